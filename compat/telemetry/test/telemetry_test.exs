defmodule TelemetryCompat.Cases do
  # The behaviour tests. They run twice (see the modules at the end of this
  # file): with the handlers looked up in ETS, and after telemetry:persist/0
  # with the handlers looked up in persistent_term. The using module sets
  # @persisted before `use`.
  #
  # The handler table is global, so tests run one at a time; each test still
  # uses its own handler ids and event names and detaches them on exit.
  def restart_telemetry do
    ExUnit.CaptureLog.capture_log(fn ->
      _ = Application.stop(:telemetry)
      {:ok, _} = Application.ensure_all_started(:telemetry)
    end)

    :ok
  end

  defmacro __using__(_opts) do
    quote unquote: false do
      import ExUnit.CaptureLog

      @failure_event [:telemetry, :handler, :failure]

      # Handler used by most tests: forwards everything to the process in the
      # config, tagged so that messages from different handlers can be told apart.
      def forward(event, measurements, metadata, {pid, tag}) do
        send(pid, {tag, event, measurements, metadata})
      end

      def forward_with_config(event, measurements, metadata, {pid, _tag} = config) do
        send(pid, {:with_config, event, measurements, metadata, config})
      end

      def raise_handler(_event, _measurements, _metadata, {pid, tag}) do
        send(pid, {tag, :called})
        raise "boom"
      end

      def throw_handler(_event, _measurements, _metadata, {pid, tag}) do
        send(pid, {tag, :called})
        throw(:thrown)
      end

      def exit_handler(_event, _measurements, _metadata, {pid, tag}) do
        send(pid, {tag, :called})
        exit(:gone)
      end

      def count_handler(_event, _measurements, _metadata, {pid, n}) do
        send(pid, {:counted, n})
      end

      # Logger primary filter installed by with_logs/1: forwards every log
      # event to the test process and lets logging carry on.
      def send_log(log_event, pid) do
        send(pid, {:log, log_event})
        :ignore
      end

      # Runs fun with every log event sent to this process as {:log, event}
      # (console output is still captured).
      defp with_logs(fun) do
        filter_id = :"compat_logs_#{System.unique_integer([:positive])}"
        %{level: old_level} = :logger.get_primary_config()
        :ok = :logger.set_primary_config(:level, :all)
        :ok = :logger.add_primary_filter(filter_id, {&__MODULE__.send_log/2, self()})

        try do
          capture_log(fun)
        after
          :logger.remove_primary_filter(filter_id)
          :logger.set_primary_config(:level, old_level)
        end
      end

      defp report_text(report) do
        {format, args} = :telemetry.report_cb(report)
        IO.chardata_to_string(:io_lib.format(format, args))
      end

      defp log_text(%{msg: {format, args}}),
        do: IO.chardata_to_string(:io_lib.format(format, args))

      # Every handler id in a test is {base, name} and every event name starts
      # with [:compat_test, base], so tests cannot see each other's handlers.
      setup do
        base = :"t#{System.unique_integer([:positive])}"

        on_exit(fn ->
          :telemetry.list_handlers([])
          |> Enum.filter(fn %{id: id} -> match?({^base, _}, id) end)
          |> Enum.each(fn %{id: id} -> :telemetry.detach(id) end)
        end)

        {:ok, base: base}
      end

      defp id(%{base: base}, name), do: {base, name}
      defp event(%{base: base}, suffix), do: [:compat_test, base | suffix]

      describe "attach/4, attach_many/4 and detach/1" do
        test "return exact values, including duplicates and unknown ids", ctx do
          fun = &__MODULE__.forward/4
          ev = event(ctx, [:a])

          assert :telemetry.attach(id(ctx, 1), ev, fun, {self(), 1}) == :ok
          assert :telemetry.attach(id(ctx, 1), ev, fun, {self(), 1}) == {:error, :already_exists}
          # Same id, different event: still a duplicate.
          assert :telemetry.attach(id(ctx, 1), event(ctx, [:b]), fun, nil) ==
                   {:error, :already_exists}

          assert :telemetry.attach_many(id(ctx, 1), [ev], fun, nil) == {:error, :already_exists}

          assert :telemetry.attach_many(id(ctx, 2), [ev, event(ctx, [:b])], fun, {self(), 2}) ==
                   :ok

          assert :telemetry.attach_many(id(ctx, 2), [ev], fun, nil) == {:error, :already_exists}
          assert :telemetry.attach(id(ctx, 2), ev, fun, nil) == {:error, :already_exists}

          assert :telemetry.detach(id(ctx, 1)) == :ok
          assert :telemetry.detach(id(ctx, 1)) == {:error, :not_found}
          assert :telemetry.detach(id(ctx, 2)) == :ok
          assert :telemetry.detach(id(ctx, 2)) == {:error, :not_found}
          assert :telemetry.detach(id(ctx, :never_attached)) == {:error, :not_found}

          # A detached id can be attached again.
          assert :telemetry.attach(id(ctx, 1), ev, fun, {self(), 1}) == :ok
          assert :telemetry.execute(ev, %{}, %{}) == :ok
          assert_received {1, ^ev, %{}, %{}}
        end

        test "any term can be a handler id", ctx do
          for {hid, n} <- Enum.with_index(["string", 42, %{a: 1}, {:tuple, self()}, make_ref()]) do
            full_id = id(ctx, hid)

            assert :telemetry.attach(full_id, event(ctx, [:"e#{n}"]), &__MODULE__.forward/4, nil) ==
                     :ok

            assert :telemetry.detach(full_id) == :ok
          end
        end

        test "detach removes an attach_many handler from all its events", ctx do
          events = [event(ctx, [:x]), event(ctx, [:y]), event(ctx, [:z])]

          :ok =
            :telemetry.attach_many(id(ctx, :many), events, &__MODULE__.forward/4, {self(), :m})

          for ev <- events, do: :telemetry.execute(ev, %{n: 1}, %{})
          for ev <- events, do: assert_received({:m, ^ev, %{n: 1}, %{}})

          :ok = :telemetry.detach(id(ctx, :many))
          for ev <- events, do: :telemetry.execute(ev, %{n: 2}, %{})
          refute_received {:m, _, _, _}
          assert :telemetry.list_handlers(event(ctx, [])) == []
        end

        test "bad arguments are rejected", ctx do
          fun = &__MODULE__.forward/4

          # Event names must be non-empty lists of atoms: badarg (ArgumentError).
          assert_raise ArgumentError, fn ->
            :telemetry.attach(id(ctx, 1), :not_a_list, fun, nil)
          end

          assert_raise ArgumentError, fn -> :telemetry.attach(id(ctx, 1), [], fun, nil) end
          assert_raise ArgumentError, fn -> :telemetry.attach(id(ctx, 1), [:a, "b"], fun, nil) end
          assert_raise ArgumentError, fn -> :telemetry.attach_many(id(ctx, 1), :a, fun, nil) end

          assert_raise ArgumentError, fn ->
            :telemetry.attach_many(id(ctx, 1), [[:ok], [:ok, 1]], fun, nil)
          end

          # The handler must be a function of arity 4: function_clause.
          assert_raise FunctionClauseError, fn ->
            :telemetry.attach(id(ctx, 1), [:a], fn _, _, _ -> :ok end, nil)
          end

          assert_raise FunctionClauseError, fn ->
            :telemetry.attach(id(ctx, 1), [:a], {__MODULE__, :forward}, nil)
          end

          # Nothing was attached by the failed calls.
          assert :telemetry.detach(id(ctx, 1)) == {:error, :not_found}
        end

        test "anonymous handlers are accepted, with a local-function report", ctx do
          pid = self()
          ev = event(ctx, [:anon])

          log =
            capture_log(fn ->
              assert :telemetry.attach(
                       id(ctx, :anon),
                       ev,
                       fn e, m, md, c -> send(pid, {e, m, md, c}) end,
                       :cfg
                     ) ==
                       :ok
            end)

          assert log =~ "local function"
          :telemetry.execute(ev, %{v: 1}, %{k: 2})
          assert_received {^ev, %{v: 1}, %{k: 2}, :cfg}

          # External captures do not warn.
          assert capture_log(fn ->
                   :ok = :telemetry.attach(id(ctx, :ext), ev, &__MODULE__.forward/4, {pid, :e})
                 end) == ""
        end
      end

      describe "execute/3 and execute/2" do
        test "delivers to handlers of exactly that event only", ctx do
          ev = event(ctx, [:a, :b])
          :ok = :telemetry.attach(id(ctx, :ab), ev, &__MODULE__.forward/4, {self(), :ab})

          :ok =
            :telemetry.attach(
              id(ctx, :other),
              event(ctx, [:c]),
              &__MODULE__.forward/4,
              {self(), :c}
            )

          # A prefix of the event, a longer event and a sibling do not match.
          assert :telemetry.execute(event(ctx, [:a]), %{}, %{}) == :ok
          assert :telemetry.execute(event(ctx, [:a, :b, :c]), %{}, %{}) == :ok
          assert :telemetry.execute(event(ctx, [:a, :x]), %{}, %{}) == :ok
          refute_received {:ab, _, _, _}
          refute_received {:c, _, _, _}

          assert :telemetry.execute(ev, %{latency: 10}, %{path: "/"}) == :ok
          assert_received {:ab, ^ev, %{latency: 10}, %{path: "/"}}
          refute_received {:c, _, _, _}
        end

        test "events with no handlers are fine", ctx do
          assert :telemetry.execute(event(ctx, [:nobody]), %{}, %{}) == :ok
        end

        test "handlers run in the caller, in attach order", ctx do
          ev = event(ctx, [:order])
          caller = self()

          for n <- [3, 1, 2, 5, 4] do
            :ok = :telemetry.attach(id(ctx, n), ev, &__MODULE__.forward/4, {caller, n})
          end

          # An attach_many handler slots in by its own attach time too.
          :ok =
            :telemetry.attach_many(
              id(ctx, 6),
              [event(ctx, [:x]), ev],
              &__MODULE__.forward/4,
              {caller, 6}
            )

          :telemetry.execute(ev, %{}, %{})
          assert collect_tags(6) == [3, 1, 2, 5, 4, 6]

          # Detaching one keeps the order of the rest.
          :ok = :telemetry.detach(id(ctx, 2))
          :telemetry.execute(ev, %{}, %{})
          assert collect_tags(5) == [3, 1, 5, 4, 6]

          # Handlers run in the calling process.
          report_pid = fn _, _, _, _ -> send(caller, {:ran_in, self()}) end
          capture_log(fn -> :ok = :telemetry.attach(id(ctx, :pid), ev, report_pid, nil) end)

          task = Task.async(fn -> :telemetry.execute(ev, %{}, %{}) end)
          :ok = Task.await(task)
          task_pid = task.pid
          assert_received {:ran_in, ^task_pid}
        end

        test "passes the handler config", ctx do
          ev = event(ctx, [:cfg])
          config = {self(), %{some: :config, list: [1, 2, 3]}}
          :ok = :telemetry.attach(id(ctx, :cfg), ev, &__MODULE__.forward_with_config/4, config)

          :telemetry.execute(ev, %{a: 1}, %{b: 2})
          assert_received {:with_config, ^ev, %{a: 1}, %{b: 2}, ^config}
        end

        test "execute/2 uses empty metadata", ctx do
          ev = event(ctx, [:two])
          :ok = :telemetry.attach(id(ctx, :two), ev, &__MODULE__.forward/4, {self(), :two})

          assert :telemetry.execute(ev, %{count: 3}) == :ok
          assert_received {:two, ^ev, %{count: 3}, %{}}
        end

        test "a number as measurements becomes %{value: n} and logs a deprecation warning", ctx do
          ev = event(ctx, [:legacy])
          :ok = :telemetry.attach(id(ctx, :legacy), ev, &__MODULE__.forward/4, {self(), :legacy})

          log = capture_log(fn -> assert :telemetry.execute(ev, 42, %{m: 1}) == :ok end)
          assert_received {:legacy, ^ev, %{value: 42}, %{m: 1}}
          assert log =~ "deprecated"

          capture_log(fn -> assert :telemetry.execute(ev, 1.5) == :ok end)
          assert_received {:legacy, ^ev, %{value: 1.5}, %{}}
        end

        test "bad arguments raise function_clause", ctx do
          assert_raise FunctionClauseError, fn -> :telemetry.execute([], %{}, %{}) end
          assert_raise FunctionClauseError, fn -> :telemetry.execute(:not_list, %{}, %{}) end
          assert_raise FunctionClauseError, fn -> :telemetry.execute(event(ctx, []), %{}, []) end
          assert_raise FunctionClauseError, fn -> :telemetry.execute(event(ctx, []), [], %{}) end
        end
      end

      describe "failing handlers" do
        for {kind, handler, reason_pattern} <- [
              {:error, :raise_handler, quote(do: %RuntimeError{message: "boom"})},
              {:throw, :throw_handler, :thrown},
              {:exit, :exit_handler, :gone}
            ] do
          test "a handler that fails with #{kind} is detached and reported", ctx do
            ev = event(ctx, [:fail])
            caller = self()
            bad_id = id(ctx, :bad)
            config = {caller, :bad}

            :ok =
              :telemetry.attach(id(ctx, :before), ev, &__MODULE__.forward/4, {caller, :before})

            :ok =
              :telemetry.attach(
                bad_id,
                ev,
                Function.capture(__MODULE__, unquote(handler), 4),
                config
              )

            :ok = :telemetry.attach(id(ctx, :after), ev, &__MODULE__.forward/4, {caller, :after})

            :ok =
              :telemetry.attach(
                id(ctx, :failure),
                @failure_event,
                &__MODULE__.forward/4,
                {caller, :failure}
              )

            log =
              capture_log(fn ->
                assert :telemetry.execute(ev, %{x: 1}, %{y: 2}) == :ok
              end)

            # The failing handler ran, and so did the handlers around it.
            assert_received {:before, ^ev, %{x: 1}, %{y: 2}}
            assert_received {:bad, :called}
            assert_received {:after, ^ev, %{x: 1}, %{y: 2}}

            # [:telemetry, :handler, :failure] was emitted with the documented data.
            assert_received {:failure, @failure_event, measurements, metadata}
            assert %{monotonic_time: mono, system_time: sys} = measurements
            assert map_size(measurements) == 2
            assert is_integer(mono) and is_integer(sys)

            assert %{
                     event_name: ^ev,
                     handler_id: ^bad_id,
                     handler_config: ^config,
                     kind: unquote(kind),
                     reason: unquote(reason_pattern),
                     stacktrace: stacktrace
                   } = metadata

            assert map_size(metadata) == 6
            assert is_list(stacktrace) and stacktrace != []

            # Logged, and detached from the table.
            assert log =~ inspect(bad_id)
            assert :telemetry.detach(bad_id) == {:error, :not_found}

            assert Enum.map(:telemetry.list_handlers(ev), & &1.id) == [
                     id(ctx, :before),
                     id(ctx, :after)
                   ]

            # Later events do not call it.
            assert :telemetry.execute(ev, %{x: 2}, %{}) == :ok
            refute_received {:bad, :called}
            refute_received {:failure, _, _, _}
            assert_received {:before, ^ev, %{x: 2}, %{}}
            assert_received {:after, ^ev, %{x: 2}, %{}}
          end
        end

        test "an attach_many handler that fails is detached from all its events", ctx do
          [ev1, ev2] = events = [event(ctx, [:one]), event(ctx, [:two])]

          :ok =
            :telemetry.attach_many(
              id(ctx, :bad),
              events,
              &__MODULE__.raise_handler/4,
              {self(), :bad}
            )

          capture_log(fn -> :ok = :telemetry.execute(ev1, %{}, %{}) end)
          assert_received {:bad, :called}

          :ok = :telemetry.execute(ev2, %{}, %{})
          refute_received {:bad, :called}
          assert :telemetry.list_handlers(event(ctx, [])) == []
        end

        test "a failing failure handler is detached too and does not loop", ctx do
          ev = event(ctx, [:loop])
          :ok = :telemetry.attach(id(ctx, :bad), ev, &__MODULE__.raise_handler/4, {self(), :bad})

          :ok =
            :telemetry.attach(
              id(ctx, :bad_failure),
              @failure_event,
              &__MODULE__.raise_handler/4,
              {self(), :bad_failure}
            )

          capture_log(fn -> assert :telemetry.execute(ev, %{}, %{}) == :ok end)
          assert_received {:bad, :called}
          assert_received {:bad_failure, :called}
          refute_received {:bad_failure, :called}

          assert :telemetry.list_handlers(@failure_event)
                 |> Enum.filter(&(&1.id == id(ctx, :bad_failure))) == []
        end
      end

      describe "span/3" do
        setup ctx do
          prefix = event(ctx, [:span])
          events = for suffix <- [:start, :stop, :exception], do: prefix ++ [suffix]

          :ok =
            :telemetry.attach_many(id(ctx, :span), events, &__MODULE__.forward/4, {self(), :span})

          {:ok, prefix: prefix}
        end

        test "emits start and stop with the documented measurements and metadata", %{
          prefix: prefix
        } do
          before = System.monotonic_time()

          result =
            :telemetry.span(prefix, %{start_meta: 1}, fn ->
              send(self(), :inside)
              {:the_result, %{stop_meta: 2}}
            end)

          assert result == :the_result
          start_event = prefix ++ [:start]
          stop_event = prefix ++ [:stop]

          assert_received {:span, ^start_event, start_measurements, start_metadata}
          assert_received :inside
          assert_received {:span, ^stop_event, stop_measurements, stop_metadata}
          refute_received {:span, _, _, _}

          assert %{monotonic_time: start_mono, system_time: sys} = start_measurements
          assert map_size(start_measurements) == 2
          assert is_integer(sys)
          assert start_mono >= before

          assert %{start_meta: 1, telemetry_span_context: span_ctx} = start_metadata
          assert is_reference(span_ctx)
          assert map_size(start_metadata) == 2

          assert %{duration: duration, monotonic_time: stop_mono} = stop_measurements
          assert map_size(stop_measurements) == 2
          assert is_integer(duration) and duration >= 0
          assert stop_mono - start_mono == duration

          # Stop metadata is the function's metadata, not the start metadata.
          assert stop_metadata == %{stop_meta: 2, telemetry_span_context: span_ctx}
        end

        test "each span gets its own context", %{prefix: prefix} do
          :telemetry.span(prefix, %{}, fn -> {:ok, %{}} end)
          :telemetry.span(prefix, %{}, fn -> {:ok, %{}} end)

          assert_received {:span, _, _, %{telemetry_span_context: ctx1}}
          assert_received {:span, _, _, %{telemetry_span_context: ^ctx1}}
          assert_received {:span, _, _, %{telemetry_span_context: ctx2}}
          assert_received {:span, _, _, %{telemetry_span_context: ^ctx2}}
          assert ctx1 != ctx2
        end

        test "a caller-provided telemetry_span_context is kept", %{prefix: prefix} do
          :telemetry.span(prefix, %{telemetry_span_context: :mine}, fn ->
            {:ok, %{telemetry_span_context: :mine}}
          end)

          assert_received {:span, _, _, %{telemetry_span_context: :mine}}
          assert_received {:span, _, _, %{telemetry_span_context: :mine}}
        end

        test "extra measurements cannot override duration and monotonic_time", %{prefix: prefix} do
          before = System.monotonic_time()

          :telemetry.span(prefix, %{}, fn ->
            {:res, %{duration: -1, monotonic_time: -1, bytes: 7}, %{}}
          end)

          stop_event = prefix ++ [:stop]
          assert_received {:span, ^stop_event, %{duration: d, monotonic_time: m, bytes: 7}, _}
          assert d >= 0
          assert m >= before
        end

        test "start and stop metadata are independent, context included", %{prefix: prefix} do
          :telemetry.span(prefix, %{telemetry_span_context: :mine, only_start: 1}, fn ->
            {:ok, %{only_stop: 2}}
          end)

          start_event = prefix ++ [:start]
          stop_event = prefix ++ [:stop]
          assert_received {:span, ^start_event, _, start_metadata}
          assert_received {:span, ^stop_event, _, stop_metadata}
          assert start_metadata == %{telemetry_span_context: :mine, only_start: 1}
          # The stop event gets only what the function returned, plus the
          # span's own default context since it returned none.
          assert %{only_stop: 2, telemetry_span_context: ctx} = stop_metadata
          assert map_size(stop_metadata) == 2
          assert is_reference(ctx)
        end

        test "extra measurements from a 3-tuple are added to the stop event", %{prefix: prefix} do
          assert :telemetry.span(prefix, %{}, fn -> {:res, %{bytes: 100, rows: 3}, %{s: 1}} end) ==
                   :res

          stop_event = prefix ++ [:stop]
          assert_received {:span, ^stop_event, measurements, %{s: 1, telemetry_span_context: _}}

          assert %{bytes: 100, rows: 3, duration: d, monotonic_time: m} = measurements
          assert is_integer(d) and is_integer(m)
          assert map_size(measurements) == 4
        end

        for {kind, body, reason} <- [
              {:error, quote(do: raise(ArgumentError, "bad")),
               quote(do: %ArgumentError{message: "bad"})},
              {:error, quote(do: :erlang.error(:custom)), :custom},
              {:throw, quote(do: throw(:ball)), :ball},
              {:exit, quote(do: exit(:shutdown_now)), :shutdown_now}
            ] do
          test "emits exception and re-raises for #{kind} #{Macro.to_string(body)}", %{
            prefix: prefix
          } do
            {caught_kind, caught_reason, caught_stack} =
              try do
                :telemetry.span(prefix, %{start_meta: :kept}, fn -> unquote(body) end)
                flunk("span/3 should have re-raised")
              catch
                kind, reason -> {kind, reason, __STACKTRACE__}
              end

            assert caught_kind == unquote(kind)
            assert unquote(reason) = caught_reason

            start_event = prefix ++ [:start]
            exception_event = prefix ++ [:exception]
            assert_received {:span, ^start_event, _, %{telemetry_span_context: span_ctx}}
            assert_received {:span, ^exception_event, measurements, metadata}
            refute_received {:span, _, _, _}

            assert %{duration: d, monotonic_time: m} = measurements
            assert map_size(measurements) == 2
            assert is_integer(d) and d >= 0 and is_integer(m)

            assert %{
                     start_meta: :kept,
                     telemetry_span_context: ^span_ctx,
                     kind: unquote(kind),
                     reason: ^caught_reason,
                     stacktrace: stacktrace
                   } = metadata

            assert map_size(metadata) == 5
            # Re-raised with the original stacktrace.
            assert stacktrace == caught_stack
          end
        end
      end

      describe "list_handlers/1" do
        test "filters by prefix and returns handler maps", ctx do
          fun = &__MODULE__.forward/4
          :ok = :telemetry.attach(id(ctx, :ab), event(ctx, [:a, :b]), fun, :c1)
          :ok = :telemetry.attach(id(ctx, :abc), event(ctx, [:a, :b, :c]), fun, :c2)
          :ok = :telemetry.attach(id(ctx, :x), event(ctx, [:x]), fun, :c3)

          :ok =
            :telemetry.attach_many(
              id(ctx, :many),
              [event(ctx, [:a, :z]), event(ctx, [:x, :y])],
              fun,
              :c4
            )

          ids = fn prefix -> Enum.map(:telemetry.list_handlers(prefix), & &1.id) end

          assert ids.(event(ctx, [])) == [
                   id(ctx, :ab),
                   id(ctx, :abc),
                   id(ctx, :x),
                   id(ctx, :many),
                   id(ctx, :many)
                 ]

          assert ids.(event(ctx, [:a])) == [id(ctx, :ab), id(ctx, :abc), id(ctx, :many)]
          assert ids.(event(ctx, [:a, :b])) == [id(ctx, :ab), id(ctx, :abc)]
          assert ids.(event(ctx, [:a, :b, :c])) == [id(ctx, :abc)]
          assert ids.(event(ctx, [:a, :b, :c, :d])) == []
          assert ids.(event(ctx, [:x])) == [id(ctx, :x), id(ctx, :many)]
          assert ids.(event(ctx, [:nope])) == []

          assert :telemetry.list_handlers(event(ctx, [:a, :b, :c])) == [
                   %{
                     id: id(ctx, :abc),
                     event_name: event(ctx, [:a, :b, :c]),
                     function: fun,
                     config: :c2
                   }
                 ]

          assert [
                   %{event_name: e1, config: :c4, function: ^fun},
                   %{event_name: e2, config: :c4, function: ^fun}
                 ] =
                   Enum.filter(
                     :telemetry.list_handlers(event(ctx, [])),
                     &(&1.id == id(ctx, :many))
                   )

          assert {e1, e2} == {event(ctx, [:a, :z]), event(ctx, [:x, :y])}
        end

        test "[] lists all handlers", ctx do
          :ok = :telemetry.attach(id(ctx, :all), event(ctx, [:all]), &__MODULE__.forward/4, nil)
          assert Enum.any?(:telemetry.list_handlers([]), &(&1.id == id(ctx, :all)))
        end

        test "a non-list or non-atom prefix raises badarg" do
          assert_raise ArgumentError, fn -> :telemetry.list_handlers(:a) end
          assert_raise ArgumentError, fn -> :telemetry.list_handlers([:a, "b"]) end
        end
      end

      describe "logger output" do
        test "attaching a local function logs an info report with the handler id", ctx do
          pid = self()
          ev = event(ctx, [:local])
          hid = id(ctx, :local)
          fun = fn e, m, md, c -> send(pid, {e, m, md, c}) end

          with_logs(fn -> assert :telemetry.attach(hid, ev, fun, :cfg) == :ok end)

          assert_received {:log, %{level: :info, msg: {:report, report}, meta: meta}}

          assert report == %{
                   handler_id: hid,
                   event_names: [ev],
                   function: fun,
                   config: :cfg,
                   type: :local
                 }

          assert meta.report_cb == (&:telemetry.report_cb/1)
          text = report_text(report)
          assert text =~ "local function"
          assert text =~ IO.chardata_to_string(:io_lib.format(~c"~w", [hid]))

          # Still attached and called.
          :telemetry.execute(ev, %{v: 1}, %{})
          assert_received {^ev, %{v: 1}, %{}, :cfg}
        end

        test "the report is logged for attach_many, local captures and duplicate ids", ctx do
          hid = id(ctx, :many)
          events = [event(ctx, [:one]), event(ctx, [:two])]
          local_capture = &forward/4

          with_logs(fn ->
            assert :telemetry.attach_many(hid, events, local_capture, {self(), :x}) == :ok
          end)

          assert_received {:log,
                           %{
                             level: :info,
                             msg:
                               {:report, %{handler_id: ^hid, event_names: ^events, type: :local}}
                           }}

          # As in the hex package the report comes before the id check, so
          # a duplicate attach is reported too.
          with_logs(fn ->
            assert :telemetry.attach(hid, hd(events), local_capture, nil) ==
                     {:error, :already_exists}
          end)

          assert_received {:log, %{level: :info, msg: {:report, %{handler_id: ^hid}}}}
        end

        test "external captures log nothing", ctx do
          hid = id(ctx, :external)

          with_logs(fn ->
            assert :telemetry.attach(hid, event(ctx, [:e]), &__MODULE__.forward/4, nil) == :ok
          end)

          refute_received {:log, _}
        end

        test "a failing handler logs an error naming it, after the failure event", ctx do
          ev = event(ctx, [:fail_log])
          bad_id = id(ctx, :bad)

          :ok =
            :telemetry.attach(
              id(ctx, :failure),
              @failure_event,
              &__MODULE__.forward/4,
              {self(), :failure}
            )

          :ok = :telemetry.attach(bad_id, ev, &__MODULE__.raise_handler/4, {self(), :bad})
          with_logs(fn -> :ok = :telemetry.execute(ev, %{}, %{}) end)

          first =
            receive do
              {:failure, @failure_event, _, %{handler_id: ^bad_id}} -> :failure_event
              {:log, %{level: :error}} -> :error_log
            after
              0 -> :none
            end

          assert first == :failure_event
          assert_received {:log, %{level: :error, msg: {format, args}} = log_event}
          assert is_list(format) and is_list(args)
          text = log_text(log_event)
          assert text =~ "Handler #{IO.chardata_to_string(:io_lib.format(~c"~p", [bad_id]))}"
          assert text =~ "has failed and has been detached"
          assert text =~ "Class=error"
          assert text =~ "boom"
          refute_received {:log, %{level: :error}}
        end

        test "the deprecated number form logs a warning", ctx do
          with_logs(fn -> :ok = :telemetry.execute(event(ctx, [:n]), 3, %{}) end)
          assert_received {:log, %{level: :warning} = log_event}
          assert log_text(log_event) =~ "deprecated"
        end
      end

      describe "telemetry_test.attach_event_handlers/2" do
        test "sends {event, ref, measurements, metadata} for each given event", ctx do
          [ev1, ev2] = events = [event(ctx, [:one]), event(ctx, [:two])]
          ref = :telemetry_test.attach_event_handlers(self(), events)
          assert is_reference(ref)

          :ok = :telemetry.execute(ev1, %{m: 1}, %{md: 1})
          :ok = :telemetry.execute(ev2, %{m: 2}, %{md: 2})
          assert_received {^ev1, ^ref, %{m: 1}, %{md: 1}}
          assert_received {^ev2, ^ref, %{m: 2}, %{md: 2}}

          # Only the given events, matched exactly.
          :ok = :telemetry.execute(event(ctx, [:one, :more]), %{}, %{})
          :ok = :telemetry.execute(event(ctx, [:three]), %{}, %{})
          refute_received {_, ^ref, _, _}
        end

        test "the ref is the handler id, so detach/1 removes it", ctx do
          [ev1, ev2] = events = [event(ctx, [:one]), event(ctx, [:two])]
          ref = :telemetry_test.attach_event_handlers(self(), events)

          assert [
                   %{id: ^ref, event_name: ^ev1, function: fun},
                   %{id: ^ref, event_name: ^ev2, function: fun}
                 ] = :telemetry.list_handlers(event(ctx, []))

          # An external function, so attaching it logs no local-function report.
          assert :erlang.fun_info(fun, :type) == {:type, :external}

          assert :telemetry.detach(ref) == :ok
          :ok = :telemetry.execute(ev1, %{}, %{})
          :ok = :telemetry.execute(ev2, %{}, %{})
          refute_received {_, ^ref, _, _}
          assert :telemetry.detach(ref) == {:error, :not_found}
        end

        test "logs no local-function report", ctx do
          ev = event(ctx, [:quiet])
          test_pid = self()

          with_logs(fn ->
            send(test_pid, {:ref, :telemetry_test.attach_event_handlers(test_pid, [ev])})
          end)

          assert_received {:ref, ref}
          refute_received {:log, _}
          assert :telemetry.detach(ref) == :ok
        end

        test "sends to the given pid, with a fresh ref per call", ctx do
          ev = event(ctx, [:other])
          test_pid = self()

          receiver =
            spawn_link(fn ->
              receive do
                msg -> send(test_pid, {:receiver_got, msg})
              end
            end)

          ref1 = :telemetry_test.attach_event_handlers(receiver, [ev])
          ref2 = :telemetry_test.attach_event_handlers(self(), [ev])
          assert ref1 != ref2

          :ok = :telemetry.execute(ev, %{x: 1}, %{})
          assert_receive {:receiver_got, {^ev, ^ref1, %{x: 1}, %{}}}
          assert_received {^ev, ^ref2, %{x: 1}, %{}}
          refute_received {^ev, ^ref1, _, _}

          :ok = :telemetry.detach(ref1)
          :ok = :telemetry.detach(ref2)
        end

        test "bad arguments", ctx do
          assert_raise FunctionClauseError, fn ->
            :telemetry_test.attach_event_handlers(:not_a_pid, [event(ctx, [:a])])
          end

          assert_raise FunctionClauseError, fn ->
            :telemetry_test.attach_event_handlers(self(), :not_a_list)
          end

          assert_raise ArgumentError, fn ->
            :telemetry_test.attach_event_handlers(self(), [[:a, "b"]])
          end
        end
      end

      describe "persist/0" do
        if @persisted do
          test "handlers are looked up in persistent_term, kept up to date", ctx do
            ev = event(ctx, [:pt])
            hid = id(ctx, :pt)
            :ok = :telemetry.attach(hid, ev, &__MODULE__.forward/4, {self(), :pt})

            assert %{^ev => [%{id: ^hid, config: {_, :pt}}]} =
                     :persistent_term.get(:telemetry_handler_table)

            :ok = :telemetry.execute(ev, %{}, %{})
            assert_received {:pt, ^ev, %{}, %{}}

            :ok = :telemetry.detach(hid)
            refute Map.has_key?(:persistent_term.get(:telemetry_handler_table), ev)
            :ok = :telemetry.execute(ev, %{}, %{})
            refute_received {:pt, _, _, _}
          end

          test "calling it again returns :ok and changes nothing", ctx do
            ev = event(ctx, [:again])
            :ok = :telemetry.attach(id(ctx, :again), ev, &__MODULE__.forward/4, {self(), :a})
            assert :telemetry.persist() == :ok
            :ok = :telemetry.execute(ev, %{}, %{})
            assert_received {:a, ^ev, %{}, %{}}
          end
        else
          test "is not in effect until called", ctx do
            :ok = :telemetry.attach(id(ctx, :ets), event(ctx, [:ets]), &__MODULE__.forward/4, nil)
            assert :persistent_term.get(:telemetry_handler_table, :none) == :none
          end
        end
      end

      describe "the handler table" do
        test "is a protected ETS table owned by the registered gen_server" do
          owner = Process.whereis(:telemetry_handler_table)
          assert is_pid(owner)
          assert :ets.info(:telemetry_handler_table, :owner) == owner
          assert :ets.info(:telemetry_handler_table, :protection) == :protected

          assert_raise ArgumentError, fn ->
            :ets.insert(:telemetry_handler_table, {[:forged], []})
          end
        end
      end

      describe "concurrency" do
        test "executing from many processes while attaching and detaching", ctx do
          ev = event(ctx, [:concurrent])
          caller = self()
          n_handlers = 100
          n_workers = 20

          workers =
            for w <- 1..n_workers do
              Task.async(fn ->
                results = for _ <- 1..200, do: :telemetry.execute(ev, %{w: w}, %{})
                Enum.uniq(results)
              end)
            end

          attach_results =
            for n <- 1..n_handlers do
              :telemetry.attach(id(ctx, {:h, n}), ev, &__MODULE__.count_handler/4, {caller, n})
            end

          detach_results = for n <- 1..div(n_handlers, 2), do: :telemetry.detach(id(ctx, {:h, n}))

          assert Enum.map(workers, &Task.await(&1, 30_000)) == List.duplicate([:ok], n_workers)
          assert Enum.uniq(attach_results) == [:ok]
          assert Enum.uniq(detach_results) == [:ok]

          # Every remaining handler is attached exactly once, in attach order.
          flush_counted()
          :ok = :telemetry.execute(ev, %{}, %{})
          expected = Enum.to_list((div(n_handlers, 2) + 1)..n_handlers)
          assert collect_counted(length(expected)) == expected
          refute_received {:counted, _}
        end

        test "racing attaches of the same id: exactly one wins", ctx do
          hid = id(ctx, :race)

          results =
            1..50
            |> Enum.map(fn n ->
              Task.async(fn ->
                :telemetry.attach(hid, event(ctx, [:race, :"r#{n}"]), &__MODULE__.forward/4, nil)
              end)
            end)
            |> Enum.map(&Task.await/1)

          assert Enum.count(results, &(&1 == :ok)) == 1
          assert Enum.count(results, &(&1 == {:error, :already_exists})) == 49
          assert length(:telemetry.list_handlers(event(ctx, [:race]))) == 1
        end
      end

      describe "the application" do
        test "is started with a supervisor and the table server" do
          assert {:telemetry, _, ~c"1.4.1"} =
                   List.keyfind(Application.started_applications(), :telemetry, 0)

          assert is_pid(Process.whereis(:telemetry_sup))
          assert Application.spec(:telemetry, :mod) == {:telemetry_app, []}
        end
      end

      defp collect_tags(count) do
        for _ <- 1..count do
          assert_receive {tag, _event, _measurements, _metadata}
          tag
        end
      end

      defp collect_counted(count) do
        for _ <- 1..count do
          assert_receive {:counted, n}
          n
        end
      end

      defp flush_counted do
        receive do
          {:counted, _} -> flush_counted()
        after
          0 -> :ok
        end
      end
    end
  end
