defmodule Snakepit.Telemetry.Stderr do
  @moduledoc """
  The stderr path: for workers that cannot serve the telemetry stream, the
  Python `stderr` backend writes one event per line,

      SNAKEPIT_TELEMETRY_EVENT {"event_parts":["python","call","stop"],"measurements":{"duration":1500},...}

  and `handle_line/2` turns such a line into the same `:telemetry` event the
  gRPC path would produce: the NIF decodes it (serde_json) with the same
  catalog, atom safety and limits, and the event gets the same standard
  metadata. Other lines are left alone (`:ignored`), so a worker's whole
  output can be passed through it, line by line (e.g. from the port that runs
  the worker; the project's dev/test `PythonWorker` in `support/` does that
  with its `:stderr_telemetry` option).

  No secret is involved (see `Snakepit.Telemetry.Secret`): the lines come
  from the worker's own stderr, a pipe only the process that spawned the
  worker holds, so only the worker's parent reads them. Pass only the
  worker's stderr here, never input another process can write.
  """

  alias Snakepit.Telemetry.{Config, Events, Native}

  @prefix "SNAKEPIT_TELEMETRY_EVENT "

  @doc "The prefix of a telemetry line."
  @spec prefix() :: String.t()
  def prefix, do: @prefix

  @doc """
  Executes the event on a telemetry line. `worker_ctx` names the worker
  (a map or keyword list with `:worker_id` and `:pool_name`).

  Never raises, whatever the arguments. Returns `:ok`, `:ignored` for any
  other line (whatever its bytes), or `{:error, reason}`, each counted in
  `stats/0`:

    * `:too_large` (over the pool's `max_message_bytes`), `:invalid_utf8`,
      `:invalid_json` - counted under that name and as `dropped_malformed`;
    * `:unknown_event`, `:malformed` - `dropped_unknown_event`,
      `dropped_malformed`; `:encode_failed` - `dropped_encode`;
    * `:invalid_line` (not a binary), `:invalid_worker_ctx`,
      `:invalid_config` (the pool's `:stream` settings cannot be used) -
      `invalid_input`: caller errors, not worker lines, so not in `received`.

  A line over 8 KiB is decoded on a dirty scheduler, so even a line of
  `max_message_bytes` never holds a normal scheduler for long.
  """
  @spec handle_line(term(), term()) :: :ok | :ignored | {:error, atom()}
  def handle_line(@prefix <> _ = line, worker_ctx) do
    case context(worker_ctx) do
      {:ok, pool, worker_id} -> decode(line, pool, worker_id)
      :error -> invalid_input(:invalid_worker_ctx)
    end
  end

  def handle_line(line, _worker_ctx) when is_binary(line), do: :ignored
  def handle_line(_line, _worker_ctx), do: invalid_input(:invalid_line)

  defp decode(line, pool, worker_id) do
    with {:ok, options} <- options(pool),
         {:ok, {event, measurements, metadata}} <- Native.decode_json_line(line, options) do
      base = %{node: node(), pool_name: pool, worker_id: worker_id}
      {measurements, metadata} = Events.from_python(event, measurements, metadata)
      :telemetry.execute(event, measurements, Map.merge(metadata, base))
    end
  end

  defp context(ctx) when is_map(ctx) do
    case ctx do
      %{pool_name: pool, worker_id: worker_id} -> {:ok, pool, worker_id}
      _ -> :error
    end
  end

  defp context(ctx) when is_list(ctx) do
    if Keyword.keyword?(ctx), do: context(Map.new(ctx)), else: :error
  end

  defp context(_ctx), do: :error

  defp invalid_input(reason) do
    Native.json_count_invalid_input()
    {:error, reason}
  end

  @doc """
  Counters of every line decoded in this VM: the keys of a stream's
  (`received == delivered + dropped_*` for telemetry lines), plus
  `too_large`, `invalid_utf8`, `invalid_json` (lines, also in
  `dropped_malformed`) and `invalid_input` (calls refused before decoding).
  """
  @spec stats() :: %{atom() => non_neg_integer()}
  def stats, do: Native.json_stats()

  # The NIF checks the options too (a bad value is :invalid_options); a
  # config that cannot even be read must not take the caller down either.
  defp options(pool) do
    case Config.fetch(:stream, pool) do
      {:ok, stream} ->
        {:ok,
         stream
         |> Map.new()
         |> Map.merge(%{
           connect_timeout_ms: 0,
           native_per_sec: System.convert_time_unit(1, :second, :native)
         })}

      {:error, _message} ->
        invalid_input(:invalid_config)
    end
  end
end
