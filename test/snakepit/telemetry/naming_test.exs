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
end
