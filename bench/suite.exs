# The benchmark suite: one table, every row next to a baseline measured in
# the same run, with the ratio and the target.
#
#   script/bench [--quick] [--tcp]
#
# --quick runs every row with fewer events (a smoke run, not for figures).
# Each worker's telemetry is served on its default address, a unix socket
# (Config.socket_path/1); --tcp serves it on a TCP port on 127.0.0.1 instead.

# PythonWorker and JSON are dev/test support, not in the prod build.
Code.require_file("../support/load.exs", __DIR__)

alias Snakepit.Telemetry.{Config, GrpcStream, PythonWorker}

defmodule Bench do
  @moduledoc false

  @python_call_stop [:snakepit, :python, :call, :stop]
  @python_call_start [:snakepit, :python, :call, :start]

  def python_call_stop, do: @python_call_stop
  def python_call_start, do: @python_call_start

  # :telemetry handlers (module functions, so :telemetry keeps them fast).
  def count(_event, _measurements, _metadata, counter), do: :counters.add(counter, 1, 1)

  # A handler that takes `busy_us` of CPU per event (a slow exporter).
  def busy(_event, _measurements, _metadata, {counter, busy_us}) do
    spin(System.monotonic_time(:microsecond) + busy_us)
    :counters.add(counter, 1, 1)
  end

  defp spin(until) do
    if System.monotonic_time(:microsecond) < until, do: spin(until)
  end

  def latency(_event, %{system_time: sent}, _metadata, pid) do
    now = System.os_time(:nanosecond)
    send(pid, {:latency, now - System.convert_time_unit(sent, :native, :nanosecond)})
  end

  def wait(fun, timeout_ms \\ 120_000) do
    deadline = System.monotonic_time(:millisecond) + timeout_ms
    do_wait(fun, deadline)
  end

  defp do_wait(fun, deadline) do
    cond do
      fun.() ->
        :ok

      System.monotonic_time(:millisecond) > deadline ->
        {:error, :timeout}

      true ->
        Process.sleep(2)
        do_wait(fun, deadline)
    end
  end

  def seconds_since(t0),
    do: System.convert_time_unit(System.monotonic_time() - t0, :native, :microsecond) / 1.0e6

  def command!(worker, command, timeout \\ 300_000) do
    {:ok, result} = PythonWorker.command(worker, command, timeout)
    result
  end

  @doc """
  Starts a worker and registers it; returns once its stream is open. With
  `transport(:unix)` (the default), the server that serves the telemetry
  calls (the Rust one with `:telemetry_listen`, else grpcio) listens on the
  worker's `Config.socket_path/1`; with `transport(:tcp)` on a TCP port.
  """
  def start_worker!(id, args, extra \\ [], worker_opts \\ []) do
    {:ok, worker} = PythonWorker.start([args: args] ++ on_transport(id, worker_opts))

    :ok =
      GrpcStream.register_worker(
        Keyword.merge(
          [worker_id: id, pool_name: :bench, address: PythonWorker.address(worker)],
          extra
        )
      )

    :ok = wait(fn -> stream(id)[:status] == :open end, 30_000)
    worker
  end

  def transport(which) when which in [:tcp, :unix],
    do: :persistent_term.put({__MODULE__, :transport}, which)

  def transport, do: :persistent_term.get({__MODULE__, :transport}, :unix)

  defp on_transport(id, opts) do
    cond do
      transport() == :tcp -> opts
      opts[:telemetry_listen] -> Keyword.put(opts, :telemetry_listen, Config.socket_path(id))
      true -> Keyword.put(opts, :listen, Config.socket_path(id))
    end
  end

  def stop_worker(id, worker) do
    GrpcStream.unregister_worker(id)
    PythonWorker.stop(worker)
  end

  @doc """
  PythonWorker options for an implementation: `:python` serves the telemetry
  calls through the worker's grpcio server; `:native` (and `:auto` when the
  extension is built) from the extension's Rust server (`--telemetry-listen`).
  """
  def impl_opts(:python), do: [implementation: :python]
  def impl_opts(:native), do: [implementation: :native, telemetry_listen: "127.0.0.1:0"]

  @doc "The implementation a worker runs, as its stream reports it (else the worker says)."
  def impl(id, worker) do
    case stream(id) do
      %{python_implementation: which} when which in [:native, :python] ->
        Atom.to_string(which)

      _ ->
        {:ok, %{"implementation" => which}} = PythonWorker.info(worker)
        which
    end
  end

  def stream(id), do: Enum.find(GrpcStream.list_streams(), &(&1.worker_id == id))

  @doc """
  Floods `n` events from each worker at once and waits until the handler saw
  them all (or the flow stopped); the handler takes `busy_us` of CPU per
  event. Returns rate, CPU and drop figures.
  """
  def flood(workers, n, busy_us \\ 0) do
    counter = :counters.new(1, [:write_concurrency])
    handler = "bench-count-#{System.unique_integer([:positive])}"

    :ok =
      if busy_us > 0,
        do: :telemetry.attach(handler, @python_call_stop, &__MODULE__.busy/4, {counter, busy_us}),
        else: :telemetry.attach(handler, @python_call_stop, &__MODULE__.count/4, counter)

    cpu0 = Enum.map(workers, fn {_id, w} -> command!(w, %{cmd: "rusage"})["cpu_s"] end)
    total = n * length(workers)
    :erlang.system_flag(:scheduler_wall_time, true)
    wall0 = :erlang.statistics(:scheduler_wall_time)
    t0 = System.monotonic_time()

    workers
    |> Enum.map(fn {_id, w} -> Task.async(fn -> command!(w, %{cmd: "flood", count: n}) end) end)
    |> Task.await_many(300_000)

    result = wait(fn -> :counters.get(counter, 1) >= total end)
    seconds = seconds_since(t0)
    wall1 = :erlang.statistics(:scheduler_wall_time)
    delivered = :counters.get(counter, 1)
    cpu1 = Enum.map(workers, fn {_id, w} -> command!(w, %{cmd: "rusage"})["cpu_s"] end)
    :telemetry.detach(handler)

    %{
      rate: delivered / seconds,
      delivered: delivered,
      drops: total - delivered,
      timed_out: result != :ok,
      cpu_us_per_event:
        Enum.sum(Enum.zip_with(cpu1, cpu0, &(&1 - &2))) * 1.0e6 / max(delivered, 1),
      scheduler_utilisation: utilisation(wall0, wall1)
    }
  end

  defp utilisation(before, later) do
    normal = :erlang.system_info(:schedulers)

    {active, total} =
      Enum.zip(Enum.sort(before), Enum.sort(later))
      |> Enum.filter(fn {{id, _, _}, _} -> id <= normal end)
      |> Enum.reduce({0, 0}, fn {{_, a0, t0}, {_, a1, t1}}, {a, t} ->
        {a + a1 - a0, t + t1 - t0}
      end)

    active / max(total, 1)
  end

  def latencies(worker, count, rate) do
    handler = "bench-latency"
    :ok = :telemetry.attach(handler, @python_call_start, &__MODULE__.latency/4, self())
    %{"count" => ^count} = command!(worker, %{cmd: "paced", count: count, rate: rate})
    samples = for _ <- 1..count, do: receive_latency()
    :telemetry.detach(handler)
    sorted = Enum.sort(samples)

    %{
      p50: percentile(sorted, 0.50),
      p99: percentile(sorted, 0.99),
      max: List.last(sorted)
    }
  end

  defp receive_latency do
    receive do
      {:latency, ns} -> ns
    after
      10_000 -> raise "latency sample missing"
    end
  end

  defp percentile(sorted, q),
    do: Enum.at(sorted, min(length(sorted) - 1, floor(q * length(sorted))))

  @doc "Process CPU of `calls` ~1 ms calls, with spans and without, alternating rounds."
  def span_overhead(worker, calls, rounds, mode) do
    runs =
      for _ <- 1..rounds, telemetry <- [false, true] do
        command = %{cmd: "spanwork", calls: calls, telemetry: telemetry, mode: mode}
        {telemetry, command!(worker, command)["cpu_s"]}
      end

    off = median(for {false, cpu} <- runs, do: cpu)
    on = median(for {true, cpu} <- runs, do: cpu)
    per_call_us = (on - off) * 1.0e6 / calls
    # Spinning: the overhead is measured; sleeping: the calls cost no CPU of
    # their own, so the telemetry's CPU per call is set against 1 ms of work.
    overhead = if mode == "spin", do: on / off - 1, else: per_call_us / 1000
    %{off: off, on: on, overhead: overhead, per_call_us: per_call_us}
  end

  @doc """
  A/B of busy ~1 ms calls on several workers (`[{id, worker}]`): per round,
  on each worker in turn, one `spanab` command: `calls` calls without
  telemetry and `calls` calls each in a span (100% sampling, default
  settings), in alternating blocks of `block` calls (ABBA, the first side
  alternating by round), so that a change in the machine's load hits both
  sides alike; each block's process CPU goes to its side. A handler counts the `python.call.stop` events; a round goes on
  once all of them were handled. Per worker: the overhead of each round
  (CPU on / off - 1), its median, min and max.
  """
  def busy_ab(workers, calls, rounds, block) do
    counter = :counters.new(1, [:write_concurrency])
    handler = "bench-busy-ab"
    :ok = :telemetry.attach(handler, @python_call_stop, &__MODULE__.count/4, counter)

    run = fn worker, round, calls ->
      first = if rem(round, 2) == 1, do: "off", else: "on"
      command = %{cmd: "spanab", calls: calls, block: block, first: first}
      before = :counters.get(counter, 1)
      result = command!(worker, command)
      :ok = wait(fn -> :counters.get(counter, 1) >= before + result["calls"] end)
      result
    end

    # Warm-up (not counted): calibrates the work, opens everything.
    for {_id, worker} <- workers, do: run.(worker, 1, block * 2)
    :counters.put(counter, 1, 0)

    pairs =
      for round <- 1..rounds, {id, worker} <- workers do
        r = run.(worker, round, calls)
        {id, r["cpu_on_s"] / r["cpu_off_s"] - 1, r}
      end

    :telemetry.detach(handler)

    Map.new(workers, fn {id, _} ->
      mine = for {^id, overhead, r} <- pairs, do: {overhead, r}
      overheads = Enum.map(mine, &elem(&1, 0))

      {id,
       %{
         overhead: median(overheads),
         min: Enum.min(overheads),
         max: Enum.max(overheads),
         on: median(for {_, r} <- mine, do: r["cpu_on_s"]),
         off: median(for {_, r} <- mine, do: r["cpu_off_s"]),
         calls: hd(mine) |> elem(1) |> Map.fetch!("calls"),
         rounds: length(overheads),
         overheads: overheads,
         calling: median(for {_, r} <- mine, do: r["calling_on_s"] / r["calling_off_s"] - 1),
         # CPU of the process's other threads (the stream's sender and server)
         # per call in spans, less what they take in the blocks without; and
         # the CPU of one call without telemetry (us).
         others_us:
           median(
             for {_, r} <- mine,
                 do:
                   (r["cpu_on_s"] - r["calling_on_s"] - (r["cpu_off_s"] - r["calling_off_s"])) *
                     1.0e6 / r["calls"]
           ),
         call_us: median(for {_, r} <- mine, do: r["cpu_off_s"] * 1.0e6 / r["calls"]),
         # Time the calling thread spent sending due batches itself (us per
         # call in spans; native on its Rust server).
         inline_us: median(for {_, r} <- mine, do: r["calling_inline_s"] * 1.0e6 / r["calls"]),
         handled: :counters.get(counter, 1)
       }}
    end)
  end

  @doc "The median (the upper one of an even count)."
  def median(values) do
    sorted = Enum.sort(values)
    Enum.at(sorted, div(length(sorted), 2))
  end

  @doc "Delivery cost per event: synthetic batches through a worker's delivery process."
  def beam_cost(pid, stream_id, batches, batch_size) do
    counter = :counters.new(1, [:write_concurrency])
    handler = "bench-beam"
    :ok = :telemetry.attach(handler, @python_call_stop, &__MODULE__.count/4, counter)
    event = {@python_call_stop, %{duration: 1_000}, %{command: "predict"}}
    events = List.duplicate(event, batch_size)
    total = batches * batch_size
    t0 = System.monotonic_time()
    for _ <- 1..batches, do: send(pid, {:snakepit_telemetry_events, stream_id, events})
    :ok = wait(fn -> :counters.get(counter, 1) >= total end)
    delivery_ns = seconds_since(t0) * 1.0e9 / total

    :counters.put(counter, 1, 0)
    metadata = %{command: "predict", node: node(), pool_name: :bench, worker_id: "beam"}
    t1 = System.monotonic_time()

    for _ <- 1..total,
        do: :telemetry.execute(@python_call_stop, %{duration: 1_000}, metadata)

    direct_ns = seconds_since(t1) * 1.0e9 / total
    :telemetry.detach(handler)
    %{delivery_ns: delivery_ns, direct_ns: direct_ns}
  end

  def python_json!(args, extra_env \\ []) do
    python = PythonWorker.default_python()
    env = [{"PYTHONPATH", Path.expand("../priv/python", __DIR__)} | extra_env]
    {out, 0} = System.cmd(python, args, env: env, cd: Path.expand("..", __DIR__))
    out |> String.split("\n", trim: true) |> List.last() |> json!()
  end

  def rust_json! do
    {out, 0} =
      System.cmd(
        "cargo",
        ~w(run --release --quiet -p snakepit_telemetry_core --example decode_bench),
        cd: Path.expand("..", __DIR__),
        stderr_to_stdout: false
      )

    out |> String.split("\n", trim: true) |> List.last() |> json!()
  end

  defp json!(line) do
    {:ok, value} = Snakepit.Telemetry.JSON.decode(line)
    value
  end

  def fmt(x) when is_float(x) and x >= 100, do: Integer.to_string(round(x))
  def fmt(x) when is_float(x), do: :erlang.float_to_binary(x, decimals: 2)
  def fmt(x) when is_integer(x), do: Integer.to_string(x)
  def fmt(x), do: to_string(x)

  def ratio(_a, b) when b == 0, do: "n/a"
  def ratio(a, b), do: :erlang.float_to_binary(a / b, decimals: 2) <> "x"
