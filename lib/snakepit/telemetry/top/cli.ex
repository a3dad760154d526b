defmodule Snakepit.Telemetry.Top.CLI do
  @moduledoc """
  The command line of `mix snakepit.telemetry.top` (see that task), also
  callable from a plain `elixir` with the compiled code on its path:

      elixir --hidden --name top@127.0.0.1 --cookie COOKIE \\
        -pa _build/dev/lib/snakepit_telemetry/ebin -pa _build/dev/lib/telemetry/ebin \\
        -e 'Snakepit.Telemetry.Top.CLI.main(["--node", "app@127.0.0.1"])'

  When this VM is not distributed yet, it becomes a hidden node
  (`top_<os pid>@<host of --node>`, long or short names as `--node` is),
  starting `epmd` if needed, so it never joins the viewed cluster.
  """

  alias Snakepit.Telemetry.Top

  @switches [
    node: :string,
    cookie: :string,
    once: :boolean,
    interval: :integer,
    sort: :string,
    pool: :string,
    lines: :boolean,
    screen: :boolean,
    timeout: :integer
  ]

  @doc "Parses `argv`, connects, runs the view; returns `:ok` or `{:error, message}`."
  @spec main([String.t()]) :: :ok | {:error, String.t()}
  def main(argv) do
    with {:ok, opts} <- parse(argv),
         :ok <- require_node(opts),
         :ok <- connect(opts) do
      Top.run(top_opts(opts))
    end
  end

  defp require_node(opts) do
    if opts[:node],
      do: :ok,
      else:
        {:error,
         "give the node to view: --node name@host [--cookie COOKIE] " <>
           "(inside a running node, from iex: Snakepit.Telemetry.Top.start())"}
  end

  @doc false
  def parse(argv) do
    case OptionParser.parse(argv, strict: @switches) do
      {opts, [], []} -> {:ok, opts}
      {_, rest, []} -> {:error, "unexpected arguments: #{Enum.join(rest, " ")}"}
      {_, _, invalid} -> {:error, "invalid options: #{inspect(invalid)}"}
    end
  end

  defp top_opts(opts) do
    output =
      cond do
        opts[:lines] -> [output: :lines]
        opts[:screen] -> [output: :screen]
        true -> []
      end

    sort =
      case opts[:sort] do
        nil -> []
        name -> [sort: Enum.find(Top.State.sorts(), :rate, &(Atom.to_string(&1) == name))]
      end

    [
      node: target(opts),
      once: Keyword.get(opts, :once, false),
      interval: Keyword.get(opts, :interval, 1_000),
      timeout: Keyword.get(opts, :timeout, 1_000),
      keys: :tty
    ] ++ output ++ sort ++ pool(opts[:pool])
  end

  # A pool name as typed: the existing atom of that name, else the string.
  defp pool(nil), do: []

  defp pool(name) do
    [pool: String.to_existing_atom(name)]
  rescue
    ArgumentError -> [pool: name]
  end

  defp target(opts) do
    case opts[:node] do
      nil -> node()
      name -> String.to_atom(name)
    end
  end

  defp connect(opts) do
    target = target(opts)

    with :ok <- start_distribution(target),
         :ok <- set_cookie(opts[:cookie]) do
      cond do
        target == node() -> :ok
        Node.connect(target) == true -> :ok
        true -> {:error, "cannot connect to #{target} (is it running? is the cookie right?)"}
      end
    end
  end

  defp set_cookie(nil), do: :ok

  defp set_cookie(cookie) do
    true = Node.set_cookie(String.to_atom(cookie))
    :ok
  end

  defp start_distribution(_target) when node() != :nonode@nohost, do: :ok
  defp start_distribution(:nonode@nohost), do: :ok

  defp start_distribution(target) do
    host = target |> Atom.to_string() |> String.split("@") |> List.last()
    long? = String.contains?(host, ".")
    System.cmd("epmd", ["-daemon"])
    name = :"top_#{System.pid()}@#{host}"

    case :net_kernel.start(name, %{
           name_domain: if(long?, do: :longnames, else: :shortnames),
           hidden: true
         }) do
      {:ok, _} -> :ok
      {:error, reason} -> {:error, "cannot start distribution as #{name}: #{inspect(reason)}"}
    end
  end
end
