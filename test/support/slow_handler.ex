defmodule Snakepit.Telemetry.SlowHandler do
  @moduledoc false
  # A deliberately slow `:telemetry` handler for the backpressure tests: it
  # busy-waits `busy_us` microseconds per event of one worker and counts the
  # events it saw in a `:counters` array (no messages, so the test process's
  # mailbox and memory stay out of the measurement).

  @doc "Attaches to `event`; returns the counter. Detached when the test ends."
  def attach!(event, worker_id, busy_us) do
    id = "slow-handler-#{System.unique_integer([:positive])}"
    counter = :counters.new(1, [:write_concurrency])
    config = %{worker_id: worker_id, busy_us: busy_us, counter: counter}
    :ok = :telemetry.attach(id, event, &__MODULE__.handle/4, config)
    ExUnit.Callbacks.on_exit(fn -> :telemetry.detach(id) end)
    counter
  end

  @doc "Events the handler has seen."
  def seen(counter), do: :counters.get(counter, 1)

  @doc false
  def handle(_event, _measurements, %{worker_id: worker_id}, %{worker_id: worker_id} = config) do
    busy_wait(System.monotonic_time(:microsecond) + config.busy_us)
    :counters.add(config.counter, 1, 1)
  end

  def handle(_event, _measurements, _metadata, _config), do: :ok

  defp busy_wait(until) do
    if System.monotonic_time(:microsecond) < until, do: busy_wait(until)
  end
end