end

{opts, _, _} = OptionParser.parse(System.argv(), strict: [quick: :boolean, tcp: :boolean])
quick? = Keyword.get(opts, :quick, false)
Bench.transport(if opts[:tcp], do: :tcp, else: :unix)
scale = fn full, small -> if quick?, do: small, else: full end

n_batched = scale.(300_000, 20_000)
n_single = scale.(40_000, 5_000)
n_each = scale.(50_000, 5_000)
latency_count = scale.(5_000, 500)
hot_rounds = scale.(200, 20)
span_calls = scale.(2_000, 200)
span_rounds = scale.(5, 1)
busy_calls = scale.(1_000, 200)
busy_rounds = scale.(11, 3)
# A block of spans starts on an idle stream and ends drained, so its batches
# are cut at the block's ends: blocks of 10 flush intervals' worth of calls
# keep that small (500 at the default 50 ms, 100 at 10 ms).
busy_block = 500
busy_block_10 = 100
flood_runs = 3

IO.puts(:stderr, "bench: Python hot path, per implementation")

hot_for = fn which ->
  Bench.python_json!(
    ["bench/python_hot_path.py", "--rounds", Integer.to_string(hot_rounds)],
    [{"SNAKEPIT_TELEMETRY_IMPLEMENTATION", which}]
  )
