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

  alias Snakepit.Telemetry.{Correlation, Naming}

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

  @doc false
  # Python start events carry the wall clock; :telemetry users also expect
  # `monotonic_time` in this VM's monotonic clock, so both Python paths
  # (gRPC and stderr) derive it here.
  @spec from_python([atom()], map()) :: map()
  def from_python(event, %{system_time: t} = measurements) when is_integer(t) do
    if List.last(event) == :start,
      do: Map.put_new(measurements, :monotonic_time, t - :erlang.time_offset()),
      else: measurements
  end

  def from_python(_event, measurements), do: measurements

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
