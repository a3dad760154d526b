defmodule Snakepit.Telemetry.PackageTest do
  # What ships is the library: the prod build (elixirc_paths(:prod)) and the
  # hex package (package()[:files]) leave out the dev/test support in
  # support/ (PythonWorker, JSON, the Python command worker), and no module of
  # the prod build calls a module compiled from anywhere else.
  use ExUnit.Case, async: true

  @root Path.expand("../../..", __DIR__)
  @support_modules [Snakepit.Telemetry.PythonWorker, Snakepit.Telemetry.JSON]
  @not_shipped ~w(support test demo bench examples guides compat script .ci
                  native/fuzz priv/python/tests priv/python/tools priv/native)

  defp project, do: Mix.Project.get!()

  defp under?(path, dir), do: path == dir or String.starts_with?(path, dir <> "/")

  defp source(module) do
    module.module_info(:compile)[:source] |> List.to_string() |> Path.relative_to(@root)
  end

  # {prod modules, other modules} of this (test) build, by source file.
  defp split_modules do
    prod_paths = project().elixirc_paths(:prod)
    {:ok, modules} = :application.get_key(:snakepit_telemetry, :modules)
    Enum.split_with(modules, fn m -> Enum.any?(prod_paths, &under?(source(m), &1)) end)
  end

  test "elixirc_paths(:prod) holds none of the support, test, demo or bench directories" do
    prod_paths = project().elixirc_paths(:prod)
    assert "lib" in prod_paths

    for path <- prod_paths, dir <- @not_shipped do
      refute under?(path, dir), "#{path} is compiled for prod"
    end

    # The support modules are compiled for test (and dev), from support/.
    assert "support" in project().elixirc_paths(:test)
    assert "support" in project().elixirc_paths(:dev)
  end

  test "the support modules are not prod modules, and no prod module calls a non-prod one" do
    {prod, other} = split_modules()
    assert Enum.all?(@support_modules, &(&1 in other))
    assert Snakepit.Telemetry.GrpcStream in prod

    # Remote calls (the beam's import table) from every prod module.
    for module <- prod do
      {:ok, {^module, [imports: imports]}} = :beam_lib.chunks(:code.which(module), [:imports])
      called = imports |> Enum.map(&elem(&1, 0)) |> Enum.uniq()

      assert called -- other == called,
             "#{inspect(module)} calls #{inspect(Enum.filter(called, &(&1 in other)))}"
    end
  end

  test "the hex package ships lib/, the Python package and the NIF sources, and no support" do
    package = project().package()

    files =
      package[:files]
      |> Enum.flat_map(fn entry ->
        path = Path.join(@root, entry)
        assert File.exists?(path), "package file #{entry} does not exist"

        if File.dir?(path),
          do: path |> Path.join("**") |> Path.wildcard(match_dot: true),
          else: [path]
      end)
      |> Enum.filter(&File.regular?/1)
      |> Enum.map(&Path.relative_to(&1, @root))
      |> Enum.reject(fn f -> Enum.any?(package[:exclude_patterns] || [], &(f =~ &1)) end)

    for file <- files, dir <- @not_shipped do
      refute under?(file, dir), "the package ships #{file}"
    end

    for file <- files do
      refute Path.basename(file) in ~w(command_worker.py python_worker.ex json.ex worker.py),
             "the package ships #{file}"

      refute file =~ ~r/__pycache__|\.pyc$/, "the package ships #{file}"
    end

    {prod, _} = split_modules()
    for module <- prod, do: assert(source(module) in files, "#{source(module)} not shipped")

    for file <- ~w(priv/python/pyproject.toml priv/python/snakepit_telemetry/telemetry/__init__.py
                   priv/python/snakepit_telemetry/telemetry/backends/grpc.py
                   priv/python/snakepit_telemetry/snakepit_bridge_pb2.py
                   priv/python/snakepit_bridge/__init__.py proto/snakepit_bridge.proto
                   native/snakepit_telemetry_core/catalog.toml Cargo.lock),
        do: assert(file in files, "#{file} not shipped")
  end
end