end

hot_py = hot_for.("python")
hot_nat = hot_for.("native")

# Without the extension a "native" run is python (the package falls back):
# the native rows then say so and no native worker is started.
native? = hot_nat["implementation"] == "native"
impls = if native?, do: [:python, :native], else: [:python]
# What a worker runs by default (SNAKEPIT_TELEMETRY_IMPLEMENTATION=auto):
# native, served by its Rust server, when the extension is built.
default_impl = List.last(impls)
default_opts = Bench.impl_opts(default_impl)
grpcio_opts = [implementation: default_impl]

IO.puts(:stderr, "bench: native decode (cargo example)")
rust = Bench.rust_json!()

IO.puts(:stderr, "bench: single-worker throughput, batches, #{Enum.join(impls, " / ")}")
queue = fn n -> ["--queue-size", Integer.to_string(n * 2)] end

flood_workers =
  for which <- impls do
    id = "batched-#{which}"
    {which, id, Bench.start_worker!(id, queue.(n_batched), [], Bench.impl_opts(which))}
  end

# Alternating runs on the workers; per implementation the median of the runs
# (this machine is noisy), with their spread.
flood_runs_by_impl =
  for(
    _ <- 1..flood_runs,
    {which, id, w} <- flood_workers,
    do: {which, Bench.flood([{id, w}], n_batched)}
  )
  |> Enum.group_by(&elem(&1, 0), &elem(&1, 1))

