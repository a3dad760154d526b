defmodule Mix.Tasks.Compile.SnakepitNative do
  @moduledoc false
  # Builds the NIF crate with cargo (release) and copies the library to
  # priv/native. Defined here rather than in lib/ because it must exist
  # before the project's own modules are compiled.
  use Mix.Task.Compiler

  @crate "snakepit_telemetry_nif"

  @impl Mix.Task.Compiler
  def run(_args) do
    if System.get_env("SNAKEPIT_TELEMETRY_SKIP_CARGO") in ["1", "true"] do
      {:noop, []}
    else
      build()
    end
  end

  defp build do
    cargo =
      System.find_executable("cargo") ||
        Mix.raise("""
        snakepit_telemetry: `cargo` was not found, and it is needed to build the NIF.
        Install Rust (https://rustup.rs) or run script/setup, then `mix compile` again.
        """)

    root = File.cwd!()

    case System.cmd(cargo, ["build", "--release", "--quiet", "-p", @crate],
           cd: root,
           stderr_to_stdout: true,
           into: IO.stream(:stdio, :line)
         ) do
      {_, 0} -> install(root)
      {_, status} -> Mix.raise("snakepit_telemetry: cargo build failed (exit #{status})")
    end
  end

  defp install(root) do
    source =
      Enum.find(
        Enum.map(
          ["lib#{@crate}.so", "lib#{@crate}.dylib"],
          &Path.join([root, "target", "release", &1])
        ),
        &File.exists?/1
      ) || Mix.raise("snakepit_telemetry: cargo built no library for #{@crate}")

    target = Path.join([root, "priv", "native", "#{@crate}.so"])
    File.mkdir_p!(Path.dirname(target))

    if File.exists?(target) and File.read!(target) == File.read!(source) do
      {:noop, []}
    else
      # Copy to a temporary name and rename, so a VM that has the old
      # library loaded never sees a half-written file.
      File.cp!(source, target <> ".tmp")
      File.rename!(target <> ".tmp", target)
      {:ok, []}
    end
  end
end

defmodule Snakepit.Telemetry.MixProject do
  use Mix.Project

  def project do
    [
      app: :snakepit_telemetry,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      compilers: [:snakepit_native | Mix.compilers()],
      elixirc_paths: elixirc_paths(Mix.env()),
      deps: deps(),
      description: "Telemetry for Snakepit's Python workers, folded into :telemetry events.",
      package: package()
    ]
  end

  def application do
    [
      extra_applications: [:logger, :crypto],
      mod: {Snakepit.Telemetry.Application, []}
    ]
  end

  # The library is lib/ alone. support/ (Snakepit.Telemetry.PythonWorker,
  # Snakepit.Telemetry.JSON and the Python command worker they run) serves the
  # demo, the tests and the benchmarks, so it is compiled for dev and test only;
  # bench/ (MIX_ENV=prod) loads it with support/load.exs. Public for
  # test/snakepit/telemetry/package_test.exs.
  @doc false
  def elixirc_paths(:test), do: ["lib", "support", "test/support"]
  def elixirc_paths(:dev), do: ["lib", "support"]
  def elixirc_paths(_), do: ["lib"]

  # What the hex package ships: the library, the Python package (installed
  # into a Snakepit worker's environment with pip from priv/python) and what
  # `mix compile` needs to build the NIF. Not support/, demo/, bench/, test/,
  # examples/ nor priv/python/tests (package_test.exs checks it).
  @doc false
  def package do
    [
      files: ~w(
        lib
        priv/python/snakepit_bridge priv/python/pyproject.toml priv/python/MANIFEST.in
        proto native/snakepit_telemetry_core native/snakepit_telemetry_nif
        Cargo.toml Cargo.lock mix.exs .formatter.exs README.md CHANGELOG.md
      ),
      exclude_patterns: [~r/__pycache__/, ~r/\.pyc$/]
    ]
  end

  defp deps do
    [telemetry_dep()]
  end

  # Users get the hex package. This build machine cannot reach hex.pm, so the
  # project's own scripts set SNAKEPIT_TELEMETRY_LOCAL_DEPS=1 to use the
  # API-compatible application in compat/telemetry instead (see README).
  defp telemetry_dep do
    if System.get_env("SNAKEPIT_TELEMETRY_LOCAL_DEPS") in ["1", "true"] do
      {:telemetry, path: "compat/telemetry"}
    else
      {:telemetry, "~> 1.2"}
    end
  end
end
