defmodule Snakepit.Telemetry.NativeTest do
  use ExUnit.Case, async: true

  alias Snakepit.Telemetry.Native

  @options %{
    connect_timeout_ms: 300,
    open_timeout_ms: 5_000,
    keepalive_interval_ms: 10_000,
    keepalive_timeout_ms: 5_000,
    retry_interval_ms: 50,
    max_batch: 64,
    max_pending_events: 1_024,
    max_message_bytes: 1_048_576,
    native_per_sec: 1_000_000_000,
    max_event_parts: 8,
    max_part_bytes: 64,
    max_measurements: 32,
    max_metadata: 32,
    max_key_bytes: 128,
    max_value_bytes: 4096
  }

  test "the library is loaded" do
    assert Native.status() == :ok
    assert %{live_streams: n, delivery_queue: q} = Native.runtime_info()
    assert is_integer(n) and is_integer(q)
  end

  test "a stream reports connecting, then connect_failed when nothing listens" do
    path = "unix:/nonexistent/#{System.unique_integer([:positive])}.sock"
    assert {:ok, handle} = Native.stream_open(self(), 7, path, @options)
    assert_receive {:snakepit_telemetry, 7, :connecting}, 1_000
    assert_receive {:snakepit_telemetry, 7, {:closed, {:connect_failed, reason}}}, 5_000
    assert is_binary(reason)
    assert Native.stream_stats(handle).connect_attempts >= 2
    assert Native.stream_toggle(handle, true) == {:error, :closed}
    assert Native.stream_close(handle) == :ok
  end

  test "closing a connecting stream ends it at once" do
    assert {:ok, handle} =
             Native.stream_open(self(), 8, "unix:/nonexistent/x.sock", %{
               @options
               | connect_timeout_ms: 60_000
             })

    assert_receive {:snakepit_telemetry, 8, :connecting}, 1_000
    assert Native.stream_close(handle) == :ok
    assert Native.stream_close(handle) == :ok
    assert_receive {:snakepit_telemetry, 8, {:closed, :stopped}}, 1_000
  end

  test "bad addresses and options are errors, not crashes" do
    assert {:error, {:invalid_address, text}} = Native.stream_open(self(), 1, "nowhere", @options)
    assert text =~ "nowhere"

    assert {:error, {:invalid_option, _}} =
             Native.stream_open(self(), 1, "127.0.0.1:1", %{@options | max_batch: 0})

    assert {:error, {:invalid_option, text}} =
             Native.stream_open(self(), 1, "127.0.0.1:1", %{@options | max_pending_events: 0})

    assert text =~ "max_pending_events"

    assert_raise ArgumentError, fn ->
      Native.stream_open(self(), 1, "127.0.0.1:1", Map.delete(@options, :max_pending_events))
    end

    # rustler names a field of the wrong type (as for every option).
    assert_raise ErlangError, ~r/max_pending_events/, fn ->
      Native.stream_open(self(), 1, "127.0.0.1:1", %{@options | max_pending_events: -1})
    end

    assert_raise ArgumentError, fn -> Native.stream_open(self(), 1, "127.0.0.1:1", %{}) end
  end

  test "stream_ack takes a non-negative count and a stream handle" do
    {:ok, handle} = Native.stream_open(self(), 10, "unix:/nonexistent/z.sock", @options)
    # More than is pending is harmless: the count never goes below zero.
    assert Native.stream_ack(handle, 0) == :ok
    assert Native.stream_ack(handle, 5) == :ok
    assert_raise ArgumentError, fn -> Native.stream_ack(handle, -1) end
    assert_raise ArgumentError, fn -> Native.stream_ack(handle, "1") end
    assert_raise ArgumentError, fn -> Native.stream_ack(make_ref(), 1) end
    Native.stream_close(handle)
    # Acknowledging on a closed stream is harmless too.
    assert Native.stream_ack(handle, 1) == :ok
  end

  test "a sampling rate outside 0..1 is refused" do
    {:ok, handle} = Native.stream_open(self(), 9, "unix:/nonexistent/y.sock", @options)
    assert Native.stream_sampling(handle, 1.5, []) == {:error, :invalid_option}
    assert Native.stream_sampling(handle, 0.5, ["python.*"]) == :ok
    Native.stream_close(handle)
  end

  test "a missing library gives an error that names the fix" do
    ebins = Enum.map([:snakepit_telemetry, :telemetry], &to_string(:code.lib_dir(&1, :ebin)))

    {output, _status} =
      System.cmd(
        "elixir",
        Enum.flat_map(ebins, &["-pa", &1]) ++
          ["-e", "IO.inspect(Application.ensure_all_started(:snakepit_telemetry))"],
        env: [{"SNAKEPIT_TELEMETRY_NIF_PATH", "/nonexistent/snakepit_telemetry_nif"}],
        stderr_to_stdout: true
      )

    assert output =~ "could not be loaded from /nonexistent/snakepit_telemetry_nif.so"
    assert output =~ "mix compile"
    assert output =~ "{:error,"
  end
end
