defmodule Snakepit.Telemetry.InstallTest do
  # Installation as a mix dependency, end to end (README "Installation"): a
  # throwaway host project in a temporary directory (its path has spaces)
  # depends on this checkout by `path:`, is compiled (the NIF built by cargo
  # from the dependency's directory) and run with `mix run`, and its handler
  # receives an event from a real Python worker that the host started with the
  # dependency's Python package. The host runs with an empty MIX_HOME (no Hex
  # archive), HEX_OFFLINE=1 and SNAKEPIT_TELEMETRY_LOCAL_DEPS=1, so resolving
  # `telemetry` through Hex would fail its build.
  #
  # Cost: cargo's target directory is this checkout's target/
  # (CARGO_TARGET_DIR), where `mix compile` has just built the same crates from
  # the same sources, so cargo finds them fresh; the host then compiles the
  # Elixir code (a few seconds). A copy of the dependency elsewhere would not
  # do: cargo names the cdylib without a hash, so two source paths sharing a
  # target directory rebuild the NIF in turn. That the hex package holds what
  # the build reads is checked from cargo's dep-info instead (second test).
  use ExUnit.Case, async: false

  @moduletag timeout: 900_000

  @root Path.expand("../../..", __DIR__)
  @host_run Path.join(@root, "test/support/host_app/host_run.exs")
  @command_worker Path.join(@root, "support/python/command_worker.py")

  setup do
    tmp =
      Path.join(
        System.tmp_dir!(),
        "snakepit_telemetry install #{System.unique_integer([:positive])}"
      )

    on_exit(fn -> File.rm_rf!(tmp) end)
    host = Path.join(tmp, "host app")
    mix_home = Path.join(tmp, "mix home")
    File.mkdir_p!(Path.join(host, "lib"))
    File.mkdir_p!(mix_home)
    %{host: host, mix_home: mix_home}
  end

  test "a host app depending on this checkout by path: builds the NIF, starts, and receives a worker's event",
       %{host: host, mix_home: mix_home} do
    File.write!(Path.join(host, "mix.exs"), host_mix_exs(@root))
    File.cp!(@host_run, Path.join(host, "host_run.exs"))
    dep_priv = snapshot(Path.join(@root, "priv"))

    {out, status} = mix(host, mix_home, ["deps.get"])
    assert status == 0, out

    {out, status} = mix(host, mix_home, ["compile"])
    assert status == 0, out
    refute out =~ "Hex", out

    # The library is installed in the host's _build, not in the dependency.
    app = Path.join([host, "_build", "dev", "lib", "snakepit_telemetry"])
    nif = Path.join([app, "priv", "native", "snakepit_telemetry_nif.so"])
    assert File.regular?(nif)
    assert {:error, _} = File.read_link(Path.join(app, "priv"))
    assert File.regular?(Path.join([app, "priv", "python", "pyproject.toml"]))

    assert snapshot(Path.join(@root, "priv")) == dep_priv,
           "the build wrote into the dependency's priv/"

    {out, status} = mix(host, mix_home, ["run", "host_run.exs", python(), @command_worker])
    assert status == 0, out
    assert out =~ "HOST_INFO nif_path=#{nif}\n", out
    assert out =~ "HOST_INFO nif_status=:ok\n", out
    assert out =~ "HOST_INFO support=false\n", out

    assert out =~
             "HOST_EVENT [:snakepit, :python, :tool, :result_size] worker_id=host-worker-1 " <>
               "pool_name=:host_pool tool=host-check bytes=42\n",
           out

    assert snapshot(Path.join(@root, "priv")) == dep_priv,
           "the host wrote into the dependency's priv/"
  end

  test "the hex package holds every file of this checkout that cargo read to build the NIF" do
    # cargo's dep-info for the library: "<output>: <input> <input> ...", with
    # the spaces inside a path escaped as "\\ ".
    dep_info = Path.join([cargo_target_dir(), "release", "libsnakepit_telemetry_nif.d"])
    assert File.regular?(dep_info), "no #{dep_info}: run mix compile"
    [_output, inputs] = dep_info |> File.read!() |> String.split(": ", parts: 2)

    read =
      inputs
      |> String.split(~r/(?<!\\)\s+/, trim: true)
      |> Enum.map(&(&1 |> String.replace("\\ ", " ") |> Path.expand()))
      # Sources of this checkout; not what build scripts generated.
      |> Enum.filter(&String.starts_with?(&1, @root <> "/"))
      |> Enum.reject(&String.starts_with?(&1, cargo_target_dir() <> "/"))
      |> Enum.map(&Path.relative_to(&1, @root))

    assert "native/snakepit_telemetry_nif/src/lib.rs" in read
    assert "proto/snakepit_bridge.proto" in read

    package = Mix.Project.get!().package()

    shipped? = fn file ->
      Enum.any?(package[:files], &(file == &1 or String.starts_with?(file, &1 <> "/")))
    end

    # Besides the sources, cargo reads the manifests and the lock file.
    manifests = ~w(Cargo.toml Cargo.lock native/snakepit_telemetry_core/Cargo.toml
                   native/snakepit_telemetry_nif/Cargo.toml mix.exs)

    for file <- read ++ manifests do
      assert shipped?.(file), "the hex package lacks #{file}, which the NIF build reads"
    end
  end

  defp host_mix_exs(dep) do
    """
    defmodule HostApp.MixProject do
      use Mix.Project

      def project do
        [app: :host_app, version: "0.1.0", elixir: "~> 1.14", deps: deps()]
      end

      def application, do: [extra_applications: [:logger]]

      defp deps, do: [{:snakepit_telemetry, path: #{inspect(dep)}}]
    end
    """
  end

  # `mix` in the host with the environment a host without Hex has.
  defp mix(host, mix_home, args) do
    env = [
      {"MIX_ENV", "dev"},
      {"MIX_HOME", mix_home},
      {"HEX_HOME", mix_home},
      {"HEX_OFFLINE", "1"},
      {"SNAKEPIT_TELEMETRY_LOCAL_DEPS", "1"},
      {"CARGO_TARGET_DIR", cargo_target_dir()},
      # Nothing of this project's own test run leaks into the host's.
      {"SNAKEPIT_TELEMETRY_NIF_PATH", nil},
      {"SNAKEPIT_TELEMETRY_SKIP_CARGO", nil},
      {"MIX_EXS", nil},
      {"MIX_BUILD_PATH", nil},
      {"MIX_BUILD_ROOT", nil},
      {"MIX_DEPS_PATH", nil},
      {"MIX_LOCKFILE", nil}
    ]

    System.cmd(System.find_executable("mix"), args, cd: host, env: env, stderr_to_stdout: true)
  end

  # Where this checkout's `mix compile` has its cargo build the NIF.
  defp cargo_target_dir do
    case System.get_env("CARGO_TARGET_DIR") do
      dir when dir not in [nil, ""] -> Path.expand(dir, @root)
      _ -> Path.join(@root, "target")
    end
  end

  defp python do
    python = Snakepit.Telemetry.PythonWorker.default_python()
    System.find_executable(python) || flunk("no Python interpreter: #{python}")
  end

  # Every file and directory under `dir`, with its size and modification time.
  defp snapshot(dir) do
    dir
    |> Path.join("**")
    |> Path.wildcard(match_dot: true)
    |> Enum.map(fn path ->
      stat = File.lstat!(path)
      {Path.relative_to(path, dir), stat.type, stat.size, stat.mtime}
    end)
    |> Enum.sort()
  end
end
