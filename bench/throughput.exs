# Throughput of the whole path, Python emit -> gRPC -> NIF -> :telemetry,
# next to baselines measured in the same run on the same worker build:
#
#   * Python emit only: the worker filling its queue with no consumer.
#   * grpcio client: a plain Python client reading the same stream, the
#     ordinary way to consume it (bench/python_consumer.py).
#
#   script/bench [--events N]

alias Snakepit.Telemetry.{GrpcStream, PythonWorker}

{opts, _, _} = OptionParser.parse(System.argv(), strict: [events: :integer])
n = Keyword.get(opts, :events, 100_000)
queue = ["--queue-size", Integer.to_string(n * 2)]
event = [:snakepit, :python, :call, :stop]

defmodule Bench do
  def count(_event, _measurements, _metadata, counter), do: :counters.add(counter, 1, 1)

  def wait(fun, deadline_ms \\ 120_000) do
    deadline = System.monotonic_time(:millisecond) + deadline_ms

    Stream.repeatedly(fn -> fun.() || (Process.sleep(1) && nil) end)
    |> Enum.find(fn result -> result || System.monotonic_time(:millisecond) > deadline end) ||
      raise "benchmark step timed out"
  end

  def rate(n, seconds), do: n / seconds
end

# 1. Python emit only.
{:ok, w} = PythonWorker.start_link(args: queue)
{:ok, %{"seconds" => emit_s}} = PythonWorker.command(w, %{cmd: "flood", count: n})
PythonWorker.stop(w)

# 2. Plain grpcio consumer.
{:ok, w} = PythonWorker.start_link(args: queue)
python = PythonWorker.default_python()
consumer = Path.join(__DIR__, "python_consumer.py")

port =
  Port.open({:spawn_executable, python}, [
    :binary,
    {:line, 4096},
    :exit_status,
    {:args, ["-u", consumer, PythonWorker.address(w), Integer.to_string(n)]},
    {:env, [{~c"PYTHONPATH", String.to_charlist(Path.expand("../priv/python", __DIR__))}]}
  ])

receive do
  {^port, {:data, {:eol, "CONSUMER_READY"}}} -> :ok
after
  10_000 -> raise "consumer did not start"
end

Bench.wait(fn ->
  match?({:ok, %{"active_stream" => true}}, PythonWorker.command(w, %{cmd: "stats"}))
end)

PythonWorker.command(w, %{cmd: "flood", count: n}, 120_000)

grpcio_s =
  receive do
    {^port, {:data, {:eol, "CONSUMER_DONE " <> rest}}} ->
      [_, seconds] = String.split(rest)
      String.to_float(seconds)
  after
    120_000 -> raise "consumer did not finish"
  end

PythonWorker.stop(w)

# 3. The NIF path into one :telemetry handler.
{:ok, w} = PythonWorker.start_link(args: queue)
counter = :counters.new(1, [:write_concurrency])
:telemetry.attach("bench-counter", event, &Bench.count/4, counter)

:ok =
  GrpcStream.register_worker(
    worker_id: "bench",
    pool_name: :bench,
    address: PythonWorker.address(w)
  )

Bench.wait(fn -> match?([%{status: :open}], GrpcStream.list_streams()) end)

t0 = System.monotonic_time()
{:ok, _} = PythonWorker.command(w, %{cmd: "flood", count: n}, 120_000)

try do
  Bench.wait(fn -> :counters.get(counter, 1) >= n end)
rescue
  e ->
    IO.inspect(
      {:counter, :counters.get(counter, 1), GrpcStream.list_streams(),
       PythonWorker.command(w, %{cmd: "stats"})}
    )

    reraise e, __STACKTRACE__
end

nif_s = System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond) / 1.0e6
[%{stats: stats}] = GrpcStream.list_streams()
GrpcStream.unregister_worker("bench")
:telemetry.detach("bench-counter")
PythonWorker.stop(w)

rows = [
  {"Python emit only (queue, no consumer)", Bench.rate(n, emit_s)},
  {"grpcio client consuming the stream (baseline)", Bench.rate(n, grpcio_s)},
  {"NIF -> GrpcStream -> :telemetry handler", Bench.rate(n, nif_s)}
]

{_, baseline} = Enum.at(rows, 1)

IO.puts(
  "\nThroughput, #{n} events from one Python worker (#{:erlang.system_info(:logical_processors)} cores)\n"
)

IO.puts("| path | events/s | vs grpcio client |")
IO.puts("|---|---:|---:|")

for {name, rate} <- rows do
  IO.puts(
    "| #{name} | #{round(rate)} | #{:erlang.float_to_binary(rate / baseline, decimals: 2)}x |"
  )
end

IO.puts(
  "\nNIF path: #{stats.batches} batches, #{Float.round(stats.delivered / max(stats.batches, 1), 1)} events/batch, drops: " <>
    inspect(
      Map.take(stats, [:dropped_buffer_full, :dropped_unknown_event, :dropped_receiver_down])
    )
)
