defmodule Snakepit.Telemetry.SchedulerProbe do
  @moduledoc false
  # Runs in a separate VM started with `+S 1` (see scheduler_test.exs): test
  # modules are compiled in memory on the test node only, so the code that
  # runs there lives here.

  @prefix "SNAKEPIT_TELEMETRY_EVENT "

  @doc """
  Runs `fun` `rounds` times in a fresh process while this process is the
  VM's `long_schedule` monitor (threshold `ms`). Returns the results and the
  reports that name the working process: it holds a normal scheduler for
  `ms` or more exactly when there is one.
  """
  def watch({m, f, a}, rounds, ms \\ 1) do
    me = self()
    previous = :erlang.system_monitor(me, [{:long_schedule, ms}])

    {worker, ref} =
      spawn_monitor(fn ->
        results = for _ <- 1..rounds, do: summary(apply(m, f, a))
        send(me, {:results, self(), results})
      end)

    results =
      receive do
        {:results, ^worker, results} -> results
      end

    receive do
      {:DOWN, ^ref, :process, ^worker, _} -> :ok
    end

    restore(previous)
    %{results: results, reports: reports(worker, [])}
  end

  # Large results (the control's tuples) are not worth copying back.
  defp summary(result) when is_tuple(result) and tuple_size(result) > 16, do: :large
  defp summary(result), do: result

  @doc "`watch/3` of decoding a line of `kind` and `size`, built here."
  def watch_decode(kind, size, options, rounds) do
    line = line(kind, size)

    Map.put(
      watch({Snakepit.Telemetry.Native, :decode_json_line, [line, options]}, rounds),
      :size,
      byte_size(line)
    )
  end

  @doc """
  Every other NIF whose cost depends on its input, with the largest input a
  caller could pass (4 MiB of text or 100 000 patterns), then the ones of
  fixed cost. Returns their results.
  """
  def watch_other_nifs(options, rounds) do
    huge = String.duplicate("a", 4 * 1024 * 1024)
    patterns = for i <- 1..100_000, do: "python.call.pattern_number_#{i}.*"
    name = List.duplicate(:a, 100_000)
    watch({__MODULE__, :other_nifs, [options, huge, patterns, name]}, rounds)
  end

  @doc false
  # Everything is built beforehand: the watched process only calls NIFs.
  def other_nifs(options, huge, patterns, name) do
    alias Snakepit.Telemetry.Native
    {:ok, handle} = Native.stream_open(self(), 1, "127.0.0.1:1", options)

    # Each result is summarised at once, so the process's heap stays small
    # (a garbage collection of a large heap would hold the scheduler too).
    calls = [
      fn -> Native.stream_open(self(), 2, huge, options) end,
      fn -> Native.stream_filter(handle, patterns, patterns) end,
      fn -> Native.stream_sampling(handle, 0.5, patterns) end,
      fn -> Native.stream_close(handle) end,
      fn -> Native.register_custom_event(huge, [:a]) end,
      fn -> Native.register_custom_event("probe.event", name) end,
      fn -> Native.custom_events() end,
      fn -> Native.catalog_events() end,
      fn -> Native.catalog_metadata_keys() end,
      fn -> Native.json_stats() end,
      fn -> Native.runtime_info() end
    ]

    for call <- calls, do: summarise(call.())
  end

  defp summarise({:error, {reason, _text}}), do: {:error, reason}
  defp summarise({:ok, _}), do: :ok
  # A control on a stream whose connection failed already.
  defp summarise({:error, :closed}), do: :ok
  defp summarise(other) when is_list(other) or is_map(other), do: :data
  defp summarise(other), do: other

  defp restore(:undefined), do: :erlang.system_monitor(:undefined)
  defp restore({pid, options}), do: :erlang.system_monitor(pid, options)

  # Reports arrive before the DOWN message that follows them; collect what
  # is already in the mailbox.
  defp reports(worker, acc) do
    receive do
      {:monitor, ^worker, :long_schedule, info} -> reports(worker, [info | acc])
      {:monitor, _other, :long_schedule, _info} -> reports(worker, acc)
    after
      0 -> Enum.reverse(acc)
    end
  end

  @doc """
  A telemetry line of exactly `size` bytes (prefix included) of one kind:

    * `:metadata` - one event with thousands of metadata entries, each a
      120-byte value;
    * `:measurements` - thousands of float measurements;
    * `:invalid_utf8` - a `:metadata` line with one byte made invalid near
      its end;
    * `:truncated` - a `:metadata` line cut short (invalid JSON).
  """
  def line(:metadata, size),
    do: fill(size, "metadata", &~s("key_#{&1}":"#{String.duplicate("v", 120)}"))

  def line(:measurements, size),
    do: fill(size, "measurements", &~s("m_#{&1}":1.2345678e-#{rem(&1, 300)}))

  def line(:invalid_utf8, size) do
    line = line(:metadata, size)
    at = size - 100
    <<head::binary-size(at), _, rest::binary>> = line
    <<head::binary, 0xFF, rest::binary>>
  end

  def line(:truncated, size), do: binary_part(line(:metadata, size + 2), 0, size)

  defp fill(size, field, entry) do
    head = @prefix <> ~s({"event_parts":["python","call","stop"],"#{field}":{)
    tail = "}}"
    # The last entry pads the line to exactly `size` bytes.
    pad = ~s("pad":"")
    budget = size - byte_size(head) - byte_size(tail) - byte_size(pad)
    {entries, used} = take_entries(entry, budget, 0, [], 0)
    padding = String.duplicate("p", budget - used)
    IO.iodata_to_binary([head, Enum.reverse(entries), ~s("pad":"#{padding}"), tail])
  end

  defp take_entries(entry, budget, i, acc, used) do
    next = entry.(i) <> ","

    if used + byte_size(next) > budget - 64,
      do: {acc, used},
      else: take_entries(entry, budget, i + 1, [next | acc], used + byte_size(next))
  end
end
