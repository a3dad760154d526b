defmodule Snakepit.Telemetry.ConfigTest do
  # Not async: changes the application environment (and restarts GrpcStream).
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{Config, GrpcStream}

  @sections [:stream, :control, :python, :pools]

  setup do
    saved = for key <- @sections, do: {key, Application.fetch_env(:snakepit_telemetry, key)}

    on_exit(fn ->
      for {key, value} <- saved do
        case value do
          {:ok, v} -> Application.put_env(:snakepit_telemetry, key, v)
          :error -> Application.delete_env(:snakepit_telemetry, key)
        end
      end
    end)

    for key <- @sections, do: Application.delete_env(:snakepit_telemetry, key)
    :ok
  end

  defp put(key, value), do: Application.put_env(:snakepit_telemetry, key, value)

  defp invalid(pattern) do
    assert {:error, message} = Config.validate()
    assert message =~ "invalid :snakepit_telemetry config: "
    assert message =~ pattern
    message
  end

  test "the defaults and a full valid configuration pass" do
    assert {:ok, %{stream: stream, control: control, python: python}} = Config.validate()
    assert stream[:healthy_after_ms] == 10_000
    assert control[:sampling_rate] == 1.0
    assert python[:queue_size] == 1024

    put(:stream,
      connect_timeout_ms: 0,
      backoff_initial_ms: 50,
      backoff_max_ms: 50,
      healthy_after_ms: 0,
      open_timeout_ms: 2_000,
      keepalive_interval_ms: 0,
      keepalive_timeout_ms: 1_000,
      max_message_bytes: 8 * 1024 * 1024
    )

    put(:control,
      enabled: false,
      sampling_rate: 1,
      sampling_rules: [{["python.call.*"], 0.5}],
      allow: ["python.*"],
      deny: []
    )

    put(:python, queue_size: 4096, stats_interval_ms: 0, flush_interval_ms: 0)

    put(:pools, %{
      :inference => [control: [sampling_rate: 0.1], python: [queue_size: 8]],
      "string-pool" => [stream: [healthy_after_ms: 500]]
    })

    assert {:ok, %{stream: stream}} = Config.validate()
    assert stream[:keepalive_timeout_ms] == 1_000
    assert {:ok, pool_stream} = Config.fetch(:stream, "string-pool")
    assert pool_stream[:healthy_after_ms] == 500
    assert pool_stream[:backoff_initial_ms] == 50
    assert Config.python(:inference)[:queue_size] == 8
    assert Config.control(:inference).default_rate == 0.1
  end

  describe ":stream" do
    test "an unknown key is named, with the known keys" do
      put(:stream, backof_max_ms: 100)
      message = invalid("unknown key :backof_max_ms in stream")
      assert message =~ ":backoff_max_ms"
      assert message =~ ":healthy_after_ms"
    end

    test "a wrong type names the key and the expected type" do
      put(:stream, health_interval_ms: "1000")

      assert invalid("stream.health_interval_ms") =~
               ~S|expected a non-negative integer (at most 4294967295), got: "1000"|

      put(:stream, max_batch: 0)
      assert invalid("stream.max_batch") =~ "expected a positive integer"

      for key <- [:open_timeout_ms, :keepalive_interval_ms, :keepalive_timeout_ms] do
        put(:stream, [{key, -1}])
        assert invalid("stream.#{key}") =~ "expected a non-negative integer"
      end

      put(:stream, healthy_after_ms: 1.5)
      assert invalid("stream.healthy_after_ms") =~ "got: 1.5"
    end

    test "the section must be a keyword list; backoff_max_ms >= backoff_initial_ms" do
      put(:stream, %{max_batch: 1})
      assert invalid("stream: expected a keyword list")

      put(:stream, backoff_initial_ms: 1_000, backoff_max_ms: 10)
      assert invalid("stream.backoff_max_ms") =~ ">= backoff_initial_ms (1000), got: 10"
    end

    test "stream/1 raises the same message; fetch/2 returns it" do
      put(:stream, max_pending_events: :lots)
      assert {:error, message} = Config.fetch(:stream)
      assert message =~ "stream.max_pending_events"
      assert_raise ArgumentError, message, fn -> Config.stream() end
    end
  end

  describe ":control" do
    test "unknown key and wrong types" do
      put(:control, sampling: 0.5)
      invalid("unknown key :sampling in control")

      put(:control, sampling_rate: 2)
      assert invalid("control.sampling_rate") =~ "expected a number in 0..1, got: 2"

      put(:control, enabled: "yes")
      assert invalid("control.enabled") =~ "expected a boolean"

      put(:control, deny: "noisy.*")
      assert invalid("control.deny") =~ "expected a list of glob patterns"

      put(:control, sampling_rules: [{[], 0.5}])
      assert invalid("control.sampling_rules") =~ "non-empty pattern list"

      assert_raise ArgumentError, ~r/control\.sampling_rules/, fn -> Config.control() end
    end
  end

  describe ":python" do
    test "unknown key and wrong types" do
      put(:python, queue: 10)
      invalid("unknown key :queue in python")

      put(:python, queue_size: 0)
      assert invalid("python.queue_size") =~ "expected a positive integer"

      put(:python, stats_interval_ms: nil)
      assert invalid("python.stats_interval_ms") =~ "got: nil"
      assert_raise ArgumentError, ~r/python\.stats_interval_ms/, fn -> Config.worker_env() end
    end
  end

  describe "worker_env/2 :telemetry_address" do
    test "adds SNAKEPIT_TELEMETRY_LISTEN, and refuses anything but a non-empty string" do
      refute List.keymember?(Config.worker_env(nil), "SNAKEPIT_TELEMETRY_LISTEN", 0)

      assert {"SNAKEPIT_TELEMETRY_LISTEN", "unix:/run/w1.sock"} in Config.worker_env(nil,
               telemetry_address: "unix:/run/w1.sock"
             )

      for bad <- ["", :"127.0.0.1:0", 5000] do
        assert_raise ArgumentError, ~r/invalid :telemetry_address/, fn ->
          Config.worker_env(nil, telemetry_address: bad)
        end
      end
    end
  end

  describe ":pools" do
    test "must be a map of keyword lists of known sections" do
      put(:pools, inference: [python: [queue_size: 1]])
      assert invalid("pools: expected a map")

      put(:pools, %{inference: :fast})
      assert invalid("pools[:inference]: expected a keyword list")

      put(:pools, %{inference: [pythn: [queue_size: 1]]})
      assert invalid("unknown key :pythn in pools[:inference]")
    end

    test "a bad per-pool value names the pool and the key" do
      put(:pools, %{inference: [python: [queue_size: 0]]})
      assert invalid("pools[:inference].python.queue_size") =~ "expected a positive integer"

      put(:pools, %{"p" => [stream: [backoff_initial_ms: 10_000]]})
      assert invalid("pools[\"p\"].stream.backoff_max_ms") =~ ">= backoff_initial_ms (10000)"

      put(:pools, %{inference: [control: [sampling_rate: -1]]})
      invalid("pools[:inference].control.sampling_rate")
      assert {:error, _} = Config.fetch(:control, :inference)
      # Other pools, and the global settings, are still usable.
      assert {:ok, _} = Config.fetch(:control, :other)
      assert {:ok, _} = Config.fetch_control()
    end

    test "register_worker answers {:invalid_config, message}; GrpcStream lives on" do
      put(:pools, %{bad_pool: [stream: [healthy_after_ms: -5]]})
      pid = Process.whereis(GrpcStream)

      assert {:error, {:invalid_config, message}} =
               GrpcStream.register_worker(
                 worker_id: "config-bad-#{System.unique_integer([:positive])}",
                 pool_name: :bad_pool,
                 address: "127.0.0.1:1"
               )

      assert message =~ "pools[:bad_pool].stream.healthy_after_ms"

      put(:pools, %{bad_pool: [control: [allow: [:atom]]]})

      assert {:error, {:invalid_config, message}} =
               GrpcStream.register_worker(
                 worker_id: "config-bad-#{System.unique_integer([:positive])}",
                 pool_name: :bad_pool,
                 address: "127.0.0.1:1"
               )

      assert message =~ "pools[:bad_pool].control.allow"
      assert Process.whereis(GrpcStream) == pid
      assert GrpcStream.list_streams() |> Enum.all?(&(&1.pool_name != :bad_pool))
    end
  end

  test "a GrpcStream restarted under an invalid configuration logs it and keeps running" do
    worker = start_worker!()
    worker_id = register!(worker)
    put(:stream, health_interval_ms: -1)
    old = Process.whereis(GrpcStream)
    ref = Process.monitor(old)

    log =
      ExUnit.CaptureLog.capture_log(fn ->
        Process.exit(old, :kill)
        assert_receive {:DOWN, ^ref, :process, _, :killed}
        await(fn -> Process.whereis(GrpcStream) not in [nil, old] end)
        # The registered worker's stream reopens with the default settings.
        await(fn -> match?(%{status: :open}, stream(worker_id)) end)
      end)

    assert log =~ "stream.health_interval_ms: expected a non-negative integer"
    assert log =~ "using the default stream settings"
    new = Process.whereis(GrpcStream)
    Application.delete_env(:snakepit_telemetry, :stream)
    assert GrpcStream.list_streams() != []
    assert Process.whereis(GrpcStream) == new
  end

  @tag timeout: 60_000
  test "the application does not start with an invalid configuration" do
    unless Node.alive?() do
      {_, 0} = System.cmd("epmd", ["-daemon"])

      {:ok, _} =
        Node.start(:"snakepit_cfg_#{System.unique_integer([:positive])}@127.0.0.1", :longnames)
    end

    {:ok, peer, node} =
      :peer.start(%{
        name: :"cfg_#{System.unique_integer([:positive])}",
        host: ~c"127.0.0.1",
        longnames: true,
        # The start failure is expected: keep its reports off the test output.
        args:
          [~c"-kernel", ~c"logger_level", ~c"none", ~c"-logger", ~c"level", ~c"none"] ++
            Enum.flat_map(:code.get_path(), &[~c"-pa", &1])
      })

    on_exit(fn ->
      try do
        :peer.stop(peer)
      catch
        :exit, _ -> :ok
      end
    end)

    :ok = :erpc.call(node, Application, :load, [:snakepit_telemetry])

    :ok =
      :erpc.call(node, Application, :put_env, [
        :snakepit_telemetry,
        :python,
        [queue_size: "big"]
      ])

    assert {:error, {:snakepit_telemetry, {{:invalid_config, message}, _}}} =
             :erpc.call(node, Application, :ensure_all_started, [:snakepit_telemetry])

    assert message =~ ~s(python.queue_size: expected a positive integer)
    assert message =~ ~s(got: "big")

    :ok = :erpc.call(node, Application, :put_env, [:snakepit_telemetry, :python, []])

    assert {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:snakepit_telemetry])
  end
end
