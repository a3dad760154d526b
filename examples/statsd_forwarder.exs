# Forwards Snakepit telemetry to StatsD (DogStatsD tags) with nothing but
# :gen_udp. With hex.pm available, TelemetryMetricsStatsd does the same from
# Telemetry.Metrics definitions; this shows the mapping in a few lines.
#
#   Code.require_file("examples/statsd_forwarder.exs")
#   Examples.StatsdForwarder.attach(host: ~c"127.0.0.1", port: 8125)

defmodule Examples.StatsdForwarder do
  @moduledoc false

  @events [
    [:snakepit, :python, :call, :stop],
    [:snakepit, :python, :call, :exception],
    [:snakepit, :telemetry, :events, :dropped]
  ]

  def attach(opts) do
    {:ok, socket} = :gen_udp.open(0, [:binary])

    config = %{
      socket: socket,
      host: opts[:host],
      port: opts[:port],
      prefix: opts[:prefix] || "snakepit"
    }

    :ok = :telemetry.attach_many("examples-statsd", @events, &__MODULE__.handle/4, config)
    socket
  end

  def detach, do: :telemetry.detach("examples-statsd")

  def handle(event, measurements, metadata, config) do
    name = Enum.join([config.prefix | Enum.drop(event, 1)], ".")
    tags = Enum.map_join([:pool_name, :worker_id, :reason], ",", &"#{&1}:#{tag(metadata[&1])}")

    line =
      case measurements do
        %{duration: d} ->
          "#{name}.duration:#{System.convert_time_unit(d, :native, :microsecond) / 1000}|ms|##{tags}"

        %{count: n} ->
          "#{name}:#{n}|c|##{tags}"
      end

    :gen_udp.send(config.socket, config.host, config.port, line)
  end

  # A Python exception's reason is a %Snakepit.Telemetry.PythonError{}: tag
  # it with the Python exception type.
  defp tag(%Snakepit.Telemetry.PythonError{type: type}), do: type
  defp tag(value), do: value
end
