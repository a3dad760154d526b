defmodule Snakepit.Telemetry.CustomEventsTest do
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.Naming

  test "a registered Python span reaches its own event names; unregistered ones are dropped" do
    worker = start_worker!()
    worker_id = register!(worker)
    prefix = [:snakepit, :python, :inference]
    forward_events([prefix ++ [:start], prefix ++ [:stop], prefix ++ [:tokens]])

    # Before registration: dropped and counted like any unknown name.
    command!(worker, %{cmd: "span", name: "inference", metadata: %{model: "bert"}})
    await(fn -> stream(worker_id).stats.dropped_unknown_event == 2 end)
    refute_received {:event, _, _, _}

    assert Naming.register_events("inference", prefix, [:start, :stop, :exception, :tokens]) ==
             :ok

    assert Naming.register_keys([:model]) == :ok
    assert {"inference.tokens", prefix ++ [:tokens]} in Naming.custom_events()

    command!(worker, %{cmd: "span", name: "inference", metadata: %{model: "bert"}})
    command!(worker, %{cmd: "emit", event: "inference.tokens", measurements: %{model: 3}})

    assert_receive {:event, [:snakepit, :python, :inference, :start], %{system_time: _},
                    %{model: "bert"}},
                   5_000

    assert_receive {:event, [:snakepit, :python, :inference, :stop], %{duration: _},
                    %{model: "bert", worker_id: ^worker_id}},
                   5_000

    assert_receive {:event, [:snakepit, :python, :inference, :tokens], %{model: 3}, _}, 5_000

    # Still nothing for a name nobody registered.
    command!(worker, %{cmd: "emit", event: "inference.unregistered", measurements: %{x: 1}})
    await(fn -> stream(worker_id).stats.dropped_unknown_event == 3 end)
  end

  test "registration validates its input" do
    assert {:error, {:invalid_custom_event, _}} = Naming.register_events("Bad Name", [:a], [:b])

    assert {:error, {:invalid_custom_event, _}} =
             Naming.register_events("python.call", [:a], [:stop])

    assert {:error, {:invalid_custom_event, _}} = Naming.register_events("ok", ["a"], [:b])
    assert {:error, {:invalid_custom_event, _}} = Naming.register_events("ok", [:a], [])
    assert {:error, {:invalid_custom_key, "x"}} = Naming.register_keys(["x"])
    assert {:error, {:invalid_custom_key, _}} = Naming.register_keys([:"Not Valid"])
  end
end
