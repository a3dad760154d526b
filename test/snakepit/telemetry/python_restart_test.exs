defmodule Snakepit.Telemetry.PythonRestartTest do
  # Python's counters start at 0 in each process: after a worker restart,
  # the drops of the new process are reported from 0, not after they pass
  # the old process's totals, and nothing is reported twice.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{Config, GrpcStream, PythonWorker}

  @dropped [:snakepit, :telemetry, :events, :dropped]
  @stats [:snakepit, :telemetry, :python, :stats]
  @reconnected [:snakepit, :grpc, :connection, :reconnected]

  @moduletag timeout: 60_000

  setup do
    Application.put_env(:snakepit_telemetry, :stream,
      backoff_initial_ms: 20,
      backoff_max_ms: 200,
      health_interval_ms: 100
    )

    on_exit(fn -> Application.delete_env(:snakepit_telemetry, :stream) end)
    :ok
  end

  defp socket_path do
    "unix:" <> path = Config.socket_path("pyre-#{System.unique_integer([:positive])}")

    on_exit(fn -> File.rm(path) end)
    path
  end

  # A worker with a 10-event queue and frequent stats reports, not restarted
  # by the test supervisor (the test kills it).
  defp start_killable!(path) do
    {:ok, pid} =
      PythonWorker.start_link(
        listen: "unix:" <> path,
        args: ["--queue-size", "10"],
        env: [{"SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", "50"}]
      )

    Process.unlink(pid)
    on_exit(fn -> if Process.alive?(pid), do: PythonWorker.stop(pid) end)
    pid
  end

  # Emits `count` events while nothing reads the queue: count - 10 are dropped.
  defp overflow!(worker, count) do
    command!(worker, %{cmd: "emit", event: "python.call.stop", count: count})
    stats = command!(worker, %{cmd: "stats"})
    assert stats["dropped_queue_full"] == count - 10
  end

  # Sums the reported queue-full drops of `worker_id` until `want` is
  # reached or the deadline passes.
  defp reported(worker_id, want, acc \\ 0, timeout \\ 15_000) do
    receive do
      {:event, @dropped, %{count: n},
       %{worker_id: ^worker_id, reason: :dropped_queue_full, hop: :python}} ->
        if acc + n >= want, do: acc + n, else: reported(worker_id, want, acc + n, timeout)
    after
      timeout -> acc
    end
  end

  test "drops of a restarted worker are reported exactly, from its own zero" do
    path = socket_path()
    worker = start_killable!(path)
    overflow!(worker, 100)
    forward_events([@dropped, @stats, @reconnected])
    worker_id = register!(worker, address: "unix:" <> path)
    assert reported(worker_id, 90) == 90

    assert_receive {:event, @stats, _, %{worker_id: ^worker_id, instance_id: first_instance}},
                   5_000

    kill9!(worker)
    await(fn -> stream(worker_id).status != :open end)

    # The new process overflows before any stream reads it: it listens on
    # another path until then, and takes the registered address by rename.
    other = socket_path()
    worker = start_killable!(other)
    overflow!(worker, 30)
    File.rename!(other, path)
    assert_receive {:event, @reconnected, _, %{worker_id: ^worker_id}}, 10_000

    # Exactly the new process's 20 drops, and no more afterwards (reports
    # run every 100 ms).
    assert reported(worker_id, 20) == 20
    assert reported(worker_id, 1, 0, 1_000) == 0

    assert_receive {:event, @stats, %{dropped_queue_full: 20},
                    %{worker_id: ^worker_id, instance_id: second_instance}},
                   5_000

    assert second_instance != first_instance
    # The worker's Python figures add up both processes.
    python = stream(worker_id).python
    assert python.dropped_queue_full == 110
    assert python.emitted == 130
  end

  test "Python counters that go backwards (no instance id) are a new process" do
    worker = start_worker!(env: [{"SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", "0"}])
    worker_id = register!(worker)
    forward_events([@dropped])
    %{stream_id: stream_id} = :sys.get_state(GrpcStream).workers[worker_id]
    delivery = stream(worker_id).delivery

    # Reports as an older Python without instance ids would send them, from
    # a process restarted between the second and the first.
    for dropped <- [50, 10, 15] do
      report = %{emitted: dropped, dropped_queue_full: dropped, queue_len: 0}
      send(delivery, {:snakepit_telemetry_events, stream_id, [{@stats, report, %{}}]})
    end

    assert reported(worker_id, 65) == 65
    assert reported(worker_id, 1, 0, 500) == 0
    assert stream(worker_id).python.dropped_queue_full == 65
  end
end
