defmodule Snakepit.Telemetry.Application do
  @moduledoc false
  use Application

  @impl Application
  def start(_type, _args) do
    with :ok <- Snakepit.Telemetry.Native.status(),
         :ok <- validate_config(),
         :ok <- register_custom() do
      # Registrations first and rest_for_one: the table of registered workers
      # outlives GrpcStream restarts (see Snakepit.Telemetry.GrpcStream).
      children = [
        Snakepit.Telemetry.Registrations,
        # The process-group scope of Snakepit.Telemetry.Cluster.
        %{id: :pg, start: {:pg, :start_link, [Snakepit.Telemetry.Cluster.scope()]}},
        # Each worker's delivery process (see Snakepit.Telemetry.Delivery).
        {DynamicSupervisor, name: Snakepit.Telemetry.DeliverySupervisor, strategy: :one_for_one},
        Snakepit.Telemetry.GrpcStream,
        Snakepit.Telemetry.Cluster
      ]

      Supervisor.start_link(children, strategy: :rest_for_one, name: Snakepit.Telemetry.Supervisor)
    end
  end

  # An invalid configuration stops the start with a message naming the key
  # (see Snakepit.Telemetry.Config, "Validation").
  defp validate_config do
    case Snakepit.Telemetry.Config.validate() do
      {:ok, _} ->
        :ok

      {:error, message} ->
        require Logger
        Logger.error(message)
        {:error, {:invalid_config, message}}
    end
  end

  # Custom events and keys from the application environment.
  defp register_custom do
    alias Snakepit.Telemetry.Naming

    events = Application.get_env(:snakepit_telemetry, :custom_events, [])
    keys = Application.get_env(:snakepit_telemetry, :custom_keys, [])

    Enum.reduce_while(events, Naming.register_keys(keys), fn
      _event, {:error, _} = error ->
        {:halt, error}

      {python_prefix, event_prefix, actions}, :ok ->
        {:cont, Naming.register_events(python_prefix, event_prefix, actions)}

      other, :ok ->
        {:halt, {:error, {:invalid_custom_event, other}}}
    end)
  end
end
