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

    # The emit time (timestamp_ns, in native units) and, for a stop event,
    # this VM's monotonic time of that moment.
    emit_time = System.convert_time_unit(1, :nanosecond, :native)

    assert measurements == %{
             duration: System.convert_time_unit(1500, :nanosecond, :native),
             monotonic_time: emit_time - :erlang.time_offset()
           }

    assert metadata == %{
             # Not a catalog key, and no test registers it as a custom one.
             "deployment_region" => "eu",
             emit_time: emit_time,
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

    # Each backend stamps its own emit time (and so monotonic_time): the
    # rest is identical.
    for name <- [@stop, @result] do
      assert_receive {:event, ^name, m1, md1}, 5_000
      assert_receive {:event, ^name, m2, md2}, 5_000
      assert is_integer(md1.emit_time) and is_integer(md2.emit_time)
      timeless = fn m, md -> {Map.delete(m, :monotonic_time), Map.delete(md, :emit_time)} end
      assert timeless.(m1, md1) == timeless.(m2, md2)
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

  defp delta(before, after_, keys), do: Map.new(keys, &{&1, after_[&1] - before[&1]})

  test "no input raises: bad bytes, non-binaries and bad worker contexts are errors, counted" do
    forward_events([@stop])
    good = ~s({"event_parts":["python","call","stop"],"correlation_id":"kw-1"})
    before = Stderr.stats()

    # Invalid UTF-8 outside and inside a JSON string; other output is still
    # ignored whatever its bytes.
    assert Stderr.handle_line(Stderr.prefix() <> <<0xFF, 0xFE>> <> "{}", @ctx) ==
             {:error, :invalid_utf8}

    bad_string =
      ~s({"event_parts":["python","call","stop"],"metadata":{"k":") <> <<0xC3, 0x28>> <> ~s("}})

    assert Stderr.handle_line(Stderr.prefix() <> bad_string, @ctx) == {:error, :invalid_utf8}
    assert Stderr.handle_line(<<0xFF, 0xFE, 0xFD>>, @ctx) == :ignored

    for line <- [nil, 42, :line, ~c"SNAKEPIT_TELEMETRY_EVENT {}", [Stderr.prefix(), good], %{}] do
      assert Stderr.handle_line(line, @ctx) == {:error, :invalid_line}
    end

    for ctx <- [%{}, %{pool_name: :p}, %{worker_id: "w"}, nil, "ctx", [1, 2], [pool_name: :p]] do
      assert Stderr.handle_line(Stderr.prefix() <> good, ctx) == {:error, :invalid_worker_ctx}
      # A bad context does not matter for other output.
      assert Stderr.handle_line("hello", ctx) == :ignored
    end

    # A keyword list is a context too; a line over 8 KiB (decoded on a dirty
    # scheduler) gives the same result as a short one.
    assert Stderr.handle_line(Stderr.prefix() <> good, worker_id: "kw", pool_name: :kw_pool) ==
             :ok

    assert_receive {:event, @stop, _, %{worker_id: "kw", correlation_id: "kw-1"}}
    long = String.replace(good, "}", ~s(,"metadata":{"big":"#{String.duplicate("b", 20_000)}"}}))
    assert Stderr.handle_line(Stderr.prefix() <> long, @ctx) == :ok
    assert_receive {:event, @stop, _, %{worker_id: "stderr-worker", correlation_id: "kw-1"}}

    assert Stderr.handle_line(Stderr.prefix() <> "[1,", @ctx) == {:error, :invalid_json}

    assert delta(before, Stderr.stats(), [
             :received,
             :delivered,
             :dropped_malformed,
             :invalid_utf8,
             :invalid_json,
             :invalid_input,
             :truncated_metadata
           ]) == %{
             received: 5,
             delivered: 2,
             dropped_malformed: 3,
             invalid_utf8: 2,
             invalid_json: 1,
             invalid_input: 13,
             truncated_metadata: 1
           }
  end

  test "a worker's stderr cannot take PythonWorker down: torn, long and oversized lines" do
    forward_events([@stop])
    worker = start_worker!(stderr_telemetry: @ctx)

    # Each call writes whole lines: stdout (the ACKs) shares the pipe.
    write = fn parts ->
      parts = for {bytes, repeat} <- parts, do: %{hex: Base.encode16(bytes), repeat: repeat}
      command!(worker, %{cmd: "write_stderr", parts: parts})
    end

    head = Stderr.prefix() <> ~s({"event_parts":["python","call","stop"],"metadata":{"big":")
    mib = String.duplicate("a", 1024 * 1024)
    before = Stderr.stats()

    # Invalid UTF-8, then a 2 MiB line (more than one read of the port).
    write.([{Stderr.prefix() <> ~s({"event_parts":[") <> <<0xFF>> <> ~s("]}\n), 1}])
    write.([{head, 1}, {mib, 2}, {~s("},"correlation_id":"long-1"}\n), 1}])

    assert_receive {:event, @stop, _,
                    %{correlation_id: "long-1", worker_id: "stderr-worker"} = md},
                   10_000

    assert byte_size(md["big"]) == 4_096

    # A 5 MiB line is refused as too large, without keeping it whole.
    write.([{head, 1}, {mib, 5}, {~s("},"correlation_id":"huge-1"}\n), 1}])
    after_line = ~s({"event_parts":["python","call","stop"],"correlation_id":"after-1"}\n)
    write.([{Stderr.prefix() <> after_line, 1}])
    assert_receive {:event, @stop, _, %{correlation_id: "after-1"}}, 10_000
    refute_received {:event, @stop, _, %{correlation_id: "huge-1"}}

    assert delta(before, Stderr.stats(), [:invalid_utf8, :too_large, :delivered]) ==
             %{invalid_utf8: 1, too_large: 1, delivered: 2}

    assert Process.alive?(worker)
    assert {:ok, _} = PythonWorker.command(worker, %{cmd: "rusage"})
  end
end
