defmodule Snakepit.Telemetry.PythonLimitsTest do
  # Python never sends a message the stream would refuse: an event too large
  # for one message is dropped there, counted and reported.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.Config

  @stop [:snakepit, :python, :call, :stop]
  @stats [:snakepit, :telemetry, :python, :stats]
  @dropped [:snakepit, :telemetry, :events, :dropped]

  test "worker_env/1 passes the stream's max_message_bytes to Python" do
    assert {"SNAKEPIT_TELEMETRY_MAX_MESSAGE_BYTES", "4194304"} in Config.worker_env(nil)
  end

  for protocol <- ["batches", "events"] do
    test "an event over the cap is dropped in Python and reported (#{protocol})" do
      args = if unquote(protocol) == "events", do: ["--wire", "single"], else: []

      worker =
        start_worker!(
          args: args,
          env: [
            {"SNAKEPIT_TELEMETRY_MAX_MESSAGE_BYTES", "4096"},
            {"SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", "100"}
          ]
        )

      worker_id = register!(worker)
      forward_events([@stop, @stats, @dropped])

      for {id, size} <- [{"small-1", 10}, {"big-1", 10_000}, {"small-2", 10}] do
        command!(worker, %{
          cmd: "emit",
          event: "python.call.stop",
          measurements: %{duration: 1},
          metadata: %{blob: String.duplicate("b", size)},
          correlation_id: id
        })
      end

      assert_receive {:event, @stop, _, %{correlation_id: "small-1", worker_id: ^worker_id}},
                     5_000

      assert_receive {:event, @stop, _, %{correlation_id: "small-2", worker_id: ^worker_id}},
                     5_000

      assert_receive {:event, @dropped, %{count: 1},
                      %{worker_id: ^worker_id, reason: :dropped_oversized, hop: :python}},
                     10_000

      assert_receive {:event, @stats, %{dropped_oversized: 1}, %{worker_id: ^worker_id}}, 5_000
      refute_received {:event, @stop, _, %{correlation_id: "big-1"}}
      assert stream(worker_id).python.dropped_oversized == 1
    end
  end
end
