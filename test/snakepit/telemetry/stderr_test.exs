defmodule Snakepit.Telemetry.StderrTest do
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.Stderr

  @stop [:snakepit, :python, :call, :stop]
  @ctx %{worker_id: "stderr-worker", pool_name: :stderr_pool}

  test "a telemetry line becomes the catalog event with the standard metadata" do
    forward_events([@stop])

    line =
      Stderr.prefix() <>
        ~s({"event_parts":["python","call","stop"],"measurements":{"duration":1500,"bad":"NaN"},) <>
        ~s("metadata":{"command":"predict","model":"m1"},"timestamp_ns":1,"correlation_id":"c-9"})

    before = Stderr.stats()
    assert Stderr.handle_line(line, @ctx) == :ok
    assert_receive {:event, @stop, measurements, metadata}

    assert measurements == %{duration: System.convert_time_unit(1500, :nanosecond, :native)}

    assert metadata == %{
             "model" => "m1",
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
    atoms = :erlang.system_info(:atom_count)
    before = Stderr.stats()
    assert Stderr.handle_line("Traceback (most recent call last):", @ctx) == :ignored
    assert Stderr.handle_line(Stderr.prefix() <> "{nope", @ctx) == {:error, :invalid_json}

    assert Stderr.handle_line(
             Stderr.prefix() <> ~s({"event_parts":["zz","q#{System.unique_integer()}"]}),
             @ctx
           ) ==
             {:error, :unknown_event}

    assert Stderr.handle_line(Stderr.prefix() <> String.duplicate("x", 5_000_000), @ctx) ==
             {:error, :too_large}

    assert :erlang.system_info(:atom_count) == atoms
    after_ = Stderr.stats()
    assert after_.dropped_unknown_event == before.dropped_unknown_event + 1
    assert after_.dropped_malformed == before.dropped_malformed + 2
  end
end
