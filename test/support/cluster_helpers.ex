defmodule Snakepit.Telemetry.ClusterHelpers do
  @moduledoc false
  # Runs on :peer nodes in the cluster tests. Test modules are compiled in
  # memory on the test node only, so code that runs remotely lives here.

  alias Snakepit.Telemetry.{Correlation, GrpcStream, PythonWorker}

  @name :cluster_test_worker

  def start_registered_worker(worker_id) do
    {:ok, worker} = PythonWorker.start()
    Process.register(worker, @name)

    GrpcStream.register_worker(
      worker_id: worker_id,
      pool_name: :cluster_pool,
      address: PythonWorker.address(worker)
    )
  end

  def command(command), do: PythonWorker.command(@name, command)

  # A Python call carrying the correlation ID current on this node.
  def call_with_current_id do
    command(%{cmd: "call", payload: "hi", correlation_id: Correlation.get()})
  end
end
