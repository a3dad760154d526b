# Aggregates Snakepit telemetry into Prometheus metrics (text exposition
# format) with an ETS table. With hex.pm available,
# TelemetryMetricsPrometheus serves the same from Telemetry.Metrics
# definitions, e.g. summary("snakepit.python.call.stop.duration").
#
#   Code.require_file("examples/prometheus_text.exs")
#   Examples.PrometheusText.attach()
#   IO.puts(Examples.PrometheusText.render())

defmodule Examples.PrometheusText do
  @moduledoc false

  @table :examples_prometheus
  @events [[:snakepit, :python, :call, :stop], [:snakepit, :python, :call, :exception]]

  def attach do
    if :ets.info(@table) == :undefined, do: :ets.new(@table, [:named_table, :public, :set])
    :telemetry.attach_many("examples-prometheus", @events, &__MODULE__.handle/4, nil)
  end

  def detach, do: :telemetry.detach("examples-prometheus")

  def handle([_, _, :call, outcome], %{duration: d}, metadata, _config) do
    seconds = System.convert_time_unit(d, :native, :nanosecond) / 1.0e9
    labels = ~s(pool="#{metadata.pool_name}",worker="#{metadata.worker_id}",outcome="#{outcome}")
    :ets.update_counter(@table, {:count, labels}, 1, {{:count, labels}, 0})
    # Sums are kept in nanoseconds so ETS counters (integers) can hold them.
    :ets.update_counter(@table, {:sum_ns, labels}, round(seconds * 1.0e9), {{:sum_ns, labels}, 0})
  end

  def render do
    rows = :ets.tab2list(@table) |> Enum.sort()

    lines =
      for {{kind, labels}, value} <- rows do
        case kind do
          :count -> "snakepit_python_call_duration_seconds_count{#{labels}} #{value}"
          :sum_ns -> "snakepit_python_call_duration_seconds_sum{#{labels}} #{value / 1.0e9}"
        end
      end

    Enum.join(["# TYPE snakepit_python_call_duration_seconds summary" | lines], "\n") <> "\n"
  end
end
