defmodule Snakepit.Telemetry.DeliveryTest do
  # The NIF's delivery to its owner process: what it cannot deliver is
  # counted, with the credit of those events released.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{Config, Native, PythonWorker}

  test "events for an owner that is gone are counted as dropped_receiver_down" do
    worker = start_worker!(env: [{"SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", "0"}])
    owner = spawn(fn -> Process.sleep(:infinity) end)

    options =
      Config.stream()
      |> Map.new()
      |> Map.merge(%{
        connect_timeout_ms: 5_000,
        native_per_sec: System.convert_time_unit(1, :second, :native)
      })

    {:ok, handle} = Native.stream_open(owner, 1, PythonWorker.address(worker), options)
    on_exit(fn -> Native.stream_close(handle) end)
    # Open: the first control (toggle on) went out.
    await(fn -> Native.stream_stats(handle).controls_sent >= 1 end)
    # An exit signal is asynchronous: the owner is gone once DOWN arrives.
    ref = Process.monitor(owner)
    Process.exit(owner, :kill)
    assert_receive {:DOWN, ^ref, :process, ^owner, :killed}

    for _ <- 1..5, do: command!(worker, %{cmd: "flood", event: "python.call.stop", count: 200})
    await(fn -> Native.stream_stats(handle).dropped_receiver_down == 1_000 end)

    stats = Native.stream_stats(handle)
    assert stats.received == 1_000
    assert stats.delivered == 0
    # Undelivered events give their credit back: the stream keeps reading.
    # (max_pending_events is 8192: without that it would stop short.)
    for _ <- 1..10 do
      command!(worker, %{cmd: "flood", event: "python.call.stop", count: 1_000})
      await(fn -> command!(worker, %{cmd: "wait_drained", timeout_ms: 1_000})["drained"] end)
    end

    await(fn -> Native.stream_stats(handle).dropped_receiver_down == 11_000 end)
    assert Native.stream_stats(handle).credit_waits == 0
  end
end
