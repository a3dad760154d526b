# Run by test/snakepit/telemetry/install_test.exs with `mix run`, inside a
# throwaway host project that depends on snakepit_telemetry by `path:`. It
# does what a host app does: starts a Python worker with the dependency's
# Python package on its PYTHONPATH and Config.worker_env/1, attaches a
# handler, registers the worker, and prints the event the handler receives.
#
#   mix run host_run.exs PYTHON COMMAND_WORKER
#
# Every wait ends on a condition or a deadline; on failure it prints
# `HOST_FAIL reason` and exits 1, so the test never waits on a hung host.

defmodule HostRun do
  @deadline_ms 120_000
  @event [:snakepit, :python, :tool, :result_size]
  @ready "SNAKEPIT_TELEMETRY_READY "

  alias Snakepit.Telemetry.{Config, GrpcStream, Native}

  def main([python, command_worker]) do
    deadline = System.monotonic_time(:millisecond) + @deadline_ms

    IO.puts("HOST_INFO nif_path=#{Native.nif_path()}.so")
    IO.puts("HOST_INFO nif_status=#{inspect(Native.status())}")
    # The dependency is built as :prod: the dev/test support is not in it.
    IO.puts("HOST_INFO support=#{Code.ensure_loaded?(Snakepit.Telemetry.PythonWorker)}")

    python_path = Path.join(:code.priv_dir(:snakepit_telemetry), "python")
    # The documented setup: a secret per worker and a private unix socket.
    secret = Snakepit.Telemetry.Secret.new()
    worker_id = "host-worker-1"
    listen = Config.socket_path(worker_id)
    env = [{"PYTHONPATH", python_path} | Config.worker_env(:host_pool, secret: secret)]

    port =
      Port.open({:spawn_executable, python}, [
        :binary,
        :exit_status,
        {:line, 65_536},
        args: ["-u", command_worker, "--listen", listen],
        env: for({k, v} <- env, do: {String.to_charlist(k), String.to_charlist(v)})
      ])

    address = await_ready(port, deadline)

    :ok = :telemetry.attach("host-app-handler", @event, &__MODULE__.handle/4, self())

    :ok =
      GrpcStream.register_worker(
        worker_id: worker_id,
        pool_name: :host_pool,
        address: address,
        secret: secret
      )

    await_open(worker_id, deadline)

    command =
      ~s({"cmd": "emit", "event": "tool.result_size", "measurements": {"bytes": 42}, ) <>
        ~s("metadata": {"tool": "host-check"}}\n)

    Port.command(port, command)

    receive do
      {:host_event, event, measurements, metadata} ->
        IO.puts(
          "HOST_EVENT #{inspect(event)} worker_id=#{metadata.worker_id} " <>
            "pool_name=#{inspect(metadata.pool_name)} tool=#{metadata.tool} " <>
            "bytes=#{measurements.bytes}"
        )

      {^port, {:exit_status, status}} ->
        fail("the Python worker exited (#{status})")
    after
      remaining(deadline) -> fail("no event within #{@deadline_ms} ms")
    end

    :ok = GrpcStream.unregister_worker(worker_id)
    # The worker exits when its stdin closes.
    Port.close(port)
  end

  def handle(event, measurements, metadata, pid) do
    send(pid, {:host_event, event, measurements, metadata})
  end

  defp await_ready(port, deadline) do
    receive do
      {^port, {:data, {:eol, @ready <> address}}} -> address
      {^port, {:data, _other}} -> await_ready(port, deadline)
      {^port, {:exit_status, status}} -> fail("the Python worker exited (#{status})")
    after
      remaining(deadline) -> fail("the Python worker did not listen")
    end
  end

  defp await_open(worker_id, deadline) do
    case Enum.find(GrpcStream.list_streams(), &(&1.worker_id == worker_id)) do
      %{status: :open} ->
        :ok

      other ->
        if remaining(deadline) == 0 do
          fail("the stream did not open: #{inspect(other)}")
        else
          Process.sleep(20)
          await_open(worker_id, deadline)
        end
    end
  end

  defp remaining(deadline), do: max(deadline - System.monotonic_time(:millisecond), 0)

  defp fail(message) do
    IO.puts("HOST_FAIL #{message}")
    System.halt(1)
  end
end

HostRun.main(System.argv())
