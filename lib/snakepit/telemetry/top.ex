defmodule Snakepit.Telemetry.Top do
  @moduledoc """
  A live terminal view of a running system's telemetry: per node, pool and
  worker, refreshed every second. Run it with `mix snakepit.telemetry.top`
  (it attaches to a node over Erlang distribution), or from iex inside a
  running node with `start/1`.

  It shows, for every node of the viewed node's cluster
  (`Snakepit.Telemetry.Cluster.nodes/0`): the node's events/s, queue depth
  and drops (policy and loss); per worker its stream status and protocol,
  events/s (from its `delivered` counter), delivered, drops on the native
  and the Python hop, the Python queue length, reconnects and its control
  state (enabled, default rate, number of rules, allow/deny); for the
  selected worker its full control state and every drop reason by hop; and
  per node the busiest event names with their rate and the p50/p99 of
  their span durations (see `Snakepit.Telemetry.Top.Collector`). A node
  that does not answer is shown with its reason; workers that restart,
  nodes that leave and a resized terminal are picked up on the next
  refresh.

  Keys: see `Snakepit.Telemetry.Top.State`. `t`/`T` toggle and `r`/`R` set
  the sampling rate of the selected worker (`{node, worker_id}`) or of its
  pool (`{:pool, name}`, every node) through
  `Snakepit.Telemetry.GrpcStream.toggle/3` and `update_sampling/4`, called
  on the viewed node; the reply (`:ok` or the error) is shown at the bottom.

  When standard output is not a terminal, one line per refresh is printed
  instead (`Snakepit.Telemetry.Top.Render.line/2`).

  ## Options

    * `:node` - the node to view (default: this node)
    * `:interval` - milliseconds between refreshes (1000)
    * `:once` - print one frame (taken after one interval, so rates are
      filled in; without ANSI, 140 columns wide when standard output is not
      a terminal; one line with `output: :lines`) and return
    * `:output` - `:screen` or `:lines` (default: `:screen` when standard
      output is a terminal); with `:once` also `:frame` (plain, 140 columns)
    * `:keys` - `:tty` (the terminal in raw mode, the mix task's default), `:stdin`
      (a line at a time; the default of `start/1`, for iex) or `:none`
    * `:timeout` - milliseconds each remote call may take (1000)
    * `:sort`, `:pool` - the initial sort order and pool filter
  """

  alias Snakepit.Telemetry.GrpcStream
  alias Snakepit.Telemetry.Top.{Render, Source, State, Terminal}

  @doc """
  Runs the view in this process until `q` (from iex: type `q` and Enter).
  Returns `:ok`.
  """
  @spec start(keyword()) :: :ok
  def start(opts \\ []) do
    run(Keyword.put_new(opts, :keys, :stdin))
  end

  @doc "Runs the view with `opts` (see the moduledoc) until quit; returns `:ok`."
  @spec run(keyword()) :: :ok
  def run(opts) do
    target = Keyword.get(opts, :node, node())
    interval = Keyword.get(opts, :interval, 1_000)
    source = Source.new(target, timeout: Keyword.get(opts, :timeout, 1_000))

    state = %State{
      sort: Keyword.get(opts, :sort, :rate),
      pool: Keyword.get(opts, :pool)
    }

    if Keyword.get(opts, :once, false) do
      output = Keyword.get_lazy(opts, :output, &once_output/0)
      once(source, state, interval, output)
    else
      output = Keyword.get_lazy(opts, :output, &screen_or_lines/0)
      keys = if output == :screen, do: Keyword.get(opts, :keys, :tty), else: :none
      reader = Terminal.start_keys(keys, self())
      if output == :screen, do: IO.write("\e[?1049h\e[?25l")

      try do
        send(self(), :tick)
        loop(%{source: source, state: state, snapshot: nil, interval: interval, output: output})
      after
        if output == :screen, do: IO.write("\e[?25h\e[?1049l")
        Terminal.stop_keys(reader)
      end
    end
  end

  defp screen_or_lines, do: if(Terminal.tty_stdout?(), do: :screen, else: :lines)
  defp once_output, do: if(Terminal.tty_stdout?(), do: :screen, else: :frame)

  defp once(source, state, interval, output) do
    {_first, source} = Source.snapshot(source)
    Process.sleep(interval)
    {snapshot, source} = Source.snapshot(source)
    Source.stop(source)
    state = state |> with_pools(snapshot) |> State.ensure_selection(Render.rows(snapshot, state))

    case output do
      :lines ->
        IO.puts(Render.line(snapshot, state: state))

      :frame ->
        # Not a terminal: the whole frame, 140 columns wide, without ANSI.
        IO.write(Render.frame(snapshot, width: 140, height: 1_000, state: state, ansi: false))

      :screen ->
        {cols, rows} = Terminal.size()
        IO.write(Render.frame(snapshot, width: cols, height: rows, state: state, ansi: false))
    end

    :ok
  end

  defp loop(view) do
    receive do
      :tick ->
        view = if view.state.paused and view.snapshot, do: view, else: refresh(view)
        draw(view)
        Process.send_after(self(), :tick, view.interval)
        loop(view)

      {:top_keys, bytes} ->
        keys(view, State.decode(bytes))

      _late_reply ->
        loop(view)
    end
  end

  defp keys(view, []) do
    draw(view)
    loop(view)
  end

  defp keys(view, [key | rest]) do
    rows = if view.snapshot, do: Render.rows(view.snapshot, view.state), else: []
    {state, action} = State.handle_key(view.state, key, rows)
    view = %{view | state: state}

    case action do
      :quit ->
        Source.stop(view.source)
        :ok

      :none ->
        keys(view, rest)

      action ->
        view = %{view | state: %{state | message: perform(view.source.target, action)}}
        # Show the new control state at once.
        keys(refresh(view), rest)
    end
  end

  defp refresh(view) do
    {snapshot, source} = Source.snapshot(view.source)
    state = with_pools(view.state, snapshot)
    state = State.ensure_selection(state, Render.rows(snapshot, state))
    %{view | snapshot: snapshot, source: source, state: state}
  end

  defp with_pools(state, snapshot) do
    pools =
      for(%{workers: ws} when is_list(ws) <- snapshot.nodes, w <- ws, do: w.pool)
      |> Enum.uniq()
      |> Enum.sort()

    %{state | pools: pools}
  end

  defp draw(%{snapshot: nil}), do: :ok

  defp draw(%{output: :lines} = view) do
    IO.puts(Render.line(view.snapshot, state: view.state))
  end

  defp draw(view) do
    {cols, rows} = Terminal.size()
    IO.write(Render.frame(view.snapshot, width: cols, height: rows, state: view.state))
  end

  @doc false
  # Carries out a steering action on the viewed node; returns the message shown.
  def perform(target_node, {:toggle, target, enabled}) do
    reply = remote(target_node, GrpcStream, :toggle, [target, enabled])
    "toggle #{describe(target)} #{if enabled, do: "on", else: "off"}: #{reply_text(reply)}"
  end

  def perform(target_node, {:sampling, target, rate}) do
    reply = remote(target_node, GrpcStream, :update_sampling, [target, rate])
    "sampling rate #{rate} for #{describe(target)}: #{reply_text(reply)}"
  end

  defp remote(node, module, fun, args) do
    :erpc.call(node, module, fun, args, 10_000)
  catch
    :error, {:erpc, reason} -> {:error, {:erpc, reason}}
    class, reason -> {:error, {class, reason}}
  end

  defp describe({:pool, pool}), do: "pool #{inspect(pool)}"
  defp describe({node, id}), do: "#{id} on #{node}"

  defp reply_text(:ok), do: "ok"
  defp reply_text(other), do: inspect(other, limit: 10, printable_limit: 100)
end
