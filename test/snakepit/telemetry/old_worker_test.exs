defmodule Snakepit.Telemetry.OldWorkerTest do
  # A Snakepit v0.13-style worker (test/support/python/old_worker.py): only
  # StreamTelemetry, one message per event, events built as v0.13 builds them,
  # a sampling update's rate applied to every event (patterns ignored), no
  # whole spans, and control applied only to events emitted after it arrived.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{GrpcStream, PythonWorker}

  @old_worker Path.expand("../../support/python/old_worker.py", __DIR__)

  @call_start [:snakepit, :python, :call, :start]
  @call_stop [:snakepit, :python, :call, :stop]
  @tool_start [:snakepit, :python, :tool, :execution, :start]
  @tool_stop [:snakepit, :python, :tool, :execution, :stop]
  @tool_exception [:snakepit, :python, :tool, :execution, :exception]
  @result_size [:snakepit, :python, :tool, :result_size]
  @marker [:snakepit, :python, :serialization, :unserializable_marker]
  @gc [:snakepit, :python, :gc, :completed]
  @dropped [:snakepit, :telemetry, :events, :dropped]

  @all [
    @call_start,
    @call_stop,
    @tool_start,
    @tool_stop,
    @tool_exception,
    @result_size,
    @marker,
    @gc
  ]

  defp start_old_worker!, do: start_worker!(script: @old_worker)

  # Registers the worker in a pool of its own whose initial control state is
  # `control` (what Elixir wants before the stream opens).
  defp register_with_control!(worker, control) do
    pool = :"old_pool_#{System.unique_integer([:positive])}"
    previous = Application.get_env(:snakepit_telemetry, :pools)
    Application.put_env(:snakepit_telemetry, :pools, %{pool => [control: control]})

    on_exit(fn ->
      if previous,
        do: Application.put_env(:snakepit_telemetry, :pools, previous),
        else: Application.delete_env(:snakepit_telemetry, :pools)
    end)

    register!(worker, pool_name: pool)
  end

  defp controls(worker), do: command!(worker, %{cmd: "controls"})["controls"]

  # Makes the NIF apply every control sent before: a filter change that is
  # forwarded to the worker, awaited there (controls pass the NIF in order).
  defp sync_controls(worker, worker_id, deny) do
    assert GrpcStream.update_filter(worker_id, deny: deny) == :ok
    await(fn -> %{"filter" => %{"allow" => [], "deny" => deny}} in controls(worker) end)
  end

  # Emits a last marker event and waits until the handler has it: every
  # event the worker sent before has then been delivered or dropped.
  defp collect_until_sentinel(worker, worker_id) do
    command!(worker, %{cmd: "emit", event: "python.gc.completed", correlation_id: "sentinel"})
    assert command!(worker, %{cmd: "wait_sent", timeout_ms: 10_000})["sent"]
    collect(worker_id, [])
  end

  defp collect(worker_id, acc) do
    receive do
      {:event, @gc, _, %{correlation_id: "sentinel"}} ->
        Enum.reverse(acc)

      {:event, name, measurements, metadata} ->
        collect(worker_id, [{name, measurements, metadata} | acc])
    after
      10_000 -> flunk("the sentinel event did not arrive; stats: #{inspect(stream(worker_id))}")
    end
  end

  defp names(events), do: Enum.map(events, &elem(&1, 0))

  # Sums the native drop reports for `reason` until they reach `total` (or
  # none comes for 10 s).
  defp reported_drops(reason, total, sum \\ 0)
  defp reported_drops(_reason, total, sum) when sum >= total, do: sum

  defp reported_drops(reason, total, sum) do
    receive do
      {:dropped, %{count: n}, %{reason: ^reason, hop: :native}} ->
        reported_drops(reason, total, sum + n)
    after
      10_000 -> sum
    end
  end

  test "events built as Snakepit v0.13 builds them reach handlers with atom keys" do
    worker = start_old_worker!()
    worker_id = register!(worker)
    forward_events(@all)

    assert stream(worker_id).protocol == :events
    assert stream(worker_id).stats.fallbacks >= 1

    command!(worker, %{cmd: "showcase", operation: "compute"})
    command!(worker, %{cmd: "showcase", operation: "explode", correlation_id: "c-9", fail: true})
    command!(worker, %{cmd: "marker", type: "numpy.ndarray"})

    command!(worker, %{
      cmd: "span",
      name: "python.call",
      metadata: %{command: "predict"},
      correlation_id: "c-1"
    })

    events = collect_until_sentinel(worker, worker_id)

    assert names(events) == [
             @tool_start,
             @tool_start,
             @result_size,
             @tool_stop,
             @tool_start,
             @tool_start,
             @result_size,
             @tool_exception,
             @marker,
             @call_start,
             @call_stop
           ]

    for {name, measurements, metadata} <- events do
      assert Enum.all?(Map.keys(measurements), &is_atom/1), inspect({name, measurements})
      assert Enum.all?(Map.keys(metadata), &is_atom/1), inspect({name, metadata})
      assert metadata.worker_id == worker_id
    end

    [start, _, size, stop | failed] = events
    {_, m, meta} = start
    assert is_integer(m.system_time)
    assert meta.tool == "telemetry_demo" and meta.operation == "compute"
    # v0.13 sends "" for no correlation id: none in the metadata.
    refute Map.has_key?(meta, :correlation_id)

    assert {_, %{bytes: 42}, %{tool: "telemetry_demo"}} = size
    {_, m, meta} = stop
    # Nanoseconds on the wire, native units here.
    assert is_integer(m.duration) and m.duration >= 0
    assert meta.operation == "compute"

    [_, _, _, {_, m, meta}, {_, marker_m, marker_meta} | _] = failed
    assert is_integer(m.duration)
    assert meta.error_type == "ValueError" and meta.error_message == "simulated failure"
    assert meta.operation == "explode" and meta.correlation_id == "c-9"
    assert marker_m == %{first_seen: 1} and marker_meta.type == "numpy.ndarray"

    assert {_, _, %{command: "predict", correlation_id: "c-1"}} = Enum.at(events, -1)
    assert stream(worker_id).stats.dropped_unknown_event == 0
  end

  test "toggled off: events the worker buffered never reach handlers, counted as enforced_disabled" do
    worker = start_old_worker!()
    ref = make_ref()

    :telemetry.attach(
      "old-drops-#{inspect(ref)}",
      @dropped,
      fn _, m, meta, pid ->
        send(pid, {:dropped, m, meta})
      end,
      self()
    )

    on_exit(fn -> :telemetry.detach("old-drops-#{inspect(ref)}") end)

    # Emitted before any stream: the worker buffers them under its defaults.
    command!(worker, %{cmd: "span", name: "python.call", correlation_prefix: "b", count: 10})

    command!(worker, %{
      cmd: "emit",
      event: "tool.result_size",
      measurements: %{bytes: 1},
      count: 5
    })

    forward_events(@all)
    worker_id = register_with_control!(worker, enabled: false)

    assert command!(worker, %{cmd: "wait_sent", timeout_ms: 10_000})["sent"]
    await(fn -> stream(worker_id).stats.enforced_disabled == 25 end)
    assert stream(worker_id).stats.delivered == 0
    assert %{"toggle" => false} in controls(worker)

    assert reported_drops(:enforced_disabled, 25) == 25

    assert GrpcStream.toggle(worker_id, true) == :ok
    await(fn -> List.last(for %{"toggle" => t} <- controls(worker), do: t) == true end)
    events = collect_until_sentinel(worker, worker_id)
    assert events == []
  end

  test "filtered: denied events never reach handlers, counted as enforced_filtered" do
    worker = start_old_worker!()

    command!(worker, %{
      cmd: "emit",
      event: "tool.result_size",
      measurements: %{bytes: 1},
      count: 7
    })

    command!(worker, %{cmd: "marker"})
    forward_events(@all)
    worker_id = register_with_control!(worker, deny: ["tool.*"])

    events = collect_until_sentinel(worker, worker_id)
    assert names(events) == [@marker]
    assert stream(worker_id).stats.enforced_filtered == 7

    # Live changes apply too (here the worker filters as well).
    sync_controls(worker, worker_id, ["snakepit.*"])
    command!(worker, %{cmd: "emit", event: "tool.result_size", measurements: %{bytes: 2}})
    command!(worker, %{cmd: "marker"})
    assert names(collect_until_sentinel(worker, worker_id)) == [@result_size]
  end

  test "a pattern rate of 0.0 drops exactly the matching events; the worker never gets it as a global rate" do
    worker = start_old_worker!()
    worker_id = register!(worker)
    forward_events(@all)

    assert GrpcStream.update_sampling(worker_id, 0.0, ["python.call.*"]) == :ok
    sync_controls(worker, worker_id, ["zz.*"])

    command!(worker, %{cmd: "span", name: "python.call", correlation_prefix: "p", count: 50})

    command!(worker, %{
      cmd: "emit",
      event: "tool.result_size",
      measurements: %{bytes: 3},
      count: 30
    })

    command!(worker, %{cmd: "showcase"})

    events = collect_until_sentinel(worker, worker_id)
    refute Enum.any?(events, &(elem(&1, 0) in [@call_start, @call_stop]))
    assert Enum.count(events, &(elem(&1, 0) == @result_size)) == 31
    assert Enum.count(events, &(elem(&1, 0) in [@tool_start, @tool_stop])) == 3
    assert stream(worker_id).stats.enforced_sampled == 100

    state = command!(worker, %{cmd: "state"})
    assert state["sampling_rate"] == 1.0
    samplings = for %{"sampling" => s} <- controls(worker), do: s
    assert samplings != []
    assert Enum.all?(samplings, &(&1 == %{"rate" => 1.0, "patterns" => []}))
  end

  test "spans are sampled whole, at any rate, also when the default rate is set" do
    worker = start_old_worker!()
    worker_id = register!(worker)
    forward_events(@all)

    assert GrpcStream.update_sampling(worker_id, 0.5, ["tool.execution.*"]) == :ok
    assert GrpcStream.update_sampling(worker_id, 0.25) == :ok
    # The sentinel event (python.gc.completed) must pass.
    assert GrpcStream.update_sampling(worker_id, 1.0, ["python.gc.*"]) == :ok
    sync_controls(worker, worker_id, ["zz.*"])

    command!(worker, %{cmd: "span", name: "tool.execution", correlation_prefix: "s", count: 300})
    events = collect_until_sentinel(worker, worker_id)

    by_cid = Enum.group_by(events, &elem(&1, 2).correlation_id, &elem(&1, 0))

    for {cid, names} <- by_cid do
      assert names == [@tool_start, @tool_stop], "span #{cid} is not whole: #{inspect(names)}"
    end

    # Binomial(300, 0.5): mean 150, standard deviation 8.7; 8 sd either side.
    assert map_size(by_cid) in 80..220
    stats = stream(worker_id).stats
    assert stats.enforced_sampled == 2 * (300 - map_size(by_cid))

    # The default rate went to the stream, not to the worker.
    assert command!(worker, %{cmd: "state"})["sampling_rate"] == 1.0
    samplings = for %{"sampling" => s} <- controls(worker), do: s
    assert Enum.all?(samplings, &(&1 == %{"rate" => 1.0, "patterns" => []}))
    assert length(samplings) >= 2
  end

  test "PythonWorker runs the old worker" do
    worker = start_old_worker!()
    assert PythonWorker.address(worker) =~ ~r/^127\.0\.0\.1:\d+$/
  end
end
