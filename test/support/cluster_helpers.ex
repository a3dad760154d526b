defmodule Snakepit.Telemetry.ClusterHelpers do
  @moduledoc false
  # Runs on :peer nodes in the cluster tests. Test modules are compiled in
  # memory on the test node only, so code that runs remotely lives here.

  alias Snakepit.Telemetry.{Correlation, GrpcStream, PythonWorker}

  @name :cluster_test_worker

  def start_registered_worker(worker_id, pool_name \\ :cluster_pool) do
    {:ok, worker} = PythonWorker.start()
    Process.register(worker, @name)

    GrpcStream.register_worker(
      worker_id: worker_id,
      pool_name: pool_name,
      address: PythonWorker.address(worker)
    )
  end

  ## On the test node

  @doc """
  Starts a :peer node running :snakepit_telemetry with a Python worker
  registered there (id "<label>-worker", in `pool`); stopped when the test
  ends. Returns `{peer, node, worker_id}` once the worker's stream is open.
  """
  def start_node!(label, pool \\ :cluster_pool) do
    {:ok, peer, node} =
      :peer.start(%{
        name: :"#{label}_#{System.unique_integer([:positive])}",
        host: ~c"127.0.0.1",
        longnames: true,
        args: Enum.flat_map(:code.get_path(), &[~c"-pa", &1])
      })

    ExUnit.Callbacks.on_exit(fn -> safe_stop(peer) end)
    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:snakepit_telemetry])
    worker_id = "#{label}-worker"
    :ok = :erpc.call(node, __MODULE__, :start_registered_worker, [worker_id, pool])

    Snakepit.Telemetry.Case.await(fn ->
      :erpc.call(node, GrpcStream, :list_streams, []) |> Enum.any?(&(&1.status == :open))
    end)

    {peer, node, worker_id}
  end

  @doc "Makes this VM a distributed node, if it is not one yet."
  def ensure_distributed! do
    unless Node.alive?() do
      {_, 0} = System.cmd("epmd", ["-daemon"])

      {:ok, _} =
        Node.start(:"snakepit_test_#{System.unique_integer([:positive])}@127.0.0.1", :longnames)
    end

    :ok
  end

  defp safe_stop(peer) do
    :peer.stop(peer)
  catch
    :exit, _ -> :ok
  end

  def command(command), do: PythonWorker.command(@name, command)

  # A Python call carrying the correlation ID current on this node.
  def call_with_current_id do
    command(%{cmd: "call", payload: "hi", correlation_id: Correlation.get()})
  end
end
