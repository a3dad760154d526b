defmodule Snakepit.Telemetry.TopSourceTest do
  # What the view gathers: from this VM (the iex case) and across a cluster
  # whose nodes come and go, and the collector's bounded counts.
  use Snakepit.Telemetry.Case, async: false

  import ExUnit.CaptureIO

  alias Snakepit.Telemetry.{ClusterHelpers, GrpcStream, Top}
  alias Snakepit.Telemetry.Top.{Collector, Source}

  @moduletag timeout: 180_000

  defp await_snapshot(source, check) do
    await(
      fn ->
        {snap, source} = Source.snapshot(Process.get(:top_source, source))
        Process.put(:top_source, source)
        check.(snap)
      end,
      60_000
    )

    Process.get(:top_source)
  end

  defp entry(snap, node), do: Enum.find(snap.nodes, &(&1.node == node))

  defp worker(snap, id) do
    for(%{workers: ws} when is_list(ws) <- snap.nodes, w <- ws, w.worker_id == id, do: w)
    |> List.first()
  end

  test "this VM: worker rows, rates from two refreshes, a restarted worker starts over" do
    worker = start_worker!()
    id = register!(worker, pool_name: :top_src)
    command!(worker, %{cmd: "workload", calls: 1_000_000, interval_ms: 5})

    source = Source.new(node())
    on_exit(fn -> Source.stop(Process.get(:top_source, source)) end)

    source =
      await_snapshot(source, fn snap ->
        w = worker(snap, id)

        w != nil and w.status == :open and is_float(w.rate) and w.rate > 0 and
          w.control.default_rate == 1.0
      end)

    # The busiest events come from the collector: Python calls, with durations.
    await_snapshot(source, fn snap ->
      case entry(snap, node()).events do
        events when is_list(events) ->
          Enum.any?(
            events,
            &(&1.name == "python.call.stop" and &1.rate > 0 and is_integer(&1.p99_us))
          )

        _ ->
          false
      end
    end)

    # The same id registered again (its counters start over): no negative rate.
    :ok = GrpcStream.unregister_worker(id)
    worker2 = start_worker!()

    :ok =
      GrpcStream.register_worker(
        worker_id: id,
        pool_name: :top_src,
        address: Snakepit.Telemetry.PythonWorker.address(worker2)
      )

    source =
      await_snapshot(Process.get(:top_source), fn snap ->
        w = worker(snap, id)
        w != nil and w.status == :open
      end)

    {snap, _} = Source.snapshot(source)
    w = worker(snap, id)
    assert w.rate == nil or w.rate >= 0
  end

  test "Top.run from this VM (iex): --once prints a frame of the local node" do
    worker = start_worker!()
    id = register!(worker, pool_name: :top_iex)
    out = capture_io(fn -> assert Top.run(once: true, output: :frame, pool: :top_iex) == :ok end)
    assert out =~ ~r/^snakepit top  #{node()}/
    assert out =~ ~r/> #{id}\s+top_iex\s+open/
  end

  test "steering shows GrpcStream's reply, the error included" do
    worker = start_worker!()
    id = register!(worker, pool_name: :top_steer)

    assert Top.perform(node(), {:sampling, {node(), id}, 0.5}) ==
             "sampling rate 0.5 for #{id} on #{node()}: ok"

    assert stream(id).control.default_rate == 0.5

    assert Top.perform(node(), {:toggle, {:pool, :top_steer}, false}) ==
             "toggle pool :top_steer off: ok"

    assert stream(id).control.enabled == false

    assert Top.perform(node(), {:toggle, {node(), "nobody"}, true}) ==
             "toggle nobody on #{node()} on: {:error, :unknown_worker}"

    assert Top.perform(node(), {:sampling, {:pool, :no_such_pool}, 0.1}) ==
             "sampling rate 0.1 for pool :no_such_pool: {:error, :unknown_pool}"

    assert Top.perform(:"nobody@127.0.0.1", {:toggle, {node(), id}, true}) =~
             ~r/^toggle #{id} on #{node()} on: \{:error, \{:erpc, :noconnection\}\}/
  end

  test "the collector keeps a bounded ring of durations per event and detaches on stop" do
    {:ok, pid} = Collector.start(self())
    event = [:snakepit, :python, :call, :stop]
    ms = System.convert_time_unit(1, :millisecond, :native)

    for i <- 1..1_000, do: :telemetry.execute(event, %{duration: i * ms}, %{})
    :telemetry.execute(event, %{duration: -1}, %{})
    :telemetry.execute(event, %{count: 1}, %{})

    {:ok, %{"python.call.stop" => c}} = Collector.read(pid)
    assert c.count == 1_002
    # The ring holds the last 64 durations (937..1000 ms).
    assert c.p50_us >= 937_000 and c.p99_us <= 1_000_000 and c.p50_us <= c.p99_us

    [handler] = Enum.filter(:telemetry.list_handlers(event), &(&1.id == {Collector, pid}))
    assert :ets.info(handler.config, :size) <= 2 + 64

    ref = Process.monitor(pid)
    Collector.stop(pid)
    assert_receive {:DOWN, ^ref, :process, ^pid, _}
    assert Enum.filter(:telemetry.list_handlers(event), &(&1.id == {Collector, pid})) == []

    # Killed before it could detach: the next event detaches the handler,
    # without raising in the process that executes it.
    {:ok, pid} = Collector.start(self())
    ref = Process.monitor(pid)
    Process.exit(pid, :kill)
    assert_receive {:DOWN, ^ref, :process, ^pid, :killed}
    failures = forward_events([[:telemetry, :handler, :failure]])
    assert :telemetry.execute(event, %{duration: 1}, %{}) == :ok
    assert Enum.filter(:telemetry.list_handlers(event), &(&1.id == {Collector, pid})) == []
    refute_received {:event, [:telemetry, :handler, :failure], _, _}
    :telemetry.detach(failures)
  end

  describe "a cluster" do
    setup do
      ClusterHelpers.ensure_distributed!()
    end

    test "every node is shown; a node that leaves is named or dropped, never a crash" do
      {peer, b, worker_b} = ClusterHelpers.start_node!("top_b", :top_b_pool)
      local = register!(start_worker!(), pool_name: :top_a_pool)
      source = Source.new(node(), timeout: 500)
      on_exit(fn -> Source.stop(Process.get(:top_source, source)) end)

      await_snapshot(source, fn snap ->
        worker(snap, worker_b) != nil and worker(snap, local) != nil and
          is_list(entry(snap, b).events) and is_integer(entry(snap, b).eps)
      end)

      # The view's collector on b runs there (it stops with the view).
      assert Enum.any?(
               :erpc.call(b, :telemetry, :list_handlers, [[]]),
               &match?({Collector, _}, &1.id)
             )

      :peer.stop(peer)

      await_snapshot(Process.get(:top_source), fn snap ->
        case entry(snap, b) do
          nil -> worker(snap, local) != nil
          %{error: reason} -> reason != nil and worker(snap, local) != nil
        end
      end)

      {snap, _} = Source.snapshot(Process.get(:top_source))
      assert Top.Render.frame(snap, width: 200, height: 50) =~ local
    end
  end
end
