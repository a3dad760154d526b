defmodule Mix.Tasks.SnakepitTelemetry.Catalog do
  @shortdoc "Writes the event catalog tables into README.md"
  @moduledoc """
  Regenerates the README's event catalog table and its table of Python
  spans from the catalog compiled into the NIF
  (`native/snakepit_telemetry_core/catalog.toml`).

      mix snakepit_telemetry.catalog          # rewrite README.md
      mix snakepit_telemetry.catalog --check  # exit 1 if README.md is stale
  """
  use Mix.Task

  @impl Mix.Task
  def run(args) do
    Mix.Task.run("app.start")
    path = "README.md"
    readme = File.read!(path)

    updated =
      readme
      |> render(Snakepit.Telemetry.Naming.markdown_table())
      |> render("spans", Snakepit.Telemetry.Naming.span_markdown_table())

    cond do
      updated == readme ->
        Mix.shell().info("README.md catalog is up to date")

      "--check" in args ->
        Mix.raise("README.md catalog is stale: run mix snakepit_telemetry.catalog")

      true ->
        File.write!(path, updated)
        Mix.shell().info("README.md catalog updated")
    end
  end

  @doc "The README text with the catalog table between its markers replaced."
  @spec render(String.t(), String.t()) :: String.t()
  def render(readme, table), do: render(readme, "catalog", table)

  @doc """
  The README text with the table between the `<!-- name:begin -->` and
  `<!-- name:end -->` markers replaced.
  """
  @spec render(String.t(), String.t(), String.t()) :: String.t()
  def render(readme, name, table) do
    begin = "<!-- #{name}:begin -->\n"
    finish = "<!-- #{name}:end -->"

    case String.split(readme, [begin, finish]) do
      [before, _old, rest] -> before <> begin <> table <> finish <> rest
      _ -> Mix.raise("README.md lacks the #{name}:begin/#{name}:end markers")
    end
  end
end
