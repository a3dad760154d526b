defmodule Snakepit.Telemetry.Case do
  @moduledoc false
  # Shared helpers for tests that run a real Python worker and the NIF.
  use ExUnit.CaseTemplate

  alias Snakepit.Telemetry.{GrpcStream, PythonWorker}

  using do
    quote do
      import Snakepit.Telemetry.Case
    end
  end

  @doc "Starts a Python command worker (support/python/command_worker.py) owned by the test."
  def start_worker!(opts \\ []) do
    start_supervised!({PythonWorker, opts}, id: make_ref())
  end

  @doc "Registers `worker` under a unique id; unregisters it when the test ends."
  def register!(worker, extra \\ []) do
    worker_id = "w-#{System.unique_integer([:positive])}"

    ctx =
      Keyword.merge(
        [worker_id: worker_id, pool_name: :test_pool, address: PythonWorker.address(worker)],
        extra
      )

    :ok = GrpcStream.register_worker(ctx)
    ExUnit.Callbacks.on_exit(fn -> GrpcStream.unregister_worker(worker_id) end)
    await(fn -> stream(worker_id).status == :open end)
    worker_id
  end

  @doc "Kills a worker's Python process with SIGKILL and waits for its PythonWorker to exit."
  def kill9!(worker) do
    ref = Process.monitor(worker)
    {_, 0} = System.cmd("kill", ["-9", Integer.to_string(PythonWorker.os_pid(worker))])

    ExUnit.Assertions.assert_receive({:DOWN, ^ref, :process, _, {:worker_exited, _}}, 5_000)
  end

  @doc "The `list_streams/0` entry of a worker."
  def stream(worker_id) do
    Enum.find(GrpcStream.list_streams(), &(&1.worker_id == worker_id))
  end

  @doc "Sends a worker command and asserts it was acknowledged."
  def command!(worker, command) do
    {:ok, result} = PythonWorker.command(worker, command)
    result
  end

  @doc """
  Forwards every listed event to the test process as
  `{:event, name, measurements, metadata}`.
  """
  def forward_events(events) do
    id = "test-forwarder-#{System.unique_integer([:positive])}"
    parent = self()

    :ok = :telemetry.attach_many(id, events, &__MODULE__.forward/4, parent)

    ExUnit.Callbacks.on_exit(fn -> :telemetry.detach(id) end)
    id
  end

  @doc false
  def forward(name, measurements, metadata, parent) do
    send(parent, {:event, name, measurements, metadata})
  end

  @doc "Polls `fun` until it returns a truthy value or `timeout` ms pass."
  def await(fun, timeout \\ 10_000) do
    deadline = System.monotonic_time(:millisecond) + timeout
    do_await(fun, deadline)
  end

  defp do_await(fun, deadline) do
    case fun.() do
      result when result not in [nil, false] ->
        result

      _ ->
        if System.monotonic_time(:millisecond) > deadline do
          ExUnit.Assertions.flunk("condition not met in time")
        else
          Process.sleep(10)
          do_await(fun, deadline)
        end
    end
  end
end
