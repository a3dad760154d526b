defmodule Snakepit.Telemetry.EndingWorker do
  @moduledoc false
  # Runs test/support/python/ending_worker.py (a worker that ends every
  # telemetry call right after accepting it) under a port owned by the
  # caller; the worker exits when the port closes, e.g. when the caller exits.
  # It prints "CALL <n>" per accepted call; those lines arrive as port messages.

  alias Snakepit.Telemetry.PythonWorker

  @doc "Starts the worker; returns `{port, address}` once it listens."
  def start!(args \\ []) do
    script = Path.expand("python/ending_worker.py", __DIR__)

    port =
      Port.open(
        {:spawn_executable, PythonWorker.default_python()},
        [:binary, :exit_status, :use_stdio, :hide, {:line, 4096}, {:args, ["-u", script | args]}]
      )

    receive do
      {^port, {:data, {:eol, "SNAKEPIT_TELEMETRY_READY " <> address}}} -> {port, address}
      {^port, {:exit_status, status}} -> raise "ending_worker.py exited with #{status}"
    after
      15_000 -> raise "ending_worker.py did not start"
    end
  end
end
