defmodule Snakepit.Telemetry.AuthTest do
  # Only the holder of a worker's secret may read or steer its telemetry
  # (issue 17): real command workers on private unix sockets, and a Python
  # intruder (test/support/python/intruder.py) on the same host.
  use Snakepit.Telemetry.Case, async: false

  import ExUnit.CaptureLog

  alias Snakepit.Telemetry.{Config, GrpcStream, PythonWorker, Registrations, Secret}

  @intruder Path.expand("../../support/python/intruder.py", __DIR__)
  @old_worker Path.expand("../../support/python/old_worker.py", __DIR__)
  @stop [:snakepit, :python, :call, :stop]
  @stats [:snakepit, :telemetry, :python, :stats]

  defp secured_worker!(extra_env \\ []) do
    secret = Secret.new()
    "unix:" <> path = address = Config.socket_path("auth-#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm(path) end)

    worker =
      start_worker!(listen: address, env: Config.worker_env(nil, secret: secret) ++ extra_env)

    {worker, secret, address}
  end

  defp intrude(address, mode, rpc, env \\ []) do
    python_path = Path.join(:code.priv_dir(:snakepit_telemetry), "python")

    {out, 0} =
      System.cmd(PythonWorker.default_python(), [@intruder, address, mode, rpc],
        env: [{"PYTHONPATH", python_path} | env],
        stderr_to_stdout: true
      )

    out |> String.split("\n", trim: true) |> List.last()
  end

  defp emit!(worker, count) do
    command!(worker, %{
      cmd: "emit",
      event: "python.call.stop",
      measurements: %{duration: 1},
      count: count
    })
  end

  # Emits 50 events at a time until told to stop; returns how many.
  defp emit_until_stopped(worker, sent) do
    receive do
      :stop -> sent
    after
      0 ->
        emit!(worker, 50)
        # Within the queue bound: every event must arrive, none shed.
        assert %{"drained" => true} = command!(worker, %{cmd: "wait_drained", timeout_ms: 10_000})
        emit_until_stopped(worker, sent + 50)
    end
  end

  defp receive_stops(0), do: :ok

  defp receive_stops(n) do
    assert_receive {:event, @stop, _, _}, 10_000
    receive_stops(n - 1)
  end

  test "intruders without the secret or with a wrong one are refused; the owner streams on" do
    {worker, secret, address} = secured_worker!()
    forward_events([@stop])
    worker_id = register!(worker, address: address, secret: secret)
    assert stream(worker_id).authenticated

    emit!(worker, 10)
    receive_stops(10)

    # Intruders on both RPCs, while the owner's worker keeps emitting.
    emitter = Task.async(fn -> emit_until_stopped(worker, 0) end)

    results =
      for mode <- ["none", "wrong"], rpc <- ["batches", "events"] do
        {mode, rpc, intrude(address, mode, rpc)}
      end

    send(emitter.pid, :stop)
    emitted = Task.await(emitter, 30_000)

    for {mode, rpc, result} <- results do
      assert result == "UNAUTHENTICATED 0", "#{mode} #{rpc}: #{result}"
    end

    # Every event of the owner arrived: its call was never replaced,
    # toggled off or reconnected.
    assert emitted >= 50
    receive_stops(emitted)
    emit!(worker, 10)
    receive_stops(10)

    info = stream(worker_id)
    assert info.status == :open and info.reconnects == 0
    assert info.control.enabled

    python = command!(worker, %{cmd: "stats"})
    assert python["refused_calls"] == 4
    assert python["streams_opened"] == 1
    assert python["control"]["enabled"] == true

    # The refusals reach Elixir with Python's counters.
    await(fn -> stream(worker_id).python[:refused_calls] == 4 end)
  end

  test "an intruder that knows the secret could take over: the secret is the key" do
    {worker, secret, address} = secured_worker!()
    worker_id = register!(worker, address: address, secret: secret)

    assert intrude(address, "env", "batches", [{"INTRUDER_SECRET", Secret.expose(secret)}]) =~
             ~r/^(OK|DEADLINE_EXCEEDED) /

    # The owner's stream was replaced and comes back.
    await(fn -> command!(worker, %{cmd: "stats"})["streams_opened"] >= 2 end)
    await(fn -> stream(worker_id).status == :open end)
  end

  test "the worker's socket is private: directory 0700, socket 0600" do
    {_worker, _secret, "unix:" <> path} = secured_worker!()
    {:ok, dir} = Config.socket_dir()
    assert Path.dirname(path) == dir
    assert {:ok, %File.Stat{mode: dir_mode, type: :directory}} = File.lstat(dir)
    assert Bitwise.band(dir_mode, 0o777) == 0o700
    assert {:ok, %File.Stat{mode: sock_mode, type: :other}} = File.lstat(path)
    assert Bitwise.band(sock_mode, 0o777) == 0o600
  end

  test "socket_path/1 hashes ids that are not plain and stays in the private directory" do
    {:ok, dir} = Config.socket_dir()
    assert Config.socket_path("w_1") == "unix:" <> Path.join(dir, "w_1.sock")
    "unix:" <> odd = Config.socket_path("../../etc/passwd")
    assert Path.dirname(odd) == dir and Path.basename(odd) =~ ~r/^w-[0-9a-f]{32}\.sock$/
    refute Config.socket_path("a/b") == Config.socket_path("a_b")
  end

  test "the secret never shows: logs, list_streams, state, registrations, crash reports" do
    {worker, secret, address} = secured_worker!()
    value = Secret.expose(secret)
    assert byte_size(value) == 43
    forward_events([@stop, @stats])

    log =
      capture_log(fn ->
        worker_id = register!(worker, address: address, secret: secret)
        emit!(worker, 5)
        receive_stops(5)
        assert_receive {:event, @stats, _, stats_metadata}, 10_000
        refute inspect(stats_metadata) =~ value

        assert intrude(address, "none", "batches") =~ "UNAUTHENTICATED"

        for term <- [
              GrpcStream.list_streams(),
              :sys.get_state(GrpcStream),
              :sys.get_state(stream(worker_id).delivery),
              Registrations.all(),
              secret
            ] do
          refute inspect(term, limit: :infinity, printable_limit: :infinity) =~ value
          # Erlang's own formatting too (what a crash report without Elixir's
          # translator would print).
          refute IO.iodata_to_binary(:io_lib.format(~c"~p", [term])) =~ value
        end

        # A crash of GrpcStream: its report holds the state; the restarted
        # server reopens the stream with the secret from the registrations.
        pid = Process.whereis(GrpcStream)
        ref = Process.monitor(pid)
        :sys.terminate(pid, :simulated_crash)
        assert_receive {:DOWN, ^ref, :process, _, :simulated_crash}, 5_000
        await(fn -> Process.whereis(GrpcStream) not in [nil, pid] end)
        await(fn -> match?(%{status: :open}, stream(worker_id)) end)
        emit!(worker, 3)
        receive_stops(3)
        assert stream(worker_id).authenticated
      end)

    assert log =~ "simulated_crash"
    refute log =~ value
  end

  test "a worker with a secret refuses an owner registered without it" do
    {worker, _secret, address} = secured_worker!()
    worker_id = "w-#{System.unique_integer([:positive])}"

    capture_log(fn ->
      :ok =
        GrpcStream.register_worker(
          worker_id: worker_id,
          pool_name: :test_pool,
          address: address,
          connect_timeout_ms: 300
        )

      on_exit(fn -> GrpcStream.unregister_worker(worker_id) end)
      await(fn -> match?({:failed, _}, stream(worker_id).status) end)
    end)

    assert {:failed, {:connect_failed, text}} = stream(worker_id).status
    assert text =~ ~r/unauthenticated|secret/i
    assert command!(worker, %{cmd: "stats"})["refused_calls"] >= 1
  end

  test "workers without a secret still stream, with one warning per VM" do
    :persistent_term.erase({GrpcStream, :warned_without_secret})
    forward_events([@stop])
    plain = start_worker!()
    old = start_worker!(script: @old_worker)

    log =
      capture_log(fn ->
        a = register!(plain)
        b = register!(old)
        refute stream(a).authenticated or stream(b).authenticated
        emit!(plain, 3)
        receive_stops(3)
      end)

    assert length(String.split(log, "registered without a secret")) == 2

    # Python serves a second call too, and has warned once (the command
    # worker prints the package's warnings as SNAKEPIT_TELEMETRY_LOG lines).
    capture_log(fn -> register!(plain) end)
    assert command!(plain, %{cmd: "stats"})["streams_opened"] == 2

    assert [warning] =
             Enum.filter(PythonWorker.lines(plain), &(&1 =~ "SNAKEPIT_TELEMETRY_LOG WARNING"))

    assert warning =~ "without a secret"
  end

  test "an old worker ignores the secret it is sent and streams" do
    forward_events([@stop])
    old = start_worker!(script: @old_worker)
    worker_id = register!(old, secret: Secret.new())
    assert stream(worker_id).authenticated
    emit!(old, 2)
    receive_stops(2)
  end

  test "bad secrets are refused without showing them" do
    assert {:error, {:invalid_worker_ctx, {:secret, why}}} =
             GrpcStream.register_worker(
               worker_id: "bad-secret",
               pool_name: :p,
               address: "127.0.0.1:1",
               secret: "tooshort-SECRETVALUE"
             )

    refute why =~ "SECRETVALUE"

    assert {:error, {:invalid_worker_ctx, {:secret, _}}} =
             GrpcStream.register_worker(worker_id: "x", pool_name: :p, address: "a:1", secret: 42)

    assert_raise ArgumentError, ~r/invalid telemetry secret/, fn ->
      Config.worker_env(nil, secret: "has spaces in it, so it is not a secret")
    end

    # A secret made on another node (its resource is not usable here).
    here = Atom.to_string(node())
    there = String.duplicate("x", byte_size(here))
    remote_ref = make_ref() |> :erlang.term_to_binary() |> :binary.replace(here, there)
    remote = %Secret{ref: :erlang.binary_to_term(remote_ref)}
    refute Secret.local?(remote)

    assert {:error, {:invalid_worker_ctx, {:secret, "made on another node" <> _}}} =
             GrpcStream.register_worker(
               worker_id: "remote-secret",
               pool_name: :p,
               address: "127.0.0.1:1",
               secret: remote
             )

    s = Secret.new()
    assert Secret.local?(s)
    assert {"SNAKEPIT_TELEMETRY_SECRET", Secret.expose(s)} in Config.worker_env(nil, secret: s)
    refute List.keymember?(Config.worker_env(nil), "SNAKEPIT_TELEMETRY_SECRET", 0)
    assert inspect(s) == "#Snakepit.Telemetry.Secret<redacted>"
    refute Secret.expose(Secret.new()) == Secret.expose(s)
  end
end
