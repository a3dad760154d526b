defmodule Snakepit.Telemetry.GrpcStreamTest do
  # Not async: several tests compare VM-wide figures (atom count, live streams).
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{Config, GrpcStream, Native, PythonWorker}

  @stop [:snakepit, :python, :call, :stop]
  # Exact counts below: keep the worker's periodic stats reports out of them.
  @no_stats_reports [{"SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", "0"}]

  describe "end to end with a real Python worker" do
    test "an event emitted in Python reaches a :telemetry handler" do
      worker = start_worker!()
      worker_id = register!(worker, pool_name: :inference_pool)
      forward_events([@stop])

      command!(worker, %{
        cmd: "emit",
        event: "python.call.stop",
        measurements: %{duration: 1_500_000, tokens: 12, ratio: 0.5},
        metadata: %{command: "predict", model: "bert"},
        correlation_id: "corr-123"
      })

      assert_receive {:event, @stop, measurements, metadata}, 5_000
      emit_time = metadata.emit_time
      assert is_integer(emit_time) and emit_time <= System.system_time()

      assert measurements == %{
               "tokens" => 12,
               "ratio" => 0.5,
               duration: System.convert_time_unit(1_500_000, :nanosecond, :native),
               monotonic_time: emit_time - :erlang.time_offset()
             }

      assert metadata == %{
               "model" => "bert",
               emit_time: emit_time,
               node: node(),
               pool_name: :inference_pool,
               worker_id: worker_id,
               correlation_id: "corr-123",
               command: "predict"
             }
    end

    test "a span becomes start and stop (or exception) events" do
      worker = start_worker!()
      register!(worker)
      prefix = [:snakepit, :python, :tool, :execution]
      forward_events(for action <- [:start, :stop, :exception], do: prefix ++ [action])

      command!(worker, %{cmd: "span", name: "tool.execution", metadata: %{tool: "tokenize"}})

      assert_receive {:event, [_, _, _, _, :start], %{system_time: t, monotonic_time: m},
                      %{tool: "tokenize"}},
                     5_000

      # Both clocks of this VM: the event is from the last few seconds.
      assert abs(t - System.system_time()) < System.convert_time_unit(5, :second, :native)
      assert abs(m - System.monotonic_time()) < System.convert_time_unit(5, :second, :native)
      assert_receive {:event, [_, _, _, _, :stop], %{duration: d}, %{tool: "tokenize"}}, 5_000
      assert is_integer(d) and d >= 0

      command!(worker, %{cmd: "span", name: "tool.execution", fail: true})
      assert_receive {:event, [_, _, _, _, :start], _, _}, 5_000
      assert_receive {:event, [_, _, _, _, :exception], %{duration: _}, metadata}, 5_000
      assert is_binary(metadata.error_type) and metadata.error_type != ""
    end

    test "works over a unix socket" do
      "unix:" <> path = Config.socket_path("test-#{System.unique_integer([:positive])}")

      worker = start_worker!(listen: "unix:" <> path)
      assert PythonWorker.address(worker) == "unix:" <> path
      register!(worker)
      forward_events([@stop])

      command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})
      assert_receive {:event, @stop, %{duration: _}, _}, 5_000
    end

    test "thousands of events arrive in batches, all accounted for" do
      worker = start_worker!(args: ["--queue-size", "100000"], env: @no_stats_reports)
      worker_id = register!(worker)
      forward_events([@stop])

      command!(worker, %{cmd: "flood", event: "python.call.stop", count: 5_000})
      await(fn -> stream(worker_id).stats.delivered == 5_000 end)

      for _ <- 1..5_000, do: assert_receive({:event, @stop, _, _}, 5_000)
      stats = stream(worker_id).stats
      assert stats.received == 5_000
      assert stats.batches < 5_000
      python = command!(worker, %{cmd: "stats"})
      assert python["dropped_queue_full"] == 0
    end
  end

  describe "protocol negotiation" do
    # The worker's --wire option: "batches" offers StreamTelemetryBatches
    # too, "single" only StreamTelemetry.
    for {wire, protocol, fallbacks} <- [{"batches", :batches, 0}, {"single", :events, 1}] do
      test "a worker with --wire #{wire} streams with #{protocol}" do
        worker = start_worker!(args: ["--wire", unquote(wire)], env: @no_stats_reports)
        opened = [:snakepit, :grpc, :stream, :opened]
        forward_events([@stop, opened])
        worker_id = register!(worker)
        protocol = unquote(protocol)

        assert_receive {:event, ^opened, _, %{worker_id: ^worker_id, protocol: ^protocol}},
                       5_000

        assert %{protocol: ^protocol, stats: %{fallbacks: unquote(fallbacks)}} = stream(worker_id)

        command!(worker, %{cmd: "emit", event: "python.call.stop", count: 300})
        for _ <- 1..300, do: assert_receive({:event, @stop, _, %{worker_id: ^worker_id}}, 5_000)

        await(fn -> stream(worker_id).stats.delivered == 300 end)
        stats = stream(worker_id).stats
        assert stats.received == 300
        assert stats.wire_messages >= 1 and stats.wire_messages <= 300
        if protocol == :events, do: assert(stats.wire_messages == 300)
      end
    end
  end

  test "drops inside Python show in list_streams" do
    worker = start_worker!(args: ["--queue-size", "10"])
    # Nothing consumes the queue yet: 10 events fit, 90 are dropped in Python.
    command!(worker, %{
      cmd: "emit",
      event: "python.call.stop",
      measurements: %{duration: 1},
      count: 100
    })

    worker_id = register!(worker)

    await(fn -> stream(worker_id).python[:dropped_queue_full] == 90 end)
    assert stream(worker_id).python.emitted == 100
    assert stream(worker_id).stats.dropped_unknown_event == 0
  end

  describe "atom safety" do
    test "unknown names and keys never become atoms" do
      worker = start_worker!(args: ["--queue-size", "100000"], env: @no_stats_reports)
      worker_id = register!(worker)
      dropped = [:snakepit, :telemetry, :events, :dropped]
      forward_events([@stop, dropped])

      # Warm up: load every module this path touches before counting.
      command!(worker, %{cmd: "unknown", count: 10})
      command!(worker, %{cmd: "unknown_keys", event: "python.call.stop", count: 10})
      await(fn -> stream(worker_id).stats.received == 20 end)
      flush_events()

      atoms_before = :erlang.system_info(:atom_count)
      command!(worker, %{cmd: "unknown", count: 3_000})
      command!(worker, %{cmd: "unknown_keys", event: "python.call.stop", count: 3_000})
      await(fn -> stream(worker_id).stats.received == 6_020 end, 30_000)
      await(fn -> stream(worker_id).stats.delivered == 3_010 end)
      assert :erlang.system_info(:atom_count) == atoms_before

      stats = stream(worker_id).stats
      assert stats.dropped_unknown_event == 3_010

      # The drops are reported as health events too (every second).

      reported = fn ->
        for {:event, ^dropped, %{count: n},
             %{worker_id: ^worker_id, reason: :dropped_unknown_event, hop: :native}} <-
              Process.info(self(), :messages) |> elem(1),
            reduce: 0,
            do: (acc -> acc + n)
      end

      await(fn -> reported.() == 3_010 end, 5_000)
      assert stats.received == stats.delivered + stats.dropped_unknown_event

      # Events with unknown keys are delivered with the keys as binaries.
      assert_receive {:event, @stop, measurements, metadata}, 5_000
      assert Enum.any?(Map.keys(measurements), &is_binary/1)
      assert Enum.any?(Map.keys(metadata), &is_binary/1)
    end
  end

  describe "registration" do
    test "unregistering stops delivery and frees the stream" do
      # Streams of earlier tests end asynchronously after their unregister.
      await(fn -> Native.runtime_info().live_streams == length(GrpcStream.list_streams()) end)
      baseline = Native.runtime_info().live_streams
      worker = start_worker!()
      worker_id = register!(worker)
      assert Native.runtime_info().live_streams == baseline + 1
      forward_events([@stop])

      command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})
      assert_receive {:event, @stop, _, _}, 5_000

      assert GrpcStream.unregister_worker(worker_id) == :ok
      assert stream(worker_id) == nil
      await(fn -> Native.runtime_info().live_streams == baseline end)

      command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})
      refute_receive {:event, @stop, _, _}, 300
      assert GrpcStream.unregister_worker(worker_id) == {:error, :unknown_worker}
    end

    test "bad worker contexts are rejected with a reason" do
      good = [worker_id: "w", pool_name: :p, address: "127.0.0.1:1"]

      for {key, value} <- [worker_id: "", worker_id: :atom, pool_name: nil, address: 'x'] do
        assert GrpcStream.register_worker(Keyword.put(good, key, value)) ==
                 {:error, {:invalid_worker_ctx, {key, value}}}
      end

      assert GrpcStream.register_worker(Keyword.put(good, :address, "nowhere")) ==
               {:error,
                {:invalid_worker_ctx,
                 {:address,
                  "invalid worker address \"nowhere\": expected \"host:port\" or \"unix:/absolute/path\""}}}

      assert GrpcStream.register_worker("nope") == {:error, {:invalid_worker_ctx, :not_a_map}}
    end

    test "a worker id can be registered once" do
      worker = start_worker!()
      worker_id = register!(worker)

      assert GrpcStream.register_worker(
               worker_id: worker_id,
               pool_name: :p,
               address: PythonWorker.address(worker)
             ) == {:error, :already_registered}
    end

    test "a worker that never listens ends as connect_failed" do
      ctx = [
        worker_id: "never-#{System.unique_integer([:positive])}",
        pool_name: :p,
        address: "unix:/nonexistent/snakepit.sock",
        connect_timeout_ms: 200
      ]

      :ok = GrpcStream.register_worker(ctx)
      on_exit(fn -> GrpcStream.unregister_worker(ctx[:worker_id]) end)
      await(fn -> match?({:failed, {:connect_failed, _}}, stream(ctx[:worker_id]).status) end)
    end
  end

  describe "robustness" do
    test "a crashing handler is detached and never takes GrpcStream down" do
      worker = start_worker!()
      worker_id = register!(worker)
      pid = Process.whereis(GrpcStream)
      parent = self()

      :telemetry.attach(
        "crashing-handler",
        @stop,
        fn _, _, _, _ ->
          send(parent, :crashing_handler_ran)
          raise "handler bug"
        end,
        nil
      )

      on_exit(fn -> :telemetry.detach("crashing-handler") end)
      forward_events([@stop])

      command!(worker, %{
        cmd: "emit",
        event: "python.call.stop",
        measurements: %{duration: 1},
        count: 2
      })

      assert_receive :crashing_handler_ran, 5_000
      assert_receive {:event, @stop, _, _}, 5_000
      assert_receive {:event, @stop, _, _}, 5_000
      refute_received :crashing_handler_ran
      assert Process.whereis(GrpcStream) == pid
      assert stream(worker_id).status == :open
    end

    test "toggle off stops delivery in Python; toggle on resumes it" do
      worker = start_worker!()
      worker_id = register!(worker)
      forward_events([@stop])

      assert GrpcStream.toggle(worker_id, false) == :ok
      await(fn -> command!(worker, %{cmd: "stats"})["enabled"] == false end)
      command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})
      refute_receive {:event, @stop, _, _}, 300

      assert GrpcStream.toggle(worker_id, true) == :ok
      await(fn -> command!(worker, %{cmd: "stats"})["enabled"] == true end)
      command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{duration: 1}})
      assert_receive {:event, @stop, _, _}, 5_000
    end

    test "control calls validate their arguments" do
      assert GrpcStream.toggle("nobody", true) == {:error, :unknown_worker}
      assert GrpcStream.update_sampling("nobody", 1.5) == {:error, {:invalid_rate, 1.5}}

      assert GrpcStream.update_sampling("nobody", 0.5, [:x]) ==
               {:error, {:invalid_patterns, [:x]}}

      assert GrpcStream.update_sampling("nobody", 0.5) == {:error, :unknown_worker}

      assert GrpcStream.update_filter("nobody", bogus: []) ==
               {:error, {:invalid_filter, [bogus: []]}}
    end
  end

  defp flush_events do
    receive do
      {:event, @stop, _, _} -> flush_events()
    after
      0 -> :ok
    end
  end
end
