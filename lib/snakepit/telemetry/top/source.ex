defmodule Snakepit.Telemetry.Top.Source do
  @moduledoc """
  Gathers what `Snakepit.Telemetry.Top` shows, from the node being viewed
  and every node of its cluster, over Erlang distribution (`:erpc`; the
  viewer's own node needs none of the application's processes).

    * `Snakepit.Telemetry.Cluster.nodes/0`, `events_per_second/0`,
      `total_queue_depth/0` and `drops_by_node/0`, asked of the viewed node;
    * `Snakepit.Telemetry.GrpcStream.list_streams/0` of every node, in
      parallel;
    * a `Snakepit.Telemetry.Top.Collector` on every node, started on first
      sight (and again if it went away), read each refresh.

  Every call is bounded by the timeout; a node that gives no answer is
  shown as `{:error, reason}`, never left out, and never stops the view.
  Rates (a worker's events/s from its `delivered` counter, an event name's
  rate from the collector's counts) are differences between two refreshes
  over the time between them; a counter that went down (a worker restarted
  or registered again) starts over.

  The source is a plain struct passed from refresh to refresh:
  `snapshot(source)` returns `{snapshot, source}`; `stop/1` stops the
  collectors.
  """

  alias Snakepit.Telemetry.{Cluster, GrpcStream}
  alias Snakepit.Telemetry.Top.Collector

  @native_drops ~w(dropped_unknown_event dropped_malformed dropped_buffer_full
                   dropped_receiver_down dropped_encode malformed_messages
                   oversized_messages enforced_disabled enforced_filtered
                   enforced_sampled)a

  defstruct target: nil, timeout: 1_000, collectors: %{}, previous: %{}, at: nil

  @type t :: %__MODULE__{}

  @doc "A source viewing `target` (a node name; `node()` for this VM)."
  @spec new(node(), keyword()) :: t()
  def new(target, opts \\ []) do
    %__MODULE__{target: target, timeout: Keyword.get(opts, :timeout, 1_000)}
  end

  @doc "Takes a snapshot (see `Snakepit.Telemetry.Top.Render`); returns it and the next source."
  @spec snapshot(t()) :: {map(), t()}
  def snapshot(%__MODULE__{} = source) do
    now = System.monotonic_time(:millisecond)
    time = DateTime.utc_now() |> DateTime.truncate(:second) |> DateTime.to_time() |> to_string()
    base = %{time: time, target: source.target, error: nil, nodes: []}

    case call(source.target, Cluster, :nodes, [], source.timeout) do
      {:ok, nodes} ->
        nodes = Enum.uniq([source.target | nodes]) |> Enum.sort()
        gather(source, nodes, base, now)

      {:error, reason} ->
        {%{base | error: reason}, %{source | at: now}}
    end
  end

  @doc "Stops the collectors this source started."
  @spec stop(t()) :: :ok
  def stop(%__MODULE__{collectors: collectors}) do
    Enum.each(collectors, fn {_node, pid} -> Collector.stop(pid) end)
  end

  defp gather(source, nodes, base, now) do
    t = source.timeout

    # The cluster queries, each bounded by the cluster's own query timeout.
    tasks = [
      Task.async(fn -> call(source.target, Cluster, :events_per_second, [], t) end),
      Task.async(fn -> call(source.target, Cluster, :total_queue_depth, [], t) end),
      Task.async(fn -> call(source.target, Cluster, :drops_by_node, [], t) end)
    ]

    streams = nodes |> :erpc.multicall(GrpcStream, :list_streams, [], t) |> Enum.zip(nodes)
    source = ensure_collectors(source, nodes)

    events =
      source.collectors
      |> Enum.map(fn {node, pid} -> {node, Task.async(fn -> Collector.read(pid, t) end)} end)
      |> Map.new(fn {node, task} -> {node, tag(Task.await(task, t + 1_000), source, node)} end)

    [eps, queue, drops] = Enum.map(tasks, &Task.await(&1, t + 1_000))
    elapsed = if source.at, do: max(now - source.at, 1), else: nil

    {node_entries, previous} =
      Enum.map_reduce(streams, %{}, fn {answer, node}, prev_acc ->
        entry(node, answer, eps, queue, drops, events, source.previous, elapsed, prev_acc)
      end)

    source = %{source | previous: previous, at: now}

    # A collector whose node gave no answer is dropped: it is started again
    # when the node answers (and stops itself when our link to it goes).
    {kept, gone} =
      Enum.split_with(source.collectors, fn {node, _} -> match?({:ok, _}, events[node]) end)

    Enum.each(gone, fn {_node, pid} -> Collector.stop(pid) end)
    collectors = Map.new(kept)

    {%{base | nodes: node_entries}, %{source | collectors: collectors}}
  end

  defp entry(node, {:ok, streams}, eps, queue, drops, events, previous, elapsed, acc)
       when is_list(streams) do
    {workers, acc} =
      Enum.map_reduce(streams, acc, fn s, acc ->
        delivered = Map.get(s.stats, :delivered, 0)
        key = {:worker, node, s.worker_id}
        rate = rate(delivered, previous[key], elapsed)
        {row(node, s, rate, delivered), Map.put(acc, key, delivered)}
      end)

    {events, acc} = events_entry(node, events[node], previous, elapsed, acc)

    {%{
       node: node,
       error: nil,
       eps: pick(eps, node),
       queue: pick(queue, node, & &1.by_node),
       drops: pick(drops, node),
       workers: workers,
       events: events
     }, acc}
  end

  defp entry(node, {:ok, other}, _eps, _queue, _drops, _events, _prev, _elapsed, acc),
    do: {%{node: node, error: {:bad_answer, other}}, acc}

  defp entry(node, {:error, {:erpc, reason}}, _e, _q, _d, _ev, _p, _el, acc),
    do: {%{node: node, error: reason}, acc}

  defp entry(node, {class, reason}, _e, _q, _d, _ev, _p, _el, acc),
    do: {%{node: node, error: {class, reason}}, acc}

  defp events_entry(node, {:ok, counts}, previous, elapsed, acc) do
    # Counts start at 0 when the collector starts: a name not seen at the
    # previous read of this same collector had 0 then.
    pid = Map.get(counts, :__collector__)
    seen? = pid != nil and previous[{:collector, node}] == pid
    acc = Map.put(acc, {:collector, node}, pid)

    Enum.map_reduce(Map.delete(counts, :__collector__), acc, fn {name, c}, acc ->
      key = {:event, node, name}
      before = previous[key] || if(seen?, do: 0)
      event = %{name: name, rate: rate(c.count, before, elapsed) || 0.0}
      {Map.merge(event, Map.take(c, [:p50_us, :p99_us])), Map.put(acc, key, c.count)}
    end)
  end

  defp events_entry(_node, {:error, reason}, _previous, _elapsed, acc),
    do: {{:error, reason}, acc}

  defp events_entry(_node, nil, _previous, _elapsed, acc), do: {{:error, :no_collector}, acc}

  defp tag({:ok, counts}, source, node),
    do: {:ok, Map.put(counts, :__collector__, source.collectors[node])}

  defp tag(other, _source, _node), do: other

  defp row(node, s, rate, delivered) do
    python = Map.get(s, :python, %{})
    stats = Map.get(s, :stats, %{})

    %{
      node: node,
      worker_id: s.worker_id,
      pool: s.pool_name,
      status: s.status,
      protocol: s.protocol,
      rate: rate,
      delivered: delivered,
      drops: %{
        native: Map.take(stats, @native_drops),
        python:
          Map.filter(python, fn {k, _} ->
            k == :interrupted_sends or String.starts_with?(Atom.to_string(k), "dropped_")
          end)
      },
      queue_len: Map.get(python, :queue_len, 0),
      reconnects: s.reconnects,
      control: control_map(s.control),
      implementation: Map.get(s, :python_implementation)
    }
  end

  defp control_map(%_{} = control), do: Map.from_struct(control)
  defp control_map(control), do: control

  defp rate(_now, nil, _elapsed), do: nil
  defp rate(_now, _prev, nil), do: nil
  defp rate(now, prev, _elapsed) when now < prev, do: nil
  defp rate(now, prev, elapsed), do: (now - prev) * 1_000 / elapsed

  defp pick(answer, node, by \\ & &1)

  defp pick({:ok, map}, node, by) do
    case by.(map) do
      %{^node => value} -> value
      _ -> {:error, :not_in_cluster_answer}
    end
  end

  defp pick({:error, reason}, _node, _by), do: {:error, reason}

  defp ensure_collectors(source, nodes) do
    collectors =
      Enum.reduce(nodes, source.collectors, fn node, acc ->
        if Map.has_key?(acc, node) do
          acc
        else
          case call(node, Collector, :start, [self()], source.timeout) do
            {:ok, {:ok, pid}} -> Map.put(acc, node, pid)
            _ -> acc
          end
        end
      end)

    %{source | collectors: collectors}
  end

  defp call(node, module, fun, args, timeout) do
    {:ok, :erpc.call(node, module, fun, args, timeout)}
  catch
    :error, {:erpc, reason} -> {:error, reason}
    :error, {:exception, reason, _stack} -> {:error, {:exception, reason}}
    class, reason -> {:error, {class, reason}}
  end
end
