defmodule Snakepit.Telemetry.ClusterTest do
  # Three real BEAM nodes (this one and two :peer nodes), each with its own
  # Python worker.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{Cluster, ClusterHelpers, Correlation, GrpcStream}

  @stop [:snakepit, :python, :call, :stop]
  @moduletag timeout: 120_000

  setup_all do
    ClusterHelpers.ensure_distributed!()
  end

  defp start_node!(label), do: ClusterHelpers.start_node!(label)

  defp remote_command(node, command), do: :erpc.call(node, ClusterHelpers, :command, [command])

  test "events from every node reach a subscriber; nodes that leave drop out of the view" do
    {_peer_b, b, worker_b} = start_node!("b")
    {peer_c, c, worker_c} = start_node!("c")
    local = start_worker!()
    local_id = register!(local, pool_name: :cluster_pool)

    :ok = Cluster.subscribe([@stop])
    await(fn -> Enum.all?([node(), b, c], &(&1 in Cluster.nodes())) end)

    for n <- [b, c],
        do:
          {:ok, _} =
            remote_command(n, %{
              cmd: "emit",
              event: "python.call.stop",
              measurements: %{duration: 1}
            })

    command!(local, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})

    seen =
      for _ <- 1..3 do
        assert_receive {:snakepit_telemetry_event, @stop, %{duration: _}, metadata}, 10_000
        {metadata.node, metadata.worker_id}
      end

    assert Enum.sort(seen) == Enum.sort([{node(), local_id}, {b, worker_b}, {c, worker_c}])

    workers = Cluster.workers_by_node()
    assert workers[b] == %{cluster_pool: [worker_b]}
    assert workers[c] == %{cluster_pool: [worker_c]}
    assert %{total: total, by_node: %{^b => %{queued: _}}} = Cluster.total_queue_depth()
    assert is_integer(total)
    assert %{policy: _, loss: _} = Cluster.drops_by_node()[c]
    await(fn -> Map.has_key?(Cluster.events_per_second(), b) end)

    :peer.stop(peer_c)
    await(fn -> c not in Cluster.nodes() end)
    refute Map.has_key?(Cluster.workers_by_node(), c)
    assert Map.has_key?(Cluster.workers_by_node(), b)
  end

  test "sampling changed on one node takes effect on a worker registered on another" do
    {_peer_a, a, _worker_a} = start_node!("a")
    {_peer_c, c, worker_c} = start_node!("c")
    :ok = Cluster.subscribe([@stop])

    # A full mesh, as in a real cluster; then node A's process groups know
    # where worker C lives.
    true = :erpc.call(a, Node, :connect, [c])

    await(fn -> :erpc.call(a, :pg, :get_members, [Cluster.scope(), {:worker, worker_c}]) != [] end)

    # From node A, steer the worker that lives on node C.
    assert :erpc.call(a, GrpcStream, :update_sampling, [worker_c, 0.0]) == :ok

    await(fn ->
      match?({:ok, %{"control" => %{"default_rate" => 0.0}}}, remote_command(c, %{cmd: "stats"}))
    end)

    {:ok, _} =
      remote_command(c, %{
        cmd: "emit",
        event: "python.call.stop",
        measurements: %{duration: 1},
        count: 50
      })

    refute_receive {:snakepit_telemetry_event, @stop, _, %{worker_id: ^worker_c}}, 500

    assert :erpc.call(a, GrpcStream, :update_sampling, [worker_c, 1.0]) == :ok

    await(fn ->
      match?({:ok, %{"control" => %{"default_rate" => 1.0}}}, remote_command(c, %{cmd: "stats"}))
    end)

    {:ok, _} =
      remote_command(c, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})

    assert_receive {:snakepit_telemetry_event, @stop, _, %{worker_id: ^worker_c, node: ^c}},
                   10_000

    assert GrpcStream.update_sampling("nobody-anywhere", 0.5) == {:error, :unknown_worker}
  end

  test "control reaches another node as data; a malformed control gets an error reply" do
    {_peer, d, worker_d} = start_node!("d")
    remote = :erpc.call(d, Process, :whereis, [GrpcStream])
    await(fn -> :pg.get_members(Cluster.scope(), {:worker, worker_d}) != [] end)

    assert GrpcStream.toggle(worker_d, false) == :ok
    assert GrpcStream.update_filter(worker_d, deny: ["tool.*"]) == :ok

    await(fn ->
      match?(
        {:ok, %{"control" => %{"enabled" => false, "deny" => ["tool.*"]}}},
        remote_command(d, %{cmd: "stats"})
      )
    end)

    # What an older node sent: a function. This module is not loaded on node
    # D, so calling it there would raise; it must be refused, not called.
    closure = fn control -> {:ok, control} end

    assert {:error, {:invalid_control, _}} =
             GenServer.call({GrpcStream, d}, {:control, worker_d, closure})

    assert GenServer.call({GrpcStream, d}, {:control, worker_d, {:toggle, :maybe}}) ==
             {:error, {:invalid_control, {:toggle, :maybe}}}

    assert GenServer.call({GrpcStream, d}, {:control, worker_d, {:sampling, 2.0, []}}) ==
             {:error, {:invalid_rate, 2.0}}

    assert GenServer.call({GrpcStream, d}, {:control, worker_d, {:future_control, 1, 2}}) ==
             {:error, {:invalid_control, {:future_control, 1, 2}}}

    assert {:error, {:invalid_request, {:something_newer, _}}} =
             GenServer.call({GrpcStream, d}, {:something_newer, worker_d})

    assert :erpc.call(d, Process, :whereis, [GrpcStream]) == remote
    [info] = :erpc.call(d, GrpcStream, :list_streams, [])
    assert info.control.enabled == false
    assert info.control.deny == ["tool.*"]

    # A node that does not answer in time is a timeout, not an unreachable node.
    :ok = :erpc.call(d, :sys, :suspend, [remote])
    assert GrpcStream.toggle(worker_d, true) == {:error, {:timeout, d}}
    :ok = :erpc.call(d, :sys, :resume, [remote])
    assert :erpc.call(d, Process, :whereis, [GrpcStream]) == remote
  end

  test "a correlation ID survives a call that crosses nodes" do
    {_peer, b, worker_b} = start_node!("b")
    :ok = Cluster.subscribe([@stop])
    id = Correlation.new()

    Correlation.with_id(id, fn ->
      {:ok, _} = Correlation.erpc(b, &ClusterHelpers.call_with_current_id/0)
    end)

    assert_receive {:snakepit_telemetry_event, @stop, _,
                    %{node: ^b, worker_id: ^worker_b, correlation_id: ^id}},
                   10_000
  end
end