spread = fn values -> {Bench.median(values), Enum.min(values), Enum.max(values)} end

flood =
  Map.new(flood_workers, fn {which, id, w} ->
    runs = flood_runs_by_impl[which]
    stream = Bench.stream(id)

    {which,
     %{
       impl: Bench.impl(id, w),
       protocol: stream.protocol,
       stats: stream.stats,
       rate: spread.(Enum.map(runs, & &1.rate)),
       cpu: spread.(Enum.map(runs, & &1.cpu_us_per_event)),
       drops: Enum.max(Enum.map(runs, & &1.drops)),
       utilisation: Bench.median(Enum.map(runs, & &1.scheduler_utilisation))
     }}
  end)

Enum.each(flood_workers, fn {_, id, w} -> Bench.stop_worker(id, w) end)
batched = flood[default_impl]
native_stats = batched.stats

IO.puts(:stderr, "bench: single-worker throughput, one message per event")
w = Bench.start_worker!("single", queue.(n_single) ++ ["--wire", "single"], [], grpcio_opts)
single_impl = Bench.impl("single", w)
protocol_single = Bench.stream("single").protocol
single = Bench.flood([{"single", w}], n_single)
Bench.stop_worker("single", w)

IO.puts(:stderr, "bench: latency at 1000 events/s")
flush = fn ms -> [env: [{"SNAKEPIT_TELEMETRY_FLUSH_INTERVAL_MS", Integer.to_string(ms)}]] end

latency = fn id, args, worker_opts ->
  w = Bench.start_worker!(id, args, [], worker_opts)
  result = Bench.latencies(w, latency_count, 1000)
  Bench.stop_worker(id, w)
  result
end

