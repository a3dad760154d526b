defmodule Snakepit.Telemetry.LifecycleTest do
  # Kills and restarts real Python workers; compares VM-wide stream counts.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{Config, GrpcStream, Native, PythonWorker}

  @stop [:snakepit, :python, :call, :stop]
  @result [:snakepit, :python, :tool, :result_size]
  @lost [:snakepit, :grpc, :connection, :lost]
  @closed [:snakepit, :grpc, :stream, :closed]
  @reconnected [:snakepit, :grpc, :connection, :reconnected]
  @established [:snakepit, :grpc, :connection, :established]

  setup do
    Application.put_env(:snakepit_telemetry, :stream, backoff_initial_ms: 20, backoff_max_ms: 200)
    on_exit(fn -> Application.delete_env(:snakepit_telemetry, :stream) end)

    # The private socket directory (0700) every worker on this host should use.
    "unix:" <> path = address = Config.socket_path("life-#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm(path) end)
    %{address: address}
  end

  # A worker the test can kill: not restarted by the test supervisor.
  defp start_killable!(address, args \\ []) do
    {:ok, pid} = PythonWorker.start_link(listen: address, args: args)
    Process.unlink(pid)
    on_exit(fn -> if Process.alive?(pid), do: PythonWorker.stop(pid) end)
    pid
  end

  defp settle_streams do
    # Streams of earlier tests end asynchronously after their unregister.
    await(fn -> Native.runtime_info().live_streams == length(GrpcStream.list_streams()) end)
  end

  test "registering before the worker listens connects once it is up", %{address: address} do
    worker_id = "early-#{System.unique_integer([:positive])}"
    opened = [:snakepit, :grpc, :stream, :opened]
    message = [:snakepit, :grpc, :stream, :message]
    forward_events([@established, @stop, opened, message])
    :ok = GrpcStream.register_worker(worker_id: worker_id, pool_name: :p, address: address)
    on_exit(fn -> GrpcStream.unregister_worker(worker_id) end)
    Process.sleep(300)
    assert stream(worker_id).status == :connecting

    worker = start_killable!(address)

    assert_receive {:event, @established, _, %{worker_id: ^worker_id, protocol: :batches}},
                   10_000

    assert_receive {:event, ^opened, %{system_time: _},
                    %{worker_id: ^worker_id, address: ^address, protocol: :batches}},
                   5_000

    command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})
    assert_receive {:event, @stop, _, %{worker_id: ^worker_id}}, 5_000
    assert_receive {:event, ^message, %{events: n}, %{worker_id: ^worker_id}} when n >= 1, 5_000
  end

  test "kill -9 mid-stream, restart on the same address: reconnects and re-applies control",
       %{address: address} do
    worker = start_killable!(address)
    worker_id = register!(worker, address: address)
    forward_events([@stop, @result, @lost, @closed, @reconnected])

    # Desired state: tool events denied.
    assert GrpcStream.update_filter(worker_id, deny: ["tool.*"]) == :ok
    command!(worker, %{cmd: "flood", event: "python.call.stop", count: 2_000})
    kill9!(worker)

    assert_receive {:event, @lost, %{system_time: _}, %{worker_id: ^worker_id, reason: _}}, 5_000
    assert_receive {:event, @closed, %{duration: d}, %{worker_id: ^worker_id}}, 5_000
    assert d >= 0
    assert stream(worker_id).status in [:backing_off, :connecting]

    worker = start_killable!(address)
    assert_receive {:event, @reconnected, %{attempts: attempts}, %{worker_id: ^worker_id}}, 10_000
    assert attempts >= 1
    await(fn -> stream(worker_id).status == :open end)
    assert stream(worker_id).reconnects == 1

    # The new Python process has the filter again.
    await(fn -> command!(worker, %{cmd: "stats"})["control"]["deny"] == ["tool.*"] end)
    flush_events()
    command!(worker, %{cmd: "emit", event: "tool.result_size", measurements: %{bytes: 1}})
    command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})
    assert_receive {:event, @stop, _, %{worker_id: ^worker_id}}, 5_000
    refute_received {:event, @result, _, _}
    assert Process.whereis(GrpcStream) != nil
  end

  test "the protocol is negotiated again on every reconnect", %{address: address} do
    worker = start_killable!(address, ["--wire", "single"])
    worker_id = register!(worker, address: address)
    forward_events([@stop, @reconnected])
    assert stream(worker_id).protocol == :events
    assert stream(worker_id).stats.fallbacks == 1

    # Upgraded: the next connection uses batches.
    kill9!(worker)
    worker = start_killable!(address, ["--wire", "batches"])

    assert_receive {:event, @reconnected, _, %{worker_id: ^worker_id, protocol: :batches}},
                   10_000

    await(fn -> stream(worker_id).status == :open end)
    assert stream(worker_id).protocol == :batches
    command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})
    assert_receive {:event, @stop, _, %{worker_id: ^worker_id}}, 5_000

    # Downgraded again: back to one event per message.
    kill9!(worker)
    worker = start_killable!(address, ["--wire", "single"])

    assert_receive {:event, @reconnected, _, %{worker_id: ^worker_id, protocol: :events}},
                   10_000

    await(fn -> stream(worker_id).status == :open end)
    assert stream(worker_id).protocol == :events
    # Counters are summed over the worker's streams.
    assert stream(worker_id).stats.fallbacks == 2
    command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})
    assert_receive {:event, @stop, _, %{worker_id: ^worker_id}}, 5_000
  end

  test "50 kill/restart cycles leave exactly one live stream per registered worker",
       %{address: address} do
    settle_streams()
    baseline = Native.runtime_info().live_streams
    worker = start_killable!(address)
    worker_id = register!(worker, address: address)
    grpc_stream = Process.whereis(GrpcStream)

    Enum.reduce(1..50, worker, fn _, worker ->
      kill9!(worker)
      worker = start_killable!(address)
      await(fn -> stream(worker_id).status == :open end)
      worker
    end)

    assert stream(worker_id).reconnects == 50
    await(fn -> Native.runtime_info().live_streams == baseline + 1 end)
    assert Process.whereis(GrpcStream) == grpc_stream
  end

  test "unregister during backoff stops reconnecting", %{address: address} do
    settle_streams()
    baseline = Native.runtime_info().live_streams
    worker = start_killable!(address)
    worker_id = register!(worker, address: address)
    kill9!(worker)
    await(fn -> stream(worker_id).status == :backing_off end)
    assert GrpcStream.unregister_worker(worker_id) == :ok

    start_killable!(address)
    Process.sleep(500)
    assert stream(worker_id) == nil
    await(fn -> Native.runtime_info().live_streams == baseline end)
  end

  test "a GrpcStream crash loses no registration and leaks no stream", %{address: address} do
    settle_streams()
    baseline = Native.runtime_info().live_streams
    worker = start_killable!(address)
    worker_id = register!(worker, address: address)
    assert GrpcStream.update_sampling(worker_id, 0.25, ["python.*"]) == :ok

    old = Process.whereis(GrpcStream)
    ref = Process.monitor(old)
    Process.exit(old, :kill)
    assert_receive {:DOWN, ^ref, :process, _, :killed}
    await(fn -> Process.whereis(GrpcStream) not in [nil, old] end)

    await(fn -> match?(%{status: :open}, stream(worker_id)) end)
    assert stream(worker_id).control.rules == [%{patterns: ["python.*"], rate: 0.25}]
    # The old stream's handle died with the old process: its task ended.
    :erlang.garbage_collect()
    await(fn -> Native.runtime_info().live_streams == baseline + 1 end)

    forward_events([@stop])
    await(fn -> command!(worker, %{cmd: "stats"})["control"]["rules"] != [] end)
    assert GrpcStream.update_sampling(worker_id, 1.0, ["python.*"]) == :ok
    await(fn -> hd(command!(worker, %{cmd: "stats"})["control"]["rules"])["rate"] == 1.0 end)
    command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})
    assert_receive {:event, @stop, _, %{worker_id: ^worker_id}}, 5_000
  end

  defp flush_events do
    receive do
      {:event, _, _, _} -> flush_events()
    after
      0 -> :ok
    end
  end
end
