defmodule Snakepit.Telemetry.ConcurrentDeliveryTest do
  # Each worker's events run in a delivery process of its own: control never
  # waits behind handlers, a slow handler slows only the workers it handles,
  # order per worker holds, and a delivery process that dies loses nothing
  # silently and disturbs no other worker.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{GrpcStream, Native}

  @moduletag timeout: 120_000

  @dropped [:snakepit, :telemetry, :events, :dropped]
  @max_pending 256
  @native_drops [
    :dropped_unknown_event,
    :dropped_malformed,
    :dropped_buffer_full,
    :dropped_receiver_down,
    :dropped_encode
  ]

  defmodule Recorder do
    @moduledoc false
    # Records, per worker, every event's process and `seq` measurement in
    # arrival order; a worker's events wait while its gate is closed (the
    # wait polls an :atomics flag, taking nothing out of the mailbox).

    @stop [:snakepit, :python, :call, :stop]

    def attach!(worker_ids) do
      # Owned by a process of its own: the test process exits before its
      # on_exit callbacks detach the handler.
      parent = self()

      owner =
        spawn(fn ->
          send(parent, {:table, :ets.new(:recorder, [:public, :set])})
          Process.sleep(:infinity)
        end)

      table = receive(do: ({:table, table} -> table))
      gates = Map.new(worker_ids, fn id -> {id, :atomics.new(1, [])} end)
      counters = Map.new(worker_ids, fn id -> {id, :counters.new(1, [:write_concurrency])} end)
      config = %{table: table, gates: gates, counters: counters}
      handler = "recorder-#{System.unique_integer([:positive])}"
      :ok = :telemetry.attach(handler, @stop, &__MODULE__.handle/4, config)

      ExUnit.Callbacks.on_exit(fn ->
        Enum.each(gates, fn {_, gate} -> :atomics.put(gate, 1, 0) end)
        :telemetry.detach(handler)
        Process.exit(owner, :kill)
      end)

      config
    end

    # Closes a worker's gate: its next event waits in the handler.
    def hold(config, worker_id), do: :atomics.put(config.gates[worker_id], 1, 1)
    def release(config, worker_id), do: :atomics.put(config.gates[worker_id], 1, 0)
    def holding?(config, worker_id), do: :atomics.get(config.gates[worker_id], 1) == 2
    def seen(config, worker_id), do: :counters.get(config.counters[worker_id], 1)

    # [{seq, pid}] of a worker, in arrival order.
    def events(config, worker_id) do
      for i <- 1..seen(config, worker_id)//1 do
        [{_, seq, pid}] = :ets.lookup(config.table, {worker_id, i})
        {seq, pid}
      end
    end

    def handle(_event, measurements, %{worker_id: worker_id}, config) do
      case config.gates do
        %{^worker_id => gate} ->
          wait(gate, System.monotonic_time(:millisecond) + 60_000)
          counter = config.counters[worker_id]
          :counters.add(counter, 1, 1)
          index = :counters.get(counter, 1)
          record(config.table, {{worker_id, index}, measurements["seq"], self()})

        _ ->
          :ok
      end
    end

    # An event executed while the test ends may find the table gone.
    defp record(table, entry) do
      :ets.insert(table, entry)
    rescue
      ArgumentError -> :ok
    end

    defp wait(gate, until) do
      if :atomics.compare_exchange(gate, 1, 1, 2) in [:ok, 2] and
           System.monotonic_time(:millisecond) < until do
        Process.sleep(1)
        wait(gate, until)
      end
    end
  end

  setup do
    Application.put_env(:snakepit_telemetry, :stream, max_pending_events: @max_pending)
    on_exit(fn -> Application.delete_env(:snakepit_telemetry, :stream) end)
    # A queue that holds every flood below: Python sheds nothing, so every
    # event emitted must arrive.
    opts = [args: ["--queue-size", "20000"], env: [{"SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", "0"}]]
    workers = for _ <- 1..2, do: start_worker!(opts)
    ids = Enum.map(workers, &register!/1)
    %{workers: Enum.zip(ids, workers)}
  end

  test "control and status calls answer while every worker's handler is blocked",
       %{workers: workers} do
    ids = Enum.map(workers, &elem(&1, 0))
    recorder = Recorder.attach!(ids)
    Enum.each(ids, &Recorder.hold(recorder, &1))
    for {_id, worker} <- workers, do: command!(worker, %{cmd: "flood", count: 2_000})
    for id <- ids, do: await(fn -> Recorder.holding?(recorder, id) end)

    [w1, w2] = ids
    # Each of these would exit on GenServer.call's 5 s timeout if it waited
    # behind a handler.
    assert GrpcStream.update_sampling(w1, 0.5) == :ok
    assert GrpcStream.toggle(w2, true) == :ok
    assert GrpcStream.update_filter({:pool, :test_pool}, deny: ["python.gc.*"]) == :ok
    assert GrpcStream.update_sampling(:all, 1.0) == :ok
    assert [_, _] = Enum.filter(GrpcStream.list_streams(), &(&1.worker_id in ids))

    extra = start_worker!()
    ctx = [worker_id: "extra-#{System.unique_integer([:positive])}", pool_name: :test_pool]
    assert GrpcStream.register_worker([{:address, address(extra)} | ctx]) == :ok
    assert GrpcStream.unregister_worker(ctx[:worker_id]) == :ok

    # The handlers were blocked the whole time.
    assert Enum.all?(ids, &Recorder.holding?(recorder, &1))
    assert Enum.all?(ids, &(Recorder.seen(recorder, &1) == 0))
    Enum.each(ids, &Recorder.release(recorder, &1))
    for id <- ids, do: await(fn -> Recorder.seen(recorder, id) == 2_000 end, 30_000)
  end

  test "a control call that times out reports a timeout, not an unreachable node",
       %{workers: [{w1, _} | _]} do
    :sys.suspend(GrpcStream)

    try do
      assert GrpcStream.update_sampling(w1, 0.5) == {:error, {:timeout, node()}}
    after
      :sys.resume(GrpcStream)
    end

    # The call that timed out may still be applied; the server is fine.
    assert GrpcStream.toggle(w1, true) == :ok
  end

  test "each worker's events run in their own process, in order", %{workers: workers} do
    ids = Enum.map(workers, &elem(&1, 0))
    recorder = Recorder.attach!(ids)
    n = 3_000
    for {_id, worker} <- workers, do: command!(worker, %{cmd: "flood", count: n, seq: true})
    for id <- ids, do: await(fn -> Recorder.seen(recorder, id) == n end, 30_000)

    pids =
      for id <- ids do
        events = Recorder.events(recorder, id)
        # Every event in the order Python emitted it...
        assert Enum.map(events, &elem(&1, 0)) == Enum.to_list(0..(n - 1))
        # ...executed by one process: the worker's delivery process.
        assert [pid] = events |> Enum.map(&elem(&1, 1)) |> Enum.uniq()
        assert pid == stream(id).delivery
        pid
      end

    assert length(Enum.uniq([Process.whereis(GrpcStream) | pids])) == 3
  end

  test "a slow handler slows only the worker it handles", %{workers: workers} do
    [{slow, slow_worker}, {fast, fast_worker}] = workers
    recorder = Recorder.attach!([slow, fast])
    Recorder.hold(recorder, slow)
    command!(slow_worker, %{cmd: "flood", count: 5_000})
    await(fn -> Recorder.holding?(recorder, slow) end)
    # The slow worker's stream stops reading for want of credit...
    await(fn -> stream(slow).stats.credit_waits > 0 end, 20_000)

    # ...while the other worker's events all arrive.
    for _ <- 1..4, do: command!(fast_worker, %{cmd: "flood", count: 2_500})
    await(fn -> Recorder.seen(recorder, fast) == 10_000 end, 30_000)
    assert Recorder.holding?(recorder, slow)
    assert Recorder.seen(recorder, slow) == 0
  end

  test "a delivery process that dies: its unhandled events are counted, a new one takes over, " <>
         "other workers are undisturbed",
       %{workers: workers} do
    [{victim, victim_worker}, {other, other_worker}] = workers
    forward_events([@dropped])
    recorder = Recorder.attach!([victim, other])
    Recorder.hold(recorder, victim)
    command!(victim_worker, %{cmd: "flood", count: 2_000})
    await(fn -> Recorder.holding?(recorder, victim) end)
    await(fn -> stream(victim).stats.credit_waits > 0 end, 20_000)

    old = stream(victim).delivery
    other_delivery = stream(other).delivery
    ref = Process.monitor(old)
    Process.exit(old, :kill)
    assert_receive {:DOWN, ^ref, :process, ^old, :killed}
    await(fn -> stream(victim).delivery != old end)

    # The events the dead process had taken (in its mailbox, or waiting in
    # the handler) are counted as dropped_receiver_down.
    assert stream(victim).stats.dropped_receiver_down > 0

    # The new process gets the rest of the flood and what follows.
    Recorder.release(recorder, victim)
    command!(victim_worker, %{cmd: "flood", count: 500})
    await(fn -> command!(victim_worker, %{cmd: "wait_drained", timeout_ms: 200})["drained"] end)
    python = command!(victim_worker, %{cmd: "stats"})

    # Every event Python sent is handled or counted.
    await(fn ->
      native = stream(victim).stats
      drops = Enum.sum(for k <- @native_drops, do: Map.fetch!(native, k))

      native.received == python["sent"] and native.received == native.delivered + drops and
        Recorder.seen(recorder, victim) == native.delivered
    end)

    assert Recorder.seen(recorder, victim) > 0
    assert recorder |> Recorder.events(victim) |> Enum.all?(&(elem(&1, 1) != old))

    # ...and reported as drops.
    lost = stream(victim).stats.dropped_receiver_down
    assert reported(victim, :dropped_receiver_down, lost) == lost

    # The other worker noticed nothing.
    assert stream(other).delivery == other_delivery
    command!(other_worker, %{cmd: "flood", count: 1_000})
    await(fn -> Recorder.seen(recorder, other) == 1_000 end, 20_000)
    assert stream(other).stats.dropped_receiver_down == 0
    assert Native.stream_stats(handle(other)).delivered == 1_000
  end

  # Sums the worker's drop reports of `reason` until they reach `expected`
  # (or 10 s pass).
  defp reported(worker_id, reason, expected, sum \\ 0) do
    if sum >= expected do
      sum
    else
      receive do
        {:event, @dropped, %{count: n}, %{reason: ^reason, worker_id: ^worker_id}} ->
          reported(worker_id, reason, expected, sum + n)
      after
        10_000 -> sum
      end
    end
  end

  defp address(worker), do: Snakepit.Telemetry.PythonWorker.address(worker)

  defp handle(worker_id), do: :sys.get_state(GrpcStream).workers[worker_id].handle
end
