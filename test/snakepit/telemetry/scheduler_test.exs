defmodule Snakepit.Telemetry.SchedulerTest do
  # No NIF holds a normal scheduler for 1 ms or more, whatever its input.
  #
  # Runs in a separate VM with one normal scheduler (`+S 1`), where this VM's
  # code paths (and so priv/native) are loaded. The VM's `long_schedule`
  # monitor (threshold 1 ms) reports every process that stays on a scheduler
  # that long: a NIF decoding a 4 MiB line on the normal scheduler would be
  # reported on every call (it takes tens to hundreds of milliseconds); a
  # dirty NIF runs off the normal scheduler and is not. A control first shows
  # that the monitor does report a call that blocks the scheduler there.
  use ExUnit.Case, async: false

  alias Snakepit.Telemetry.{Config, Native, SchedulerProbe}

  @moduletag timeout: 300_000

  setup_all do
    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])
    {:ok, peer, _node} = :peer.start(%{connection: :standard_io, args: [~c"+S", ~c"1" | paths]})

    on_exit(fn ->
      try do
        :peer.stop(peer)
      catch
        :exit, _ -> :ok
      end
    end)

    options =
      Config.stream()
      |> Map.new()
      |> Map.merge(%{connect_timeout_ms: 0, native_per_sec: 1_000_000_000})

    %{peer: peer, options: options, max: options.max_message_bytes}
  end

  defp call(peer, fun, args), do: :peer.call(peer, SchedulerProbe, fun, args, 240_000)

  test "the probe VM has one normal scheduler and its monitor reports a blocking call",
       %{peer: peer} do
    assert :peer.call(peer, :erlang, :system_info, [:schedulers_online]) == 1
    # make_tuple does not yield: 5 million elements hold the scheduler for
    # several milliseconds.
    %{reports: reports} = call(peer, :watch, [{:erlang, :make_tuple, [5_000_000, :x]}, 3])
    assert reports != []
  end

  test "decoding lines of max_message_bytes never holds the normal scheduler",
       %{peer: peer, options: options, max: max} do
    assert max == 4 * 1024 * 1024

    expected = [
      metadata: &match?({:ok, {[:snakepit, :python, :call, :stop], _, _}}, &1),
      measurements: &match?({:ok, {[:snakepit, :python, :call, :stop], _, _}}, &1),
      invalid_utf8: &(&1 == {:error, :invalid_utf8}),
      truncated: &(&1 == {:error, :invalid_json})
    ]

    for {kind, ok?} <- expected do
      result = call(peer, :watch_decode, [kind, max, options, 4])
      assert result.size == max
      assert Enum.all?(result.results, ok?), "#{kind}: #{inspect(hd(result.results))}"
      assert result.reports == [], "#{kind}: #{inspect(result.reports)}"
    end

    # One byte more is refused before it is parsed.
    result = call(peer, :watch_decode, [:metadata, max + 1, options, 2])
    assert Enum.all?(result.results, &(&1 == {:error, :too_large}))
    assert result.reports == []
  end

  test "only lines up to 8 KiB are decoded on the calling scheduler", %{options: options} do
    # Their cost is bounded by measurement, not by this test (a wall-clock
    # bound on a shared machine measures the machine): 8 KiB of the worst
    # content measured (float measurements, duplicate keys) decodes in under
    # 0.1 ms. What is checked here is the routing: anything longer is left
    # to the dirty variant.
    for kind <- [:metadata, :measurements] do
      assert {:ok, _} = Native.decode_json_line_nif(SchedulerProbe.line(kind, 8 * 1024), options)

      assert Native.decode_json_line_nif(SchedulerProbe.line(kind, 8 * 1024 + 1), options) ==
               :dirty
    end

    # Other output of any length costs only the prefix check.
    assert {:error, :not_telemetry} =
             Native.decode_json_line_nif(String.duplicate("x", 100_000), options)
  end

  test "the other NIFs never hold the normal scheduler, even on huge input",
       %{peer: peer, options: options} do
    %{results: [results | _], reports: reports} = call(peer, :watch_other_nifs, [options, 3])

    assert [
             {:error, :invalid_address},
             :ok,
             :ok,
             :ok,
             :ok,
             :ok,
             :data,
             :data,
             :data,
             :data,
             :data
           ] == results

    assert reports == []
  end
end