lat_b = latency.("lat-default", [], default_opts)
lat_0 = latency.("lat-0", [], default_opts ++ flush.(0))
lat_s = latency.("lat-single", ["--wire", "single"], grpcio_opts)

IO.puts(:stderr, "bench: CPU on paced ~1 ms calls in spans")

overhead = fn id, worker_opts, mode ->
  w = Bench.start_worker!(id, [], [], worker_opts)
  result = Bench.span_overhead(w, span_calls, span_rounds, mode)
  Bench.stop_worker(id, w)
  result
end

paced = overhead.("spans-paced", default_opts, "sleep")
paced_0 = overhead.("spans-paced-0", default_opts ++ flush.(0), "sleep")
paced_10 = overhead.("spans-paced-10", default_opts ++ flush.(10), "sleep")

IO.puts(:stderr, "bench: busy ~1 ms calls in spans, A/B, #{busy_rounds} rounds")

# Default settings (flush interval 50 ms); native also at 10 ms (more, smaller
# batches: more CPU, less latency).
busy_flush10? = fn id -> String.ends_with?(id, "-flush10") end

busy_setups =
  for(which <- impls, do: {which, "busy-#{which}", []}) ++
    if native?, do: [{:native, "busy-native-flush10", flush.(10)}], else: []

busy_workers =
  for {which, id, extra} <- busy_setups do
    {id, Bench.start_worker!(id, [], [], Bench.impl_opts(which) ++ extra)}
  end

busy_impl = Map.new(busy_workers, fn {id, w} -> {id, Bench.impl(id, w)} end)
{busy_10, busy_default} = Enum.split_with(busy_workers, fn {id, _} -> busy_flush10?.(id) end)

busy =
  Map.merge(
    Bench.busy_ab(busy_default, busy_calls, busy_rounds, busy_block),
    if(busy_10 == [],
      do: %{},
      else: Bench.busy_ab(busy_10, busy_calls, busy_rounds, busy_block_10)
    )
  )

busy_handled = Enum.sum(for [{id, _} | _] <- [busy_default, busy_10], do: busy[id].handled)

busy_calling =
  Enum.map_join(busy_workers, ", ", fn {id, _} ->
    "#{busy_impl[id]}#{if busy_flush10?.(id), do: " (flush 10 ms)"} #{Float.round(busy[id].calling * 100, 2)}%"
  end)

busy_expected = busy |> Map.values() |> Enum.map(&(&1.calls * &1.rounds)) |> Enum.sum()
Enum.each(busy_workers, fn {id, w} -> Bench.stop_worker(id, w) end)

w = Bench.start_worker!("spans", [], [], default_opts)

IO.puts(:stderr, "bench: BEAM cost per event")
stream_id = :sys.get_state(GrpcStream).workers["spans"].stream_id
beam = Bench.beam_cost(Bench.stream("spans").delivery, stream_id, scale.(400, 40), 500)
Bench.stop_worker("spans", w)

IO.puts(:stderr, "bench: 8 workers")

workers =
  for i <- 1..8 do
    id = "w#{i}"
    {id, Bench.start_worker!(id, queue.(n_each), [], default_opts)}
  end

eight = Bench.flood(workers, n_each)
Enum.each(workers, fn {id, w} -> Bench.stop_worker(id, w) end)

# Each worker's events run in a delivery process of its own: with a handler
# that is the bottleneck, N workers use N schedulers where 1 worker uses one.
schedulers = :erlang.system_info(:schedulers_online)
busy_us = 20
n_par = scale.(40_000, 4_000)
IO.puts(:stderr, "bench: #{schedulers} workers into one #{busy_us} us handler")
w = Bench.start_worker!("par-1", queue.(n_par), [], default_opts)
par_one = Bench.flood([{"par-1", w}], n_par, busy_us)
Bench.stop_worker("par-1", w)

par_workers =
  for i <- 1..schedulers do
    id = "par-#{i}-of-#{schedulers}"
    {id, Bench.start_worker!(id, queue.(n_par), [], default_opts)}
  end

par_many = Bench.flood(par_workers, n_par, busy_us)
Enum.each(par_workers, fn {id, w} -> Bench.stop_worker(id, w) end)

deliver_ns =
  case native_stats do
    %{deliver_ns: ns, delivered: d} when d > 0 -> ns / d
    _ -> nil
  end

pct = fn x -> "#{Bench.fmt(x * 100)}%" end

lat = fn %{p50: p50, p99: p99, max: max} ->
  Enum.map_join([p50, p99, max], " / ", &Bench.fmt(&1 / 1.0e6))
end

yes = fn ok -> if ok, do: "yes", else: "**no**" end
med = fn {median, _min, _max} -> median end
range = fn {_median, min, max} -> "#{Bench.fmt(min)}-#{Bench.fmt(max)}" end

