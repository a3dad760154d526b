defmodule Snakepit.Telemetry.CorrelationE2ETest do
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.Correlation

  @call [:snakepit, :python, :call]
  @result [:snakepit, :python, :tool, :result_size]

  test "one ID set in Elixir is on the Python call events and on every event inside the call" do
    worker = start_worker!()
    worker_id = register!(worker)
    forward_events([@call ++ [:start], @call ++ [:stop], @call ++ [:exception], @result])
    id = Correlation.new()

    # Elixir has no gRPC client of its own here: the worker's `call` command
    # makes the real gRPC call, with the header Elixir computed.
    Correlation.with_id(id, fn ->
      %{"x-snakepit-correlation-id" => header} = Correlation.grpc_metadata()
      assert command!(worker, %{cmd: "call", payload: "hello", correlation_id: header})["ok"]
    end)

    assert_receive {:event, [_, _, :call, :start], %{system_time: _},
                    %{
                      correlation_id: ^id,
                      rpc_method: "/snakepit.bridge.BridgeService/Ping",
                      worker_id: ^worker_id
                    }},
                   5_000

    assert_receive {:event, @result, %{bytes: 5}, %{correlation_id: ^id, tool: "ping"}}, 5_000

    assert_receive {:event, [_, _, :call, :stop], %{duration: _},
                    %{correlation_id: ^id, result: "success"}},
                   5_000

    other = Correlation.new()
    command!(worker, %{cmd: "call", payload: "fail", correlation_id: other})

    assert_receive {:event, [_, _, :call, :exception], %{duration: _},
                    %{correlation_id: ^other} = meta},
                   5_000

    assert meta.error_type != ""
  end
end
