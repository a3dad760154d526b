defmodule Snakepit.Telemetry.Events do
  @moduledoc """
  Emits the events that Elixir code owns (the infrastructure and gRPC layers
  of the catalog, e.g. `[:snakepit, :pool, :worker, :spawned]`), checked
  against the catalog.

  Every event gets `:node` and, when the process has one, `:correlation_id`
  (see `Snakepit.Telemetry.Correlation`) unless the metadata already has them.

      Events.execute([:snakepit, :pool, :status], %{available: 3, busy: 1, queue_depth: 0},
        %{pool_name: :default})

      Events.span([:snakepit, :grpc, :call], %{rpc_method: "ExecuteTool"}, fn ->
        {call_worker(), %{result: :success}}
      end)
  """

  alias Snakepit.Telemetry.{Correlation, Naming, PythonError}

  @doc """
  Executes a catalog event that Elixir emits. Returns
  `{:error, {:unknown_event, event}}` for a name not in the catalog (or one
  only Python emits), `{:error, {:invalid, ...}}` for non-map arguments.
  """
  @spec execute([atom()], map(), map()) :: :ok | {:error, term()}
  def execute(event, measurements, metadata \\ %{})

  def execute(event, measurements, metadata) when is_map(measurements) and is_map(metadata) do
    with :ok <- check(event) do
      :telemetry.execute(event, measurements, standard(metadata))
    end
  end

  def execute(_event, measurements, metadata),
    do: {:error, {:invalid, measurements: measurements, metadata: metadata}}

  @doc """
  Runs `fun` as a span: `prefix ++ [:start]` with `system_time` and
  `monotonic_time`, then `prefix ++ [:stop]` with `duration`, or
  `prefix ++ [:exception]` with `kind`, `reason` and `stacktrace` if it
  raises (the exception propagates). `fun` returns `{result, stop_metadata}`,
  as for `:telemetry.span/3`. Raises `ArgumentError` for a prefix whose
  start, stop and exception events are not all in the catalog.
  """
  @spec span([atom()], map(), (() -> {result, map()})) :: result when result: term()
  def span(prefix, metadata, fun)
      when is_list(prefix) and is_map(metadata) and is_function(fun, 0) do
    for action <- [:start, :stop, :exception] do
      with {:error, reason} <- check(prefix ++ [action]) do
        raise ArgumentError, "not a span in the catalog: #{inspect(prefix)} (#{inspect(reason)})"
      end
    end

    # Stop and exception events take the metadata `fun` returns: the
    # standard keys are added there too.
    :telemetry.span(prefix, standard(metadata), fn ->
      case fun.() do
        {result, stop_metadata} -> {result, standard(stop_metadata)}
        {result, extra, stop_metadata} -> {result, extra, standard(stop_metadata)}
      end
    end)
  end

  @doc """
  Completes the measurements and metadata of a Python event (decoded by the
  NIF, from the gRPC stream or a stderr line) with what `:telemetry.span/3`
  gives an Elixir span, so span-aware tools read Python spans alike. Returns
  `{measurements, metadata}`:

    * start events (`[..., :start]`): `monotonic_time` from `system_time`,
      in this VM's monotonic clock (`system_time - :erlang.time_offset()`);
    * stop and exception events: `monotonic_time` from the emit time
      (`metadata.emit_time`, set by the NIF on every Python event);
    * exception events: `kind: :error`, `reason:` a
      `Snakepit.Telemetry.PythonError` from `error_type`/`error_message`
      (which stay), and `stacktrace:` the Python traceback or `[]` (see
      `Snakepit.Telemetry.PythonError` for its shape).

  `telemetry_span_context` (the same on a span's start, stop and exception,
  different for every span) and `emit_time` come from the NIF. Python cannot
  set any of these keys: the NIF drops them from Python's metadata (and
  `monotonic_time` from its measurements) and counts them in the stream's
  `reserved_keys_dropped`.
  """
  @spec from_python([atom()], map(), map()) :: {map(), map()}
  def from_python(event, measurements, metadata)
      when is_list(event) and is_map(measurements) and is_map(metadata) do
    case List.last(event) do
      :start ->
        {put_monotonic(measurements, Map.get(measurements, :system_time)), metadata}

      :stop ->
        {put_monotonic(measurements, Map.get(metadata, :emit_time)), metadata}

      :exception ->
        {put_monotonic(measurements, Map.get(metadata, :emit_time)), exception(metadata)}

      _ ->
        {measurements, metadata}
    end
  end

  # `system_time` is a wall-clock time in native units; this VM's monotonic
  # time of that moment is `system_time - time_offset`.
  defp put_monotonic(measurements, system_time) when is_integer(system_time),
    do: Map.put_new(measurements, :monotonic_time, system_time - :erlang.time_offset())

  defp put_monotonic(measurements, _system_time), do: measurements

  defp exception(metadata) do
    reason = %PythonError{
      type: text(Map.get(metadata, :error_type)),
      message: text(Map.get(metadata, :error_message))
    }

    metadata
    |> Map.put(:kind, :error)
    |> Map.put(:reason, reason)
    |> Map.put_new(:stacktrace, [])
  end

  defp text(value) when is_binary(value), do: value
  defp text(_value), do: ""

  defp check(event) do
    case Naming.lookup(event) do
      %{python: nil} -> :ok
      _ -> {:error, {:unknown_event, event}}
    end
  end

  defp standard(metadata) do
    metadata = Map.put_new(metadata, :node, node())

    case Correlation.get() do
      nil -> metadata
      id -> Map.put_new(metadata, :correlation_id, id)
    end
  end
end
