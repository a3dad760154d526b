defmodule Snakepit.Telemetry.Naming do
  @moduledoc """
  The event catalog, as compiled into the NIF.

  Every answer comes from the native tables that decode Python events, so
  this module and the decoder cannot disagree. A Python event name that is
  not here is dropped (and counted) by the NIF, never turned into an atom.
  """

  @typedoc "A catalog entry."
  @type event :: %{
          python: String.t(),
          name: [atom()],
          measurements: [{atom(), String.t()}],
          metadata: [atom()],
          doc: String.t()
        }

  @doc "Every catalog entry, in catalog order."
  @spec catalog() :: [event()]
  def catalog do
    case :persistent_term.get({__MODULE__, :catalog}, nil) do
      nil ->
        catalog = Snakepit.Telemetry.Native.catalog_events()
        :persistent_term.put({__MODULE__, :catalog}, catalog)
        catalog

      catalog ->
        catalog
    end
  end

  @doc "Every `:telemetry` event name the catalog can produce."
  @spec events() :: [[atom()]]
  def events, do: Enum.map(catalog(), & &1.name)

  @doc "Map of dotted Python event name to `:telemetry` event name."
  @spec python_events() :: %{String.t() => [atom()]}
  def python_events, do: Map.new(catalog(), &{&1.python, &1.name})

  @doc """
  The `:telemetry` event name for a dotted Python event name.

      iex> Snakepit.Telemetry.Naming.from_python("python.call.stop")
      {:ok, [:snakepit, :python, :call, :stop]}

      iex> Snakepit.Telemetry.Naming.from_python("made.up.event")
      {:error, :not_in_catalog}
  """
  @spec from_python(String.t()) :: {:ok, [atom()]} | {:error, :not_in_catalog}
  def from_python(name) when is_binary(name) do
    case Enum.find(catalog(), &(&1.python == name)) do
      nil -> {:error, :not_in_catalog}
      event -> {:ok, event.name}
    end
  end

  @doc "Metadata keys that arrive as atoms; any other key arrives as a binary."
  @spec metadata_keys() :: [atom()]
  def metadata_keys, do: Snakepit.Telemetry.Native.catalog_metadata_keys()
end
