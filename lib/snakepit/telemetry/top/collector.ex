defmodule Snakepit.Telemetry.Top.Collector do
  @moduledoc """
  Counts the catalog events executed on one node, for
  `Snakepit.Telemetry.Top`'s "busiest events".

  `start/1` runs on the node being viewed (the viewer calls it there with
  `:erpc`): it spawns a process that owns a public ETS table and attaches a
  `:telemetry` handler (id `{Snakepit.Telemetry.Top.Collector, pid}`) to
  every event of `Snakepit.Telemetry.Naming.events/0`. The handler runs in
  the process that executes the event (a worker's delivery process) and
  costs one `:ets.update_counter/4` per event, plus, for an event with an
  integer `:duration` measurement (a span's stop or exception), one more
  counter and one insert into a ring of the last 64 durations of that
  event name. Memory is bounded: one counter and 64 slots per event name
  of the catalog.

  The collector monitors its owner (the viewer, possibly on another node)
  and detaches its handler and exits when the owner exits or its node
  disconnects; `stop/1` does the same at once.

  `read/2` answers `%{name => %{count: n, p50_us: n | nil, p99_us: n | nil}}`
  (`name` is the event name without its leading `snakepit`, joined with
  dots, e.g. `"python.call.stop"`; `count` is the total since start, rates
  are the viewer's differences between reads).
  """

  alias Snakepit.Telemetry.Naming

  @ring 64

  @doc "Starts a collector on this node for `owner`; returns its pid."
  @spec start(pid()) :: {:ok, pid()} | {:error, :timeout}
  def start(owner) when is_pid(owner) do
    parent = self()
    ref = make_ref()
    pid = spawn(fn -> init(owner, parent, ref) end)

    receive do
      {^ref, :ready} -> {:ok, pid}
    after
      5_000 -> {:error, :timeout}
    end
  end

  @doc "Stops a collector (and detaches its handler)."
  @spec stop(pid()) :: :ok
  def stop(pid) do
    send(pid, :stop)
    :ok
  end

  @doc "The counts and span durations so far; `{:error, :timeout}` if no answer in `timeout` ms."
  @spec read(pid(), timeout()) :: {:ok, map()} | {:error, term()}
  def read(pid, timeout \\ 1_000) do
    ref = Process.monitor(pid)
    send(pid, {:read, self(), ref})

    receive do
      {^ref, counts} ->
        Process.demonitor(ref, [:flush])
        {:ok, counts}

      {:DOWN, ^ref, :process, _, reason} ->
        {:error, {:collector_down, reason}}
    after
      timeout ->
        Process.demonitor(ref, [:flush])
        {:error, :timeout}
    end
  end

  defp init(owner, parent, ref) do
    table = :ets.new(__MODULE__, [:public, :set, write_concurrency: true])
    id = {__MODULE__, self()}
    :ok = :telemetry.attach_many(id, Naming.events(), &__MODULE__.handle_event/4, table)
    owner_ref = Process.monitor(owner)
    send(parent, {ref, :ready})
    loop(table, id, owner_ref)
  end

  defp loop(table, id, owner_ref) do
    receive do
      {:read, from, ref} ->
        send(from, {ref, summarize(table)})
        loop(table, id, owner_ref)

      {:DOWN, ^owner_ref, :process, _, _} ->
        :telemetry.detach(id)

      :stop ->
        :telemetry.detach(id)
    end
  end

  @doc false
  def handle_event(event, measurements, _metadata, table) do
    :ets.update_counter(table, {:n, event}, 1, {{:n, event}, 0})

    case measurements do
      %{duration: d} when is_integer(d) and d >= 0 ->
        i = :ets.update_counter(table, {:i, event}, 1, {{:i, event}, 0})
        :ets.insert(table, {{:d, event, rem(i, @ring)}, d})

      _ ->
        :ok
    end
  rescue
    # The collector was killed (its table is gone) before it could detach:
    # detach here rather than raise in the process executing the event.
    ArgumentError -> :ets.info(table, :owner) == :undefined && detach_orphan(table)
  end

  defp detach_orphan(table) do
    for %{id: {__MODULE__, _} = id, config: ^table} <- :telemetry.list_handlers([]),
        do: :telemetry.detach(id)

    :ok
  end

  defp summarize(table) do
    rows = :ets.tab2list(table)

    durations =
      for({{:d, event, _slot}, d} <- rows, do: {event, d})
      |> Enum.group_by(&elem(&1, 0), &elem(&1, 1))

    for {{:n, event}, n} <- rows, into: %{} do
      sorted = durations |> Map.get(event, []) |> Enum.sort()

      {name(event),
       %{count: n, p50_us: percentile(sorted, 0.50), p99_us: percentile(sorted, 0.99)}}
    end
  end

  defp name([:snakepit | rest]), do: Enum.join(rest, ".")
  defp name(event), do: Enum.join(event, ".")

  defp percentile([], _q), do: nil

  defp percentile(sorted, q) do
    index = min(length(sorted) - 1, trunc(q * length(sorted)))
    System.convert_time_unit(Enum.at(sorted, index), :native, :microsecond)
  end
end
