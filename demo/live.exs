# Live control from iex: a Python worker runs a steady workload while this
# prints, every second, how many events arrived. Change its telemetry from
# the prompt and watch the figures move:
#
#   Snakepit.Telemetry.GrpcStream.update_sampling("worker_1", 0.1)
#   Snakepit.Telemetry.GrpcStream.update_sampling("worker_1", 0.0, ["tool.*"])
#   Snakepit.Telemetry.GrpcStream.update_filter("worker_1", deny: ["python.call.*"])
#   Snakepit.Telemetry.GrpcStream.toggle("worker_1", false)
#   Snakepit.Telemetry.GrpcStream.list_streams()
#   LiveDemo.quiet()   # stop printing
#
# The live view shows the same (and steers it with keys): from this prompt
# `LiveDemo.quiet(); Snakepit.Telemetry.Top.start()` (type q and Enter to
# leave it), or from another terminal, in this directory:
#   mix snakepit.telemetry.top --node demo_live@127.0.0.1 --cookie snakepit_demo
#
# Start it with `script/demo --live` (iex --name demo_live@127.0.0.1 --cookie
# snakepit_demo -S mix run demo/live.exs).

alias Snakepit.Telemetry.{GrpcStream, Naming, PythonWorker}

defmodule LiveDemo do
  @moduledoc false

  def count(event, _measurements, _metadata, table) do
    :ets.update_counter(table, event, 1, {event, 0})
  end

  def report(table) do
    Process.sleep(1_000)
    counts = :ets.tab2list(table)
    :ets.delete_all_objects(table)

    line =
      counts
      |> Enum.sort()
      |> Enum.map_join("  ", fn {event, n} ->
        "#{event |> Enum.drop(2) |> Enum.join(".")}=#{n}"
      end)

    IO.puts("[live] events/s: " <> if(line == "", do: "(none)", else: line))
    report(table)
  end

  def quiet do
    :telemetry.detach("live-demo")

    case Process.whereis(:live_demo_reporter) do
      nil -> :ok
      pid -> Process.exit(pid, :kill)
    end
  end
end

# A private unix socket and a secret: only this VM may open the worker's
# telemetry call (see the README's Security section).
secret = Snakepit.Telemetry.Secret.new()

{:ok, worker} =
  PythonWorker.start_link(
    listen: Snakepit.Telemetry.Config.socket_path("worker_1"),
    env: Snakepit.Telemetry.Config.worker_env(:demo, secret: secret)
  )

Process.unlink(worker)

:ok =
  GrpcStream.register_worker(
    worker_id: "worker_1",
    pool_name: :demo,
    address: PythonWorker.address(worker),
    secret: secret
  )

{:ok, _} = PythonWorker.command(worker, %{cmd: "workload", calls: 1_000_000, interval_ms: 10})
# The reporter owns the counts table: this script's process ends once iex starts.
reporter =
  spawn(fn ->
    table = :ets.new(:live_demo_counts, [:public, :set, write_concurrency: true])
    :telemetry.attach_many("live-demo", Naming.events(), &LiveDemo.count/4, table)
    LiveDemo.report(table)
  end)

Process.register(reporter, :live_demo_reporter)

IO.puts("""
worker_1 is running about 100 Python calls per second. Try:
  Snakepit.Telemetry.GrpcStream.update_sampling("worker_1", 0.1)
  Snakepit.Telemetry.GrpcStream.toggle("worker_1", false)
  LiveDemo.quiet()
The live view: LiveDemo.quiet(); Snakepit.Telemetry.Top.start()   (q, Enter: leave)
or in another terminal: mix snakepit.telemetry.top --node #{node()} --cookie #{Node.get_cookie()}
""")
