defmodule Telemetry.MixProject do
  use Mix.Project

  # Local stand-in for the hex package `telemetry` (beam-telemetry/telemetry),
  # used only when hex.pm cannot be reached. See README.md.
  def project do
    [
      app: :telemetry,
      version: "1.4.1",
      language: :erlang,
      elixir: "~> 1.14",
      erlc_paths: ["src"],
      erlc_options: erlc_options(Mix.env()),
      compilers: [:erlang, :app],
      start_permanent: Mix.env() == :prod,
      deps: []
    ]
  end

  # `mix compile --warnings-as-errors` does not cover Erlang sources on
  # Elixir 1.14, so the standalone test build turns Erlang warnings into
  # errors itself. As a dependency (compiled in :prod) a warning from a newer
  # OTP release must not break the host project's build.
  defp erlc_options(:test), do: [:debug_info, :warnings_as_errors]
  defp erlc_options(_env), do: [:debug_info]

  def application do
    [
      description: ~c"Dynamic dispatching of events (local compat build of hex telemetry)",
      registered: [:telemetry_sup, :telemetry_handler_table],
      mod: {:telemetry_app, []},
      extra_applications: []
    ]
  end
end
