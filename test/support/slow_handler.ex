defmodule Snakepit.Telemetry.SlowHandler do
  @moduledoc false
  # A deliberately slow `:telemetry` handler for the backpressure tests: it
  # busy-waits `busy_us` microseconds per event of one worker and counts the
  # events it saw in a `:counters` array (no messages, so the test process's
  # mailbox and memory stay out of the measurement).
  #
  # With `hold: true` it starts closed: the first event it sees waits (in the
  # handler, so in the process that executes the events) until `release/1`,
  # which makes the handler slower than any producer by construction rather
  # than by machine speed. The wait polls an `:atomics` flag with
  # `Process.sleep/1`, which takes no message out of the mailbox of the
  # process it runs in.

  # Never hold longer than this, so a failing test cannot hang the suite.
  @max_hold_ms 60_000

  @doc "Attaches to `event`; returns the handler's state. Detached when the test ends."
  def attach!(event, worker_id, busy_us, opts \\ []) do
    id = "slow-handler-#{System.unique_integer([:positive])}"
    counter = :counters.new(1, [:write_concurrency])
    gate = :atomics.new(1, [])
    if Keyword.get(opts, :hold, false), do: :atomics.put(gate, 1, 1)
    config = %{worker_id: worker_id, busy_us: busy_us, counter: counter, gate: gate}
    :ok = :telemetry.attach(id, event, &__MODULE__.handle/4, config)

    ExUnit.Callbacks.on_exit(fn ->
      :atomics.put(gate, 1, 0)
      :telemetry.detach(id)
    end)

    %{counter: counter, gate: gate}
  end

  @doc "Events the handler has finished."
  def seen(%{counter: counter}), do: :counters.get(counter, 1)

  @doc "Opens a handler attached with `hold: true`."
  def release(%{gate: gate}), do: :atomics.put(gate, 1, 0)

  @doc "Whether an event is waiting in a held handler."
  def holding?(%{gate: gate}), do: :atomics.get(gate, 1) == 2

  @doc false
  def handle(_event, _measurements, %{worker_id: worker_id}, %{worker_id: worker_id} = config) do
    hold(config.gate, System.monotonic_time(:millisecond) + @max_hold_ms)
    busy_wait(System.monotonic_time(:microsecond) + config.busy_us)
    :counters.add(config.counter, 1, 1)
  end

  def handle(_event, _measurements, _metadata, _config), do: :ok

  defp hold(gate, until) do
    # 1: closed, nobody waiting yet; 2: closed, an event is waiting.
    if :atomics.compare_exchange(gate, 1, 1, 2) in [:ok, 2] and
         System.monotonic_time(:millisecond) < until do
      Process.sleep(1)
      hold(gate, until)
    end
  end

  defp busy_wait(until) do
    if System.monotonic_time(:microsecond) < until, do: busy_wait(until)
  end
end