# How a row names the implementation: "native", or "python" (and why, when
# native was asked for but is not built).
served = fn
  "native" -> "native (Rust server)"
  "python" -> "python (grpcio)"
  other -> other
end

nat_label = if native?, do: "native", else: "native: not built, python ran"
default_label = served.(batched.impl)
# The one-message-per-event worker offers only StreamTelemetry, on its grpcio server.
single_label = "#{single_impl} (grpcio)"

hot_rows =
  for {hot, label, target?} <- [{hot_py, "python", false}, {hot_nat, nat_label, true}] do
    [
      {"1", "`emit()` (ns/op), #{label}", Bench.fmt(hot["emit_ns"]),
       "prometheus_client `Counter.inc()`", Bench.fmt(hot["counter_inc_ns"]),
       Bench.ratio(hot["emit_ns"], hot["counter_inc_ns"]), if(target?, do: "<= 0.5x", else: "-"),
       if(target? and native?,
         do: yes.(hot["emit_ns"] <= 0.5 * hot["counter_inc_ns"]),
         else: "-"
       )},
      {"1", "empty `span()` (ns/op), #{label}", Bench.fmt(hot["span_ns"]),
       "OpenTelemetry SDK span", Bench.fmt(hot["otel_span_ns"]),
       Bench.ratio(hot["span_ns"], hot["otel_span_ns"]), "-", "-"}
    ]
  end
  |> List.flatten()

py = flood[:python]
nat = flood[:native]

{cpu_rows, rate_rows} =
  if nat do
    {[
       {"2", "Python CPU per delivered event (us), #{served.(nat.impl)}, batches",
        Bench.fmt(med.(nat.cpu)), served.(py.impl), Bench.fmt(med.(py.cpu)),
        Bench.ratio(med.(nat.cpu), med.(py.cpu)), "<= 0.5 us", yes.(med.(nat.cpu) <= 0.5)}
     ],
     [
       {"3", "1 worker -> 1 handler (events/s), #{served.(nat.impl)}, #{nat.protocol}",
        Bench.fmt(med.(nat.rate)), "#{served.(py.impl)}, #{py.protocol}",
        Bench.fmt(med.(py.rate)), Bench.ratio(med.(nat.rate), med.(py.rate)), ">= 1x",
        yes.(med.(nat.rate) >= med.(py.rate))},
       {"3", "drops in those runs (most in one run)", "#{nat.drops} of #{n_batched}",
        served.(py.impl), "#{py.drops} of #{n_batched}", "-", "< 0.1%",
        yes.(nat.drops < 0.001 * n_batched and py.drops < 0.001 * n_batched)}
     ]}
  else
    {[
       {"2", "Python CPU per delivered event (us), native", "not built", served.(py.impl),
        Bench.fmt(med.(py.cpu)), "-", "<= 0.5 us", "-"}
     ],
     [
       {"3", "1 worker -> 1 handler (events/s), native", "not built", served.(py.impl),
        Bench.fmt(med.(py.rate)), "-", ">= 1x", "-"}
     ]}
  end

busy_rows =
  for {id, _w} <- busy_workers do
    b = busy[id]
    which = busy_impl[id]
    flush10? = busy_flush10?.(id)
    target? = which == "native" and not flush10?
    setting = if flush10?, do: ", flush interval 10 ms", else: ""
    hot = if which == "native", do: hot_nat, else: hot_py
    # The same overhead from its parts, which the load of the machine moves less:
    # the span's own cost (row 1), the other threads' CPU per call and the time
    # the calling thread spent sending due batches itself.
    parts_us = hot["span_ns"] / 1000 + b.others_us + b.inline_us
    parts = parts_us / b.call_us

    [
      {"5",
       "busy ~1 ms calls in spans, process CPU overhead, #{served.(which)}#{setting}: median (min..max) of #{b.rounds} rounds",
       "#{pct.(b.overhead)} (#{pct.(b.min)}..#{pct.(b.max)})",
       "same calls, no telemetry (CPU s per round)", Bench.fmt(b.off), Bench.ratio(b.on, b.off),
       if(target?, do: "<= 0.3%", else: "-"),
       if(target?, do: yes.(b.overhead <= 0.003), else: "-")},
      {"5",
       "the same from its parts: span (row 1) + stream threads' CPU + sends by the calling thread, per call (us), #{which}#{setting}",
       "#{Bench.fmt(hot["span_ns"] / 1000)} + #{Bench.fmt(b.others_us)} + #{Bench.fmt(b.inline_us)}",
       "CPU of one call without telemetry (us)", Bench.fmt(b.call_us), pct.(parts),
       if(target?, do: "<= 0.3%", else: "-"), if(target?, do: yes.(parts <= 0.003), else: "-")}
    ]
  end
  |> List.flatten()

