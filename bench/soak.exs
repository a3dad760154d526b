# The soak run: several Python workers streaming at a steady rate for
# minutes, with a `kill -9` of one worker every interval, while the BEAM's
# memory and the workers' RSS are printed every 10 s. At the end, every
# event is accounted for per worker (emitted = delivered + every counted
# drop) and no stream task is left behind.
#
#   script/soak [--minutes 10] [--rate 24000] [--workers 4] [--kill-every 30]
#
# Each worker listens on a fixed unix socket, so a killed worker's
# replacement is reached by the same registration: GrpcStream sees the
# stream lost, backs off, reconnects to the new process and notices (by its
# stats instance) that the Python counters started again.
#
# Before each kill the victim's producer stops and its queue drains (into
# gRPC and the NIF): events still inside a process killed with SIGKILL are
# gone with it, and no counter anywhere can know how many there were. So the
# kill loses no event, and the accounting stays exact.

# PythonWorker and JSON are dev/test support, not in the prod build.
Code.require_file("../support/load.exs", __DIR__)

alias Snakepit.Telemetry.{GrpcStream, Native, PythonWorker}

defmodule Soak do
  @moduledoc false

  @event [:snakepit, :python, :call, :stop]
  # The workers' own counter reports travel the same streams.
  @stats_event [:snakepit, :telemetry, :python, :stats]
  # Native counters of whole events lost (the other dropped_* count values).
  @native_losses [
    :dropped_unknown_event,
    :dropped_malformed,
    :dropped_buffer_full,
    :dropped_receiver_down,
    :dropped_encode
  ]
  @tick_ms 100
  @report_ms 10_000
  # Python counters of events lost or held back by policy, besides dropped_*.
  @python_losses ~w(internal_errors interrupted_sends)

  def main(args) do
    {opts, _, _} =
      OptionParser.parse(args,
        strict: [minutes: :float, rate: :integer, workers: :integer, kill_every: :integer]
      )

    minutes = opts[:minutes] || 10.0
    rate = opts[:rate] || 24_000
    n = opts[:workers] || 4
    kill_every_ms = (opts[:kill_every] || 30) * 1000
    duration_ms = round(minutes * 60_000)
    # The workers' sockets go in the private (0700) socket directory.
    {:ok, dir} = Snakepit.Telemetry.Config.socket_dir()

    IO.puts(
      "soak: #{n} workers, #{rate} events/s in all, #{minutes} min, " <>
        "kill -9 of one worker every #{div(kill_every_ms, 1000)} s"
    )

    :ets.new(:soak_pids, [:named_table, :public])
    # Slots 1..n: events per worker; n+1..2n: its stats reports.
    counter = :counters.new(2 * n, [:write_concurrency])
    index = Map.new(1..n, &{id(&1), &1})
    :ok = :telemetry.attach("soak", @event, &__MODULE__.count/4, {index, counter, 0})
    :ok = :telemetry.attach("soak-stats", @stats_event, &__MODULE__.count/4, {index, counter, n})

    slots =
      for i <- 1..n do
        address = "unix:" <> Path.join(dir, "soak-w#{i}.sock")
        worker = start_worker!(address)
        :ets.insert(:soak_pids, {i, PythonWorker.os_pid(worker)})

        :ok = GrpcStream.register_worker(worker_id: id(i), pool_name: :soak, address: address)

        :ok = await(fn -> stream(id(i))[:status] == :open end, 30_000)

        producer =
          spawn_link(fn ->
            produce(%{
              i: i,
              worker: worker,
              address: address,
              per_tick: max(1, div(rate * @tick_ms, 1000 * n)),
              finished: [],
              kills: 0
            })
          end)

        {i, producer}
      end

    started = System.monotonic_time(:millisecond)
    samples = monitor(slots, counter, n, started, duration_ms, kill_every_ms, 0, [], 0)

    results = for {_i, producer} <- slots, do: stop_producer(producer)
    :telemetry.detach("soak")
    :telemetry.detach("soak-stats")
    report(results, counter, samples, started)

    for {i, _generations, worker} <- results do
      :ok = GrpcStream.unregister_worker(id(i))
      PythonWorker.stop(worker)
    end

    await(fn -> Native.runtime_info().live_streams == 0 end, 10_000)

    IO.puts(
      "live stream tasks after unregistering every worker: #{Native.runtime_info().live_streams}"
    )

    File.rm_rf!(dir)
  end

  def count(_event, _measurements, %{worker_id: worker_id}, {index, counter, offset}) do
    case index do
      %{^worker_id => i} -> :counters.add(counter, offset + i, 1)
      _ -> :ok
    end
  end

  defp id(i), do: "soak-#{i}"

  defp start_worker!(address) do
    {:ok, worker} =
      PythonWorker.start(
        listen: address,
        args: ["--queue-size", "4096"],
        env: Snakepit.Telemetry.Config.worker_env(:soak)
      )

    worker
  end

  ## Producers: one process per worker, paced in ticks.

  defp produce(state) do
    tick_start = System.monotonic_time(:millisecond)
    {:ok, _} = PythonWorker.command(state.worker, %{cmd: "flood", count: state.per_tick})

    receive do
      {:kill, from} ->
        state = kill_and_restart(state)
        send(from, {:killed, state.i})
        produce(state)

      {:stop, from} ->
        final = drain_and_read(state)
        send(from, {:stopped, state.i, [final | state.finished], state.worker})
    after
      max(0, tick_start + @tick_ms - System.monotonic_time(:millisecond)) -> produce(state)
    end
  end

  # The Python counters of a worker once its queue is empty and the NIF has
  # read all it sent.
  defp drain_and_read(state) do
    {:ok, %{"drained" => true}} =
      PythonWorker.command(state.worker, %{cmd: "wait_drained", timeout_ms: 30_000}, 60_000)

    {:ok, stats} = PythonWorker.command(state.worker, %{cmd: "stats"})
    sent_before = Enum.sum(for s <- state.finished, do: s["sent"])

    :ok =
      await(fn -> stream(id(state.i)).stats.received >= sent_before + stats["sent"] end, 30_000)

    stats
  end

  defp kill_and_restart(state) do
    final = drain_and_read(state)
    os_pid = PythonWorker.os_pid(state.worker)
    ref = Process.monitor(state.worker)
    System.cmd("kill", ["-9", Integer.to_string(os_pid)])

    receive do
      {:DOWN, ^ref, _, _, _} -> :ok
    after
      10_000 -> raise "worker #{os_pid} did not exit after kill -9"
    end

    worker = start_worker!(state.address)
    :ets.insert(:soak_pids, {state.i, PythonWorker.os_pid(worker)})

    %{
      state
      | worker: worker,
        finished: [final | state.finished],
        kills: state.kills + 1
    }
  end

  defp stop_producer(producer) do
    send(producer, {:stop, self()})

    receive do
      {:stopped, i, generations, worker} -> {i, generations, worker}
    after
      120_000 -> raise "a producer did not stop"
    end
  end

  ## Monitor: samples every 10 s, a kill every kill_every_ms.

  defp monitor(slots, counter, n, started, duration_ms, kill_every_ms, kills, samples, last) do
    now = System.monotonic_time(:millisecond)
    elapsed = now - started

    cond do
      elapsed >= duration_ms ->
        Enum.reverse([sample(counter, n, elapsed, kills, last) | samples])

      true ->
        next_report = (length(samples) + 1) * @report_ms
        next_kill = (kills + 1) * kill_every_ms
        wait = max(0, min(next_report, min(next_kill, duration_ms)) - elapsed)
        Process.sleep(wait)
        elapsed = System.monotonic_time(:millisecond) - started

        {kills, samples, last} =
          cond do
            elapsed >= next_kill and elapsed < duration_ms ->
              {_i, producer} = Enum.at(slots, rem(kills, n))
              send(producer, {:kill, self()})
              receive do: ({:killed, _} -> :ok)
              {kills + 1, samples, last}

            elapsed >= next_report ->
              s = sample(counter, n, elapsed, kills, last)
              print_sample(s)
              {kills, [s | samples], s.delivered}

            true ->
              {kills, samples, last}
          end

        monitor(slots, counter, n, started, duration_ms, kill_every_ms, kills, samples, last)
    end
  end

  defp sample(counter, n, elapsed, kills, last) do
    delivered = Enum.sum(for i <- 1..n, do: :counters.get(counter, i))
    streams = Enum.filter(GrpcStream.list_streams(), &String.starts_with?(&1.worker_id, "soak-"))

    %{
      t: div(elapsed, 1000),
      delivered: delivered,
      rate: (delivered - last) * 1000 / @report_ms,
      beam: :erlang.memory(:total),
      processes: :erlang.system_info(:process_count),
      rss: worker_rss(),
      live: Native.runtime_info().live_streams,
      open: Enum.count(streams, &(&1.status == :open)),
      reconnects: Enum.sum(Enum.map(streams, & &1.reconnects)),
      kills: kills
    }
  end

  # RSS of each worker's current Python process.
  defp worker_rss do
    :soak_pids
    |> :ets.tab2list()
    |> Enum.sort()
    |> Enum.map(fn {_i, pid} ->
      case File.read("/proc/#{pid}/status") do
        {:ok, text} ->
          [kb] = Regex.run(~r/VmRSS:\s+(\d+) kB/, text, capture: :all_but_first)
          String.to_integer(kb) * 1024

        _ ->
          0
      end
    end)
  end

  defp print_sample(s) do
    IO.puts(
      :io_lib.format(
        "t=~4ws  ~8w events/s  delivered ~10w  BEAM ~6.1f MiB  processes ~5w  " <>
          "worker RSS ~s MiB  streams open ~w/live ~w  reconnects ~w  kills ~w",
        [
          s.t,
          round(s.rate),
          s.delivered,
          s.beam / 1_048_576,
          s.processes,
          Enum.map_join(s.rss, "/", &:erlang.float_to_binary(&1 / 1_048_576, decimals: 1)),
          s.open,
          s.live,
          s.reconnects,
          s.kills
        ]
      )
    )
  end

  ## Accounting

  defp report(results, counter, samples, started) do
    # Everything delivered by the NIF has been executed by the handler.
    n = length(results)

    for {i, _, _} <- results do
      settled =
        await(
          fn ->
            st = stream(id(i)).stats
            handled = :counters.get(counter, i) + :counters.get(counter, n + i)
            st.delivered == handled and st.received == st.delivered + native_drops(st)
          end,
          30_000
        )

      if settled != :ok do
        IO.puts("#{id(i)}: the native counters did not settle: #{inspect(stream(id(i)).stats)}")
      end
    end

    IO.puts("\naccounting per worker (every generation of its Python process):")

    IO.puts("  worker   gens    emitted   delivered  python drops  native drops  unaccounted")

    exact =
      for {i, generations, _worker} <- results do
        emitted = Enum.sum(for g <- generations, do: g["emitted"])
        py_drops = Enum.sum(for g <- generations, do: python_drops(g))
        st = stream(id(i)).stats
        nat = native_drops(st)
        delivered = :counters.get(counter, i)
        gap = emitted - delivered - py_drops - nat

        IO.puts(
          :io_lib.format("  ~-7s ~5w ~10w ~11w ~13w ~13w ~12w", [
            id(i),
            length(generations),
            emitted,
            delivered,
            py_drops,
            nat,
            gap
          ])
        )

        gap == 0
      end

    steady = Enum.drop(samples, 1)
    beam = Enum.map(steady, & &1.beam)
    rss = Enum.map(steady, &Enum.sum(&1.rss))
    seconds = (System.monotonic_time(:millisecond) - started) / 1000
    total = Enum.sum(for i <- 1..n, do: :counters.get(counter, i))

    IO.puts("""

    delivered #{total} events in #{Float.round(seconds, 1)} s (#{round(total / seconds)} events/s)
    BEAM memory after the first sample: min #{mib(Enum.min(beam, fn -> 0 end))} MiB, max #{mib(Enum.max(beam, fn -> 0 end))} MiB
    workers' RSS (sum) after the first sample: min #{mib(Enum.min(rss, fn -> 0 end))} MiB, max #{mib(Enum.max(rss, fn -> 0 end))} MiB
    exact accounting: #{if Enum.all?(exact), do: "yes", else: "NO"}
    """)
  end

  defp python_drops(stats) do
    stats
    |> Enum.filter(fn {k, v} ->
      is_integer(v) and (String.starts_with?(k, "dropped_") or k in @python_losses)
    end)
    |> Enum.map(&elem(&1, 1))
    |> Enum.sum()
  end

  defp native_drops(st), do: Enum.sum(for k <- @native_losses, do: Map.get(st, k, 0))

  defp mib(bytes), do: Float.round(bytes / 1_048_576, 1)

  defp stream(id), do: Enum.find(GrpcStream.list_streams(), &(&1.worker_id == id))

  defp await(fun, timeout) do
    deadline = System.monotonic_time(:millisecond) + timeout
    do_await(fun, deadline)
  end

  defp do_await(fun, deadline) do
    cond do
      fun.() ->
        :ok

      System.monotonic_time(:millisecond) > deadline ->
        :timeout

      true ->
        Process.sleep(20)
        do_await(fun, deadline)
    end
  end
end

Soak.main(System.argv())
