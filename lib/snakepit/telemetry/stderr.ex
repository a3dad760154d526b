defmodule Snakepit.Telemetry.Stderr do
  @moduledoc """
  The stderr path: for workers that cannot serve the telemetry stream, the
  Python `stderr` backend writes one event per line,

      SNAKEPIT_TELEMETRY_EVENT {"event_parts":["python","call","stop"],"measurements":{"duration":1500},...}

  and `handle_line/2` turns such a line into the same `:telemetry` event the
  gRPC path would produce: the NIF decodes it (serde_json) with the same
  catalog, atom safety and limits, and the event gets the same standard
  metadata. Other lines are left alone (`:ignored`), so a worker's whole
  output can be passed through it. `Snakepit.Telemetry.PythonWorker` does
  that with its `:stderr_telemetry` option.
  """

  alias Snakepit.Telemetry.{Config, Events, Native}

  @prefix "SNAKEPIT_TELEMETRY_EVENT "

  @doc "The prefix of a telemetry line."
  @spec prefix() :: String.t()
  def prefix, do: @prefix

  @doc """
  Executes the event on a telemetry line. `worker_ctx` names the worker
  (`:worker_id`, `:pool_name`). Returns `:ok`, `:ignored` for any other line,
  or `{:error, reason}` (`:invalid_json`, `:unknown_event`, `:malformed`,
  `:too_large`), each counted in `stats/0`.
  """
  @spec handle_line(String.t(), map() | keyword()) :: :ok | :ignored | {:error, atom()}
  def handle_line(@prefix <> _ = line, worker_ctx) do
    ctx = Map.new(worker_ctx)
    pool = Map.fetch!(ctx, :pool_name)

    case Native.decode_json_line(line, options(pool)) do
      {:ok, {event, measurements, metadata}} ->
        base = %{node: node(), pool_name: pool, worker_id: Map.fetch!(ctx, :worker_id)}

        :telemetry.execute(
          event,
          Events.from_python(event, measurements),
          Map.merge(metadata, base)
        )

      {:error, reason} ->
        {:error, reason}
    end
  end

  def handle_line(line, _worker_ctx) when is_binary(line), do: :ignored

  @doc "Counters of every line decoded in this VM (the keys of a stream's)."
  @spec stats() :: %{atom() => non_neg_integer()}
  def stats, do: Native.json_stats()

  defp options(pool) do
    pool
    |> Config.stream()
    |> Map.new()
    |> Map.merge(%{
      connect_timeout_ms: 0,
      native_per_sec: System.convert_time_unit(1, :second, :native)
    })
  end
end
