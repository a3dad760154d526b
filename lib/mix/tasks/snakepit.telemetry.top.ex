defmodule Mix.Tasks.Snakepit.Telemetry.Top do
  @shortdoc "Live terminal view of a running node's Python worker telemetry"
  @moduledoc """
  A live view of a running system's telemetry (see `Snakepit.Telemetry.Top`):
  per node, pool and worker, refreshed every second, with keys to sort,
  filter by pool, pause, and steer the selected worker or pool.

      mix snakepit.telemetry.top --node app@127.0.0.1 --cookie secret
      mix snakepit.telemetry.top --node app@127.0.0.1 --once   # one frame, then exit

  Options:

    * `--node NAME` - the node to view (required), over Erlang distribution;
      this task starts a hidden node of its own for that (`top_<os pid>@host`).
      Inside a running node, use `Snakepit.Telemetry.Top.start/1` from iex.
    * `--cookie COOKIE` - the distribution cookie.
    * `--once` - print one frame (after one interval, so rates are filled in)
      and exit.
    * `--lines` / `--screen` - one line per second, or the full-screen view
      (default: the screen when standard output is a terminal, else lines).
    * `--interval MS` (1000), `--timeout MS` (1000), `--sort rate|worker|pool|drops|queue`,
      `--pool NAME`.

  Keys: up/down (or j/k) select, `s` sort, `p` pool filter, space pause,
  `t` toggle the selected worker, `T` its pool, `r` type its sampling rate
  (`R`: its pool's), `q` quit.

  The task does not start the application: it only needs the compiled code
  (the viewed nodes run the application).
  """
  use Mix.Task

  @impl Mix.Task
  def run(argv) do
    Mix.Task.run("compile")
    Mix.Task.run("loadpaths")

    case Snakepit.Telemetry.Top.CLI.main(argv) do
      :ok -> :ok
      {:error, message} -> Mix.raise(message)
    end
  end
end
