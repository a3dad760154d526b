defmodule Snakepit.Telemetry.ClusterControlTest do
  # The cluster as a control plane, on real nodes (:peer): `:all` and pools
  # act on every node, answers name the nodes that did not confirm, a frozen
  # node costs a bounded wait and ends up with the latest change, and the
  # queries report fresh figures and both kinds of drops.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{Cluster, ClusterHelpers, GrpcStream}

  @moduletag timeout: 180_000

  setup_all do
    ClusterHelpers.ensure_distributed!()
  end

  defp control_of(n, worker_id) when n == node(),
    do: control_of(GrpcStream.list_streams(), worker_id)

  defp control_of(n, worker_id) when is_atom(n),
    do: control_of(:erpc.call(n, GrpcStream, :list_streams, []), worker_id)

  defp control_of(streams, worker_id) do
    Enum.find_value(streams, &(&1.worker_id == worker_id and &1.control))
  end

  defp await_member(worker_id) do
    await(fn -> :pg.get_members(Cluster.scope(), {:worker, worker_id}) != [] end)
  end

  test ":all and {:pool, name} act on every node; worker ids are unique in the cluster" do
    {_peer_b, b, worker_b} = ClusterHelpers.start_node!("b", :pool_b)
    {_peer_c, c, worker_c} = ClusterHelpers.start_node!("c", :shared)
    local = register!(start_worker!(), pool_name: :shared)
    await(fn -> Enum.all?([node(), b, c], &(&1 in Cluster.nodes())) end)
    Enum.each([worker_b, worker_c], &await_member/1)

    assert GrpcStream.toggle(:all, false) == :ok

    for {n, id} <- [{b, worker_b}, {c, worker_c}, {node(), local}],
        do: assert(control_of(n, id).enabled == false)

    # A pool that lives on one node only...
    assert GrpcStream.update_sampling({:pool, :pool_b}, 0.25) == :ok
    assert control_of(b, worker_b).default_rate == 0.25
    assert control_of(c, worker_c).default_rate == 1.0
    # ...and one spread over two.
    assert GrpcStream.update_sampling({:pool, :shared}, 0.5) == :ok
    assert control_of(c, worker_c).default_rate == 0.5
    assert control_of(node(), local).default_rate == 0.5
    assert control_of(b, worker_b).default_rate == 0.25
    assert GrpcStream.update_sampling({:pool, :nowhere}, 0.5) == {:error, :unknown_pool}

    # One id, one worker: a second registration elsewhere is refused...
    duplicate = [worker_id: worker_b, pool_name: :shared, address: "127.0.0.1:1"]
    assert GrpcStream.register_worker(duplicate) == {:error, {:already_registered, b}}
    # ...and {node, worker_id} names a worker on one node.
    assert GrpcStream.toggle({b, worker_b}, true) == :ok
    assert control_of(b, worker_b).enabled == true
    assert GrpcStream.toggle({c, worker_b}, true) == {:error, :unknown_worker}

    assert GrpcStream.toggle({:"nobody@127.0.0.1", worker_b}, true) ==
             {:error, {:node_unreachable, :"nobody@127.0.0.1"}}
  end

  test "a frozen node: queries and control name it in bounded time; " <>
         "thawed, it holds the latest change and never an older one" do
    Application.put_env(:snakepit_telemetry, :cluster,
      query_timeout_ms: 300,
      control_timeout_ms: 500
    )

    on_exit(fn -> Application.delete_env(:snakepit_telemetry, :cluster) end)
    {_peer, b, worker_b} = ClusterHelpers.start_node!("frozen")
    local = register!(start_worker!())
    await(fn -> b in Cluster.nodes() end)
    await_member(worker_b)
    os_pid = :erpc.call(b, :os, :getpid, [])

    {_, 0} = System.cmd("kill", ["-STOP", to_string(os_pid)])
    on_exit(fn -> System.cmd("kill", ["-CONT", to_string(os_pid)]) end)
    # A stop signal takes effect thread by thread: wait until every thread
    # of the node's OS process is stopped.
    await(fn -> stopped?(os_pid) end)

    try do
      # Every query answers, and names the node that did not.
      workers = Cluster.workers_by_node()
      assert workers[b] == {:error, :timeout}
      assert %{test_pool: ids} = workers[node()]
      assert local in ids
      assert Cluster.events_per_second()[b] == {:error, :timeout}
      assert %{by_node: %{^b => {:error, :timeout}}} = Cluster.total_queue_depth()
      assert Cluster.drops_by_node()[b] == {:error, :timeout}

      # Control: a timeout says so (the change may still be applied).
      assert GrpcStream.update_sampling(worker_b, 0.3) == {:error, {:timeout, b}}
      assert GrpcStream.toggle(:all, false) == {:error, {:nodes, %{b => :timeout}}}
      # Recorded on the nodes that answered.
      assert control_of(node(), local).enabled == false
      assert GrpcStream.update_sampling(worker_b, 0.7) == {:error, {:timeout, b}}
    after
      System.cmd("kill", ["-CONT", to_string(os_pid)])
    end

    # Thawed: the delayed changes arrive; the latest one holds.
    await(fn ->
      control = control_of(b, worker_b)
      control.default_rate == 0.7 and control.enabled == false
    end)

    # A change older than the one applied (delayed longer, or sent from a
    # node whose request arrived late) is ignored.
    stale = {0, node(), 0}

    assert GenServer.call({GrpcStream, b}, {:control, worker_b, {:sampling, 0.1, []}, stale}) ==
             :ok

    assert control_of(b, worker_b).default_rate == 0.7
    # Newer ones apply, and a retry is harmless.
    assert GrpcStream.update_sampling(worker_b, 1.0) == :ok
    assert GrpcStream.update_sampling(worker_b, 1.0) == :ok
    assert control_of(b, worker_b).default_rate == 1.0
    assert Cluster.workers_by_node()[b] == %{cluster_pool: [worker_b]}
  end

  test "queue depth is read fresh from the native counters; drops come as policy and loss" do
    worker = start_worker!(args: ["--queue-size", "64"])
    worker_id = register!(worker)
    gate = :atomics.new(1, [])
    :atomics.put(gate, 1, 1)
    handler = "queue-depth-#{System.unique_integer([:positive])}"

    :ok =
      :telemetry.attach(
        handler,
        [:snakepit, :python, :call, :stop],
        &__MODULE__.hold/4,
        {gate, worker_id}
      )

    on_exit(fn ->
      :atomics.put(gate, 1, 0)
      :telemetry.detach(handler)
    end)

    # Held handlers: the events decoded wait for them, and the depth says so now.
    command!(worker, %{cmd: "flood", count: 2_000})

    await(fn ->
      depth = Cluster.total_queue_depth().by_node[node()]
      depth.native > 0 and depth.queued >= depth.native
    end)

    :atomics.put(gate, 1, 0)

    # Policy: sampled out on purpose. Loss: shed by a full Python queue.
    assert GrpcStream.update_sampling(worker_id, 0.0, ["python.gc.*"]) == :ok
    # Control reaches Python asynchronously: wait until it applies the rule.
    await(fn -> command!(worker, %{cmd: "stats"})["control"]["rules"] != [] end)
    command!(worker, %{cmd: "flood", event: "python.gc.completed", count: 50})

    await(fn ->
      %{policy: policy, loss: loss} = Cluster.drops_by_node()[node()]
      python = stream(worker_id).python
      policy >= 50 and loss >= python[:dropped_queue_full] and python[:dropped_queue_full] > 0
    end)

    %{policy: policy} = Cluster.drops_by_node()[node()]
    assert policy == stream(worker_id).python.dropped_sampled
    assert is_integer(Cluster.total_queue_depth().by_node[node()].python_age_ms)
  end

  # Whether every thread of an OS process is stopped (state T in
  # /proc/PID/task/*/stat).
  defp stopped?(os_pid) do
    states =
      for stat <- Path.wildcard("/proc/#{os_pid}/task/*/stat"),
          {:ok, text} <- [File.read(stat)],
          # The state follows the command name, which is in parentheses.
          [_, rest] <- [String.split(text, ") ", parts: 2)],
          do: String.first(rest)

    states != [] and Enum.all?(states, &(&1 in ["T", "t"]))
  end

  @doc false
  def hold(_event, _measurements, %{worker_id: id}, {gate, id}) do
    if :atomics.get(gate, 1) == 1 do
      Process.sleep(1)
      hold(nil, nil, %{worker_id: id}, {gate, id})
    end
  end

  def hold(_event, _measurements, _metadata, _config), do: :ok
end
