defmodule Snakepit.Telemetry.GrpcStream do
  @moduledoc """
  Consumes the telemetry streams of Python workers and re-emits their events
  as `:telemetry` events.

  Register each worker once it is started (`register_worker/1`); the NIF opens
  a `StreamTelemetry` call to it, retrying until the worker listens or the
  connect timeout passes, decodes every event against the compiled-in catalog
  and sends the decoded events here in batches. Each event is executed with
  `:telemetry.execute/3`; its metadata always holds `:node`, `:pool_name` and
  `:worker_id`, and `:correlation_id` when the event had one.

  Handlers run in this process. A handler that raises is detached by
  `:telemetry` (and reported as `[:telemetry, :handler, :failure]`); it never
  takes this process down.

  ## Messages from the NIF

  The stream tasks send this process:

    * `{:snakepit_telemetry, stream_id, status}` where status is
      `:connecting`, `:open` or `{:closed, reason}`; reason is `:stopped`,
      `:end_of_stream`, `{:error, text}` or `{:connect_failed, text}`.
    * `{:snakepit_telemetry_events, stream_id, [{event, measurements, metadata}]}`.

  Messages for a stream that is no longer registered are ignored.

  ## Configuration

      config :snakepit_telemetry, :stream,
        connect_timeout_ms: 10_000,
        retry_interval_ms: 100,
        max_batch: 512,
        max_message_bytes: 4_194_304
  """
  use GenServer

  require Logger

  alias Snakepit.Telemetry.Native

  @type worker_id :: String.t()

  @typedoc """
  A worker to stream from: `:worker_id` (string), `:pool_name` (atom or
  string), `:address` (`"host:port"` or `"unix:/path"`), optionally
  `:python_pid` (the worker's OS pid) and `:connect_timeout_ms`.
  """
  @type worker_ctx :: map() | keyword()

  @type stream_info :: %{
          worker_id: worker_id(),
          pool_name: atom() | String.t(),
          address: String.t(),
          python_pid: non_neg_integer() | nil,
          status: :connecting | :open | {:closed, term()},
          stats: %{atom() => non_neg_integer()}
        }

  @stream_defaults [
    connect_timeout_ms: 10_000,
    retry_interval_ms: 100,
    max_batch: 512,
    max_message_bytes: 4 * 1024 * 1024
  ]

  @doc false
  def start_link(opts \\ []) do
    GenServer.start_link(__MODULE__, opts, name: Keyword.get(opts, :name, __MODULE__))
  end

  @doc """
  Starts streaming telemetry from a worker.

  Returns `:ok` once the stream is being opened (its progress shows in
  `list_streams/0`), `{:error, :already_registered}`, or
  `{:error, {:invalid_worker_ctx, reason}}` for bad input.
  """
  @spec register_worker(worker_ctx(), GenServer.server()) ::
          :ok | {:error, :already_registered | {:invalid_worker_ctx, term()}}
  def register_worker(worker_ctx, server \\ __MODULE__) do
    with {:ok, ctx} <- validate_ctx(worker_ctx) do
      GenServer.call(server, {:register, ctx})
    end
  end

  @doc "Closes the worker's stream at once and forgets the worker."
  @spec unregister_worker(worker_id(), GenServer.server()) :: :ok | {:error, :unknown_worker}
  def unregister_worker(worker_id, server \\ __MODULE__) do
    GenServer.call(server, {:unregister, worker_id})
  end

  @doc "Every registered worker with its stream status and counters."
  @spec list_streams(GenServer.server()) :: [stream_info()]
  def list_streams(server \\ __MODULE__) do
    GenServer.call(server, :list_streams)
  end

  @doc """
  Switches the worker's telemetry on or off.

  `:ok` means the control message is on its way to Python.
  """
  @spec toggle(worker_id(), boolean(), GenServer.server()) ::
          :ok | {:error, :unknown_worker | :not_connected | :control_queue_full | :closed}
  def toggle(worker_id, enabled, server \\ __MODULE__) when is_boolean(enabled) do
    GenServer.call(server, {:control, worker_id, {:toggle, enabled}})
  end

  @doc """
  Sets the sampling rate (0.0 to 1.0) for the worker's events whose dotted
  Python name matches one of the glob `patterns`, or for all events when
  there are none.
  """
  @spec update_sampling(worker_id(), number(), [String.t()], GenServer.server()) ::
          :ok | {:error, term()}
  def update_sampling(worker_id, rate, patterns \\ [], server \\ __MODULE__) do
    cond do
      not (is_number(rate) and rate >= 0 and rate <= 1) ->
        {:error, {:invalid_rate, rate}}

      not string_list?(patterns) ->
        {:error, {:invalid_patterns, patterns}}

      true ->
        GenServer.call(server, {:control, worker_id, {:sampling, rate / 1, patterns}})
    end
  end

  @doc """
  Sets allow and deny lists of glob patterns over dotted Python event names.
  Deny wins; an empty allow list allows every event.
  """
  @spec update_filter(worker_id(), keyword(), GenServer.server()) :: :ok | {:error, term()}
  def update_filter(worker_id, filter, server \\ __MODULE__) do
    with {:ok, filter} <- Keyword.validate(filter, allow: [], deny: []),
         true <- string_list?(filter[:allow]) and string_list?(filter[:deny]) do
      GenServer.call(server, {:control, worker_id, {:filter, filter[:allow], filter[:deny]}})
    else
      _ -> {:error, {:invalid_filter, filter}}
    end
  end

  ## Server

  @impl GenServer
  def init(_opts) do
    config =
      Keyword.merge(@stream_defaults, Application.get_env(:snakepit_telemetry, :stream, []))

    native_per_sec = System.convert_time_unit(1, :second, :native)
    {:ok, %{workers: %{}, streams: %{}, config: config, native_per_sec: native_per_sec}}
  end

  @impl GenServer
  def handle_call({:register, ctx}, _from, state) do
    if Map.has_key?(state.workers, ctx.worker_id) do
      {:reply, {:error, :already_registered}, state}
    else
      case open_stream(ctx, state) do
        {:ok, worker} ->
          state = put_in(state.workers[ctx.worker_id], worker)
          state = put_in(state.streams[worker.stream_id], ctx.worker_id)
          {:reply, :ok, state}

        {:error, {:invalid_address, text}} ->
          {:reply, {:error, {:invalid_worker_ctx, {:address, text}}}, state}

        {:error, reason} ->
          {:reply, {:error, reason}, state}
      end
    end
  end

  def handle_call({:unregister, worker_id}, _from, state) do
    case Map.pop(state.workers, worker_id) do
      {nil, _} ->
        {:reply, {:error, :unknown_worker}, state}

      {worker, workers} ->
        Native.stream_close(worker.handle)
        streams = Map.delete(state.streams, worker.stream_id)
        {:reply, :ok, %{state | workers: workers, streams: streams}}
    end
  end

  def handle_call(:list_streams, _from, state) do
    streams =
      for {_, w} <- Enum.sort_by(state.workers, &elem(&1, 0)) do
        %{
          worker_id: w.worker_id,
          pool_name: w.pool_name,
          address: w.address,
          python_pid: w.python_pid,
          status: w.status,
          stats: Native.stream_stats(w.handle)
        }
      end

    {:reply, streams, state}
  end

  def handle_call({:control, worker_id, control}, _from, state) do
    reply =
      case Map.fetch(state.workers, worker_id) do
        :error -> {:error, :unknown_worker}
        {:ok, worker} -> send_control(worker.handle, control)
      end

    {:reply, reply, state}
  end

  @impl GenServer
  def handle_info({:snakepit_telemetry_events, stream_id, events}, state) do
    with {:ok, worker_id} <- Map.fetch(state.streams, stream_id),
         {:ok, worker} <- Map.fetch(state.workers, worker_id) do
      base = worker.metadata

      Enum.each(events, fn {event, measurements, metadata} ->
        :telemetry.execute(event, measurements, Map.merge(metadata, base))
      end)
    end

    {:noreply, state}
  end

  def handle_info({:snakepit_telemetry, stream_id, status}, state) do
    case Map.fetch(state.streams, stream_id) do
      {:ok, worker_id} ->
        log_status(worker_id, status)
        {:noreply, update_in(state.workers[worker_id], &%{&1 | status: status})}

      :error ->
        {:noreply, state}
    end
  end

  def handle_info(message, state) do
    Logger.debug("#{inspect(__MODULE__)} ignored #{inspect(message)}")
    {:noreply, state}
  end

  ## Helpers

  defp open_stream(ctx, state) do
    stream_id = System.unique_integer([:positive, :monotonic])

    options =
      state.config
      |> Keyword.take(Keyword.keys(@stream_defaults))
      |> Map.new()
      |> Map.merge(
        for {k, v} <- Map.take(ctx, [:connect_timeout_ms]), v != nil, into: %{}, do: {k, v}
      )
      |> Map.put(:native_per_sec, state.native_per_sec)

    with {:ok, handle} <- Native.stream_open(self(), stream_id, ctx.address, options) do
      metadata = %{node: node(), pool_name: ctx.pool_name, worker_id: ctx.worker_id}

      {:ok,
       ctx
       |> Map.take([:worker_id, :pool_name, :address, :python_pid])
       |> Map.merge(%{
         stream_id: stream_id,
         handle: handle,
         status: :connecting,
         metadata: metadata
       })}
    end
  end

  defp send_control(handle, {:toggle, enabled}), do: Native.stream_toggle(handle, enabled)

  defp send_control(handle, {:sampling, rate, patterns}),
    do: Native.stream_sampling(handle, rate, patterns)

  defp send_control(handle, {:filter, allow, deny}), do: Native.stream_filter(handle, allow, deny)

  defp log_status(worker_id, {:closed, reason}) when reason != :stopped do
    Logger.warning("telemetry stream of worker #{worker_id} closed: #{inspect(reason)}")
  end

  defp log_status(_worker_id, _status), do: :ok

  defp validate_ctx(ctx) when is_list(ctx) do
    if Keyword.keyword?(ctx),
      do: validate_ctx(Map.new(ctx)),
      else: {:error, {:invalid_worker_ctx, :not_a_map}}
  end

  defp validate_ctx(%{} = ctx) do
    cond do
      not (is_binary(ctx[:worker_id]) and ctx[:worker_id] != "") ->
        {:error, {:invalid_worker_ctx, {:worker_id, ctx[:worker_id]}}}

      not ((is_atom(ctx[:pool_name]) and ctx[:pool_name] != nil) or is_binary(ctx[:pool_name])) ->
        {:error, {:invalid_worker_ctx, {:pool_name, ctx[:pool_name]}}}

      not is_binary(ctx[:address]) ->
        {:error, {:invalid_worker_ctx, {:address, ctx[:address]}}}

      not (is_nil(ctx[:python_pid]) or (is_integer(ctx[:python_pid]) and ctx[:python_pid] > 0)) ->
        {:error, {:invalid_worker_ctx, {:python_pid, ctx[:python_pid]}}}

      not (is_nil(ctx[:connect_timeout_ms]) or
               (is_integer(ctx[:connect_timeout_ms]) and ctx[:connect_timeout_ms] >= 0)) ->
        {:error, {:invalid_worker_ctx, {:connect_timeout_ms, ctx[:connect_timeout_ms]}}}

      true ->
        {:ok, Map.put_new(ctx, :python_pid, nil)}
    end
  end

  defp validate_ctx(_ctx), do: {:error, {:invalid_worker_ctx, :not_a_map}}

  defp string_list?(list), do: is_list(list) and Enum.all?(list, &is_binary/1)
end
