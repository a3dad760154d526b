defmodule Snakepit.Telemetry.NativeServerTest do
  # Workers on the Python package's native implementation (the Rust
  # extension), streaming from the Rust server inside the Python process
  # (telemetry.serve) or through the worker's grpcio server
  # (add_to_server), next to a worker on the pure-Python implementation.
  # The NIF's side is the same for all of them.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{Config, GrpcStream, PythonWorker, Secret}

  @call [:snakepit, :python, :call]
  @stop @call ++ [:stop]
  @start @call ++ [:start]
  @stats [:snakepit, :telemetry, :python, :stats]

  defp unique, do: System.unique_integer([:positive])

  defp native_worker!(extra_env \\ []) do
    secret = Secret.new()
    address = Config.socket_path("native-#{unique()}")

    worker =
      start_worker!(
        implementation: :native,
        telemetry_listen: address,
        env: Config.worker_env(nil, secret: secret) ++ extra_env
      )

    {worker, secret, address}
  end

  defp python_counter(worker_id, key), do: Map.get(stream(worker_id).python, key, 0)

  test "the Rust server streams a worker's events, spans and stats to handlers" do
    {worker, secret, address} = native_worker!()
    assert {:ok, %{"implementation" => "native", "serving" => "rust"}} = PythonWorker.info(worker)
    # The worker announced the Rust server's address; the stream opens there.
    assert PythonWorker.address(worker) == address
    worker_id = register!(worker, secret: secret, pool_name: :native_pool)

    forward_events([@start, @stop, @stats])
    prefix = "native-#{unique()}"

    command!(worker, %{cmd: "spans", name: "python.call", count: 20, correlation_prefix: prefix})

    for i <- 0..19 do
      id = "#{prefix}-#{i}"

      assert_receive {:event, @start, %{system_time: _}, %{correlation_id: ^id} = start_md},
                     10_000

      assert_receive {:event, @stop, %{duration: d}, %{correlation_id: ^id} = stop_md}, 10_000
      assert is_integer(d) and d >= 0
      assert start_md.telemetry_span_context == stop_md.telemetry_span_context
      assert stop_md.worker_id == worker_id and stop_md.pool_name == :native_pool
    end

    assert_receive {:event, @stats, %{emitted: _}, %{implementation: "native"}}, 10_000
    await(fn -> stream(worker_id).python_implementation == :native end)
    assert stream(worker_id).protocol == :batches
    assert stream(worker_id).reconnects == 0
  end

  test "control reaches a worker served by the Rust server, and it drops and counts there" do
    {worker, secret, _address} = native_worker!([{"SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", "50"}])
    worker_id = register!(worker, secret: secret)
    forward_events([@stop])

    :ok = GrpcStream.update_sampling(worker_id, 0.0, ["python.call.*"])
    await(fn -> command!(worker, %{cmd: "stats"})["control"]["rules"] != [] end)

    command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{n: 1}, count: 100})
    command!(worker, %{cmd: "emit", event: "tool.result_size", measurements: %{bytes: 1}})
    # The rule drops exactly the matching events, in Python; the count reaches Elixir.
    await(fn -> python_counter(worker_id, :dropped_sampled) == 100 end)
    refute_received {:event, @stop, _, _}

    :ok = GrpcStream.toggle(worker_id, false)
    await(fn -> command!(worker, %{cmd: "stats"})["control"]["enabled"] == false end)

    command!(worker, %{
      cmd: "emit",
      event: "tool.result_size",
      measurements: %{bytes: 1},
      count: 7
    })

    await(fn -> python_counter(worker_id, :dropped_disabled) == 7 end)

    :ok = GrpcStream.toggle(worker_id, true)
    :ok = GrpcStream.update_sampling(worker_id, 1.0, ["python.call.*"])
    await(fn -> command!(worker, %{cmd: "stats"})["control"]["enabled"] end)

    await(fn ->
      command!(worker, %{cmd: "stats"})["control"]["rules"] |> hd() |> Map.get("rate") == 1.0
    end)

    command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{n: 2}})
    assert_receive {:event, @stop, %{"n" => 2}, _}, 10_000
  end

  test "the Rust server refuses a worker registered without the secret" do
    {worker, _secret, address} = native_worker!()
    worker_id = "native-nosecret-#{unique()}"
    :ok = GrpcStream.register_worker(worker_id: worker_id, pool_name: :p, address: address)
    on_exit(fn -> GrpcStream.unregister_worker(worker_id) end)

    await(fn -> match?({:failed, {:connect_failed, _}}, stream(worker_id).status) end)
    {:failed, {:connect_failed, text}} = stream(worker_id).status
    assert text =~ ~r/unauthenticated/i
    await(fn -> command!(worker, %{cmd: "stats"})["refused_calls"] >= 1 end)
  end

  test "list_streams names each worker's implementation: native through grpcio, and python" do
    native = start_worker!(implementation: :native)
    python = start_worker!(implementation: :python)

    assert {:ok, %{"implementation" => "native", "serving" => "grpcio"}} =
             PythonWorker.info(native)

    assert {:ok, %{"implementation" => "python"}} = PythonWorker.info(python)

    native_id = register!(native)
    python_id = register!(python)
    forward_events([@stop])

    for {worker, id} <- [{native, native_id}, {python, python_id}] do
      command!(worker, %{cmd: "emit", event: "python.call.stop", measurements: %{n: 3}})
      assert_receive {:event, @stop, %{"n" => 3}, %{worker_id: ^id}}, 10_000
    end

    await(fn -> stream(native_id).python_implementation == :native end)
    await(fn -> stream(python_id).python_implementation == :python end)
  end
end
