defmodule Snakepit.Telemetry.ControlTest do
  # Not async: the Config tests change the application environment.
  use ExUnit.Case, async: false
  doctest Snakepit.Telemetry.Config

  alias Snakepit.Telemetry.{Config, Control}

  test "the default state sends toggle, default rate and an empty filter" do
    assert {:ok, state} = Control.new()
    assert Control.messages(state) == [{:toggle, true}, {:sampling, 1.0, []}, {:filter, [], []}]
  end

  test "rules with the same patterns replace each other and become the newest" do
    {:ok, s} = Control.new()
    {:ok, s} = Control.put_sampling(s, 0.5, ["python.*"])
    {:ok, s} = Control.put_sampling(s, 0.1, ["tool.*"])
    {:ok, s} = Control.put_sampling(s, 0.2, ["python.*"])
    {:ok, s} = Control.put_sampling(s, 0, [])

    assert s.default_rate == 0.0
    assert s.rules == [%{patterns: ["tool.*"], rate: 0.1}, %{patterns: ["python.*"], rate: 0.2}]

    assert Control.messages(s) == [
             {:toggle, true},
             {:sampling, 0.0, []},
             {:sampling, 0.1, ["tool.*"]},
             {:sampling, 0.2, ["python.*"]},
             {:filter, [], []}
           ]
  end

  test "to_native gives the NIF the state, rules oldest first with float rates" do
    {:ok, s} = Control.new(enabled: false, sampling_rate: 0, deny: ["tool.*"])
    {:ok, s} = Control.put_sampling(s, 1, ["python.*"])
    {:ok, s} = Control.put_sampling(s, 0.5, ["tool.*"])

    assert Control.to_native(s) == %{
             enabled: false,
             default_rate: 0.0,
             rules: [{1.0, ["python.*"]}, {0.5, ["tool.*"]}],
             allow: [],
             deny: ["tool.*"]
           }
  end

  test "at most 32 rules are kept, the oldest go first" do
    {:ok, s} = Control.new()

    s =
      Enum.reduce(1..40, s, fn i, acc ->
        {:ok, acc} = Control.put_sampling(acc, 0.5, ["r#{i}"])
        acc
      end)

    assert length(s.rules) == 32
    assert hd(s.rules).patterns == ["r9"]
  end

  test "bad rates, patterns and filters are clear errors" do
    {:ok, s} = Control.new()
    assert Control.put_sampling(s, 1.5, []) == {:error, {:invalid_rate, 1.5}}
    assert Control.put_sampling(s, -0.1, []) == {:error, {:invalid_rate, -0.1}}
    assert Control.put_sampling(s, "0.5", []) == {:error, {:invalid_rate, "0.5"}}
    assert Control.put_sampling(s, 0.5, "python.*") == {:error, {:invalid_patterns, "python.*"}}
    assert Control.put_sampling(s, 0.5, [""]) == {:error, {:invalid_patterns, [""]}}
    assert Control.put_sampling(s, 0.5, ["a b"]) == {:error, {:invalid_patterns, ["a b"]}}
    assert Control.put_sampling(s, 0.5, [:atom]) == {:error, {:invalid_patterns, [:atom]}}

    assert Control.put_filter(s, allow: ["ok.*"], deny: ["bad pattern"]) ==
             {:error, {:invalid_patterns, ["bad pattern"]}}

    assert Control.put_filter(s, nope: []) == {:error, {:invalid_filter, [nope: []]}}
    assert Control.put_filter(s, "allow") == {:error, {:invalid_filter, "allow"}}

    assert Control.new(sampling_rules: [{[], 0.5}]) ==
             {:error, {:invalid_sampling_rule, {[], 0.5}}}

    assert Control.new(enabled: :yes) == {:error, {:invalid_enabled, :yes}}
  end

  describe "Config" do
    setup do
      on_exit(fn ->
        Application.delete_env(:snakepit_telemetry, :control)
        Application.delete_env(:snakepit_telemetry, :python)
        Application.delete_env(:snakepit_telemetry, :pools)
      end)
    end

    test "pool settings override global ones, and worker_env follows them" do
      Application.put_env(:snakepit_telemetry, :control, sampling_rate: 0.5, deny: ["noisy.*"])
      Application.put_env(:snakepit_telemetry, :python, queue_size: 2048)

      Application.put_env(:snakepit_telemetry, :pools, %{
        inference: [
          control: [sampling_rate: 0.1, sampling_rules: [{["tool.*"], 1.0}]],
          python: [stats_interval_ms: 0],
          stream: [max_message_bytes: 1_000_000]
        ]
      })

      assert Config.control().default_rate == 0.5
      inference = Config.control(:inference)
      assert inference.default_rate == 0.1
      assert inference.deny == ["noisy.*"]
      assert inference.rules == [%{patterns: ["tool.*"], rate: 1.0}]

      assert Map.new(Config.worker_env(:inference)) == %{
               "SNAKEPIT_TELEMETRY_ENABLED" => "true",
               "SNAKEPIT_TELEMETRY_SAMPLING_RATE" => "0.1",
               "SNAKEPIT_TELEMETRY_ALLOW" => "",
               "SNAKEPIT_TELEMETRY_DENY" => "noisy.*",
               "SNAKEPIT_TELEMETRY_QUEUE_SIZE" => "2048",
               "SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS" => "0",
               "SNAKEPIT_TELEMETRY_FLUSH_INTERVAL_MS" => "50",
               "SNAKEPIT_TELEMETRY_MAX_MESSAGE_BYTES" => "1000000"
             }

      assert Config.stream(:inference)[:backoff_max_ms] == 5_000
    end

    test "an invalid control config raises a clear error" do
      Application.put_env(:snakepit_telemetry, :control, sampling_rate: 2)

      assert_raise ArgumentError,
                   ~r/control.sampling_rate: expected a number in 0..1, got: 2/,
                   fn -> Config.control() end
    end
  end
end