end

defmodule TelemetryCompatTest do
  use ExUnit.Case, async: false
  @persisted false
  use TelemetryCompat.Cases
end

defmodule TelemetryCompatPersistedTest do
  use ExUnit.Case, async: false

  setup_all do
    assert :telemetry.persist() == :ok

    # Back to ETS lookups for the modules that run after this one.
    on_exit(&TelemetryCompat.Cases.restart_telemetry/0)
  end

  @persisted true
  use TelemetryCompat.Cases
end

defmodule TelemetryCompatPersistLifecycleTest do
  # persist/0 around the application's life cycle. Every test leaves the
  # application restarted, i.e. running and not persisted.
  use ExUnit.Case, async: false

  def forward(event, measurements, metadata, {pid, tag}) do
    send(pid, {tag, event, measurements, metadata})
  end

  setup do
    on_exit(&TelemetryCompat.Cases.restart_telemetry/0)
    ev = [:compat_lifecycle, :"e#{System.unique_integer([:positive])}"]
    {:ok, ev: ev}
  end

  test "handlers attached before persist/0 still run after it", %{ev: ev} do
    :ok = :telemetry.attach(:before_persist, ev, &__MODULE__.forward/4, {self(), :before})
    assert :telemetry.persist() == :ok
    :ok = :telemetry.execute(ev, %{a: 1}, %{b: 2})
    assert_received {:before, ^ev, %{a: 1}, %{b: 2}}
    assert [%{id: :before_persist}] = :telemetry.list_handlers(ev)
  end

  test "stopping the application ends persistence and forgets the handlers", %{ev: ev} do
    :ok = :telemetry.attach(:stopped, ev, &__MODULE__.forward/4, {self(), :stopped})
    :ok = :telemetry.persist()

    ExUnit.CaptureLog.capture_log(fn -> :ok = Application.stop(:telemetry) end)
    assert :persistent_term.get(:telemetry_handler_table, :none) == :none
    # Emitting while stopped is harmless.
    assert :telemetry.execute(ev, %{}, %{}) == :ok
    refute_received {:stopped, _, _, _}

    {:ok, _} = Application.ensure_all_started(:telemetry)
    assert :persistent_term.get(:telemetry_handler_table, :none) == :none
    assert :telemetry.list_handlers(ev) == []
    :ok = :telemetry.execute(ev, %{}, %{})
    refute_received {:stopped, _, _, _}
  end

  test "persist/0 exits when the application is not running" do
    ExUnit.CaptureLog.capture_log(fn -> :ok = Application.stop(:telemetry) end)
    assert {:noproc, _} = catch_exit(:telemetry.persist())
  end

  test "a restarted handler table server starts empty and not persisted", %{ev: ev} do
    :ok = :telemetry.attach(:crashed, ev, &__MODULE__.forward/4, {self(), :crashed})
    :ok = :telemetry.persist()
    old = Process.whereis(:telemetry_handler_table)
    ref = Process.monitor(old)

    ExUnit.CaptureLog.capture_log(fn ->
      Process.exit(old, :kill)
      assert_receive {:DOWN, ^ref, :process, ^old, :killed}
      wait_for_restart(old)
    end)

    assert :persistent_term.get(:telemetry_handler_table, :none) == :none
    :ok = :telemetry.execute(ev, %{}, %{})
    refute_received {:crashed, _, _, _}
    assert :telemetry.attach(:crashed, ev, &__MODULE__.forward/4, {self(), :again}) == :ok
    :ok = :telemetry.execute(ev, %{}, %{})
    assert_received {:again, ^ev, %{}, %{}}
  end

  defp wait_for_restart(old, tries \\ 100) do
    case Process.whereis(:telemetry_handler_table) do
      pid when is_pid(pid) and pid != old ->
        :ok

      _ when tries > 0 ->
        Process.sleep(10)
        wait_for_restart(old, tries - 1)
    end
  end
end
