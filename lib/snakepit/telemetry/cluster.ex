defmodule Snakepit.Telemetry.Cluster do
  @moduledoc """
  Telemetry across a BEAM cluster, built on BEAM distribution itself:
  process groups (`:pg`, scope `:snakepit_telemetry`) and `:erpc`.

  Every node running `:snakepit_telemetry` starts one `Cluster` process. It
  joins the `:nodes` group, counts the catalog events executed on its node
  and forwards them to subscribers anywhere in the cluster.

    * `subscribe/2`: receive selected events from every node, as
      `{:snakepit_telemetry_event, event, measurements, metadata}` messages
      (`metadata.node` says which node folded the event). Subscriptions are
      `:pg` memberships, so nodes that join later deliver too, and a
      subscriber that exits is dropped by `:pg` itself.
    * `nodes/0`, `workers_by_node/0`, `events_per_second/0`,
      `total_queue_depth/0`, `drops_by_node/0`: cluster-wide answers, asked of
      the nodes that are in the group right now, all in parallel, each
      bounded by `query_timeout_ms` (`:cluster` config, default 500 ms). A
      node that does not answer in time is **not left out**: its entry is
      `{:error, reason}` (`:timeout`, `:noconnection`, ...). A node that
      leaves the cluster drops out of `nodes/0` as soon as `:pg` notices.
    * Control across nodes: `Snakepit.Telemetry.GrpcStream.toggle/3`,
      `update_sampling/4` and `update_filter/3` with a worker id reach the
      node where that worker is registered (GrpcStream joins the
      `{:worker, id}` group); with `:all` or `{:pool, name}` they act on every
      node of the group (see GrpcStream, "Control across the cluster").

  Correlation IDs cross nodes with `Snakepit.Telemetry.Correlation.erpc/3`.
  """
  use GenServer

  alias Snakepit.Telemetry.{GrpcStream, Naming}

  @scope :snakepit_telemetry
  @handler "snakepit-telemetry-cluster"
  @rate_interval_ms 1_000
  # Drop counters that are policy (asked for: sampling, filters, toggle),
  # not losses. Every other `dropped_*` counter, and the native counters of
  # whole messages, are losses.
  @policy_drops [:dropped_sampled, :dropped_filtered, :dropped_disabled]
  @loss_counters [:malformed_messages, :oversized_messages, :interrupted_sends]

  @typedoc "Why a node gave no answer: `:timeout`, `:noconnection`, or what it raised."
  @type no_answer :: {:error, term()}

  @doc false
  def scope, do: @scope

  @doc false
  def start_link(opts \\ []), do: GenServer.start_link(__MODULE__, opts, name: __MODULE__)

  @doc """
  Sends `pid` every listed event executed on any node of the cluster.
  Returns `:ok`; `pid` must be local to the calling node.
  """
  @spec subscribe([[atom()]], pid()) :: :ok
  def subscribe(events, pid \\ self()) when is_list(events) and is_pid(pid) do
    Enum.each(events, &:pg.join(@scope, {:subscriber, &1}, pid))
  end

  @doc "Stops sending `pid` these events."
  @spec unsubscribe([[atom()]], pid()) :: :ok
  def unsubscribe(events, pid \\ self()) when is_list(events) and is_pid(pid) do
    Enum.each(events, &:pg.leave(@scope, {:subscriber, &1}, pid))
  end

  @doc "Nodes that run `:snakepit_telemetry`, this one included, sorted."
  @spec nodes() :: [node()]
  def nodes,
    do: @scope |> :pg.get_members(:nodes) |> Enum.map(&node/1) |> Enum.uniq() |> Enum.sort()

  @doc "`%{node => %{pool_name => [worker_id]}}` for every node (`{:error, reason}` if it gave no answer)."
  @spec workers_by_node() :: %{node() => %{term() => [String.t()]} | no_answer()}
  def workers_by_node do
    ask(GrpcStream, :list_streams, [], fn streams ->
      streams |> Enum.group_by(& &1.pool_name, & &1.worker_id)
    end)
  end

  @doc "Catalog events executed per second on each node, over the last second."
  @spec events_per_second() :: %{node() => non_neg_integer() | no_answer()}
  def events_per_second, do: ask(__MODULE__, :local_rate, [], & &1)

  @doc """
  Events waiting on their way to handlers, across the cluster:
  `%{total: n, by_node: %{node => depth | {:error, reason}}}`, where each
  node's depth is

      %{queued: python + native, python: n, native: n, python_age_ms: ms | nil}

  `native` is read now: events the NIF decoded that the workers' delivery
  processes have not handled yet. `python` is the sum of the workers' Python
  queue lengths from their latest stats report, `python_age_ms` the age of
  the oldest of those reports (`nil`: no report yet). `total` sums the nodes
  that answered; the others are named in `by_node`.
  """
  @spec total_queue_depth() :: %{
          total: non_neg_integer(),
          by_node: %{node() => map() | no_answer()}
        }
  def total_queue_depth do
    by_node = ask(__MODULE__, :local_queue_depth, [], & &1)
    total = for({_node, %{queued: n}} <- by_node, do: n) |> Enum.sum()
    %{total: total, by_node: by_node}
  end

  @doc """
  Events dropped so far on each node's workers, in two kinds:
  `%{node => %{policy: n, loss: n} | {:error, reason}}`. `policy` counts
  what was asked for (`dropped_sampled`, `dropped_filtered`,
  `dropped_disabled`, on the Python or the native hop); `loss` everything
  else: events shed or refused on the way (queue full, invalid, oversized,
  malformed, unknown, receiver down, ...) and whole messages refused.
  """
  @spec drops_by_node() :: %{
          node() => %{policy: non_neg_integer(), loss: non_neg_integer()} | no_answer()
        }
  def drops_by_node do
    ask(GrpcStream, :list_streams, [], fn streams ->
      streams
      |> Enum.flat_map(&(Map.to_list(&1.stats) ++ Map.to_list(&1.python)))
      |> Enum.reduce(%{policy: 0, loss: 0}, fn {key, n}, acc ->
        case drop_kind(key) do
          nil -> acc
          kind -> Map.update!(acc, kind, &(&1 + n))
        end
      end)
    end)
  end

  defp drop_kind(key) when key in @policy_drops, do: :policy
  defp drop_kind(key) when key in @loss_counters, do: :loss

  defp drop_kind(key) do
    name = Atom.to_string(key)

    cond do
      String.starts_with?(name, "enforced_") -> :policy
      String.starts_with?(name, "dropped_") -> :loss
      true -> nil
    end
  end

  @doc false
  # This node's part of total_queue_depth/0.
  def local_queue_depth do
    streams = GrpcStream.list_streams()
    python = Enum.sum(Enum.map(streams, &Map.get(&1.python, :queue_len, 0)))
    native = Enum.sum(Enum.map(streams, & &1.pending))
    ages = for %{python_age_ms: age} when is_integer(age) <- streams, do: age

    %{
      queued: python + native,
      python: python,
      native: native,
      python_age_ms: if(ages == [], do: nil, else: Enum.max(ages))
    }
  end

  @doc false
  def local_rate do
    case :persistent_term.get({__MODULE__, :counter}, nil) do
      nil -> 0
      counter -> :counters.get(counter, 2)
    end
  end

  # Runs Module.fun(args) on every node of the group, in parallel, each
  # bounded by query_timeout_ms; a node that gives no answer is named with
  # {:error, reason}, never left out.
  defp ask(module, fun, args, summarize) do
    nodes = nodes()
    timeout = Snakepit.Telemetry.Config.cluster()[:query_timeout_ms]

    nodes
    |> :erpc.multicall(module, fun, args, timeout)
    |> Enum.zip(nodes)
    |> Map.new(fn
      {{:ok, value}, node} -> {node, summarize.(value)}
      {{:error, {:erpc, reason}}, node} -> {node, {:error, reason}}
      {{class, reason}, node} -> {node, {:error, {class, reason}}}
    end)
  end

  ## Handler

  @doc false
  def handle_event(event, measurements, metadata, counter) do
    :counters.add(counter, 1, 1)

    case :pg.get_members(@scope, {:subscriber, event}) do
      [] ->
        :ok

      pids ->
        Enum.each(pids, &send(&1, {:snakepit_telemetry_event, event, measurements, metadata}))
    end
  end

  ## Server

  @impl GenServer
  def init(_opts) do
    :ok = :pg.join(@scope, :nodes, self())
    # Slot 1: events executed on this node; slot 2: the last second's rate.
    counter = :counters.new(2, [:write_concurrency])
    :persistent_term.put({__MODULE__, :counter}, counter)
    # A restarted Cluster process replaces its predecessor's handler.
    :telemetry.detach(@handler)
    :ok = :telemetry.attach_many(@handler, Naming.events(), &__MODULE__.handle_event/4, counter)
    Process.send_after(self(), :rate, @rate_interval_ms)
    {:ok, %{counter: counter, last: 0}}
  end

  @impl GenServer
  def handle_info(:rate, state) do
    now = :counters.get(state.counter, 1)
    :counters.put(state.counter, 2, now - state.last)
    Process.send_after(self(), :rate, @rate_interval_ms)
    {:noreply, %{state | last: now}}
  end
end
