defmodule Snakepit.Telemetry.EventsTest do
  use ExUnit.Case, async: true

  alias Snakepit.Telemetry.{Correlation, Events, Naming}

  setup do
    id = "events-test-#{System.unique_integer([:positive])}"
    parent = self()
    :telemetry.attach_many(id, Naming.elixir_events(), &__MODULE__.forward/4, parent)
    on_exit(fn -> :telemetry.detach(id) end)
    :ok
  end

  def forward(event, measurements, metadata, parent) do
    # Several async tests share the handler: only forward what this test emitted.
    if metadata[:test_pid] == parent, do: send(parent, {:event, event, measurements, metadata})
  end

  test "every Elixir event of the catalog can be emitted, with node added" do
    events = Naming.elixir_events()
    assert length(events) >= 24

    for event <- events do
      %{measurements: schema} = Naming.lookup(event)
      measurements = Map.new(schema, fn {key, _unit} -> {key, 1} end)
      assert Events.execute(event, measurements, %{pool_name: :p, test_pid: self()}) == :ok
      assert_receive {:event, ^event, ^measurements, metadata}
      assert metadata.node == node()
      assert metadata.pool_name == :p
    end
  end

  test "events outside the catalog, or that only Python emits, are refused" do
    assert Events.execute([:snakepit, :made_up], %{}, %{}) ==
             {:error, {:unknown_event, [:snakepit, :made_up]}}

    assert Events.execute([:snakepit, :python, :call, :stop], %{duration: 1}, %{}) ==
             {:error, {:unknown_event, [:snakepit, :python, :call, :stop]}}

    assert {:error, {:invalid, _}} = Events.execute([:snakepit, :pool, :status], :nope, %{})
  end

  test "the process's correlation id is added unless given" do
    Correlation.with_id("corr-1", fn ->
      :ok =
        Events.execute([:snakepit, :session, :created], %{system_time: 1}, %{test_pid: self()})

      assert_receive {:event, _, _, %{correlation_id: "corr-1"}}

      :ok =
        Events.execute([:snakepit, :session, :created], %{system_time: 1}, %{
          test_pid: self(),
          correlation_id: "mine"
        })

      assert_receive {:event, _, _, %{correlation_id: "mine"}}
    end)

    :ok = Events.execute([:snakepit, :session, :created], %{system_time: 1}, %{test_pid: self()})
    assert_receive {:event, _, _, metadata}
    refute Map.has_key?(metadata, :correlation_id)
  end

  test "span emits start and stop, or exception and re-raises" do
    result =
      Events.span([:snakepit, :grpc, :call], %{rpc_method: "Ping", test_pid: self()}, fn ->
        {:pong, %{result: :success, test_pid: self()}}
      end)

    assert result == :pong

    assert_receive {:event, [:snakepit, :grpc, :call, :start],
                    %{system_time: _, monotonic_time: _}, %{rpc_method: "Ping"}}

    assert_receive {:event, [:snakepit, :grpc, :call, :stop], %{duration: d},
                    %{result: :success, node: _}}

    assert d >= 0

    assert_raise RuntimeError, "boom", fn ->
      Events.span([:snakepit, :grpc, :call], %{test_pid: self()}, fn -> raise "boom" end)
    end

    assert_receive {:event, [:snakepit, :grpc, :call, :exception], %{duration: _},
                    %{kind: :error, reason: %RuntimeError{}}}
  end

  test "span refuses a prefix that is not a catalog span" do
    assert_raise ArgumentError, ~r/not a span in the catalog/, fn ->
      Events.span([:snakepit, :pool], %{}, fn -> {:ok, %{}} end)
    end
  end
end
