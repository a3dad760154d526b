defmodule Snakepit.Telemetry.Application do
  @moduledoc false
  use Application

  @impl Application
  def start(_type, _args) do
    with :ok <- Snakepit.Telemetry.Native.status() do
      # Registrations first and rest_for_one: the table of registered workers
      # outlives GrpcStream restarts (see Snakepit.Telemetry.GrpcStream).
      children = [Snakepit.Telemetry.Registrations, Snakepit.Telemetry.GrpcStream]

      Supervisor.start_link(children, strategy: :rest_for_one, name: Snakepit.Telemetry.Supervisor)
    end
  end
end
