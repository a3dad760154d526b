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
      the nodes that are in the group right now (a node that leaves drops out
      as soon as `:pg` notices).
    * Control across nodes: `Snakepit.Telemetry.GrpcStream.toggle/2`,
      `update_sampling/3` and `update_filter/2` with a worker id reach the
      node where that worker is registered (GrpcStream joins the
      `{:worker, id}` group).

  Correlation IDs cross nodes with `Snakepit.Telemetry.Correlation.erpc/3`.
  """
  use GenServer

  alias Snakepit.Telemetry.{GrpcStream, Naming}

  @scope :snakepit_telemetry
  @handler "snakepit-telemetry-cluster"
  @rate_interval_ms 1_000
  @call_timeout 5_000

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

  @doc "`%{node => %{pool_name => [worker_id]}}` for every node."
  @spec workers_by_node() :: %{node() => %{term() => [String.t()]}}
  def workers_by_node do
    ask(GrpcStream, :list_streams, [], fn streams ->
      streams |> Enum.group_by(& &1.pool_name, & &1.worker_id)
    end)
  end

  @doc "Catalog events executed per second on each node, over the last second."
  @spec events_per_second() :: %{node() => non_neg_integer()}
  def events_per_second, do: ask(__MODULE__, :local_rate, [], & &1)

  @doc "Events waiting in the Python queues of every worker in the cluster."
  @spec total_queue_depth() :: non_neg_integer()
  def total_queue_depth do
    GrpcStream
    |> ask(:list_streams, [], fn streams ->
      Enum.sum(Enum.map(streams, &Map.get(&1.python, :queue_len, 0)))
    end)
    |> Map.values()
    |> Enum.sum()
  end

  @doc "Events dropped so far on each node's workers, Python and native hops together."
  @spec drops_by_node() :: %{node() => non_neg_integer()}
  def drops_by_node do
    ask(GrpcStream, :list_streams, [], fn streams ->
      streams
      |> Enum.flat_map(&(Map.to_list(&1.stats) ++ Map.to_list(&1.python)))
      |> Enum.filter(fn {key, _} -> key |> Atom.to_string() |> String.starts_with?("dropped_") end)
      |> Enum.map(&elem(&1, 1))
      |> Enum.sum()
    end)
  end

  @doc false
  def local_rate do
    case :persistent_term.get({__MODULE__, :counter}, nil) do
      nil -> 0
      counter -> :counters.get(counter, 2)
    end
  end

  # Runs Module.fun(args) on every node of the group; nodes that do not
  # answer in time are left out (they are leaving or gone).
  defp ask(module, fun, args, summarize) do
    nodes = nodes()

    nodes
    |> :erpc.multicall(module, fun, args, @call_timeout)
    |> Enum.zip(nodes)
    |> Enum.flat_map(fn
      {{:ok, value}, node} -> [{node, summarize.(value)}]
      {_failed, _node} -> []
    end)
    |> Map.new()
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
