# The main job: start a real Python worker, stream its telemetry into Elixir
# through the NIF and print every :telemetry event as it arrives.
#
#   script/demo [--calls N] [--interval-ms MS] [--listen ADDR]
#
# Run with `mix run demo/demo.exs` (script/demo sets everything up first).

alias Snakepit.Telemetry.{Config, GrpcStream, Naming, PythonWorker, Secret}

{opts, _, _} =
  OptionParser.parse(System.argv(),
    strict: [calls: :integer, interval_ms: :integer, listen: :string]
  )

calls = Keyword.get(opts, :calls, 12)
interval_ms = Keyword.get(opts, :interval_ms, 40)
# Default: a unix socket in a private (0700) directory; TCP with --listen HOST:PORT.
listen = Keyword.get_lazy(opts, :listen, fn -> Config.socket_path("demo_worker_1") end)
# Where the worker's telemetry is served when the Python package runs its
# native implementation (a Rust gRPC server inside the worker, beside its own
# grpcio server): another private socket, or any free port with --listen.
telemetry_address =
  if String.starts_with?(listen, "unix:"),
    do: Config.socket_path("demo_worker_1_telemetry"),
    else: "127.0.0.1:0"

# Only this VM may open the worker's telemetry call (see Snakepit.Telemetry.Secret).
secret = Secret.new()

defmodule Demo do
  def print(event, measurements, metadata, %{parent: parent, t0: t0}) do
    ms = System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond) / 1000

    measured =
      Enum.map_join(measurements, " ", fn
        {:duration, d} ->
          "duration=#{Float.round(System.convert_time_unit(d, :native, :microsecond) / 1000, 3)}ms"

        {k, v} ->
          "#{k}=#{v}"
      end)

    meta =
      metadata
      |> Map.take([:command, :tool, :error_type, :correlation_id, :worker_id, :node])
      |> Enum.map_join(" ", fn {k, v} -> "#{k}=#{v}" end)

    IO.puts(
      String.pad_leading("+#{:erlang.float_to_binary(ms, decimals: 1)}ms", 10) <>
        "  " <> String.pad_trailing(inspect(event), 50) <> " " <> measured <> "  " <> meta
    )

    send(parent, {:demo_event, event})
  end

  def await(fun, deadline) do
    cond do
      fun.() ->
        :ok

      System.monotonic_time(:millisecond) > deadline ->
        :timeout

      true ->
        Process.sleep(20)
        await(fun, deadline)
    end
  end

  def collect(counts, done?, deadline) do
    if done?.(counts) do
      {:ok, counts}
    else
      receive do
        {:demo_event, event} -> collect(Map.update(counts, event, 1, &(&1 + 1)), done?, deadline)
      after
        max(deadline - System.monotonic_time(:millisecond), 0) -> {:timeout, counts}
      end
    end
  end
end

{:ok, worker} =
  PythonWorker.start_link(
    listen: listen,
    env: Config.worker_env(:demo_pool, secret: secret, telemetry_address: telemetry_address)
  )

# The address the worker announced: its Rust server's (native implementation)
# or its grpcio server's (pure-Python implementation).
address = PythonWorker.address(worker)
{:ok, info} = PythonWorker.info(worker)

IO.puts(
  "Python worker (os pid #{PythonWorker.os_pid(worker)}, #{info["implementation"]} implementation) " <>
    "serves telemetry on #{address} (#{info["serving"]})"
)

:ok =
  :telemetry.attach_many(
    "snakepit-telemetry-demo",
    Naming.events(),
    &Demo.print/4,
    %{parent: self(), t0: System.monotonic_time()}
  )

:ok =
  GrpcStream.register_worker(
    worker_id: "demo_worker_1",
    pool_name: :demo_pool,
    address: address,
    python_pid: PythonWorker.os_pid(worker),
    secret: secret
  )

open? = fn -> match?([%{status: :open}], GrpcStream.list_streams()) end

case Demo.await(open?, System.monotonic_time(:millisecond) + 10_000) do
  :ok -> IO.puts("stream open; running #{calls} synthetic calls in Python\n")
  :timeout -> raise "telemetry stream did not open: #{inspect(GrpcStream.list_streams())}"
end

{:ok, _} =
  PythonWorker.command(worker, %{
    cmd: "workload",
    calls: calls,
    interval_ms: interval_ms,
    correlation_prefix: "demo"
  })

finished = fn counts ->
  Map.get(counts, [:snakepit, :python, :call, :stop], 0) +
    Map.get(counts, [:snakepit, :python, :call, :exception], 0) >= calls
end

{result, counts} = Demo.collect(%{}, finished, System.monotonic_time(:millisecond) + 30_000)

# Atom safety: names the catalog does not know are dropped and counted in
# Rust; none becomes an atom.
atoms_before = :erlang.system_info(:atom_count)
{:ok, _} = PythonWorker.command(worker, %{cmd: "unknown", count: 1_000})

unknown_dropped? = fn ->
  [s] = GrpcStream.list_streams()
  s.stats.dropped_unknown_event >= 1_000
end

:ok = Demo.await(unknown_dropped?, System.monotonic_time(:millisecond) + 10_000)
[stream] = GrpcStream.list_streams()

IO.puts(
  "\nPython sent 1000 events with unknown, random names: dropped in Rust and counted " <>
    "(dropped_unknown_event=#{stream.stats.dropped_unknown_event}); " <>
    "atoms created: #{:erlang.system_info(:atom_count) - atoms_before}"
)

IO.puts("\nevents received in :telemetry handlers:")

for {event, n} <- Enum.sort(counts) do
  IO.puts("  #{String.pad_trailing(inspect(event), 52)} #{n}")
end

IO.puts(
  "\nstream (#{stream.protocol}, Python implementation #{stream.python_implementation}): " <>
    inspect(
      Map.take(stream.stats, [
        :received,
        :delivered,
        :wire_messages,
        :batches,
        :dropped_unknown_event
      ])
    )
)

:ok = GrpcStream.unregister_worker("demo_worker_1")
:telemetry.detach("snakepit-telemetry-demo")
PythonWorker.stop(worker)

if result != :ok do
  IO.puts(:stderr, "demo: not every call was seen before the timeout")
  System.halt(1)
end

IO.puts("\ndone: #{calls} Python calls folded into :telemetry events")