rows =
  hot_rows ++
    cpu_rows ++
    [
      {"2", "Python CPU per delivered event (us), #{default_label}, batches",
       Bench.fmt(med.(batched.cpu)), "one message per event (#{single_label})",
       Bench.fmt(single.cpu_us_per_event),
       Bench.ratio(med.(batched.cpu), single.cpu_us_per_event), "<= 1.5 us",
       yes.(med.(batched.cpu) <= 1.5)}
    ] ++
    rate_rows ++
    [
      {"3", "1 worker -> 1 handler (events/s), #{default_label}, #{batched.protocol}",
       Bench.fmt(med.(batched.rate)),
       "one message per event (#{single_label}, #{protocol_single})", Bench.fmt(single.rate),
       Bench.ratio(med.(batched.rate), single.rate), ">= 5x and >= 150k",
       yes.(med.(batched.rate) >= 5 * single.rate and med.(batched.rate) >= 150_000)},
      {"3", "drops in that run", "#{batched.drops} of #{n_batched}", "one message per event",
       "#{single.drops} of #{n_single}", "-", "< 0.1%", yes.(batched.drops < 0.001 * n_batched)},
      {"4", "latency p50 / p99 / max at 1000 ev/s (ms), #{default_label}, batches", lat.(lat_b),
       "one message per event (#{single_label})", lat.(lat_s), Bench.ratio(lat_b.p99, lat_s.p99),
       "p99 <= 2 ms", yes.(lat_b.p99 <= 2_000_000)},
      {"4", "the same, flush interval 0 (send at once)", lat.(lat_0), "default flush interval",
       lat.(lat_b), Bench.ratio(lat_0.p99, lat_b.p99), "p99 <= 2 ms",
       yes.(lat_0.p99 <= 2_000_000)},
      {"5", "telemetry CPU per paced ~1 ms call in a span (us), #{default_label}",
       Bench.fmt(paced.per_call_us), "1 ms of work", "1000", pct.(paced.overhead), "<= 0.3%",
       yes.(paced.overhead <= 0.003)},
      {"5", "the same, flush interval 0", Bench.fmt(paced_0.per_call_us), "1 ms of work", "1000",
       pct.(paced_0.overhead), "<= 0.3%", yes.(paced_0.overhead <= 0.003)},
      {"5", "the same, flush interval 10 ms", Bench.fmt(paced_10.per_call_us), "1 ms of work",
       "1000", pct.(paced_10.overhead), "-", "-"}
    ] ++
    busy_rows ++
    [
      {"6", "native decode per event (ns)", Bench.fmt(rust["decode_ns"]), "prost parse alone",
       Bench.fmt(rust["prost_parse_ns"]), Bench.ratio(rust["decode_ns"], rust["prost_parse_ns"]),
       "-", "-"},
      {"6", "NIF term building + send per event (ns)",
       if(deliver_ns, do: Bench.fmt(deliver_ns), else: "n/a"), "-", "-", "-", "-", "-"},
      {"6", "delivery process + `:telemetry.execute` per event (ns)", Bench.fmt(beam.delivery_ns),
       "`:telemetry.execute` alone", Bench.fmt(beam.direct_ns),
       Bench.ratio(beam.delivery_ns, beam.direct_ns), "-", "-"},
      {"7", "8 workers at once (events/s), #{default_label}", Bench.fmt(eight.rate),
       "1 worker (row 3)", Bench.fmt(med.(batched.rate)),
       Bench.ratio(eight.rate, med.(batched.rate)), "-", "-"},
      {"7", "BEAM scheduler utilisation, 8 workers", pct.(eight.scheduler_utilisation),
       "1 worker (row 3)", pct.(batched.utilisation), "-", "-", "-"},
      {"7", "drops, 8 workers", "#{eight.drops} of #{8 * n_each}", "-", "-", "-", "-", "-"},
      {"8",
       "#{schedulers} workers -> one #{busy_us} us handler, #{schedulers} schedulers (+S #{schedulers}) (events/s)",
       Bench.fmt(par_many.rate), "1 worker, same handler", Bench.fmt(par_one.rate),
       Bench.ratio(par_many.rate, par_one.rate), if(schedulers > 1, do: ">= 1.5x", else: "-"),
       if(schedulers > 1, do: yes.(par_many.rate >= 1.5 * par_one.rate), else: "-")},
      {"8", "BEAM scheduler utilisation, #{schedulers} workers",
       pct.(par_many.scheduler_utilisation), "1 worker", pct.(par_one.scheduler_utilisation),
       Bench.ratio(par_many.scheduler_utilisation, par_one.scheduler_utilisation), "-", "-"},
      {"8", "drops, #{schedulers} workers", "#{par_many.drops} of #{schedulers * n_par}",
       "1 worker", "#{par_one.drops} of #{n_par}", "-", "0",
       yes.(par_many.drops == 0 and par_one.drops == 0)}
    ]

