defmodule Mix.Tasks.Compile.SnakepitNative do
  @moduledoc false
  # Builds the NIF crate with cargo (release) and installs the library as
  # priv/native/snakepit_telemetry_nif.so in the application's build
  # directory, where Snakepit.Telemetry.Native.nif_path/0 looks
  # (:code.priv_dir/1). Defined here rather than in lib/ because it must
  # exist before the project's own modules are compiled.
  #
  # Built on its own (this checkout), cargo's target directory is target/
  # beside Cargo.toml, shared with `cargo test`. Built as a dependency of a
  # host app, nothing is written into the dependency's sources: cargo builds
  # in <host _build>/<env>/lib/snakepit_telemetry/native/target and the
  # application's priv/ in _build becomes a copy of the sources' priv/
  # rather than Mix's symlink to it. CARGO_TARGET_DIR overrides the target
  # directory in both cases (a host can point it at a shared one).
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

    root = Path.dirname(Mix.Project.project_file())
    app_path = Mix.Project.app_path()
    # A dependency is built into its host's _build, outside its directory.
    dependency? = not inside?(Mix.Project.build_path(), root)
    target_dir = target_dir(root, app_path, dependency?)

    # cargo is --quiet; say why a first build in this target directory is slow.
    unless library(target_dir) do
      Mix.shell().info(
        "==> snakepit_telemetry: building the NIF with cargo (release) in #{target_dir}; " <>
          "a first build takes minutes"
      )
    end

    # Arguments, not a shell line: paths with spaces are fine.
    args = ["build", "--release", "--quiet", "-p", @crate, "--target-dir", target_dir]

    case System.cmd(cargo, args,
           cd: root,
           stderr_to_stdout: true,
           into: IO.stream(:stdio, :line)
         ) do
      {_, 0} -> install(root, app_path, target_dir, dependency?)
      {_, status} -> Mix.raise("snakepit_telemetry: cargo build failed (exit #{status})")
    end
  end

  defp target_dir(root, app_path, dependency?) do
    case System.get_env("CARGO_TARGET_DIR") do
      dir when dir not in [nil, ""] -> Path.expand(dir, root)
      _ when dependency? -> Path.join([app_path, "native", "target"])
      _ -> Path.join(root, "target")
    end
  end

  # The library cargo built in target_dir, or nil.
  defp library(target_dir) do
    ["lib#{@crate}.so", "lib#{@crate}.dylib"]
    |> Enum.map(&Path.join([target_dir, "release", &1]))
    |> Enum.find(&File.exists?/1)
  end

  defp inside?(path, dir) do
    path = Path.expand(path)
    dir = Path.expand(dir)
    path == dir or String.starts_with?(path, dir <> "/")
  end

  defp install(root, app_path, target_dir, dependency?) do
    source =
      library(target_dir) ||
        Mix.raise("snakepit_telemetry: cargo built no library for #{@crate} in #{target_dir}")

    priv = Path.join(app_path, "priv")
    if dependency?, do: own_priv(Path.join(root, "priv"), priv)

    target = Path.join([priv, "native", "#{@crate}.so"])
    File.mkdir_p!(Path.dirname(target))

    if File.exists?(target) and File.read!(target) == File.read!(source) do
      {:noop, []}
    else
      # Copy to a temporary name and rename, so a VM that has the old
      # library loaded never sees a half-written file (the name is unique:
      # two builds may install at once).
      tmp = "#{target}.#{System.unique_integer([:positive])}.#{System.os_time()}.tmp"
      File.cp!(source, tmp)
      File.rename!(tmp, target)
      {:ok, []}
    end
  end

  # Mix links a dependency's _build priv/ to the priv/ of its sources; the
  # library would then be written into the sources. Replace the link with a
  # copy (Mix keeps a directory there and copies newer files into it on later
  # builds; a release copies it as it would the link's target).
  defp own_priv(source, priv) do
    case File.read_link(priv) do
      {:ok, _} ->
        File.rm!(priv)
        if File.dir?(source), do: File.cp_r!(source, priv), else: File.mkdir_p!(priv)

      {:error, _} ->
        File.mkdir_p!(priv)
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
        priv/python/snakepit_telemetry priv/python/snakepit_bridge
        priv/python/pyproject.toml priv/python/MANIFEST.in
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
