defmodule Snakepit.Telemetry.SamplingTest do
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.GrpcStream

  @stop [:snakepit, :python, :call, :stop]
  @start [:snakepit, :python, :call, :start]
  @exception [:snakepit, :python, :call, :exception]
  @result [:snakepit, :python, :tool, :result_size]

  defp python_control(worker), do: command!(worker, %{cmd: "stats"})["control"]

  # Waits until everything Python sent has been received by the NIF and
  # delivered, then returns the events the test process got.
  defp drain(worker, worker_id) do
    await(fn -> command!(worker, %{cmd: "wait_drained", timeout_ms: 5_000})["drained"] end)
    python = command!(worker, %{cmd: "stats"})
    # The stream's own stats reports are delivered too but are not in "sent".
    sent = python["sent"] + python["stats_reports"]

    await(fn ->
      s = stream(worker_id).stats

      s.delivered + s.dropped_unknown_event >= sent and
        s.received == s.delivered + s.dropped_unknown_event
    end)

    collect([])
  end

  defp collect(acc) do
    receive do
      {:event, name, measurements, metadata} -> collect([{name, measurements, metadata} | acc])
    after
      200 -> Enum.reverse(acc)
    end
  end

  test "10,000 events at rate 0.1 deliver about 1,000" do
    worker = start_worker!(args: ["--queue-size", "20000"])
    worker_id = register!(worker)
    forward_events([@stop])

    assert GrpcStream.update_sampling(worker_id, 0.1) == :ok
    await(fn -> python_control(worker)["default_rate"] == 0.1 end)
    command!(worker, %{cmd: "flood", event: "python.call.stop", count: 10_000})

    delivered = length(drain(worker, worker_id))
    # Binomial(10 000, 0.1): mean 1 000, standard deviation 30. Six standard
    # deviations either side fails by chance about once in 10^9 runs.
    assert delivered in 820..1180
    python = command!(worker, %{cmd: "stats"})
    assert python["dropped_sampled"] + python["sent"] == 10_000
  end

  test "a pattern rate only touches matching events" do
    worker = start_worker!(args: ["--queue-size", "20000"])
    worker_id = register!(worker)
    forward_events([@stop, @result])

    assert GrpcStream.update_sampling(worker_id, 0.0, ["python.call.*"]) == :ok

    await(fn ->
      python_control(worker)["rules"] == [%{"rate" => 0.0, "patterns" => ["python.call.*"]}]
    end)

    command!(worker, %{
      cmd: "emit_many",
      events: [
        %{event: "python.call.stop", measurements: %{duration: 1}},
        %{event: "tool.result_size", measurements: %{bytes: 1}}
      ],
      repeat: 500
    })

    events = drain(worker, worker_id)
    assert Enum.count(events, &match?({@result, _, _}, &1)) == 500
    assert Enum.count(events, &match?({@stop, _, _}, &1)) == 0
  end

  test "sampled spans stay whole" do
    worker = start_worker!(args: ["--queue-size", "20000"])
    worker_id = register!(worker)
    forward_events([@start, @stop, @exception])

    assert GrpcStream.update_sampling(worker_id, 0.5, ["python.call.*"]) == :ok
    await(fn -> python_control(worker)["rules"] != [] end)
    command!(worker, %{cmd: "spans", name: "python.call", count: 2_000, correlation_prefix: "s"})

    events = drain(worker, worker_id)

    ids = fn name ->
      for {^name, _, %{correlation_id: id}} <- events, into: MapSet.new(), do: id
    end

    starts = ids.(@start)
    assert starts == ids.(@stop)
    # Binomial(2 000, 0.5): mean 1 000, standard deviation about 22.
    assert MapSet.size(starts) in 866..1134
  end

  test "filters allow and deny; deny wins" do
    worker = start_worker!()
    worker_id = register!(worker)
    forward_events([@stop, @exception, @result])

    assert GrpcStream.update_filter(worker_id,
             allow: ["python.*"],
             deny: ["python.call.exception"]
           ) == :ok

    await(fn -> python_control(worker)["deny"] == ["python.call.exception"] end)

    command!(worker, %{
      cmd: "emit_many",
      events: [
        %{event: "python.call.stop", measurements: %{duration: 1}},
        %{event: "python.call.exception", measurements: %{duration: 1}},
        %{event: "tool.result_size", measurements: %{bytes: 1}}
      ],
      repeat: 10
    })

    events = drain(worker, worker_id)
    assert Enum.map(events, &elem(&1, 0)) == List.duplicate(@stop, 10)
    assert stream(worker_id).control.deny == ["python.call.exception"]
  end

  test "controls address a pool or every worker" do
    pool = :"pool_#{System.unique_integer([:positive])}"
    a = start_worker!()
    b = start_worker!()
    register!(a, pool_name: pool)
    register!(b, pool_name: pool)

    assert GrpcStream.toggle({:pool, pool}, false) == :ok
    await(fn -> not python_control(a)["enabled"] and not python_control(b)["enabled"] end)

    assert GrpcStream.update_sampling(:all, 0.5, ["tool.*"]) == :ok
    await(fn -> python_control(a)["rules"] != [] and python_control(b)["rules"] != [] end)

    assert GrpcStream.toggle({:pool, :no_such_pool}, true) == {:error, :unknown_pool}
    assert GrpcStream.toggle({:nonsense}, true) == {:error, {:invalid_target, {:nonsense}}}
  end
end