cpu =
  case File.read("/proc/cpuinfo") do
    {:ok, text} ->
      case Regex.run(~r/model name\s*:\s*(.+)/, text) do
        [_, model] -> model
        _ -> "unknown CPU"
      end

    _ ->
      "unknown CPU"
  end

IO.puts("""

snakepit_telemetry benchmarks#{if quick?, do: " (--quick: smoke run, not figures)", else: ""}
#{:erlang.system_info(:logical_processors)} logical CPUs (#{cpu}), OTP #{System.otp_release()}, Elixir #{System.version()}; #{n_batched} / #{n_single} events (batches / one per message), 8 x #{n_each}
Telemetry over #{if Bench.transport() == :unix, do: "unix sockets (Config.socket_path/1)", else: "TCP on 127.0.0.1"}; Python implementations: #{Enum.join(impls, ", ")}#{if native?, do: "", else: " (the native extension is not built)"}; rows 4-8 without a named implementation run the default: #{default_label}
""")

IO.puts("| # | measurement | value | baseline | baseline value | ratio | target | met |")
IO.puts("|---|---|---:|---|---:|---:|---|---|")

for {row, what, value, base, base_value, ratio, target, met} <- rows do
  IO.puts(
    "| #{row} | #{what} | #{value} | #{base} | #{base_value} | #{ratio} | #{target} | #{met} |"
  )
end

flood_spread =
  Enum.map_join(impls, "; ", fn which ->
    f = flood[which]
    "#{which}: #{range.(f.rate)} events/s, #{range.(f.cpu)} us/event"
  end)

IO.puts("""

Row 1: each implementation in its own Python process (SNAKEPIT_TELEMETRY_IMPLEMENTATION), which
also measures prometheus_client and the OTel SDK span as its baseline; best of #{hot_rounds} interleaved
rounds of #{hot_py["per_round"]} calls (medians: emit #{Bench.fmt(hot_py["emit_median_ns"])} / #{Bench.fmt(hot_nat["emit_median_ns"])} ns,
Counter.inc #{Bench.fmt(hot_py["counter_inc_median_ns"])} / #{Bench.fmt(hot_nat["counter_inc_median_ns"])} ns, python / #{nat_label}); `telemetry.emit` is a
#{hot_py["emit_type"]} / #{hot_nat["emit_type"]}. Events not queued in those runs: #{hot_py["events_lost"]} / #{hot_nat["events_lost"]}.
Python CPU per event covers emit, encoding and sending (process CPU, all threads, over delivered
events). Rows 2 and 3: median of #{flood_runs} runs per implementation, alternating between the workers;
spread (min-max): #{flood_spread}. Elixir side: #{native_stats[:wire_messages]} wire messages for
#{native_stats[:delivered]} events over the #{default_impl} runs. A native worker serves the telemetry calls from
the extension's Rust server (telemetry.serve, registered with that address); a python one from grpcio.
Latency: #{latency_count} samples per path. Row 5: "per call" rows pace #{span_calls} calls with sleeps (1 ms
apart; medians of #{span_rounds} alternating rounds), so the process CPU is the telemetry's own, and set it
against 1 ms of work. Busy A/B rows: per round, #{busy_calls} busy ~1 ms calls (a spin loop) each in a
span (100% sampling, default settings) and #{busy_calls} without telemetry, in alternating blocks of #{busy_block}
calls (#{busy_block_10} at the 10 ms flush interval: 10 flush intervals; ABBA order, the first side alternating by round), so a change
in the machine's load hits both sides alike; each block's process CPU (all threads) goes to its side,
and a block of spans ends once its events were handed to the stream (so its telemetry work is not left
to the next block; it also starts on an idle stream, so it sends about one batch more than steady
operation would: an upper bound);
#{busy_rounds} rounds, interleaved across the implementations. Overhead = CPU with / without - 1 per
round: median and (min..max); of that, in the calling thread (median): #{busy_calling}. "From its
parts": the empty span of row 1 plus the median CPU of the worker's other threads per call in spans
(less their CPU in the blocks without) plus the time the calling thread spent sending batches it found
due (the native stream's server_rounds), over the CPU of one call without telemetry.
#{busy_handled} of #{busy_expected} `python.call.stop` events were delivered and handled.
Row 8: one handler that spins #{busy_us} us per event (the bottleneck), #{n_par} events per worker;
each worker's events run in its own delivery process, so #{schedulers} workers can use all
#{schedulers} schedulers (this VM: +S #{schedulers}; set ELIXIR_ERL_OPTIONS="+S n" to choose) while 1
worker uses one. The Python workers share the same #{:erlang.system_info(:logical_processors)} CPUs.
""")
