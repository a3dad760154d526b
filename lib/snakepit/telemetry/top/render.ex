defmodule Snakepit.Telemetry.Top.Render do
  @moduledoc """
  Draws `Snakepit.Telemetry.Top`'s view: pure functions from a snapshot
  (see `Snakepit.Telemetry.Top.Source.snapshot/3`) and the view state
  (`Snakepit.Telemetry.Top.State`) to text.

    * `frame/2`: the full-screen frame, plain ANSI: cursor home, each line
      cut to the terminal's width and cleared to its end, the selected worker
      in reverse video (and marked `>`), the rest of the screen cleared.
      Lines end with `\\r\\n`, as a terminal in raw mode needs.
    * `line/2`: one line, for output that is not a terminal.
    * `rows/2`: the worker rows shown, in order (pool filter and sort applied).

  A snapshot is

      %{time: "12:00:01", target: node, error: nil | reason,
        nodes: [%{node: node, error: nil | reason,
                  eps: n | {:error, r}, queue: map | {:error, r},
                  drops: %{policy: n, loss: n} | {:error, r},
                  workers: [row],
                  events: [%{name: "python.call.stop", rate: float,
                             p50_us: n | nil, p99_us: n | nil}] | {:error, r}}]}

  where a row is `%{node, worker_id, pool, status, protocol, rate,
  delivered, drops: %{native: %{reason => n}, python: %{reason => n}},
  queue_len, reconnects, control, implementation}` (`implementation`:
  `:native`, `:python` or `nil`, from the worker's stats reports).
  """

  alias Snakepit.Telemetry.Top.State

  @busiest 5

  @doc """
  The worker rows shown: those of the filtered pool (matched by name, so
  `"demo"` selects pool `:demo`), grouped by node, in the sort order.
  """
  @spec rows(map(), State.t()) :: [map()]
  def rows(snapshot, %State{} = state) do
    snapshot
    |> nodes()
    |> Enum.flat_map(&node_rows(&1, state))
  end

  defp nodes(%{nodes: nodes}), do: Enum.sort_by(nodes, & &1.node)

  defp node_rows(%{workers: workers}, state) when is_list(workers) do
    workers
    |> Enum.filter(&(state.pool == nil or pool_name(&1.pool) == pool_name(state.pool)))
    |> sort(state.sort)
  end

  defp node_rows(_node, _state), do: []

  defp sort(rows, :worker), do: Enum.sort_by(rows, & &1.worker_id)
  defp sort(rows, :pool), do: Enum.sort_by(rows, &{to_string(&1.pool), &1.worker_id})
  defp sort(rows, :rate), do: Enum.sort_by(rows, &{-(&1.rate || 0), &1.worker_id})
  defp sort(rows, :drops), do: Enum.sort_by(rows, &{-drop_total(&1), &1.worker_id})
  defp sort(rows, :queue), do: Enum.sort_by(rows, &{-(&1.queue_len || 0), &1.worker_id})
  defp sort(rows, _), do: Enum.sort_by(rows, & &1.worker_id)

  @doc """
  The frame as a string. Options: `:width` (80), `:height` (24), `:state`
  (a `Snakepit.Telemetry.Top.State`), `:ansi` (true; false gives the bare
  lines joined by `\\n`, as `--once` prints them to a file).
  """
  @spec frame(map(), keyword()) :: String.t()
  def frame(snapshot, opts \\ []) do
    width = max(Keyword.get(opts, :width, 80), 20)
    height = max(Keyword.get(opts, :height, 24), 5)
    state = Keyword.get(opts, :state, %State{})
    ansi? = Keyword.get(opts, :ansi, true)

    body = body(snapshot, state)
    footer = footer(state)
    lines = [header(snapshot, state) | fit(body, height - 1 - length(footer))] ++ footer

    lines = Enum.map(lines, fn {style, text} -> {style, truncate(text, width)} end)

    if ansi? do
      out =
        Enum.map(lines, fn
          {:selected, text} -> ["\e[7m", text, "\e[0m\e[K\r\n"]
          {:bold, text} -> ["\e[1m", text, "\e[0m\e[K\r\n"]
          {:error, text} -> ["\e[31m", text, "\e[0m\e[K\r\n"]
          {_, text} -> [text, "\e[K\r\n"]
        end)

      IO.iodata_to_binary(["\e[H", out, "\e[J"])
    else
      Enum.map_join(lines, "\n", &elem(&1, 1)) <> "\n"
    end
  end

  # Keeps the selected line visible when the body is taller than the room.
  defp fit(body, room) when length(body) <= room, do: body

  defp fit(body, room) do
    room = max(room - 1, 1)
    selected = Enum.find_index(body, &(elem(&1, 0) == :selected)) || 0
    start = max(0, min(selected - div(room, 2), length(body) - room))
    shown = Enum.slice(body, start, room)
    hidden = length(body) - length(shown)
    shown ++ [{:plain, "  ... #{hidden} more lines (resize the terminal or filter a pool)"}]
  end

  defp header(snapshot, state) do
    workers = for %{workers: ws} when is_list(ws) <- snapshot.nodes, w <- ws, do: w

    text =
      "snakepit top  #{snapshot.target}  #{snapshot.time}  nodes #{length(snapshot.nodes)}" <>
        "  workers #{length(workers)}  sort: #{state.sort}  pool: #{pool_name(state.pool)}" <>
        if(state.paused, do: "  [PAUSED]", else: "")

    {:bold, text}
  end

  defp footer(state) do
    message =
      case state.input do
        {target, buffer} ->
          "sampling rate for #{target_name(target)} (0..1, Enter/Esc): #{buffer}_"

        nil ->
          state.message || ""
      end

    [{:plain, message}, {:plain, State.help()}]
  end

  defp body(%{error: reason} = snapshot, _state) when reason != nil do
    [{:error, "#{snapshot.target}: no answer (#{format_reason(reason)}); retrying every second"}]
  end

  defp body(snapshot, state) do
    Enum.flat_map(nodes(snapshot), &node_lines(&1, state))
  end

  defp node_lines(%{error: reason, node: node}, _state) when reason != nil do
    [{:error, "node #{node}  no answer: #{format_reason(reason)}"}]
  end

  defp node_lines(node, state) do
    rows = node_rows(node, state)

    [{:bold, node_summary(node)}] ++
      if(rows == [] and state.pool != nil,
        do: [],
        else: [{:plain, columns()}]
      ) ++
      Enum.flat_map(rows, &worker_lines(&1, state)) ++
      event_lines(node.events)
  end

  defp node_summary(node) do
    "node #{node.node}  events/s #{value(node.eps, &Integer.to_string/1)}" <>
      "  queue #{value(node.queue, &queue_text/1)}  drops #{value(node.drops, &drops_text/1)}"
  end

  defp queue_text(%{queued: q, python: p, native: n}), do: "#{q} (python #{p}, native #{n})"
  defp queue_text(other), do: inspect(other)
  defp drops_text(%{policy: p, loss: l}), do: "policy #{p} loss #{l}"
  defp drops_text(other), do: inspect(other)

  defp value({:error, reason}, _fun), do: "? (#{format_reason(reason)})"
  defp value(nil, _fun), do: "-"
  defp value(v, fun), do: fun.(v)

  @doc false
  def columns do
    "  " <>
      pad("WORKER", 22) <>
      pad("POOL", 16) <>
      pad("STATUS", 9) <>
      pad("PROTO", 8) <>
      lpad("EV/S", 8) <>
      lpad("DELIVERED", 11) <>
      lpad("DROP N/PY", 13) <>
      lpad("PYQ", 6) <> lpad("RECON", 6) <> "  CONTROL"
  end

  defp worker_lines(row, state) do
    selected? = state.selected == State.key_of(row)
    drops = row.drops || %{native: %{}, python: %{}}

    line =
      if(selected?, do: "> ", else: "  ") <>
        pad(row.worker_id, 22) <>
        pad(pool_name(row.pool), 16) <>
        pad(status_text(row.status), 9) <>
        pad(to_string(row.protocol || "-"), 8) <>
        lpad(rate_text(row.rate), 8) <>
        lpad(to_string(row.delivered || 0), 11) <>
        lpad("#{sum(drops.native)}/#{sum(drops.python)}", 13) <>
        lpad(to_string(row.queue_len || 0), 6) <>
        lpad(to_string(row.reconnects || 0), 6) <>
        "  " <> control_short(row.control)

    main = {if(selected?, do: :selected, else: style_of(row.status)), line}

    if selected? do
      [main, {:plain, "    control: " <> control_long(row.control)}] ++
        drop_lines(drops) ++
        [{:plain, "    python implementation: " <> to_string(row[:implementation] || "?")}]
    else
      [main]
    end
  end

  defp drop_lines(%{native: native, python: python}) do
    [{:plain, "    drops: native " <> reasons(native) <> "  | python " <> reasons(python)}]
  end

  defp reasons(counts) do
    case for {k, n} <- Enum.sort(counts), n > 0, do: "#{k}=#{n}" do
      [] -> "none"
      list -> Enum.join(list, " ")
    end
  end

  defp event_lines({:error, reason}),
    do: [{:plain, "  busiest events: ? (#{format_reason(reason)})"}]

  defp event_lines(nil), do: []
  defp event_lines([]), do: [{:plain, "  busiest events: none yet"}]

  defp event_lines(events) do
    top =
      events
      |> Enum.sort_by(&{-&1.rate, &1.name})
      |> Enum.take(@busiest)
      |> Enum.map(fn e ->
        {:plain,
         "    " <>
           pad(e.name, 36) <>
           lpad(rate_text(e.rate) <> "/s", 10) <>
           "  p50 " <>
           lpad(duration_text(e[:p50_us]), 8) <> "  p99 " <> lpad(duration_text(e[:p99_us]), 8)}
      end)

    [{:plain, "  busiest events (rate, span duration p50/p99):"} | top]
  end

  @doc "One line summing a snapshot up, for output that is not a terminal."
  @spec line(map(), keyword()) :: String.t()
  def line(snapshot, opts \\ []) do
    state = Keyword.get(opts, :state, %State{})

    case snapshot do
      %{error: reason} when reason != nil ->
        "#{snapshot.time} #{snapshot.target} no answer: #{format_reason(reason)}"

      _ ->
        rows = rows(snapshot, state)

        nodes =
          Enum.map_join(nodes(snapshot), " ", fn
            %{node: n, error: r} when r != nil -> "#{n}=no answer (#{format_reason(r)})"
            %{node: n, eps: eps} -> "#{n}=#{value(eps, fn v -> "#{v}/s" end)}"
          end)

        workers =
          Enum.map_join(rows, " ", fn r ->
            "#{r.worker_id}:#{status_text(r.status)}:#{rate_text(r.rate)}/s:" <>
              "q#{r.queue_len || 0}:#{control_short(r.control)}"
          end)

        "#{snapshot.time} nodes #{nodes} workers #{length(rows)} #{workers}"
        |> String.trim_trailing()
    end
  end

  ## Formatting

  defp pool_name(nil), do: "all"
  defp pool_name(pool) when is_binary(pool), do: pool
  defp pool_name(pool), do: inspect(pool) |> String.trim_leading(":")

  defp target_name({:pool, pool}), do: "pool #{pool_name(pool)} (every node)"
  defp target_name({node, id}), do: "#{id} on #{node}"

  defp status_text(:open), do: "open"
  defp status_text(:connecting), do: "connect"
  defp status_text(:backing_off), do: "backoff"
  defp status_text({:failed, _}), do: "failed"
  defp status_text(other), do: inspect(other)

  defp style_of(:open), do: :plain
  defp style_of(_), do: :error

  defp control_short(%{} = c) do
    rules = length(Map.get(c, :rules, []))
    allow = length(Map.get(c, :allow, []))
    deny = length(Map.get(c, :deny, []))

    "#{if Map.get(c, :enabled, true), do: "on", else: "OFF"} rate #{float_text(Map.get(c, :default_rate, 1.0))}" <>
      if(rules > 0, do: " rules #{rules}", else: "") <>
      if(allow > 0, do: " allow #{allow}", else: "") <>
      if(deny > 0, do: " deny #{deny}", else: "")
  end

  defp control_short(_), do: "-"

  defp control_long(%{} = c) do
    rules =
      Enum.map_join(Map.get(c, :rules, []), ", ", fn r ->
        "#{Enum.join(r.patterns, "|")}=#{float_text(r.rate)}"
      end)

    "#{if Map.get(c, :enabled, true), do: "enabled", else: "DISABLED"}" <>
      "  default rate #{float_text(Map.get(c, :default_rate, 1.0))}" <>
      "  rules [#{rules}]" <>
      "  allow [#{Enum.join(Map.get(c, :allow, []), ", ")}]" <>
      "  deny [#{Enum.join(Map.get(c, :deny, []), ", ")}]"
  end

  defp control_long(_), do: "-"

  defp float_text(f) when is_float(f), do: :erlang.float_to_binary(f, [:short])
  defp float_text(n), do: to_string(n)

  defp rate_text(nil), do: "-"
  defp rate_text(r) when r >= 10, do: Integer.to_string(round(r))
  defp rate_text(r), do: :erlang.float_to_binary(r / 1, decimals: 1)

  defp duration_text(nil), do: "-"
  defp duration_text(us) when us < 1_000, do: "#{us}us"

  defp duration_text(us) when us < 1_000_000,
    do: :erlang.float_to_binary(us / 1_000, decimals: 1) <> "ms"

  defp duration_text(us), do: :erlang.float_to_binary(us / 1_000_000, decimals: 2) <> "s"

  defp sum(counts) when is_map(counts), do: counts |> Map.values() |> Enum.sum()
  defp sum(_), do: 0

  defp drop_total(%{drops: %{native: n, python: p}}), do: sum(n) + sum(p)
  defp drop_total(_), do: 0

  defp format_reason({:erpc, reason}), do: format_reason(reason)
  defp format_reason(reason) when is_atom(reason), do: Atom.to_string(reason)
  defp format_reason(reason), do: inspect(reason, limit: 5, printable_limit: 60)

  defp pad(text, n) do
    text = to_string(text)

    if String.length(text) >= n,
      do: String.slice(text, 0, n - 1) <> " ",
      else: String.pad_trailing(text, n)
  end

  defp lpad(text, n), do: String.pad_leading(to_string(text), n)

  @doc "Cuts a line to `width` characters (graphemes)."
  @spec truncate(String.t(), pos_integer()) :: String.t()
  def truncate(text, width) do
    if String.length(text) > width, do: String.slice(text, 0, width), else: text
  end
end
