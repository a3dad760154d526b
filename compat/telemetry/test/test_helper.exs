# The app is built as an Erlang application (it does not depend on Elixir or
# Elixir's :logger), so start :logger here for ExUnit's log capturing.
{:ok, _} = Application.ensure_all_started(:logger)

# Failing handlers, the deprecated number form of execute/3 and anonymous
# handlers all log on purpose; show logs only for failing tests.
ExUnit.start(capture_log: true)
