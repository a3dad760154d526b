defmodule Snakepit.Telemetry.StderrTest do
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{GrpcStream, PythonWorker, Stderr}

  @stop [:snakepit, :python, :call, :stop]
  @result [:snakepit, :python, :tool, :result_size]
  @ctx %{worker_id: "stderr-worker", pool_name: :stderr_pool}

  test "a telemetry line becomes the catalog event with the standard metadata" do
    forward_events([@stop])

    line =
      Stderr.prefix() <>
        ~s({"event_parts":["python","call","stop"],"measurements":{"duration":1500,"bad":"NaN"},) <>
        ~s("metadata":{"command":"predict","deployment_region":"eu"},"timestamp_ns":1,"correlation_id":"c-9"})

    before = Stderr.stats()
    assert Stderr.handle_line(line, @ctx) == :ok
    assert_receive {:event, @stop, measurements, metadata}

    assert measurements == %{duration: System.convert_time_unit(1500, :nanosecond, :native)}

    assert metadata == %{
             # Not a catalog key, and no test registers it as a custom one.
             "deployment_region" => "eu",
             command: "predict",
             correlation_id: "c-9",
             node: node(),
             pool_name: :stderr_pool,
             worker_id: "stderr-worker"
           }

    after_ = Stderr.stats()
    assert after_.delivered == before.delivered + 1
    assert after_.dropped_measurements == before.dropped_measurements + 1
  end

  test "other lines are ignored; bad telemetry lines are errors, counted, never atoms" do
    bad_lines = fn ->
      assert Stderr.handle_line("Traceback (most recent call last):", @ctx) == :ignored
      assert Stderr.handle_line(Stderr.prefix() <> "{nope", @ctx) == {:error, :invalid_json}

      unknown =
        ~s({"event_parts":["zz","q#{System.unique_integer([:positive])}"],) <>
          ~s("metadata":{"k#{System.unique_integer([:positive])}":"v"}})

      assert Stderr.handle_line(Stderr.prefix() <> unknown, @ctx) == {:error, :unknown_event}
      too_large = Stderr.prefix() <> String.duplicate("x", 5_000_000)
      assert Stderr.handle_line(too_large, @ctx) == {:error, :too_large}
    end

    # The first round loads every module on the path; the second is measured.
    bad_lines.()
    atoms = :erlang.system_info(:atom_count)
    before = Stderr.stats()
    bad_lines.()
    assert :erlang.system_info(:atom_count) == atoms
    after_ = Stderr.stats()
    assert after_.dropped_unknown_event == before.dropped_unknown_event + 1
    assert after_.dropped_malformed == before.dropped_malformed + 2
  end

  test "the gRPC and stderr paths give identical events for the same emit" do
    worker_id = "both-#{System.unique_integer([:positive])}"
    ctx = %{worker_id: worker_id, pool_name: :both_pool}
    # One worker with both backends: each emit travels both paths.
    worker = start_worker!(args: ["--backend", "grpc,stderr"], stderr_telemetry: ctx)
    :ok = GrpcStream.register_worker(Map.put(ctx, :address, PythonWorker.address(worker)))
    on_exit(fn -> GrpcStream.unregister_worker(worker_id) end)
    await(fn -> stream(worker_id).status == :open end)

    start = [:snakepit, :python, :tool, :execution, :start]
    stop = [:snakepit, :python, :tool, :execution, :stop]
    forward_events([@stop, @result, start, stop])

    command!(worker, %{
      cmd: "emit",
      event: "python.call.stop",
      measurements: %{duration: 42, ratio: 0.25, bad: "NaN"},
      metadata: %{command: "predict", extra: "x"},
      correlation_id: "same-1"
    })

    command!(worker, %{
      cmd: "emit",
      event: "tool.result_size",
      measurements: %{bytes: 7},
      metadata: %{tool: "t", "Odd Key": "é"}
    })

    for name <- [@stop, @result] do
      assert_receive {:event, ^name, m1, md1}, 5_000
      assert_receive {:event, ^name, m2, md2}, 5_000
      assert {m1, md1} == {m2, md2}
    end

    # A span arrives on both paths too (each backend times it on its own).
    command!(worker, %{
      cmd: "span",
      name: "tool.execution",
      metadata: %{tool: "t"},
      correlation_id: "s2"
    })

    for name <- [start, stop, start, stop] do
      assert_receive {:event, ^name, _,
                      %{tool: "t", correlation_id: "s2", worker_id: ^worker_id}},
                     5_000
    end

    refute_receive {:event, _, _, _}, 200
  end
end
