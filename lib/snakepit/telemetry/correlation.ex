defmodule Snakepit.Telemetry.Correlation do
  @moduledoc """
  Correlation IDs: one ID follows a request from Elixir into Python and
  back, on every event it causes.

      id = Correlation.new()
      Correlation.with_id(id, fn ->
        # Snakepit passes Correlation.grpc_metadata() with its gRPC call;
        # the Python interceptor makes the ID current for the call, and every
        # event emitted inside it carries it back as metadata.correlation_id.
      end)

  The current ID lives in the process dictionary and in `Logger` metadata
  (`:correlation_id`), and `Snakepit.Telemetry.Events` adds it to the events
  it emits.
  """

  @key {__MODULE__, :id}
  @header "x-snakepit-correlation-id"

  @type id :: String.t()

  @doc "A new random ID (128 bits, hex, UUID layout)."
  @spec new() :: id()
  def new do
    <<a::binary-4, b::binary-2, c::binary-2, d::binary-2, e::binary-6>> =
      :crypto.strong_rand_bytes(16)

    Enum.map_join([a, b, c, d, e], "-", &Base.encode16(&1, case: :lower))
  end

  @doc "Makes `id` the current process's ID (and Logger's `:correlation_id`)."
  @spec put(id()) :: :ok
  def put(id) when is_binary(id) and id != "" do
    Process.put(@key, id)
    Logger.metadata(correlation_id: id)
  end

  @doc "The current process's ID, or `nil`."
  @spec get() :: id() | nil
  def get, do: Process.get(@key)

  @doc "Clears the current ID."
  @spec delete() :: :ok
  def delete do
    Process.delete(@key)
    Logger.metadata(correlation_id: nil)
  end

  @doc "Runs `fun` with `id` current, then restores the previous ID."
  @spec with_id(id(), (() -> result)) :: result when result: term()
  def with_id(id, fun) when is_function(fun, 0) do
    previous = get()
    put(id)

    try do
      fun.()
    after
      if previous, do: put(previous), else: delete()
    end
  end

  @doc """
  Runs `fun` on `node` with `:erpc.call/4`, with the current ID current
  there too, so a call that crosses nodes keeps its correlation ID.
  """
  @spec erpc(node(), (() -> result), timeout()) :: result when result: term()
  def erpc(node, fun, timeout \\ :infinity) when is_function(fun, 0) do
    case get() do
      nil -> :erpc.call(node, fun, timeout)
      id -> :erpc.call(node, __MODULE__, :with_id, [id, fun], timeout)
    end
  end

  @doc "The gRPC metadata header name Python's interceptor reads."
  @spec header_name() :: String.t()
  def header_name, do: @header

  @doc """
  gRPC request metadata carrying the ID (the current one by default);
  empty when there is none.

      iex> Snakepit.Telemetry.Correlation.grpc_metadata("abc")
      %{"x-snakepit-correlation-id" => "abc"}
  """
  @spec grpc_metadata(id() | nil) :: %{optional(String.t()) => id()}
  def grpc_metadata(id \\ get())
  def grpc_metadata(nil), do: %{}
  def grpc_metadata(id) when is_binary(id), do: %{@header => id}
end
