defmodule Snakepit.Telemetry.Application do
  @moduledoc false
  use Application

  @impl Application
  def start(_type, _args) do
    with :ok <- Snakepit.Telemetry.Native.status() do
      children = [Snakepit.Telemetry.GrpcStream]
      Supervisor.start_link(children, strategy: :one_for_one, name: Snakepit.Telemetry.Supervisor)
    end
  end
end
