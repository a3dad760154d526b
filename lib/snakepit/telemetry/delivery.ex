defmodule Snakepit.Telemetry.Delivery do
  @moduledoc false
  # One process per registered worker: it executes the worker's events with
  # :telemetry.execute/3, so the handlers of different workers run in
  # different processes (on different schedulers), a slow handler slows only
  # the workers whose events it handles, and GrpcStream itself never runs a
  # handler (control and status calls never wait behind events).
  #
  # The NIF sends this process the worker's events
  # ({:snakepit_telemetry_events, stream_id, events}); it acknowledges each
  # batch with Native.stream_ack/2 once executed (the credit that bounds its
  # mailbox). GrpcStream sends it:
  #
  #   * {:stream, stream_id, handle}: the worker's new stream (after every
  #     open); events of a stream whose handle has not arrived yet are
  #     executed at once and acknowledged when it does;
  #   * {:emit, event, measurements, metadata}: the worker's lifecycle and
  #     health events, executed here too so that every handler runs in a
  #     delivery process, in order with the worker's events;
  #   * :stop (after unregister_worker/1): executes what is already in the
  #     mailbox, forgets the worker's Python counters, then exits.
  #
  # It monitors GrpcStream and exits with it (the streams close then). If it
  # dies, GrpcStream starts another and redirects the stream to it
  # (Native.stream_redirect/2): the events it held unacknowledged are counted
  # as dropped_receiver_down. Its Python counters live in an ETS table
  # (Registrations.python/1) under the registration's key, so a new delivery
  # process (and a restarted GrpcStream) carries them on.
  use GenServer, restart: :temporary

  alias Snakepit.Telemetry.{Events, Native, Registrations}

  @python_stats [:snakepit, :telemetry, :python, :stats]
  @message [:snakepit, :grpc, :stream, :message]
  # Python stats measurements that are levels, not cumulative counters.
  @python_gauges [:queue_len]

  @doc false
  def start_link(args), do: GenServer.start_link(__MODULE__, args)

  @doc false
  # Starts a worker's delivery process under the delivery supervisor.
  @spec start(reference(), map(), pid()) :: DynamicSupervisor.on_start_child()
  def start(key, metadata, owner) do
    DynamicSupervisor.start_child(
      Snakepit.Telemetry.DeliverySupervisor,
      {__MODULE__, %{key: key, metadata: metadata, owner: owner}}
    )
  end

  @doc false
  # The Python counters of a worker summed over its Python processes (the
  # latest levels for gauges), as reported so far.
  @spec python_totals(reference()) :: map()
  def python_totals(key) do
    python = Registrations.python(key)
    add_counters(python.current, python.base)
  end

  @impl GenServer
  def init(%{key: key, metadata: metadata, owner: owner}) do
    Process.monitor(owner)

    {:ok,
     %{
       key: key,
       metadata: metadata,
       owner: owner,
       stream_id: nil,
       handle: nil,
       # Events of a stream whose handle has not arrived yet: {stream_id, n}.
       early: nil
     }}
  end

  @impl GenServer
  def handle_info({:snakepit_telemetry_events, stream_id, events}, state) do
    count = length(events)
    :telemetry.execute(@message, %{events: count}, state.metadata)
    Enum.each(events, &execute(&1, state))
    {:noreply, ack(state, stream_id, count)}
  end

  def handle_info({:emit, event, measurements, metadata}, state) do
    :telemetry.execute(event, measurements, metadata)
    {:noreply, state}
  end

  def handle_info({:stream, stream_id, handle}, state) do
    case state.early do
      {^stream_id, n} -> Native.stream_ack(handle, n)
      _ -> :ok
    end

    {:noreply, %{state | stream_id: stream_id, handle: handle, early: nil}}
  end

  def handle_info(:stop, state) do
    Registrations.delete_python(state.key)
    {:stop, :normal, state}
  end

  def handle_info({:DOWN, _ref, :process, owner, _reason}, %{owner: owner} = state),
    do: {:stop, :normal, state}

  def handle_info(_message, state), do: {:noreply, state}

  # Acknowledges to the stream that sent the events. Stream ids grow, so an
  # id above the current one is a stream GrpcStream has opened and not yet
  # announced; a lower one is a closed stream, which needs no ack.
  defp ack(%{stream_id: stream_id, handle: handle} = state, stream_id, count) do
    Native.stream_ack(handle, count)
    state
  end

  defp ack(state, stream_id, count) when state.stream_id == nil or stream_id > state.stream_id do
    case state.early do
      {^stream_id, n} -> %{state | early: {stream_id, n + count}}
      _ -> %{state | early: {stream_id, count}}
    end
  end

  defp ack(state, _old_stream_id, _count), do: state

  defp execute({@python_stats, measurements, metadata}, state) do
    :telemetry.execute(@python_stats, measurements, Map.merge(metadata, state.metadata))
    python_report(state.key, measurements, metadata)
  end

  defp execute({event, measurements, metadata}, state) do
    {measurements, metadata} = Events.from_python(event, measurements, metadata)
    :telemetry.execute(event, measurements, Map.merge(metadata, state.metadata))
  end

  # Python's counters start at 0 in each process (and each TelemetryStream).
  # A report from another instance, or a counter that went down, means a new
  # one: the previous instance's last counters are kept in `base`, so the
  # worker's figures (and the drops reported from them) stay cumulative and
  # nothing is counted twice or lost.
  defp python_report(key, measurements, metadata) do
    instance = Map.get(metadata, :instance_id)
    python = Registrations.python(key)
    counters = Map.drop(python.current, @python_gauges)

    restarted? =
      python.instance != instance or
        Enum.any?(counters, fn {key, old} -> Map.get(measurements, key, 0) < old end)

    base = if restarted?, do: add_counters(python.base, counters), else: python.base
    # When Python took these figures (its emit time), else now.
    at = Map.get_lazy(metadata, :emit_time, &System.system_time/0)

    Registrations.put_python(key, %{
      current: measurements,
      instance: instance,
      base: base,
      at: at,
      implementation: implementation(metadata)
    })
  end

  # The worker's Python implementation as its report names it; a string
  # from Python becomes one of two fixed atoms, never a new one.
  defp implementation(%{implementation: "native"}), do: :native
  defp implementation(%{implementation: "python"}), do: :python
  defp implementation(_metadata), do: nil

  @doc false
  # The implementation named by the worker's latest Python stats report
  # (`nil`: no report yet, or a worker that does not say).
  @spec python_implementation(reference()) :: :native | :python | nil
  def python_implementation(key), do: Map.get(Registrations.python(key), :implementation)

  @doc false
  # How old the worker's latest Python report is, in ms (nil: none yet).
  @spec python_age_ms(reference()) :: non_neg_integer() | nil
  def python_age_ms(key) do
    case Registrations.python(key) do
      %{at: at} when is_integer(at) ->
        max(0, System.convert_time_unit(System.system_time() - at, :native, :millisecond))

      _ ->
        nil
    end
  end

  defp add_counters(a, b), do: Map.merge(a, b, fn _k, x, y -> x + y end)
end
