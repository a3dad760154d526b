defmodule Snakepit.Telemetry.Naming do
  @moduledoc """
  The event catalog, as compiled into the NIF.

  Every answer comes from the native tables that decode Python events, so
  this module and the decoder cannot disagree. A Python event name that is
  not here is dropped (and counted) by the NIF, never turned into an atom.
  """

  @typedoc "A catalog entry; `python` is `nil` for events only Elixir emits."
  @type event :: %{
          python: String.t() | nil,
          name: [atom()],
          measurements: [{atom(), String.t()}],
          metadata: [atom()],
          doc: String.t()
        }

  @doc "Every catalog entry, in catalog order."
  @spec catalog() :: [event()]
  def catalog, do: tables().catalog

  # The catalog never changes while the NIF is loaded: read it once.
  defp tables do
    case :persistent_term.get({__MODULE__, :tables}, nil) do
      nil ->
        catalog = Snakepit.Telemetry.Native.catalog_events()

        tables = %{
          catalog: catalog,
          by_name: Map.new(catalog, &{&1.name, &1}),
          python: for(%{python: p} = e <- catalog, p != nil, into: %{}, do: {p, e.name})
        }

        :persistent_term.put({__MODULE__, :tables}, tables)
        tables

      tables ->
        tables
    end
  end

  @doc "Every `:telemetry` event name the catalog can produce."
  @spec events() :: [[atom()]]
  def events, do: Enum.map(catalog(), & &1.name)

  @doc "Map of dotted Python event name to `:telemetry` event name."
  @spec python_events() :: %{String.t() => [atom()]}
  def python_events, do: tables().python

  @doc "The events that Elixir code emits (see `Snakepit.Telemetry.Events`)."
  @spec elixir_events() :: [[atom()]]
  def elixir_events, do: for(%{python: nil, name: name} <- catalog(), do: name)

  @doc "The catalog entry of a `:telemetry` event name, or `nil`."
  @spec lookup([atom()]) :: event() | nil
  def lookup(name) when is_list(name), do: Map.get(tables().by_name, name)

  @doc """
  The `:telemetry` event name for the parts of a Python event name.

      iex> Snakepit.Telemetry.Naming.from_parts(["python", "call", "stop"])
      {:ok, [:snakepit, :python, :call, :stop]}
  """
  @spec from_parts([String.t()]) :: {:ok, [atom()]} | {:error, :not_in_catalog}
  def from_parts(parts) when is_list(parts), do: from_python(Enum.join(parts, "."))

  @doc """
  The `:telemetry` event name for a dotted Python event name.

      iex> Snakepit.Telemetry.Naming.from_python("python.call.stop")
      {:ok, [:snakepit, :python, :call, :stop]}

      iex> Snakepit.Telemetry.Naming.from_python("made.up.event")
      {:error, :not_in_catalog}
  """
  @spec from_python(String.t()) :: {:ok, [atom()]} | {:error, :not_in_catalog}
  def from_python(name) when is_binary(name) do
    case Map.fetch(python_events(), name) do
      {:ok, event} -> {:ok, event}
      :error -> {:error, :not_in_catalog}
    end
  end

  def from_python(_name), do: {:error, :not_in_catalog}

  @doc """
  The catalog as a Markdown table, as it appears in the README between the
  `catalog:begin` and `catalog:end` markers (`mix snakepit_telemetry.catalog`
  rewrites it there).
  """
  @spec markdown_table() :: String.t()
  def markdown_table do
    rows =
      for e <- catalog() do
        measurements = Enum.map_join(e.measurements, ", ", fn {k, unit} -> "`#{k}` (#{unit})" end)
        metadata = Enum.map_join(e.metadata, ", ", &"`#{&1}`")
        python = if e.python, do: "`#{e.python}`", else: "(Elixir)"
        "| `#{inspect(e.name)}` | #{python} | #{measurements} | #{metadata} | #{e.doc} |"
      end

    Enum.join(
      ["| event | from Python as | measurements | metadata | |", "|---|---|---|---|---|" | rows],
      "\n"
    ) <> "\n"
  end

  @doc """
  The Python spans of the catalog as a Markdown table: for each span (a
  Python prefix whose `start`, `stop` and `exception` events are all in the
  catalog), one row per event with its measurements and metadata, as it
  appears in the README between the `spans:begin` and `spans:end` markers
  (`mix snakepit_telemetry.catalog` rewrites it there). The standard keys
  every Python event carries (`node`, `pool_name`, `worker_id`,
  `correlation_id`, `emit_time`) are left out.
  """
  @spec span_markdown_table() :: String.t()
  def span_markdown_table do
    rows =
      for {python, events} <- python_spans(), {action, e} <- events do
        measurements = Enum.map_join(e.measurements, ", ", fn {k, _unit} -> "`#{k}`" end)
        metadata = Enum.map_join(e.metadata, ", ", &"`#{&1}`")
        "| `#{python}` | `#{action}` | #{measurements} | #{metadata} |"
      end

    Enum.join(
      ["| Python span | event | measurements | metadata |", "|---|---|---|---|" | rows],
      "\n"
    ) <> "\n"
  end

  @doc """
  The catalog's Python spans: `{python_prefix, [start: entry, stop: entry,
  exception: entry]}` in catalog order.
  """
  @spec python_spans() :: [{String.t(), keyword(event())}]
  def python_spans do
    catalog = catalog()
    by_python = for %{python: p} = e <- catalog, p != nil, into: %{}, do: {p, e}

    for %{python: python} <- catalog,
        python != nil,
        String.ends_with?(python, ".start"),
        prefix = String.replace_suffix(python, ".start", ""),
        events = for(a <- [:start, :stop, :exception], do: {a, by_python["#{prefix}.#{a}"]}),
        Enum.all?(events, fn {_a, e} -> e != nil end),
        do: {prefix, events}
  end

  @doc """
  Lets Python events outside the catalog through, under names made of atoms
  that already exist in the application's code. For each action, the Python
  event `"<python_prefix>.<action>"` becomes `event_prefix ++ [action]`:

      Naming.register_events("inference", [:snakepit, :python, :inference],
        [:start, :stop, :exception, :tokens])

  so that `with telemetry.span("inference", {"model": m}):` in Python reaches
  `[:snakepit, :python, :inference, :stop]`. Python names that nobody
  registered are still dropped and counted. The same is possible at start-up
  with `config :snakepit_telemetry, custom_events: [{python_prefix,
  event_prefix, actions}]`.
  """
  @spec register_events(String.t(), [atom()], [atom()]) :: :ok | {:error, term()}
  def register_events(python_prefix, event_prefix, actions)
      when is_binary(python_prefix) and is_list(event_prefix) and is_list(actions) do
    if Enum.all?(event_prefix ++ actions, &is_atom/1) and event_prefix != [] and actions != [] do
      Enum.reduce_while(actions, :ok, fn action, :ok ->
        python = python_prefix <> "." <> Atom.to_string(action)

        case Snakepit.Telemetry.Native.register_custom_event(python, event_prefix ++ [action]) do
          {:ok, :ok} -> {:cont, :ok}
          {:error, {_, text}} -> {:halt, {:error, {:invalid_custom_event, text}}}
        end
      end)
    else
      {:error, {:invalid_custom_event, {python_prefix, event_prefix, actions}}}
    end
  end

  def register_events(python_prefix, event_prefix, actions),
    do: {:error, {:invalid_custom_event, {python_prefix, event_prefix, actions}}}

  @doc """
  Registers a Python span (`start`, `stop`, `exception`) under
  `event_prefix`; see `register_events/3`.
  """
  @spec register_span(String.t(), [atom()]) :: :ok | {:error, term()}
  def register_span(python_prefix, event_prefix),
    do: register_events(python_prefix, event_prefix, [:start, :stop, :exception])

  @doc """
  Makes these measurement and metadata keys arrive as the given atoms rather
  than binaries (`config :snakepit_telemetry, custom_keys: [...]` at start-up).
  """
  @spec register_keys([atom()]) :: :ok | {:error, term()}
  def register_keys(keys) when is_list(keys) do
    Enum.reduce_while(keys, :ok, fn
      key, :ok when is_atom(key) ->
        case Snakepit.Telemetry.Native.register_custom_key(key) do
          {:ok, :ok} -> {:cont, :ok}
          {:error, {_, text}} -> {:halt, {:error, {:invalid_custom_key, text}}}
        end

      key, :ok ->
        {:halt, {:error, {:invalid_custom_key, key}}}
    end)
  end

  def register_keys(keys), do: {:error, {:invalid_custom_key, keys}}

  @doc "Every registered custom event as `{python_name, event_name}`."
  @spec custom_events() :: [{String.t(), [atom()]}]
  def custom_events, do: Snakepit.Telemetry.Native.custom_events()

  @doc "Metadata keys that arrive as atoms; any other key arrives as a binary."
  @spec metadata_keys() :: [atom()]
  def metadata_keys, do: Snakepit.Telemetry.Native.catalog_metadata_keys()
end
