defmodule Snakepit.Telemetry.Top.State do
  @moduledoc """
  The view state of `Snakepit.Telemetry.Top` and its key handling, as a pure
  transition: `handle_key(state, key, rows)` returns the next state and an
  action for the caller to carry out (`:none`, `:quit`, or a control call).

  `pools` holds every pool of the latest snapshot (the caller sets it), for
  `p` to cycle through. `rows` are the worker rows shown right now (after the pool filter and the
  sort, see `Snakepit.Telemetry.Top.Render.rows/2`); the selection is kept
  as `{node, worker_id}`, so it survives re-sorting and a worker restarting
  under the same id.

  Keys (see `help/0`):

    * `up`/`k`, `down`/`j`: select the previous/next worker
    * `s`: next sort order (`:rate`, `:worker`, `:pool`, `:drops`, `:queue`)
    * `p`: next pool filter (all pools, then each pool in turn)
    * space: pause/resume refreshing
    * `t`: toggle the selected worker (on becomes off and back)
    * `T`: toggle the selected worker's pool (every node)
    * `r`: type a sampling rate for the selected worker, `R`: for its pool;
      digits and `.`, Enter applies, Esc cancels. `0`..`9` right after `r`
      or `R` start the number.
    * `q`: quit
  """

  @sorts [:rate, :worker, :pool, :drops, :queue]

  defstruct sort: :rate,
            pool: nil,
            pools: [],
            paused: false,
            selected: nil,
            input: nil,
            message: nil

  @type key :: String.t() | :up | :down | :enter | :esc | :backspace
  @type target :: {node(), String.t()} | {:pool, term()}
  @type action ::
          :none | :quit | {:toggle, target(), boolean()} | {:sampling, target(), float()}
  @type t :: %__MODULE__{
          sort: atom(),
          pool: term(),
          pools: [term()],
          paused: boolean(),
          selected: {node(), String.t()} | nil,
          input: nil | {target(), String.t()},
          message: String.t() | nil
        }

  @doc "The sort orders, in the order `s` cycles through them."
  def sorts, do: @sorts

  @doc "One line naming the keys."
  def help,
    do: "keys: up/down select  s sort  p pool  space pause  t/T toggle  r/R rate  q quit"

  @doc """
  Splits bytes read from a terminal into keys: arrow keys, Enter (`\\r` or
  `\\n`), Esc, Backspace, else one-character strings.
  """
  @spec decode(binary()) :: [key()]
  def decode(bytes), do: decode(bytes, [])

  defp decode(<<>>, acc), do: Enum.reverse(acc)
  defp decode(<<"\e[A", rest::binary>>, acc), do: decode(rest, [:up | acc])
  defp decode(<<"\e[B", rest::binary>>, acc), do: decode(rest, [:down | acc])
  defp decode(<<"\eOA", rest::binary>>, acc), do: decode(rest, [:up | acc])
  defp decode(<<"\eOB", rest::binary>>, acc), do: decode(rest, [:down | acc])
  # Other escape sequences (right/left arrows, function keys) are ignored.
  defp decode(<<"\e[", c, rest::binary>>, acc) when c in ?A..?Z or c == ?~,
    do: decode(rest, acc)

  defp decode(<<"\e", rest::binary>>, acc), do: decode(rest, [:esc | acc])
  defp decode(<<c, rest::binary>>, acc) when c in [?\r, ?\n], do: decode(rest, [:enter | acc])
  defp decode(<<c, rest::binary>>, acc) when c in [127, 8], do: decode(rest, [:backspace | acc])
  # Ctrl-C in raw mode: quit.
  defp decode(<<3, rest::binary>>, acc), do: decode(rest, ["q" | acc])

  defp decode(<<c::utf8, rest::binary>>, acc), do: decode(rest, [<<c::utf8>> | acc])
  defp decode(<<_, rest::binary>>, acc), do: decode(rest, acc)

  @doc """
  Selects the first row when nothing (or a row no longer shown) is selected.
  """
  @spec ensure_selection(t(), [map()]) :: t()
  def ensure_selection(%__MODULE__{selected: sel} = state, rows) do
    if Enum.any?(rows, &(key_of(&1) == sel)) do
      state
    else
      %{state | selected: rows |> List.first() |> then(&(&1 && key_of(&1)))}
    end
  end

  @doc "The next state and the action to carry out, for one key."
  @spec handle_key(t(), key(), [map()]) :: {t(), action()}
  def handle_key(%__MODULE__{input: {target, buffer}} = state, key, _rows) do
    case key do
      :esc ->
        {%{state | input: nil, message: "rate: cancelled"}, :none}

      :backspace ->
        {%{state | input: {target, String.slice(buffer, 0..-2//1)}}, :none}

      :enter ->
        case parse_rate(buffer) do
          {:ok, rate} ->
            {%{state | input: nil}, {:sampling, target, rate}}

          :error ->
            {%{state | input: nil, message: "rate: #{inspect(buffer)} is not in 0..1"}, :none}
        end

      c when is_binary(c) and (c in ~w(0 1 2 3 4 5 6 7 8 9) or c == ".") ->
        {%{state | input: {target, buffer <> c}}, :none}

      _ ->
        {state, :none}
    end
  end

  def handle_key(state, key, rows) do
    state = ensure_selection(state, rows)
    selected = Enum.find(rows, &(key_of(&1) == state.selected))

    case key do
      "q" ->
        {state, :quit}

      k when k in [:up, "k"] ->
        {move(state, rows, -1), :none}

      k when k in [:down, "j"] ->
        {move(state, rows, 1), :none}

      "s" ->
        {%{state | sort: next(@sorts, state.sort)}, :none}

      "p" ->
        {%{state | pool: next([nil | pools(rows, state)], state.pool), selected: nil}, :none}

      " " ->
        {%{state | paused: not state.paused}, :none}

      "t" when selected != nil ->
        {state, {:toggle, key_of(selected), not enabled?(selected)}}

      "T" when selected != nil ->
        {state, {:toggle, {:pool, selected.pool}, not enabled?(selected)}}

      "r" when selected != nil ->
        {%{state | input: {key_of(selected), ""}}, :none}

      "R" when selected != nil ->
        {%{state | input: {{:pool, selected.pool}, ""}}, :none}

      k when k in ["t", "T", "r", "R"] ->
        {%{state | message: "no worker selected"}, :none}

      _ ->
        {state, :none}
    end
  end

  @doc "A rate typed by the user: a number from 0 to 1."
  @spec parse_rate(String.t()) :: {:ok, float()} | :error
  def parse_rate(text) do
    text = if String.starts_with?(text, "."), do: "0" <> text, else: text

    case Float.parse(text) do
      {rate, ""} when rate >= 0.0 and rate <= 1.0 -> {:ok, rate}
      _ -> :error
    end
  end

  @doc "The `{node, worker_id}` of a row."
  def key_of(%{node: node, worker_id: id}), do: {node, id}

  # Every pool of the latest snapshot (`pools`, set by the caller: the rows
  # shown are those of one pool when filtering), else the rows' pools.
  defp pools(rows, %{pools: []}), do: rows |> Enum.map(& &1.pool) |> Enum.uniq()
  defp pools(_rows, %{pools: pools}), do: pools

  defp enabled?(%{control: %{enabled: enabled}}), do: enabled
  defp enabled?(_row), do: true

  defp move(state, [], _step), do: state

  defp move(state, rows, step) do
    index = Enum.find_index(rows, &(key_of(&1) == state.selected)) || 0
    index = (index + step) |> max(0) |> min(length(rows) - 1)
    %{state | selected: key_of(Enum.at(rows, index))}
  end

  defp next(list, current) do
    case Enum.find_index(list, &(&1 == current)) do
      nil -> hd(list)
      i -> Enum.at(list, rem(i + 1, length(list)))
    end
  end
end
