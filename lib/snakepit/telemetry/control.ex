defmodule Snakepit.Telemetry.Control do
  @moduledoc """
  The control state Elixir wants a worker's telemetry to have, and the
  control messages that give it to Python.

  GrpcStream keeps one per worker, changes it through `toggle/2`,
  `update_sampling/3` and `update_filter/2`, and sends all of it again
  whenever the worker's stream (re)opens, so a restarted worker ends up in
  the same state. Python starts every new stream from its environment
  defaults (see `Snakepit.Telemetry.Config.worker_env/1`) and applies the
  messages in order.

  ## How sampling rules combine

    * A rate with no patterns sets the **default rate**, used for events that
      no rule matches (initially 1.0).
    * A rate with patterns sets a **rule**. A rule with the very same pattern
      list replaces the earlier one and becomes the newest; otherwise the rule
      is added. At most 32 rules are kept (the oldest go first).
    * An event's rate is that of the **newest rule** with a pattern matching
      its dotted Python name (`"python.call.*"` matches `"python.call.stop"`),
      else the default rate.
    * Spans are sampled whole: the decision is taken at the span's start and
      applies to its stop or exception.

  ## Filters

  `allow` and `deny` are glob lists over dotted Python names. Deny wins; an
  empty allow list allows every event. Filters and toggle apply after
  sampling rules are chosen, to every event.

  Globs are Python's `fnmatch` globs (`*` matches dots too). This project's
  Python applies the state itself. A worker that only serves
  `StreamTelemetry` (e.g. Snakepit v0.13's Python) does not apply it this
  way; the NIF enforces it for such a worker, with the same semantics (see
  `to_native/1` and `Snakepit.Telemetry.GrpcStream`).
  """

  @max_rules 32
  @max_patterns 32
  @max_pattern_bytes 256

  @type rule :: %{patterns: [String.t()], rate: float()}
  @type t :: %__MODULE__{
          enabled: boolean(),
          default_rate: float(),
          rules: [rule()],
          allow: [String.t()],
          deny: [String.t()]
        }

  @typedoc "A control message as the NIF takes it."
  @type message ::
          {:toggle, boolean()}
          | {:sampling, float(), [String.t()]}
          | {:filter, [String.t()], [String.t()]}

  defstruct enabled: true, default_rate: 1.0, rules: [], allow: [], deny: []

  @doc """
  Builds a state from options: `:enabled`, `:sampling_rate`,
  `:sampling_rules` (a list of `{patterns, rate}`), `:allow`, `:deny`.
  """
  @spec new(keyword()) :: {:ok, t()} | {:error, term()}
  def new(opts \\ []) do
    with {:ok, opts} <-
           Keyword.validate(opts,
             enabled: true,
             sampling_rate: 1.0,
             sampling_rules: [],
             allow: [],
             deny: []
           ),
         true <- is_boolean(opts[:enabled]) || {:error, {:invalid_enabled, opts[:enabled]}},
         {:ok, state} <-
           put_sampling(%__MODULE__{enabled: opts[:enabled]}, opts[:sampling_rate], []),
         {:ok, state} <- put_rules(state, opts[:sampling_rules]) do
      put_filter(state, allow: opts[:allow], deny: opts[:deny])
    end
  end

  defp put_rules(state, rules) when is_list(rules) do
    Enum.reduce_while(rules, {:ok, state}, fn
      {patterns, rate}, {:ok, acc} when patterns != [] ->
        case put_sampling(acc, rate, patterns) do
          {:ok, acc} -> {:cont, {:ok, acc}}
          error -> {:halt, error}
        end

      other, _ ->
        {:halt, {:error, {:invalid_sampling_rule, other}}}
    end)
  end

  defp put_rules(_state, rules), do: {:error, {:invalid_sampling_rule, rules}}

  @doc "Switches telemetry on or off."
  @spec toggle(t(), boolean()) :: t()
  def toggle(%__MODULE__{} = state, enabled) when is_boolean(enabled),
    do: %{state | enabled: enabled}

  @doc "Sets the default rate (no patterns) or a rule (see the moduledoc)."
  @spec put_sampling(t(), number(), [String.t()]) :: {:ok, t()} | {:error, term()}
  def put_sampling(%__MODULE__{} = state, rate, patterns) do
    with :ok <- validate_rate(rate),
         :ok <- validate_patterns(patterns) do
      rate = rate / 1

      if patterns == [] do
        {:ok, %{state | default_rate: rate}}
      else
        rules =
          Enum.reject(state.rules, &(&1.patterns == patterns)) ++
            [%{patterns: patterns, rate: rate}]

        {:ok, %{state | rules: Enum.take(rules, -@max_rules)}}
      end
    end
  end

  @doc "Sets the allow and deny lists."
  @spec put_filter(t(), keyword()) :: {:ok, t()} | {:error, term()}
  def put_filter(%__MODULE__{} = state, filter) do
    with true <- Keyword.keyword?(filter) || {:error, {:invalid_filter, filter}},
         {:ok, filter} <- Keyword.validate(filter, allow: [], deny: []),
         :ok <- validate_patterns(filter[:allow]),
         :ok <- validate_patterns(filter[:deny]) do
      {:ok, %{state | allow: filter[:allow], deny: filter[:deny]}}
    else
      {:error, {:invalid_patterns, _} = reason} -> {:error, reason}
      _ -> {:error, {:invalid_filter, filter}}
    end
  end

  @doc "The messages that bring a freshly opened stream to this state, in order."
  @spec messages(t()) :: [message()]
  def messages(%__MODULE__{} = state) do
    [{:toggle, state.enabled}, {:sampling, state.default_rate, []}] ++
      Enum.map(state.rules, &{:sampling, &1.rate, &1.patterns}) ++
      [{:filter, state.allow, state.deny}]
  end

  @doc "`:ok` or `{:error, {:invalid_rate, rate}}`; a rate is a number in 0..1."
  @spec validate_rate(term()) :: :ok | {:error, {:invalid_rate, term()}}
  def validate_rate(rate) when is_number(rate) and rate >= 0 and rate <= 1, do: :ok
  def validate_rate(rate), do: {:error, {:invalid_rate, rate}}

  @doc """
  `:ok` or `{:error, {:invalid_patterns, patterns}}`. Patterns are globs over
  dotted names: letters, digits, `_`, `-`, `.`, and the glob characters
  `*`, `?`, `[`, `]`, `!`; at most #{@max_patterns} of at most
  #{@max_pattern_bytes} bytes each.
  """
  @spec validate_patterns(term()) :: :ok | {:error, {:invalid_patterns, term()}}
  def validate_patterns(patterns) when is_list(patterns) and length(patterns) <= @max_patterns do
    if Enum.all?(patterns, &valid_pattern?/1),
      do: :ok,
      else: {:error, {:invalid_patterns, patterns}}
  end

  def validate_patterns(patterns), do: {:error, {:invalid_patterns, patterns}}

  defp valid_pattern?(p) do
    is_binary(p) and p != "" and byte_size(p) <= @max_pattern_bytes and
      String.match?(p, ~r/\A[A-Za-z0-9_.*?\[\]!-]+\z/)
  end

  @doc """
  The state as `Snakepit.Telemetry.Native.stream_open/4` takes it (its
  `:control` option): rules oldest first, as `{rate, patterns}`.
  """
  @spec to_native(t()) :: map()
  def to_native(%__MODULE__{} = state) do
    %{
      enabled: state.enabled,
      default_rate: state.default_rate,
      rules: Enum.map(state.rules, &{&1.rate, &1.patterns}),
      allow: state.allow,
      deny: state.deny
    }
  end

  @doc "A plain map for `list_streams/0` and logs."
  @spec to_map(t()) :: map()
  def to_map(%__MODULE__{} = state), do: Map.from_struct(state)
end
