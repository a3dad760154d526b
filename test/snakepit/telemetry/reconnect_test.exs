defmodule Snakepit.Telemetry.ReconnectTest do
  # A worker that accepts each telemetry call and ends it at once: the
  # reconnect backoff must keep growing (it resets only after a stream stayed
  # open healthy_after_ms), and the "lost" warning is rate-limited.
  use Snakepit.Telemetry.Case, async: false

  import ExUnit.CaptureLog

  alias Snakepit.Telemetry.{EndingWorker, GrpcStream}

  @opened [:snakepit, :grpc, :stream, :opened]
  @lost [:snakepit, :grpc, :connection, :lost]
  @reconnected [:snakepit, :grpc, :connection, :reconnected]

  @moduletag timeout: 120_000

  setup context do
    Application.put_env(:snakepit_telemetry, :stream,
      backoff_initial_ms: 20,
      backoff_max_ms: 60_000,
      healthy_after_ms: context[:healthy_after_ms] || 10_000
    )

    on_exit(fn -> Application.delete_env(:snakepit_telemetry, :stream) end)
    forward_events([@opened, @lost, @reconnected])
    :ok
  end

  defp register_storm!(address) do
    worker_id = "storm-#{System.unique_integer([:positive])}"
    :ok = GrpcStream.register_worker(worker_id: worker_id, pool_name: :storm, address: address)
    on_exit(fn -> GrpcStream.unregister_worker(worker_id) end)
    worker_id
  end

  # The `attempts` measurement of the next `n` reconnections of `worker_id`.
  defp reconnect_attempts(worker_id, n) do
    for _ <- 1..n do
      assert_receive {:event, @reconnected, %{attempts: attempts}, %{worker_id: ^worker_id}},
                     30_000

      attempts
    end
  end

  defp count(event, worker_id, acc \\ 0) do
    receive do
      {:event, ^event, _, %{worker_id: ^worker_id}} -> count(event, worker_id, acc + 1)
    after
      0 -> acc
    end
  end

  test "calls ended at once: the backoff keeps doubling and one warning is logged" do
    {_port, address} = EndingWorker.start!()
    pid = Process.whereis(GrpcStream)

    log =
      capture_log(fn ->
        worker_id = register_storm!(address)
        # Reconnection k waited backoff_initial_ms * 2^(attempts - 1): with
        # attempts 1..8 the delays were 20, 40, ..., 2560 ms. Were the
        # backoff reset on each open, every reconnection would have
        # attempts == 1 and come 20 ms after the previous loss.
        assert reconnect_attempts(worker_id, 8) == Enum.to_list(1..8)
        assert GrpcStream.unregister_worker(worker_id) == :ok

        # One open per attempt (plus the first one), each lost at once.
        assert count(@opened, worker_id) == 9
        assert count(@lost, worker_id) in 8..9
        send(self(), {:worker_id, worker_id})
      end)

    assert_received {:worker_id, worker_id}
    warnings = Regex.scan(~r/telemetry stream of worker #{worker_id} lost/, log)
    assert length(warnings) == 1, log
    assert log =~ ":end_of_stream"
    assert Process.whereis(GrpcStream) == pid
  end

  @tag healthy_after_ms: 100
  test "a stream that stayed open healthy_after_ms starts the backoff again" do
    # Each call stays open a second, far longer than healthy_after_ms.
    {_port, address} = EndingWorker.start!(["--hold-ms", "1000"])
    worker_id = register_storm!(address)
    assert reconnect_attempts(worker_id, 3) == [1, 1, 1]
  end
end
