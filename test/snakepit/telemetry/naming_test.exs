defmodule Snakepit.Telemetry.NamingTest do
  use ExUnit.Case, async: true
  doctest Snakepit.Telemetry.Naming

  alias Snakepit.Telemetry.Naming

  test "the catalog holds the Python execution events, all under :snakepit" do
    events = Naming.events()

    for event <- [
          [:snakepit, :python, :call, :start],
          [:snakepit, :python, :call, :stop],
          [:snakepit, :python, :call, :exception],
          [:snakepit, :python, :tool, :execution, :start],
          [:snakepit, :python, :tool, :execution, :stop],
          [:snakepit, :python, :tool, :execution, :exception],
          [:snakepit, :python, :tool, :result_size]
        ] do
      assert event in events
    end

    assert Enum.all?(events, &match?([:snakepit | _], &1))
    assert length(Enum.uniq(events)) == length(events)
  end

  test "python names map to event names" do
    assert Naming.python_events()["tool.execution.stop"] ==
             [:snakepit, :python, :tool, :execution, :stop]

    assert Naming.from_python("tool.result_size") ==
             {:ok, [:snakepit, :python, :tool, :result_size]}
  end

  test "every entry documents its measurements and metadata" do
    for entry <- Naming.catalog() do
      assert entry.doc != ""
      assert Enum.all?(entry.measurements, fn {key, unit} -> is_atom(key) and is_binary(unit) end)
      assert Enum.all?(entry.metadata, &(&1 in Naming.metadata_keys()))
    end
  end

  test "the README's catalog table is up to date (mix snakepit_telemetry.catalog)" do
    readme = File.read!(Path.expand("../../../README.md", __DIR__))
    table = Naming.markdown_table()
    # Not a plain ==: a stale README would print the whole file twice.
    if Mix.Tasks.SnakepitTelemetry.Catalog.render(readme, table) != readme do
      flunk("README.md's catalog table is stale: run `mix snakepit_telemetry.catalog`")
    end

    spans = Naming.span_markdown_table()

    if Mix.Tasks.SnakepitTelemetry.Catalog.render(readme, "spans", spans) != readme do
      flunk("README.md's span table is stale: run `mix snakepit_telemetry.catalog`")
    end
  end

  test "every Python span follows the :telemetry.span/3 conventions" do
    spans = Naming.python_spans()
    assert {"python.call", _} = List.keyfind(spans, "python.call", 0)
    assert {"tool.execution", _} = List.keyfind(spans, "tool.execution", 0)

    for {python, events} <- spans do
      keys = fn action, field -> Keyword.keys(events[action][field]) end
      meta = fn action -> events[action].metadata end
      # What :telemetry.span/3 gives, at least (Snakepit v0.13's `count` may come too).
      assert [:monotonic_time, :system_time] -- keys.(:start, :measurements) == [], python
      refute :duration in keys.(:start, :measurements), python

      for action <- [:stop, :exception] do
        assert [:duration, :monotonic_time] -- keys.(action, :measurements) == [], python
        refute :system_time in keys.(action, :measurements), python
      end

      for action <- [:start, :stop, :exception] do
        assert :telemetry_span_context in meta.(action), python
      end

      for key <- [:kind, :reason, :stacktrace, :error_type, :error_message] do
        assert key in meta.(:exception), "#{python}: #{key}"
      end
    end
  end

  test "the catalog covers the three layers and the system's own health" do
    python = Naming.python_events()
    elixir = Naming.elixir_events()

    for name <- ~w(python.call.start python.call.stop python.call.exception python.memory.sampled
                   python.cpu.sampled python.gc.completed python.error.occurred tool.execution.start
                   tool.execution.stop tool.execution.exception tool.result_size) do
      assert Map.has_key?(python, name), name
    end

    assert python["tool.result_size"] == [:snakepit, :python, :tool, :result_size]

    for suffix <- [
          [:pool, :initialized],
          [:pool, :status],
          [:pool, :queue, :enqueued],
          [:pool, :queue, :dequeued],
          [:pool, :queue, :timeout],
          [:pool, :worker, :spawn_started],
          [:pool, :worker, :spawned],
          [:pool, :worker, :spawn_failed],
          [:pool, :worker, :terminated],
          [:pool, :worker, :restarted],
          [:session, :created],
          [:session, :destroyed],
          [:session, :affinity, :assigned],
          [:session, :affinity, :broken],
          [:grpc, :call, :start],
          [:grpc, :call, :stop],
          [:grpc, :call, :exception],
          [:grpc, :stream, :opened],
          [:grpc, :stream, :message],
          [:grpc, :stream, :closed],
          [:grpc, :connection, :established],
          [:grpc, :connection, :lost],
          [:grpc, :connection, :reconnected],
          [:telemetry, :events, :dropped]
        ] do
      assert [:snakepit | suffix] in elixir, inspect(suffix)
    end
  end

  test "durations are in native time units and start events carry system_time" do
    for %{name: name, measurements: m} <- Naming.catalog() do
      units = Map.new(m)
      if Map.has_key?(units, :duration), do: assert(units.duration == "native_time")

      if List.last(name) == :start do
        assert units[:system_time] == "native_time", inspect(name)
        assert units[:monotonic_time] == "native_time", inspect(name)
      end
    end
  end
end
