# Loads the dev/test support modules (Snakepit.Telemetry.JSON and
# Snakepit.Telemetry.PythonWorker) into a build that does not compile them:
# bench/suite.exs and bench/soak.exs run with MIX_ENV=prod, where
# elixirc_paths is lib/ only. A no-op under dev and test.
for {module, file} <- [
      {Snakepit.Telemetry.JSON, "json.ex"},
      {Snakepit.Telemetry.PythonWorker, "python_worker.ex"}
    ],
    not Code.ensure_loaded?(module) do
  Code.require_file(file, __DIR__)
end
