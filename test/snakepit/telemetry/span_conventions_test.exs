defmodule Snakepit.Telemetry.SpanConventionsTest do
  # Python spans as `:telemetry.span/3` tools expect them: a span context
  # shared by a span's events, the span measurements, the exception's kind,
  # reason and stacktrace, the emit time on every event, and standard keys
  # that Python cannot spoof.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{PythonError, Stderr}

  doctest PythonError

  @call [:snakepit, :python, :call]
  @tool [:snakepit, :python, :tool, :execution]
  @stop [:snakepit, :python, :call, :stop]
  @ctx %{worker_id: "span-conventions", pool_name: :span_pool}

  defp span_events(prefix), do: for(a <- [:start, :stop, :exception], do: prefix ++ [a])

  # Receives the next event named `name` whose correlation id is `id`.
  defp receive_event(name, id) do
    assert_receive {:event, ^name, measurements, %{correlation_id: ^id} = metadata}, 10_000
    {measurements, metadata}
  end

  # Both RPCs: StreamTelemetryBatches (bytes written by Python's own encoder)
  # and StreamTelemetry (protobuf messages).
  for wire <- ["batches", "single"] do
    describe "with a real Python worker (#{wire} wire)" do
      @describetag wire: wire

      setup %{wire: wire} do
        worker = start_worker!(args: ["--wire", wire])
        worker_id = register!(worker, pool_name: :span_pool)
        %{worker: worker, worker_id: worker_id}
      end

      test "a span's start and stop share telemetry_span_context; every span has its own",
           %{worker: worker} do
        forward_events(span_events(@call))
        prefix = "ctx-#{System.unique_integer([:positive])}"

        command!(worker, %{
          cmd: "spans",
          name: "python.call",
          count: 5,
          correlation_prefix: prefix
        })

        contexts =
          for i <- 0..4 do
            id = "#{prefix}-#{i}"
            {start_m, start_md} = receive_event(@call ++ [:start], id)
            {stop_m, stop_md} = receive_event(@call ++ [:stop], id)

            context = start_md.telemetry_span_context
            assert is_integer(context) and context > 0
            assert stop_md.telemetry_span_context == context

            # The measurements of :telemetry.span/3, in this VM's clocks.
            assert %{system_time: system_time, monotonic_time: start_mono} = start_m
            assert start_mono == system_time - :erlang.time_offset()
            assert %{duration: duration, monotonic_time: stop_mono} = stop_m
            assert is_integer(duration) and duration >= 0
            assert stop_mono <= System.monotonic_time()

            for md <- [start_md, stop_md] do
              assert is_integer(md.emit_time) and md.emit_time <= System.system_time()
            end

            context
          end

        assert length(Enum.uniq(contexts)) == 5
      end

      test "an exception event has kind, reason and a Python stacktrace that Exception formats",
           %{worker: worker} do
        forward_events(span_events(@tool))
        id = "exc-#{System.unique_integer([:positive])}"

        command!(worker, %{
          cmd: "span",
          name: "tool.execution",
          metadata: %{tool: "t"},
          correlation_id: id,
          fail: true
        })

        {_start_m, start_md} = receive_event(@tool ++ [:start], id)
        {m, md} = receive_event(@tool ++ [:exception], id)

        assert md.telemetry_span_context == start_md.telemetry_span_context
        assert %{duration: d, monotonic_time: mono} = m
        assert is_integer(d) and d >= 0 and mono <= System.monotonic_time()

        message = "span failure requested by the worker command"
        assert md.kind == :error
        assert md.reason == %PythonError{type: "RuntimeError", message: message}
        assert {md.error_type, md.error_message} == {"RuntimeError", message}
        assert Exception.message(md.reason) == "RuntimeError: " <> message

        stacktrace = md.stacktrace
        assert stacktrace != [] and length(stacktrace) <= 32

        for frame <- stacktrace do
          assert {:python, :frame, [function], location} = frame
          assert is_binary(function)
          assert Keyword.keyword?(location)
        end

        # The innermost frame first: the worker command that raised.
        assert {:python, :frame, [function], location} = hd(stacktrace)
        assert String.ends_with?(function, "cmd_span")
        file = List.to_string(location[:file])
        assert String.ends_with?(file, ".py")
        assert is_integer(location[:line]) and location[:line] > 0

        formatted = Exception.format(:error, md.reason, stacktrace)
        assert formatted =~ "RuntimeError: " <> message
        assert formatted =~ "#{Path.basename(file)}:#{location[:line]}"
        assert is_binary(Exception.format_stacktrace(stacktrace))
      end

      test "Python's own standard and span keys are dropped, counted, never duplicated",
           %{worker: worker, worker_id: worker_id} do
        forward_events([@stop])
        before = stream(worker_id).stats.reserved_keys_dropped

        spoofed =
          ~w(node pool_name worker_id telemetry_span_context emit_time kind reason stacktrace)

        command!(worker, %{
          cmd: "emit",
          event: "python.call.stop",
          measurements: %{duration: 5, monotonic_time: 1},
          metadata: Map.new(spoofed, &{&1, "spoofed"}) |> Map.put("command", "predict"),
          correlation_id: "spoof-1"
        })

        {m, md} = receive_event(@stop, "spoof-1")
        assert md.worker_id == worker_id
        assert md.pool_name == :span_pool
        assert md.node == node()
        assert is_integer(md.emit_time)
        assert md.command == "predict"
        assert m.monotonic_time == md.emit_time - :erlang.time_offset()
        # A plain event: no span context, and no binary key at all.
        refute Map.has_key?(md, :telemetry_span_context)
        assert Enum.filter(Map.keys(md), &is_binary/1) == []
        assert Enum.filter(Map.keys(m), &is_binary/1) == []

        # 8 metadata keys and the monotonic_time measurement.
        await(fn -> stream(worker_id).stats.reserved_keys_dropped == before + 9 end)
      end
    end
  end

  test "spans of two workers (two Python processes) never share a context" do
    forward_events([@call ++ [:start]])

    contexts =
      for n <- 1..2 do
        worker = start_worker!()
        register!(worker)
        prefix = "two-#{n}-#{System.unique_integer([:positive])}"

        command!(worker, %{
          cmd: "spans",
          name: "python.call",
          count: 3,
          correlation_prefix: prefix
        })

        for i <- 0..2 do
          {_, md} = receive_event(@call ++ [:start], "#{prefix}-#{i}")
          md.telemetry_span_context
        end
      end

    assert length(Enum.uniq(List.flatten(contexts))) == 6
  end

  describe "stderr lines" do
    test "carry span ids and a traceback, bounded and formattable whatever Python sent" do
      forward_events(span_events(@call))

      frames =
        for i <- 1..100 do
          %{file: String.duplicate("d/", 300) <> "☃_#{i}.py", line: i, function: "f#{i}"}
        end

      frame_json = fn
        %{} = f ->
          fields = for {k, v} <- f, do: ~s("#{k}":#{if is_binary(v), do: ~s("#{v}"), else: v})
          "{" <> Enum.join(fields, ",") <> "}"

        other ->
          to_string(other)
      end

      odd = [%{file: "", line: 0, function: ""}, %{function: String.duplicate("é", 500)}, 7]
      stacktrace = "[" <> Enum.map_join(odd ++ frames, ",", frame_json) <> "]"
      span_id = 18_446_744_073_709_551_615

      line_of = fn action, extra ->
        Stderr.prefix() <>
          ~s({"event_parts":["python","call","#{action}"],"measurements":{"duration":3},) <>
          ~s("metadata":{"error_type":"ValueError","error_message":"bad"},) <>
          ~s("timestamp_ns":#{System.system_time(:nanosecond)},"correlation_id":"stderr-span",) <>
          ~s("span_id":#{span_id}#{extra}})
      end

      assert Stderr.handle_line(line_of.("start", ""), @ctx) == :ok

      assert Stderr.handle_line(line_of.("exception", ~s(,"stacktrace":#{stacktrace})), @ctx) ==
               :ok

      {_, start_md} = receive_event(@call ++ [:start], "stderr-span")
      {m, md} = receive_event(@call ++ [:exception], "stderr-span")
      assert start_md.telemetry_span_context == span_id
      assert md.telemetry_span_context == span_id
      assert %{duration: _, monotonic_time: _} = m

      assert md.reason == %PythonError{type: "ValueError", message: "bad"}
      assert length(md.stacktrace) == 32

      for {:python, :frame, [function], location} <- md.stacktrace do
        assert byte_size(function) <= 256
        file = location |> Keyword.get(:file, []) |> List.to_string()
        assert byte_size(file) <= 256
      end

      # The odd frames are there, in order, with what could be kept.
      assert [{:python, :frame, [""], []}, {:python, :frame, [long], []} | _] = md.stacktrace
      assert String.starts_with?(long, "éé")
      assert {:python, :frame, ["f1"], [file: file, line: 1]} = Enum.at(md.stacktrace, 2)
      assert List.to_string(file) |> String.ends_with?("/☃_1.py")

      formatted = Exception.format(:error, md.reason, md.stacktrace)
      assert formatted =~ "ValueError: bad"
      assert formatted =~ "☃_1.py:1"
      assert is_binary(Exception.format_stacktrace(md.stacktrace))
      # Erlang's own formatter (what logger reports use) takes it too.
      erlang = :erl_error.format_exception(:error, md.reason, md.stacktrace)
      assert IO.chardata_to_string(erlang) =~ "python:frame"
    end

    test "an exception without a traceback, or an old worker's span, still works" do
      forward_events(span_events(@call))
      line = ~s({"event_parts":["python","call","exception"],"correlation_id":"old-1"})
      assert Stderr.handle_line(Stderr.prefix() <> line, @ctx) == :ok
      {_, md} = receive_event(@call ++ [:exception], "old-1")
      refute Map.has_key?(md, :telemetry_span_context)
      refute Map.has_key?(md, :emit_time)
      assert md.kind == :error
      assert md.reason == %PythonError{type: "", message: ""}
      assert md.stacktrace == []
      assert Exception.format(:error, md.reason, md.stacktrace) =~ "PythonError"
    end

    test "reserved keys on a line are dropped and counted in Stderr.stats/0" do
      forward_events([@stop])
      before = Stderr.stats().reserved_keys_dropped

      line =
        ~s({"event_parts":["python","call","stop"],"correlation_id":"sp-2",) <>
          ~s("metadata":{"worker_id":"evil","node":"evil","pool_name":"evil","kind":"x"}})

      assert Stderr.handle_line(Stderr.prefix() <> line, @ctx) == :ok
      {_, md} = receive_event(@stop, "sp-2")
      assert md.worker_id == @ctx.worker_id
      assert md.node == node()
      assert md.pool_name == :span_pool
      refute Map.has_key?(md, :kind)
      assert Enum.filter(Map.keys(md), &is_binary/1) == []
      assert Stderr.stats().reserved_keys_dropped == before + 4
    end
  end
end
