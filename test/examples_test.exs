# Loaded before the module below compiles, so its calls resolve.
Code.require_file("../examples/statsd_forwarder.exs", __DIR__)
Code.require_file("../examples/prometheus_text.exs", __DIR__)

defmodule Snakepit.Telemetry.ExamplesTest do
  # The client guide's examples (guides/client_guide.md, examples/) run here.
  use Snakepit.Telemetry.Case, async: false

  @stop [:snakepit, :python, :call, :stop]

  test "the StatsD forwarder sends DogStatsD lines for events from a real worker" do
    {:ok, receiver} = :gen_udp.open(0, [:binary, active: true])
    {:ok, port} = :inet.port(receiver)
    Examples.StatsdForwarder.attach(host: ~c"127.0.0.1", port: port)
    on_exit(&Examples.StatsdForwarder.detach/0)

    worker = start_worker!()
    worker_id = register!(worker, pool_name: :guide)

    command!(worker, %{
      cmd: "emit",
      event: "python.call.stop",
      measurements: %{duration: 2_500_000}
    })

    assert_receive {:udp, ^receiver, _, _, line}, 5_000

    assert line ==
             "snakepit.python.call.stop.duration:2.5|ms|#pool_name:guide,worker_id:#{worker_id},reason:"

    # An exception's reason (a PythonError) becomes its Python type.
    command!(worker, %{cmd: "span", name: "python.call", fail: true})
    assert_receive {:udp, ^receiver, _, _, line}, 5_000

    assert line =~
             ~r/^snakepit\.python\.call\.exception\.duration:[0-9.]+\|ms\|#pool_name:guide,worker_id:#{worker_id},reason:RuntimeError$/
  end

  test "the Prometheus example renders a summary" do
    Examples.PrometheusText.attach()
    on_exit(&Examples.PrometheusText.detach/0)
    meta = %{pool_name: :guide, worker_id: "w9"}

    :telemetry.execute(
      @stop,
      %{duration: System.convert_time_unit(1500, :millisecond, :native)},
      meta
    )

    :telemetry.execute(
      @stop,
      %{duration: System.convert_time_unit(500, :millisecond, :native)},
      meta
    )

    text = Examples.PrometheusText.render()

    assert text =~
             ~s(snakepit_python_call_duration_seconds_count{pool="guide",worker="w9",outcome="stop"} 2\n)

    assert text =~
             ~s(snakepit_python_call_duration_seconds_sum{pool="guide",worker="w9",outcome="stop"} 2.0\n)
  end
end
