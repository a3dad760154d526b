defmodule Snakepit.Telemetry.GrpcStream do
  @moduledoc """
  Consumes the telemetry streams of Python workers, re-emits their events as
  `:telemetry` events, and steers each worker's telemetry live.

  Register each worker (`register_worker/1`); the NIF opens a
  `StreamTelemetryBatches` call to it (or `StreamTelemetry` when the worker
  does not implement that; negotiated on every connection), decodes every
  event against the compiled-in catalog and sends the decoded events here in
  batches. Each event is executed with `:telemetry.execute/3`; its metadata
  always holds `:node`, `:pool_name` and `:worker_id`, and `:correlation_id`
  when the event had one.

  ## Delivery: which process runs the handlers

  Each registered worker has a **delivery process** of its own
  (`:delivery` in `list_streams/0`, supervised by
  `Snakepit.Telemetry.DeliverySupervisor`). The NIF sends the worker's
  events there, and that process executes them, in the order the worker
  emitted them, together with the worker's lifecycle and drop events
  (`[:snakepit, :grpc, ...]`, `[:snakepit, :telemetry, :events, :dropped]`).
  So:

    * handlers of different workers run in different processes, on
      different schedulers: N workers are not funnelled through one process;
    * a slow handler slows only the workers whose events it handles, through
      their own credit (see "Backpressure");
    * this process runs no handler at all: `register_worker/1`,
      `unregister_worker/1`, `list_streams/0` and the control calls answer
      at once, however busy the handlers are.

  A handler that raises is detached by `:telemetry` (and reported as
  `[:telemetry, :handler, :failure]`); it never takes a delivery process
  down. If a delivery process dies anyway (killed, or a bug), this process
  starts another at once and points the worker's stream at it: the events
  the dead one had received and not handled are counted as
  `dropped_receiver_down` (and reported like every drop; events of the batch
  it was executing may have reached some handlers before it died), the new
  process gets everything after, and no other worker notices.
  `unregister_worker/1` lets the worker's delivery process execute what it
  already holds, then stops it.

  ## Backpressure

  Each batch is acknowledged to the NIF (`Native.stream_ack/2`) by the
  delivery process once its events have been executed. At most
  `max_pending_events` (see `Snakepit.Telemetry.Config`) unacknowledged
  events per stream, plus one wire message, are ever on their way to it, so
  its mailbox stays bounded. When a worker's handlers are slower than the
  worker, the NIF stops reading that worker's call, HTTP/2 flow control
  stops the worker's sender, and the worker's bounded queue drops (and
  counts, `dropped_queue_full`) what does not fit. Other workers' streams
  are not affected.

  ## Control

  `toggle/3`, `update_sampling/4` and `update_filter/3` take a target (see
  `t:target/0`). The desired state is remembered per worker (see
  `Snakepit.Telemetry.Control` for how sampling rules combine), shown by
  `list_streams/0`, sent at once when the stream is open, and sent again
  whenever the stream (re)opens. Control and status calls never wait behind
  events (handlers run in the delivery processes).

  A worker on `StreamTelemetry` (protocol `:events`, e.g. Snakepit v0.13's
  Python) does not apply sampling rules, whole spans or early filters the
  way `Snakepit.Telemetry.Control` means them, so the NIF enforces the
  worker's state on what it receives (seeded at open from the remembered
  state, updated by the same control messages) and sends such a worker no
  sampling rule or rate; its drops count as `enforced_disabled`,
  `enforced_filtered` and `enforced_sampled`.

  ## Control across the cluster

  The replies say what happened where:

    * **A worker id** reaches the node where that worker is registered (the
      `{:worker, id}` process group). `:ok` means that node recorded the
      change and its control messages are on their way to Python (now, or
      as soon as the stream opens). Worker ids are unique in the cluster:
      `register_worker/1` answers `{:error, {:already_registered, node}}`
      for an id another node has. Two nodes registering one id at the same
      moment can both succeed; control by that id then answers
      `{:error, {:ambiguous_worker, nodes}}`, never one of them at random,
      and `{node, worker_id}` addresses the worker of that id on one node.
    * **`:all` and `{:pool, name}`** act on every node that runs the
      application (`Snakepit.Telemetry.Cluster.nodes/0`), asked in parallel.
      `:ok` means **every** one of those nodes recorded the change (for a
      pool: every node answered and at least one has the pool; nodes without
      it have nothing to change). Otherwise the reply is
      `{:error, {:nodes, %{node => reason}}}`, naming every node that did
      not confirm, and only those: the others did record it. `reason` is
      `:timeout` (no answer within `control_timeout_ms`: the change may
      still be applied when the request arrives), `:node_unreachable`,
      `:not_running`, or the node's own refusal (e.g. `[{worker_id,
      :control_queue_full}]`). `{:error, :unknown_pool}`: no node has the
      pool. On a single node the same rules give `:ok` or
      `{:error, {:nodes, %{node() => reason}}}`.
    * **Errors for one worker**: `{:error, :unknown_worker}`,
      `{:error, {:timeout, node}}` (may have been applied),
      `{:error, {:node_unreachable, node}}`, `{:error, {:not_running, node}}`,
      or the node's refusal. A timeout is never reported as unreachable.

  Every call waits at most `control_timeout_ms` (`:cluster` config, default
  2 s) for any node, whatever the target. Changes are idempotent, so a
  retry is safe, and each carries a version (the caller's wall clock, then
  its node and a counter): a node applies a change only if it is newer than
  the last change of the same kind (toggle, filter, the sampling rule of the
  same pattern list) it applied to that worker. A node frozen while changes
  were sent to it applies, once it thaws, the latest one and never an older
  one after it. (The versions assume the nodes' wall clocks roughly agree.)

  The change travels as data (`t:change/0`), never as a function, so nodes
  running different code can control each other; a change or request the
  server does not know is answered with `{:error, {:invalid_control,
  change}}` or `{:error, {:invalid_request, request}}`, never a crash.

  ## Lifecycle

    * **Registration before the worker listens**: the first connection is
      retried every `retry_interval_ms` until `connect_timeout_ms` passes; then
      the status becomes `{:failed, reason}` (unregister and register again to
      retry). Each attempt (connect, HTTP/2 handshake, response headers) is
      bounded by `open_timeout_ms`, so a worker that accepts the connection
      and never answers cannot keep the stream `:connecting`: the attempt
      fails with "open timed out after N ms" (counted in `open_timeouts`).
    * **On open**: Python gets `toggle(true)` and then the worker's whole
      control state. The first open emits `[:snakepit, :grpc, :connection,
      :established]`, and every open `[:snakepit, :grpc, :stream, :opened]`;
      their metadata hold `:protocol` (`:batches` or `:events`), as does the
      `[:snakepit, :grpc, :connection, :reconnected]` event.
    * **When an open stream ends** (worker crash, `kill -9`, network error,
      worker shutdown, a message over `max_message_bytes`, or a worker that
      stops answering HTTP/2 PINGs, see `keepalive_interval_ms` and
      `keepalive_timeout_ms`, with reason `:keepalive_timeout`):
      `[:snakepit, :grpc, :connection, :lost]` and
      `[:snakepit, :grpc, :stream, :closed]` are emitted and the stream is
      reopened with capped exponential backoff for as long as the worker is
      registered: attempt `n` waits `backoff_initial_ms * 2^(n - 1)`, at most
      `backoff_max_ms`, and each reopen is one attempt bounded by
      `open_timeout_ms`. Success emits
      `[:snakepit, :grpc, :connection, :reconnected]`, whose `attempts`
      counts the attempts since the worker last had a healthy stream.
    * **Backoff reset**: the attempt count starts over (from
      `backoff_initial_ms`) only when the stream that ended had stayed open
      at least `healthy_after_ms` (default 10 s). A stream lost sooner
      continues the progression, so a worker that accepts each call and ends
      it at once is retried ever more slowly, up to one attempt per
      `backoff_max_ms`, instead of in a tight loop.
    * **Logging**: the first loss of a worker's stream is logged as a
      warning, then at most one warning per minute per worker, which says
      how many losses were not logged since the previous one. Every loss is
      still a `[:snakepit, :grpc, :connection, :lost]` event.
    * **`unregister_worker/1`** closes the stream at once; nothing reconnects.
    * **If this process crashes**, the stream handles it held are garbage
      collected, which stops their native tasks and closes their connections
      (no leak), and the delivery processes exit with it. Registrations,
      control states and the workers' Python counters live in ETS tables
      owned by `Snakepit.Telemetry.Registrations`, so the restarted process
      starts new delivery processes, reopens every registered worker's
      stream and re-applies its control state.
    * **Configuration**: `register_worker/2` reads the pool's settings and
      answers `{:error, {:invalid_config, message}}` when they are invalid
      (see `Snakepit.Telemetry.Config`). A restarting process never raises on
      configuration: it logs the error and uses the built-in stream defaults.

  ## Authentication

  A worker registered with `:secret` (a `Snakepit.Telemetry.Secret`, the
  one its environment got from `Config.worker_env(pool, secret: secret)`)
  is sent it as `x-snakepit-telemetry-secret` metadata on every telemetry
  call; the worker refuses calls without it (`UNAUTHENTICATED`, counted in
  its `refused_calls`), so no other local process can take its stream over,
  read its events or steer it. The secret lives only in a NIF resource:
  `inspect/1`, `:sys.get_state/1`, `list_streams/0` (which shows
  `authenticated: true`) and crash reports never show it. A worker
  registered without one streams as before, with a warning logged once per
  VM. A worker that expects a secret and gets none or another one never
  opens: its status becomes `{:failed, {:connect_failed, text}}`, with
  gRPC's "unauthenticated" in `text`.

  ## Status and counters

  `list_streams/0` reports per worker: `:authenticated` (registered with a
  secret; the secret itself is never shown), `:pending` (events decoded and not
  yet handled by its delivery process, read now), `:python_age_ms` (age of
  its latest Python stats report, `nil` before the first),
  `:python_implementation` (`:native` when the worker's telemetry runs in
  the Rust extension, `:python` on the pure-Python path, as its latest
  stats report says; `nil` before the first or for a worker that does not
  say), `:status` (`:connecting`, `:open`,
  `:backing_off` or `{:failed, reason}`), `:protocol` (`:batches` or
  `:events`: the RPC of the current or latest open stream; `nil` before the
  first open), `:control`, `:reconnects`, `:delivery` (the pid of the
  worker's delivery process), `:stats` (native counters summed
  over every stream the worker had: `received`, `delivered`, each drop
  reason, `wire_messages`, `fallbacks` (connections that fell back to
  `StreamTelemetry`), `credit_waits` (times the NIF stopped reading for
  want of acknowledgements), `deliver_ns` (time spent building terms and
  sending them to the delivery process; over `delivered`, the native cost per event),
  `malformed_messages` (batches that could not be parsed at all; a single
  event that does not decode counts in `dropped_malformed` and the rest of
  its batch is delivered), `oversized_messages` and `oversized_bytes_max`
  (messages refused for exceeding `max_message_bytes`, and the largest such
  size), `open_timeouts`, `keepalive_timeouts`, `enforced_disabled`,
  `enforced_filtered`, `enforced_sampled` (control the NIF enforced on a
  `StreamTelemetry` worker), ...) and `:python` (the
  worker's own counters, e.g. `dropped_queue_full`, from the
  `[:snakepit, :telemetry, :python, :stats]` reports, summed over the
  worker's Python processes; `queue_len` is the latest).

  Python's counters start at 0 in each process. Each report names its
  instance (`:instance_id` metadata); a report from a new instance, or a
  counter lower than before (an older Python without ids), starts a new
  instance: the previous one's last counters are kept in the sums, so a
  restarted worker's drops are reported from its own 0, none twice.

  ## Messages from the NIF

    * `{:snakepit_telemetry, stream_id, status}`: `:connecting`,
      `{:open, protocol}` (`:batches` or `:events`) or `{:closed, reason}`
      with reason `:stopped`, `:end_of_stream`, `:keepalive_timeout`,
      `{:error, text}` or `{:connect_failed, text}`.
    * `{:snakepit_telemetry_events, stream_id, [{event, measurements, metadata}]}`,
      to the worker's delivery process, which acknowledges them with
      `Native.stream_ack(handle, length(events))` once handled.

  Status messages for a stream that is no longer current are ignored.
  """
  use GenServer

  require Logger

  alias Snakepit.Telemetry.{Cluster, Config, Control, Delivery, Native, Registrations, Secret}

  @type worker_id :: String.t()
  @typedoc """
  What a control call acts on: a worker id (wherever in the cluster it is
  registered), `{node, worker_id}` (the worker of that id on that node),
  `{:pool, name}` (that pool's workers on every node) or `:all` (every
  worker on every node). See "Control across the cluster".
  """
  @type target :: worker_id() | {node(), worker_id()} | {:pool, term()} | :all

  @typedoc """
  A worker to stream from: `:worker_id` (string), `:pool_name` (atom or
  string), `:address` (`"host:port"` or `"unix:/path"`), optionally
  `:python_pid` (the worker's OS pid), `:connect_timeout_ms` and `:secret`
  (the worker's `Snakepit.Telemetry.Secret`, or its string, sent on every
  telemetry call; see "Authentication").
  """
  @type worker_ctx :: map() | keyword()

  @type status :: :connecting | :open | :backing_off | {:failed, term()}

  @type protocol :: :batches | :events

  @type stream_info :: %{
          worker_id: worker_id(),
          pool_name: atom() | String.t(),
          address: String.t(),
          python_pid: pos_integer() | nil,
          authenticated: boolean(),
          status: status(),
          protocol: protocol() | nil,
          control: map(),
          reconnects: non_neg_integer(),
          delivery: pid(),
          pending: non_neg_integer(),
          python_age_ms: non_neg_integer() | nil,
          python_implementation: :native | :python | nil,
          stats: %{atom() => non_neg_integer()},
          python: %{atom() => non_neg_integer()}
        }

  @typedoc """
  A control change, as the server takes it (also from other nodes): plain
  data, applied with `Snakepit.Telemetry.Control`. Anything else is
  answered with `{:error, {:invalid_control, change}}`.
  """
  @type change ::
          {:toggle, boolean()} | {:sampling, number(), [String.t()]} | {:filter, keyword()}

  # At most one "stream lost" warning per worker per this interval.
  @lost_log_interval_ms 60_000

  # Stream settings the NIF takes (see Snakepit.Telemetry.Config).
  @native_options [
    :open_timeout_ms,
    :keepalive_interval_ms,
    :keepalive_timeout_ms,
    :retry_interval_ms,
    :max_batch,
    :max_pending_events,
    :max_message_bytes,
    :max_event_parts,
    :max_part_bytes,
    :max_measurements,
    :max_metadata,
    :max_key_bytes,
    :max_value_bytes
  ]
  @dropped [:snakepit, :telemetry, :events, :dropped]

  # Counters that each count whole events lost (or held back by policy) at
  # one hop; each non-zero change is reported as a `@dropped` event.
  @native_drops [
    :dropped_unknown_event,
    :dropped_malformed,
    :dropped_buffer_full,
    :dropped_receiver_down,
    :dropped_encode,
    # Whole messages, not events: batches that could not be parsed, and
    # messages over max_message_bytes (reported with `bytes`, the largest).
    :malformed_messages,
    :oversized_messages,
    # Control the NIF enforces itself on a `StreamTelemetry` worker.
    :enforced_disabled,
    :enforced_filtered,
    :enforced_sampled
  ]
  @python_drops [
    :dropped_queue_full,
    :dropped_invalid,
    :dropped_disabled,
    :dropped_sampled,
    :dropped_filtered,
    :dropped_oversized,
    :interrupted_sends
  ]

  @doc false
  def start_link(opts \\ []) do
    GenServer.start_link(__MODULE__, opts, name: Keyword.get(opts, :name, __MODULE__))
  end

  @doc """
  Starts streaming telemetry from a worker.

  Returns `:ok` once the stream is being opened (its progress shows in
  `list_streams/0`), `{:error, :already_registered}` (this node has the id),
  `{:error, {:already_registered, node}}` (another node of the cluster has it),
  `{:error, {:invalid_worker_ctx, reason}}` for bad input, or
  `{:error, {:invalid_config, message}}` when the pool's settings are
  invalid (see `Snakepit.Telemetry.Config`).
  """
  @spec register_worker(worker_ctx(), GenServer.server()) ::
          :ok
          | {:error,
             :already_registered | {:invalid_worker_ctx, term()} | {:invalid_config, String.t()}}
  def register_worker(worker_ctx, server \\ __MODULE__) do
    with {:ok, ctx} <- validate_ctx(worker_ctx),
         {:ok, ctx} <- wrap_secret(ctx) do
      warn_without_secret(ctx)
      GenServer.call(server, {:register, ctx})
    end
  end

  # A string secret is wrapped here, in the caller, so the server's
  # messages, state and crash reports only ever hold the redacted struct.
  defp wrap_secret(%{secret: nil} = ctx), do: {:ok, Map.delete(ctx, :secret)}

  defp wrap_secret(%{secret: secret} = ctx) do
    case Secret.wrap(secret) do
      {:ok, secret} -> {:ok, %{ctx | secret: secret}}
      {:error, {:invalid_secret, why}} -> {:error, {:invalid_worker_ctx, {:secret, why}}}
    end
  end

  defp wrap_secret(ctx), do: {:ok, ctx}

  # Once per VM: a worker without a secret accepts any local client's call.
  defp warn_without_secret(%{secret: _}), do: :ok

  defp warn_without_secret(ctx) do
    unless :persistent_term.get({__MODULE__, :warned_without_secret}, false) do
      :persistent_term.put({__MODULE__, :warned_without_secret}, true)

      Logger.warning(
        "telemetry: worker #{ctx.worker_id} is registered without a secret: any local " <>
          "process that reaches its address can read or steer its telemetry. Start workers " <>
          "with Config.worker_env(pool, secret: secret) and register them with the same " <>
          "secret (see Snakepit.Telemetry.Secret). This warning is logged once."
      )
    end

    :ok
  end

  @doc "Closes the worker's stream at once and forgets the worker."
  @spec unregister_worker(worker_id(), GenServer.server()) :: :ok | {:error, :unknown_worker}
  def unregister_worker(worker_id, server \\ __MODULE__) do
    GenServer.call(server, {:unregister, worker_id})
  end

  @doc "Every registered worker with its status, control state and counters."
  @spec list_streams(GenServer.server()) :: [stream_info()]
  def list_streams(server \\ __MODULE__) do
    GenServer.call(server, :list_streams)
  end

  @doc "Switches telemetry on or off."
  @spec toggle(target(), boolean(), GenServer.server()) :: :ok | {:error, term()}
  def toggle(target, enabled, server \\ __MODULE__)

  def toggle(target, enabled, server) when is_boolean(enabled) do
    control(target, {:toggle, enabled}, server)
  end

  def toggle(_target, enabled, _server), do: {:error, {:invalid_enabled, enabled}}

  @doc """
  Sets a sampling rate in 0..1: the default rate when `patterns` is empty,
  otherwise a rule for the events whose dotted Python name matches one of
  the glob `patterns` (see `Snakepit.Telemetry.Control`).

      GrpcStream.update_sampling("worker_1", 0.1)
      GrpcStream.update_sampling({:pool, :inference}, 0.0, ["python.call.*"])
  """
  @spec update_sampling(target(), number(), [String.t()], GenServer.server()) ::
          :ok | {:error, term()}
  def update_sampling(target, rate, patterns \\ [], server \\ __MODULE__) do
    with :ok <- Control.validate_rate(rate),
         :ok <- Control.validate_patterns(patterns) do
      control(target, {:sampling, rate, patterns}, server)
    end
  end

  @doc """
  Sets the allow and deny glob lists (`allow: [...], deny: [...]`). Deny
  wins; an empty allow list allows every event.
  """
  @spec update_filter(target(), keyword(), GenServer.server()) :: :ok | {:error, term()}
  def update_filter(target, filter, server \\ __MODULE__) do
    with {:ok, _} <- Control.put_filter(%Control{}, filter) do
      control(target, {:filter, filter}, server)
    end
  end

  # A worker id registered on another node is controlled there. The change
  # travels as data (a `t:change/0`), never as a function: a node running
  # other code could not call a function defined here. Every request carries
  # a version (see version/0): a node applies a change only if it is newer
  # than the last change of the same kind it applied to that worker.
  defp control(worker_id, change, __MODULE__) when is_binary(worker_id) do
    case :pg.get_members(Cluster.scope(), {:worker, worker_id}) do
      # Not registered anywhere the process groups know of: asked here, so
      # the answer is this node's (`{:error, :unknown_worker}`).
      [] ->
        call_control(__MODULE__, worker_id, change, version())

      [pid] ->
        call_control(pid, worker_id, change, version())

      pids ->
        {:error, {:ambiguous_worker, pids |> Enum.map(&node/1) |> Enum.uniq() |> Enum.sort()}}
    end
  end

  defp control({node, worker_id}, change, __MODULE__)
       when is_atom(node) and node != :pool and is_binary(worker_id) do
    call_control({__MODULE__, node}, worker_id, change, version())
  end

  defp control(target, change, __MODULE__)
       when target == :all or (tuple_size(target) == 2 and elem(target, 0) == :pool) do
    cluster_control(target, change)
  end

  defp control(target, _change, __MODULE__), do: {:error, {:invalid_target, target}}

  # A server of the caller's own (not the application's): asked alone.
  defp control(target, change, server) do
    GenServer.call(server, {:control, target, change, version()})
  end

  # One control request to one GrpcStream, bounded by control_timeout_ms.
  defp call_control(destination, target, change, version) do
    case call_node(destination, {:control, target, change, version}) do
      {:ok, reply} -> reply
      {:error, :timeout} -> {:error, {:timeout, destination_node(destination)}}
      {:error, :not_running} when destination == __MODULE__ -> {:error, :not_running}
      {:error, reason} -> {:error, {reason, destination_node(destination)}}
    end
  end

  # `{:ok, reply}`, or why the node gave none: `:timeout` (the request may
  # still be applied when it arrives), `:node_unreachable` or `:not_running`.
  defp call_node(destination, request) do
    {:ok, GenServer.call(destination, request, Config.cluster()[:control_timeout_ms])}
  catch
    :exit, {:timeout, _} -> {:error, :timeout}
    :exit, {:noproc, _} -> {:error, :not_running}
    :exit, {{:nodedown, _}, _} -> {:error, :node_unreachable}
    :exit, {:noconnection, _} -> {:error, :node_unreachable}
    :exit, _ -> {:error, :node_unreachable}
  end

  # `:all` and `{:pool, name}`: every node that runs the application (the
  # Cluster process group), asked in parallel with the same version.
  defp cluster_control(target, change) do
    version = version()

    nodes =
      case Cluster.nodes() do
        [] -> [node()]
        nodes -> nodes
      end

    nodes
    |> Task.async_stream(
      fn n ->
        destination = if n == node(), do: __MODULE__, else: {__MODULE__, n}
        {n, call_node(destination, {:control, target, change, version})}
      end,
      max_concurrency: length(nodes),
      timeout: :infinity,
      ordered: false
    )
    |> Map.new(fn {:ok, {n, result}} -> {n, node_result(result)} end)
    |> summarize_nodes(target)
  end

  defp node_result({:ok, :ok}), do: :ok
  defp node_result({:ok, {:error, reason}}), do: reason
  defp node_result({:ok, other}), do: {:unexpected_reply, other}
  defp node_result({:error, reason}), do: reason

  # `:ok` when every node recorded the change (for a pool: every node
  # answered, and at least one has the pool); else every node that did not
  # confirm, with its reason.
  defp summarize_nodes(results, target) do
    pool? = match?({:pool, _}, target)
    absent? = fn reason -> pool? and reason == :unknown_pool end

    failed =
      for {n, reason} <- results, reason != :ok, not absent?.(reason), into: %{}, do: {n, reason}

    cond do
      failed != %{} ->
        {:error, {:nodes, failed}}

      pool? and Enum.all?(results, fn {_n, reason} -> absent?.(reason) end) ->
        {:error, :unknown_pool}

      true ->
        :ok
    end
  end

  defp destination_node(pid) when is_pid(pid), do: node(pid)
  defp destination_node({_name, node}), do: node
  defp destination_node(_name), do: node()

  # Orders control changes across nodes: the wall clock first (nodes'
  # clocks are assumed roughly in step), then the node and a counter to
  # break ties. A change older than one already applied is ignored.
  defp version do
    {System.system_time(), node(), System.unique_integer([:positive, :monotonic])}
  end

  ## Server

  @impl GenServer
  def init(_opts) do
    # Never raise on configuration here: a crash would only repeat on restart.
    health_ms = stream_config(nil)[:health_interval_ms]

    state = %{
      workers: %{},
      streams: %{},
      native_per_sec: System.convert_time_unit(1, :second, :native),
      health_ms: health_ms
    }

    if health_ms > 0, do: Process.send_after(self(), :health, health_ms)

    state =
      Enum.reduce(Registrations.all(), state, fn {worker_id, registration}, acc ->
        Logger.info("telemetry: reopening the stream of registered worker #{worker_id}")
        stream_opts = stream_config(registration.ctx.pool_name)

        worker =
          registration.ctx
          |> new_worker(stream_opts, registration.control, true, registration.key)
          |> Map.put(:versions, Map.get(registration, :versions, %{}))
          |> start_delivery()

        :pg.join(Cluster.scope(), {:worker, worker_id}, self())
        connect(acc, worker, worker.stream_opts[:connect_timeout_ms])
      end)

    {:ok, state}
  end

  @impl GenServer
  def handle_call({:register, ctx}, _from, state) do
    elsewhere =
      for pid <- :pg.get_members(Cluster.scope(), {:worker, ctx.worker_id}),
          node(pid) != node(),
          do: node(pid)

    cond do
      Map.has_key?(state.workers, ctx.worker_id) ->
        {:reply, {:error, :already_registered}, state}

      # The NIF resource of a secret made on another node is not usable here.
      ctx[:secret] != nil and not Secret.local?(ctx.secret) ->
        {:reply,
         {:error, {:invalid_worker_ctx, {:secret, "made on another node: wrap the string here"}}},
         state}

      # Worker ids are unique across the cluster (as far as its process
      # groups know: two nodes registering one id at the same moment can
      # both succeed, and control by that id then answers
      # {:error, {:ambiguous_worker, nodes}}).
      elsewhere != [] ->
        {:reply, {:error, {:already_registered, Enum.min(elsewhere)}}, state}

      true ->
        register(ctx, state)
    end
  end

  def handle_call({:unregister, worker_id}, _from, state) do
    case Map.pop(state.workers, worker_id) do
      {nil, _} ->
        {:reply, {:error, :unknown_worker}, state}

      {worker, workers} ->
        Registrations.delete(worker_id)
        :pg.leave(Cluster.scope(), {:worker, worker_id}, self())
        if worker.handle, do: Native.stream_close(worker.handle)
        if worker.timer, do: Process.cancel_timer(worker.timer)
        stop_delivery(worker)

        {:reply, :ok,
         %{state | workers: workers, streams: Map.delete(state.streams, worker.stream_id)}}
    end
  end

  def handle_call(:list_streams, _from, state) do
    streams = state.workers |> Map.values() |> Enum.sort_by(& &1.worker_id) |> Enum.map(&info/1)
    {:reply, streams, state}
  end

  def handle_call({:control, target, change, version}, _from, state) do
    with :ok <- check_change(change),
         {:ok, ids} <- targets(state, target) do
      {reply, state} = Enum.reduce(ids, {:ok, state}, &apply_control(&1, change, version, &2))
      {:reply, reply, state}
    else
      error -> {:reply, error, state}
    end
  end

  # From a node without versions: applied as of now.
  def handle_call({:control, target, change}, from, state) do
    handle_call({:control, target, change, version()}, from, state)
  end

  # A request from a node running other code, or a bad caller: answered,
  # never a crash.
  def handle_call(request, _from, state) do
    {:reply, {:error, {:invalid_request, request}}, state}
  end

  @impl GenServer
  def handle_info({:snakepit_telemetry, stream_id, status}, state) do
    case current(state, stream_id) do
      {:ok, worker} -> {:noreply, stream_status(state, worker, status)}
      :error -> {:noreply, state}
    end
  end

  def handle_info(:health, state) do
    workers = Map.new(state.workers, fn {id, worker} -> {id, report_drops(worker)} end)
    Process.send_after(self(), :health, state.health_ms)
    {:noreply, %{state | workers: workers}}
  end

  def handle_info({:DOWN, ref, :process, _pid, reason}, state) do
    case Enum.find(Map.values(state.workers), &(&1.delivery_ref == ref)) do
      nil -> {:noreply, state}
      worker -> {:noreply, delivery_down(state, worker, reason)}
    end
  end

  def handle_info({:reconnect, worker_id}, state) do
    case Map.fetch(state.workers, worker_id) do
      {:ok, %{status: :backing_off} = worker} ->
        # One attempt per timer tick; the backoff spaces the attempts out.
        {:noreply, connect(state, %{worker | timer: nil}, 0)}

      _ ->
        {:noreply, state}
    end
  end

  def handle_info(message, state) do
    Logger.debug("#{inspect(__MODULE__)} ignored #{inspect(message)}")
    {:noreply, state}
  end

  ## Streams

  defp register(ctx, state) do
    with {:ok, stream_opts} <- Config.fetch(:stream, ctx.pool_name),
         {:ok, control} <- Config.fetch_control(ctx.pool_name),
         worker = new_worker(ctx, stream_opts, control, false, make_ref()),
         timeout = ctx[:connect_timeout_ms] || stream_opts[:connect_timeout_ms],
         worker = start_delivery(worker),
         {:ok, worker} <- open_or_stop(worker, timeout, state) do
      Registrations.put(ctx.worker_id, registration(worker))
      :pg.join(Cluster.scope(), {:worker, ctx.worker_id}, self())
      {:reply, :ok, put_worker(state, worker)}
    else
      {:error, {:invalid_address, text}} ->
        {:reply, {:error, {:invalid_worker_ctx, {:address, text}}}, state}

      {:error, message} when is_binary(message) ->
        {:reply, {:error, {:invalid_config, message}}, state}

      {:error, reason} ->
        {:reply, {:error, reason}, state}
    end
  end

  defp new_worker(ctx, stream_opts, control, reopened?, key) do
    %{
      key: key,
      # The version of the last applied change of each kind (see version/0).
      versions: %{},
      delivery: nil,
      delivery_ref: nil,
      worker_id: ctx.worker_id,
      pool_name: ctx.pool_name,
      address: ctx.address,
      python_pid: ctx[:python_pid],
      # A Snakepit.Telemetry.Secret (a NIF resource, redacted by inspect) or nil.
      secret: ctx[:secret],
      metadata: %{node: node(), pool_name: ctx.pool_name, worker_id: ctx.worker_id},
      stream_opts: stream_opts,
      control: control,
      stream_id: nil,
      handle: nil,
      status: :connecting,
      protocol: nil,
      timer: nil,
      attempt: 0,
      ever_open?: reopened?,
      lost_at: nil,
      opened_at: nil,
      lost_log: %{at: nil, suppressed: 0},
      reconnects: 0,
      totals: %{},
      reported: %{}
    }
  end

  defp registration(worker) do
    %{ctx: ctx(worker), control: worker.control, key: worker.key, versions: worker.versions}
  end

  ## Delivery processes

  # Every worker's events (and lifecycle events) are executed by a delivery
  # process of its own (Snakepit.Telemetry.Delivery), never here.
  defp start_delivery(worker) do
    case Delivery.start(worker.key, worker.metadata, self()) do
      {:ok, pid} ->
        %{worker | delivery: pid, delivery_ref: Process.monitor(pid)}

      {:error, reason} ->
        # Only if the delivery supervisor is gone, which restarts this
        # process too (rest_for_one).
        exit({:delivery_not_started, reason})
    end
  end

  defp stop_delivery(worker) do
    Process.demonitor(worker.delivery_ref, [:flush])
    # After what is already in its mailbox: those events are executed.
    send(worker.delivery, :stop)
  end

  # A delivery process died (a bug, or killed): a new one takes over the
  # worker's stream. The events the dead one held unacknowledged are counted
  # (dropped_receiver_down) by the redirect; other workers never notice.
  defp delivery_down(state, worker, reason) do
    worker = start_delivery(worker)

    lost =
      if worker.handle do
        lost = Native.stream_redirect(worker.handle, worker.delivery)
        send(worker.delivery, {:stream, worker.stream_id, worker.handle})
        lost
      else
        0
      end

    Logger.error(
      "telemetry: the delivery process of worker #{worker.worker_id} exited " <>
        "(#{inspect(reason)}); #{lost} events it held were lost (dropped_receiver_down); " <>
        "a new one took over"
    )

    put_in(state.workers[worker.worker_id], worker)
  end

  # A pool's stream settings; on an invalid configuration (changed since the
  # application started) the built-in defaults, logged.
  defp stream_config(pool) do
    case Config.fetch(:stream, pool) do
      {:ok, opts} ->
        opts

      {:error, message} ->
        Logger.error("telemetry: #{message}; using the default stream settings")
        Config.defaults(:stream)
    end
  end

  defp put_worker(state, worker) do
    state
    |> put_in([:workers, worker.worker_id], worker)
    |> put_in([:streams, worker.stream_id], worker.worker_id)
  end

  # Opens a stream and makes it the worker's current one.
  defp connect(state, worker, connect_timeout_ms) do
    case open(worker, connect_timeout_ms, state) do
      {:ok, worker} ->
        put_worker(state, worker)

      {:error, reason} ->
        # Only a bad address or option gets here; retrying will not help.
        Logger.error(
          "telemetry: cannot open the stream of #{worker.worker_id}: #{inspect(reason)}"
        )

        put_in(state.workers[worker.worker_id], %{worker | status: {:failed, reason}})
    end
  end

  defp open(worker, connect_timeout_ms, state) do
    stream_id = System.unique_integer([:positive, :monotonic])

    options =
      worker.stream_opts
      |> Keyword.take(@native_options)
      |> Map.new()
      |> Map.merge(%{
        connect_timeout_ms: connect_timeout_ms,
        native_per_sec: state.native_per_sec,
        receiver: worker.delivery,
        control: Control.to_native(worker.control),
        secret: worker.secret
      })

    with {:ok, handle} <- Native.stream_open(self(), stream_id, worker.address, options) do
      send(worker.delivery, {:stream, stream_id, handle})
      {:ok, %{worker | stream_id: stream_id, handle: handle, status: :connecting}}
    end
  end

  # A registration that fails at its open has no use for its delivery process.
  defp open_or_stop(worker, connect_timeout_ms, state) do
    with {:error, _} = error <- open(worker, connect_timeout_ms, state) do
      stop_delivery(worker)
      error
    end
  end

  defp current(state, stream_id) do
    with {:ok, worker_id} <- Map.fetch(state.streams, stream_id) do
      Map.fetch(state.workers, worker_id)
    end
  end

  defp stream_status(state, worker, :connecting),
    do: put_in(state.workers[worker.worker_id], worker)

  defp stream_status(state, worker, {:open, protocol}) do
    now = System.monotonic_time()
    Enum.each(Control.messages(worker.control), &send_control(worker.handle, &1))

    if worker.ever_open? do
      downtime = if worker.lost_at, do: now - worker.lost_at, else: 0

      emit(
        worker,
        [:connection, :reconnected],
        %{attempts: worker.attempt, downtime: downtime},
        %{protocol: protocol}
      )
    else
      emit(worker, [:connection, :established], %{system_time: System.system_time()}, %{
        protocol: protocol
      })
    end

    emit(worker, [:stream, :opened], %{system_time: System.system_time()}, %{
      address: worker.address,
      protocol: protocol
    })

    reconnects = if worker.ever_open?, do: worker.reconnects + 1, else: 0

    # `attempt` is kept: only a stream that stays open `healthy_after_ms`
    # starts the backoff again from its first delay (see "Lifecycle").
    worker = %{
      worker
      | status: :open,
        protocol: protocol,
        ever_open?: true,
        lost_at: nil,
        opened_at: now,
        reconnects: reconnects
    }

    put_in(state.workers[worker.worker_id], worker)
  end

  defp stream_status(state, worker, {:closed, reason}) do
    worker = fold_stats(worker)
    state = %{state | streams: Map.delete(state.streams, worker.stream_id)}

    cond do
      worker.status == :open ->
        now = System.monotonic_time()
        worker = log_lost(worker, reason)

        emit(worker, [:connection, :lost], %{system_time: System.system_time()}, %{reason: reason})

        open_for = now - worker.opened_at
        emit(worker, [:stream, :closed], %{duration: open_for}, %{reason: reason})

        healthy? =
          System.convert_time_unit(open_for, :native, :millisecond) >=
            worker.stream_opts[:healthy_after_ms]

        # A stream lost before it was healthy continues the backoff.
        attempt = if healthy?, do: 1, else: worker.attempt + 1
        backoff(state, %{worker | lost_at: now, attempt: attempt})

      worker.ever_open? ->
        backoff(state, %{worker | attempt: worker.attempt + 1})

      true ->
        Logger.warning(
          "telemetry stream of worker #{worker.worker_id} never opened: #{inspect(reason)}"
        )

        put_in(state.workers[worker.worker_id], %{worker | status: {:failed, reason}})
    end
  end

  # The first loss is logged, then at most one warning per
  # `@lost_log_interval_ms`, saying how many losses went unlogged in between
  # (every loss is a `[:snakepit, :grpc, :connection, :lost]` event).
  defp log_lost(worker, reason) do
    now = System.monotonic_time(:millisecond)
    %{at: at, suppressed: suppressed} = worker.lost_log

    if at == nil or now - at >= @lost_log_interval_ms do
      unlogged =
        if suppressed > 0,
          do: " (#{suppressed} more losses since the previous warning were not logged)",
          else: ""

      Logger.warning(
        "telemetry stream of worker #{worker.worker_id} lost: #{inspect(reason)}#{unlogged}"
      )

      %{worker | lost_log: %{at: now, suppressed: 0}}
    else
      %{worker | lost_log: %{at: at, suppressed: suppressed + 1}}
    end
  end

  defp backoff(state, worker) do
    initial = worker.stream_opts[:backoff_initial_ms]
    cap = worker.stream_opts[:backoff_max_ms]
    delay = min(cap, initial * Integer.pow(2, min(worker.attempt - 1, 20)))
    timer = Process.send_after(self(), {:reconnect, worker.worker_id}, delay)
    put_in(state.workers[worker.worker_id], %{worker | status: :backing_off, timer: timer})
  end

  # Adds a finished stream's counters to the worker's totals.
  defp fold_stats(%{handle: nil} = worker), do: worker

  defp fold_stats(worker) do
    totals = add_stats(worker.totals, Native.stream_stats(worker.handle))

    %{worker | totals: totals, handle: nil}
  end

  # Executed by the worker's delivery process, like its events.
  defp emit(worker, suffix, measurements, metadata) do
    execute(worker, [:snakepit, :grpc | suffix], measurements, metadata)
  end

  defp execute(worker, event, measurements, metadata) do
    send(worker.delivery, {:emit, event, measurements, Map.merge(metadata, worker.metadata)})
  end

  # The worker's Python counters over all its Python instances, and the
  # latest levels (kept by its delivery process).
  defp python_totals(worker), do: Delivery.python_totals(worker.key)

  # Emits one `@dropped` event per counter that grew since the last report.
  defp report_drops(worker) do
    current = if worker.handle, do: Native.stream_stats(worker.handle), else: %{}
    native = add_stats(worker.totals, current)

    counts =
      for(
        {reason, hop, source} <- drop_counters(native, python_totals(worker)),
        into: %{},
        do: {{hop, reason}, source}
      )

    Enum.each(counts, fn {{hop, reason} = key, now} ->
      delta = now - Map.get(worker.reported, key, 0)

      if delta > 0 do
        execute(worker, @dropped, drop_measurements(reason, delta, native), %{
          reason: reason,
          hop: hop
        })
      end
    end)

    %{worker | reported: Map.merge(worker.reported, counts)}
  end

  defp drop_measurements(:oversized_messages, delta, native),
    do: %{count: delta, bytes: Map.get(native, :oversized_bytes_max, 0)}

  defp drop_measurements(_reason, delta, _native), do: %{count: delta}

  # Sums two streams' counters; a high-water mark takes the larger.
  defp add_stats(a, b) do
    Map.merge(a, b, fn
      :oversized_bytes_max, x, y -> max(x, y)
      _k, x, y -> x + y
    end)
  end

  defp drop_counters(native, python) do
    for(r <- @native_drops, do: {r, :native, Map.get(native, r, 0)}) ++
      for r <- @python_drops, do: {r, :python, Map.get(python, r, 0)}
  end

  ## Control

  defp targets(state, :all), do: {:ok, Map.keys(state.workers)}

  defp targets(state, {:pool, pool}) do
    case for({id, %{pool_name: ^pool}} <- state.workers, do: id) do
      [] -> {:error, :unknown_pool}
      ids -> {:ok, ids}
    end
  end

  defp targets(state, worker_id) when is_binary(worker_id) do
    if Map.has_key?(state.workers, worker_id),
      do: {:ok, [worker_id]},
      else: {:error, :unknown_worker}
  end

  defp targets(_state, target), do: {:error, {:invalid_target, target}}

  # `:ok` when `change` is well-formed and valid (checked on the default
  # state, before any worker's state changes).
  defp check_change(change) do
    case change(%Control{}, change) do
      {:ok, _} -> :ok
      {:error, _} = error -> error
    end
  end

  defp change(control, {:toggle, enabled}) when is_boolean(enabled),
    do: {:ok, Control.toggle(control, enabled)}

  defp change(control, {:sampling, rate, patterns}),
    do: Control.put_sampling(control, rate, patterns)

  defp change(control, {:filter, filter}), do: Control.put_filter(control, filter)
  defp change(_control, other), do: {:error, {:invalid_control, other}}

  defp apply_control(worker_id, change, version, {reply, state}) do
    worker = state.workers[worker_id]
    kind = change_kind(change)
    applied = Map.get(worker.versions, kind)

    case change(worker.control, change) do
      # A newer change of this kind is in place already (this one was
      # delayed, e.g. by a frozen node): it stays, the older one is dropped.
      {:ok, _control} when applied != nil and applied >= version ->
        {reply, state}

      {:ok, control} ->
        versions = Map.put(worker.versions, kind, version)

        Registrations.put(
          worker_id,
          registration(%{worker | control: control, versions: versions})
        )

        state = put_in(state.workers[worker_id].versions, versions)

        sent =
          if worker.status == :open,
            do: send_all(worker.handle, control, worker.control),
            else: :ok

        {merge_reply(reply, worker_id, sent), put_in(state.workers[worker_id].control, control)}

      {:error, _} = error ->
        {merge_reply(reply, worker_id, error), state}
    end
  end

  # Changes of one kind replace each other; the version is kept per kind.
  defp change_kind({:toggle, _}), do: :toggle
  defp change_kind({:sampling, _rate, patterns}), do: {:sampling, patterns}
  defp change_kind({:filter, _}), do: :filter

  # Sends what changed between two control states.
  defp send_all(handle, new, old) do
    (Control.messages(new) -- Control.messages(old))
    |> Enum.map(&send_control(handle, &1))
    |> Enum.find(:ok, &(&1 != :ok))
  end

  defp merge_reply(:ok, _id, :ok), do: :ok
  defp merge_reply(:ok, id, {:error, reason}), do: {:error, [{id, reason}]}
  defp merge_reply({:error, errors}, _id, :ok), do: {:error, errors}
  defp merge_reply({:error, errors}, id, {:error, reason}), do: {:error, errors ++ [{id, reason}]}

  defp send_control(handle, {:toggle, enabled}), do: Native.stream_toggle(handle, enabled)

  defp send_control(handle, {:sampling, rate, patterns}),
    do: Native.stream_sampling(handle, rate, patterns)

  defp send_control(handle, {:filter, allow, deny}), do: Native.stream_filter(handle, allow, deny)

  ## Inspection

  defp info(worker) do
    current = if worker.handle, do: Native.stream_stats(worker.handle), else: %{}

    %{
      worker_id: worker.worker_id,
      pool_name: worker.pool_name,
      address: worker.address,
      python_pid: worker.python_pid,
      authenticated: worker.secret != nil,
      status: worker.status,
      protocol: worker.protocol,
      control: Control.to_map(worker.control),
      reconnects: worker.reconnects,
      delivery: worker.delivery,
      stats: add_stats(worker.totals, current),
      pending: if(worker.handle, do: Native.stream_pending(worker.handle), else: 0),
      python: python_totals(worker),
      python_age_ms: Delivery.python_age_ms(worker.key),
      python_implementation: Delivery.python_implementation(worker.key)
    }
  end

  defp ctx(worker) do
    Map.take(worker, [:worker_id, :pool_name, :address, :python_pid, :secret])
  end

  ## Validation

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

      not (is_nil(ctx[:secret]) or is_binary(ctx[:secret]) or is_struct(ctx[:secret], Secret)) ->
        {:error,
         {:invalid_worker_ctx, {:secret, "expected a Snakepit.Telemetry.Secret or a string"}}}

      true ->
        {:ok,
         Map.take(ctx, [
           :worker_id,
           :pool_name,
           :address,
           :python_pid,
           :connect_timeout_ms,
           :secret
         ])}
    end
  end

  defp validate_ctx(_ctx), do: {:error, {:invalid_worker_ctx, :not_a_map}}
end
