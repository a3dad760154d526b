defmodule Snakepit.Telemetry.Registrations do
  @moduledoc false
  # Keeps GrpcStream's registrations outside GrpcStream, in an ETS table
  # owned by this process, so a crash and restart of GrpcStream loses
  # neither the workers nor their control state: the new GrpcStream reads
  # them back and reopens every stream. The supervisor starts this process
  # first, with :rest_for_one, so if it ever dies GrpcStream restarts too
  # (and finds an empty table, consistently).
  #
  # A second table holds each registration's Python counters (see
  # Snakepit.Telemetry.Delivery), written by the worker's delivery process
  # under the registration's key, so they survive the restart of a delivery
  # process or of GrpcStream.
  use GenServer

  @table __MODULE__
  @python Module.concat(__MODULE__, Python)
  @no_python %{current: %{}, instance: nil, base: %{}, at: nil, implementation: nil}

  def start_link(_opts), do: GenServer.start_link(__MODULE__, nil, name: __MODULE__)

  @impl GenServer
  def init(nil) do
    :ets.new(@table, [:named_table, :public, :set, read_concurrency: true])
    :ets.new(@python, [:named_table, :public, :set, read_concurrency: true])
    {:ok, nil}
  end

  @spec put(String.t(), map()) :: true
  def put(worker_id, registration), do: :ets.insert(@table, {worker_id, registration})

  @spec delete(String.t()) :: true
  def delete(worker_id), do: :ets.delete(@table, worker_id)

  @spec all() :: [{String.t(), map()}]
  def all, do: :ets.tab2list(@table)

  @doc "A registration's Python counters: `%{current:, instance:, base:, at:}`."
  @spec python(reference()) :: map()
  def python(key) do
    case :ets.lookup(@python, key) do
      [{^key, python}] -> python
      [] -> @no_python
    end
  end

  @spec put_python(reference(), map()) :: true
  def put_python(key, python), do: :ets.insert(@python, {key, python})

  @spec delete_python(reference()) :: true
  def delete_python(key), do: :ets.delete(@python, key)
end
