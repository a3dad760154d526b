defmodule Snakepit.Telemetry.StreamFaultsTest do
  # Faults of the stream itself: a worker that accepts connections and never
  # answers must not keep a stream :connecting (every open attempt is
  # bounded by open_timeout_ms, and connect_timeout_ms on a first open); a
  # message over max_message_bytes is counted and reported, and the stream
  # recovers; a worker behind a black hole is noticed by the keepalive.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{GrpcStream, PythonWorker}

  setup do
    Application.put_env(:snakepit_telemetry, :stream,
      backoff_initial_ms: 20,
      backoff_max_ms: 100,
      open_timeout_ms: 200
    )

    on_exit(fn -> Application.delete_env(:snakepit_telemetry, :stream) end)
    :ok
  end

  # A listener that accepts every connection and says nothing (no HTTP/2
  # settings, no response); it holds the sockets open until the test ends.
  defp silent_listener!(ip_opts) do
    parent = self()

    pid =
      spawn_link(fn ->
        {:ok, listen} = :gen_tcp.listen(0, [:binary, active: false, reuseaddr: true] ++ ip_opts)
        send(parent, {:listening, self(), listen})
        accept_forever(listen, [])
      end)

    assert_receive {:listening, ^pid, listen}, 5_000
    {pid, listen}
  end

  defp accept_forever(listen, held) do
    case :gen_tcp.accept(listen) do
      {:ok, socket} -> accept_forever(listen, [socket | held])
      {:error, _} -> Process.sleep(:infinity)
    end
  end

  test "a first open to a worker that never answers fails within connect_timeout" do
    {_pid, listen} = silent_listener!(ip: {127, 0, 0, 1})
    {:ok, port} = :inet.port(listen)
    worker_id = "silent-#{System.unique_integer([:positive])}"

    # The open timeout alone would wait a minute: the connect timeout cuts
    # the attempt.
    Application.put_env(:snakepit_telemetry, :stream, open_timeout_ms: 60_000)

    :ok =
      GrpcStream.register_worker(
        worker_id: worker_id,
        pool_name: :p,
        address: "127.0.0.1:#{port}",
        connect_timeout_ms: 300
      )

    on_exit(fn -> GrpcStream.unregister_worker(worker_id) end)

    {:failed, {:connect_failed, text}} =
      await(fn -> match?({:failed, _}, stream(worker_id).status) && stream(worker_id).status end)

    assert text =~ ~r/^open timed out after \d+ ms$/
    [ms] = Regex.run(~r/\d+/, text)
    assert String.to_integer(ms) <= 300
    assert stream(worker_id).stats.open_timeouts >= 1
  end

  test "after a lost stream, reconnects to a worker that never answers keep retrying" do
    path =
      Path.join(System.tmp_dir!(), "snakepit-silent-#{System.unique_integer([:positive])}.sock")

    on_exit(fn -> File.rm(path) end)
    address = "unix:" <> path

    {:ok, worker} = PythonWorker.start_link(listen: address)
    Process.unlink(worker)
    worker_id = register!(worker, address: address)

    # The worker dies; something else takes its socket and never answers.
    ref = Process.monitor(worker)
    {_, 0} = System.cmd("kill", ["-9", Integer.to_string(PythonWorker.os_pid(worker))])
    assert_receive {:DOWN, ^ref, :process, _, _}, 5_000
    File.rm(path)
    {silent, listen} = silent_listener!(ifaddr: {:local, path})

    # Each reconnect is one attempt bounded by open_timeout_ms, followed by
    # a backoff: the stream goes on retrying instead of hanging :connecting.
    await(fn -> stream(worker_id).stats.open_timeouts >= 3 end)
    assert stream(worker_id).status in [:connecting, :backing_off]
    assert stream(worker_id).stats.connect_attempts >= 4

    # The worker comes back: the next attempt opens.
    :gen_tcp.close(listen)
    Process.unlink(silent)
    Process.exit(silent, :kill)
    File.rm(path)
    worker = start_worker!(listen: address)
    await(fn -> stream(worker_id).status == :open end)
    command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})
    await(fn -> stream(worker_id).stats.delivered >= 1 end)
  end

  test "a message over max_message_bytes is counted, reported with its size, and the stream recovers" do
    Application.put_env(:snakepit_telemetry, :stream,
      backoff_initial_ms: 20,
      backoff_max_ms: 100,
      max_message_bytes: 2_000
    )

    stop = [:snakepit, :python, :call, :stop]
    dropped = [:snakepit, :telemetry, :events, :dropped]
    forward_events([stop, dropped])
    worker = start_worker!()
    worker_id = register!(worker)
    reconnects = stream(worker_id).reconnects

    command!(worker, %{
      cmd: "emit",
      event: "python.call.stop",
      measurements: %{duration: 1},
      metadata: %{"blob" => String.duplicate("x", 3_000)}
    })

    assert_receive {:event, ^dropped, %{count: 1, bytes: bytes},
                    %{worker_id: ^worker_id, reason: :oversized_messages, hop: :native}},
                   10_000

    assert bytes > 2_000
    stats = stream(worker_id).stats
    assert stats.oversized_messages == 1
    assert stats.oversized_bytes_max == bytes

    await(fn ->
      stream(worker_id).status == :open and stream(worker_id).reconnects > reconnects
    end)

    command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})
    assert_receive {:event, ^stop, _, %{worker_id: ^worker_id}}, 10_000
  end

  # A TCP proxy to `upstream` ("host:port") that forwards both ways until
  # `freeze/1`, then stops forwarding and holds its sockets open: a network
  # black hole. Connections made after `thaw/1` are forwarded again.
  defp proxy!(upstream) do
    [host, port] = String.split(upstream, ":")
    flag = :atomics.new(1, [])
    parent = self()

    pid =
      spawn_link(fn ->
        {:ok, listen} =
          :gen_tcp.listen(0, [:binary, active: false, reuseaddr: true, ip: {127, 0, 0, 1}])

        send(parent, {:proxy, self(), listen})
        proxy_accept(listen, String.to_charlist(host), String.to_integer(port), flag)
      end)

    assert_receive {:proxy, ^pid, listen}, 5_000
    {:ok, port} = :inet.port(listen)
    {"127.0.0.1:#{port}", flag}
  end

  defp proxy_accept(listen, host, port, flag) do
    {:ok, client} = :gen_tcp.accept(listen)
    {:ok, server} = :gen_tcp.connect(host, port, [:binary, active: false])
    pipe(client, server, flag)
    pipe(server, client, flag)
    proxy_accept(listen, host, port, flag)
  end

  defp pipe(from, to, flag) do
    pid =
      spawn_link(fn ->
        receive do
          :go -> forward(from, to, flag)
        end
      end)

    :ok = :gen_tcp.controlling_process(from, pid)
    send(pid, :go)
  end

  defp forward(from, to, flag) do
    with {:ok, data} <- :gen_tcp.recv(from, 0),
         0 <- :atomics.get(flag, 1),
         :ok <- :gen_tcp.send(to, data) do
      forward(from, to, flag)
    else
      # Frozen: hold the sockets, say nothing.
      1 -> Process.sleep(:infinity)
      _closed -> :ok
    end
  end

  defp freeze(flag), do: :atomics.put(flag, 1, 1)
  defp thaw(flag), do: :atomics.put(flag, 1, 0)

  test "a stream to a worker behind a black hole ends on its keepalive and reconnects" do
    Application.put_env(:snakepit_telemetry, :stream,
      backoff_initial_ms: 20,
      backoff_max_ms: 100,
      open_timeout_ms: 500,
      keepalive_interval_ms: 300,
      keepalive_timeout_ms: 500
    )

    lost = [:snakepit, :grpc, :connection, :lost]
    forward_events([lost])
    worker = start_worker!()
    {address, flag} = proxy!(PythonWorker.address(worker))
    worker_id = register!(worker, address: address)

    freeze(flag)

    assert_receive {:event, ^lost, _, %{worker_id: ^worker_id, reason: :keepalive_timeout}},
                   10_000

    assert stream(worker_id).stats.keepalive_timeouts == 1
    thaw(flag)
    await(fn -> stream(worker_id).status == :open and stream(worker_id).reconnects >= 1 end)
  end

  test "an idle worker whose server takes SERVER_OPTIONS keeps its stream under fast keepalive" do
    Application.put_env(:snakepit_telemetry, :stream,
      keepalive_interval_ms: 100,
      keepalive_timeout_ms: 2_000
    )

    lost = [:snakepit, :grpc, :connection, :lost]
    forward_events([lost])
    # No stats reports: nothing flows from Python, so only PINGs cross the
    # connection. grpc-core's default policy would end it after two.
    worker = start_worker!(env: [{"SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", "0"}])
    worker_id = register!(worker)
    Process.sleep(2_000)
    refute_received {:event, ^lost, _, %{worker_id: ^worker_id}}
    assert %{status: :open, reconnects: 0, stats: %{keepalive_timeouts: 0}} = stream(worker_id)
  end
end
