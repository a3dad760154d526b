defmodule Snakepit.Telemetry.AtomSafetyTest do
  # One million hostile events through the whole path: no atom is created,
  # memory stays bounded, and every event is accounted for.
  use Snakepit.Telemetry.Case, async: false

  @total 1_000_000
  @chunk 20_000
  @moduletag timeout: 600_000
  # The `hostile` command is test support, added to the command worker here.
  @hostile_commands Path.expand("../../support/python/hostile_commands.py", __DIR__)

  test "a million hostile events create no atom and are all accounted for" do
    worker =
      start_worker!(
        args: ["--queue-size", "50000", "--commands", @hostile_commands],
        env: [{"SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", "0"}]
      )

    worker_id = register!(worker)

    # Warm up every code path once before measuring.
    command!(worker, %{cmd: "hostile", count: 100, seed: 1})
    await(fn -> command!(worker, %{cmd: "wait_drained", timeout_ms: 5_000})["drained"] end)
    await(fn -> accounted?(worker, worker_id) end, 30_000)
    :erlang.garbage_collect()
    # :erlang.memory/1 creates the allocator names as atoms on its first call:
    # read memory first, then the atom count.
    memory = :erlang.memory(:total)
    atoms = :erlang.system_info(:atom_count)

    kinds =
      Enum.reduce(1..div(@total, @chunk), %{}, fn i, acc ->
        result =
          command!(worker, %{cmd: "hostile", count: @chunk, seed: i + 1, oversized_every: 100})

        await(
          fn -> command!(worker, %{cmd: "wait_drained", timeout_ms: 10_000})["drained"] end,
          60_000
        )

        Map.merge(acc, result["kinds"], fn _k, a, b -> a + b end)
      end)

    await(fn -> accounted?(worker, worker_id) end, 60_000)
    assert Enum.sum(Map.values(kinds)) == @total
    assert :erlang.system_info(:atom_count) == atoms

    python = command!(worker, %{cmd: "stats"})
    native = stream(worker_id).stats
    assert python["emitted"] == @total + 100

    # Every event emitted in Python is either dropped there (and counted) or
    # sent; every sent event is either delivered or dropped (and counted) in Rust.
    python_drops =
      python["dropped_queue_full"] + python["dropped_invalid"] + python["dropped_disabled"] +
        python["dropped_sampled"] + python["dropped_filtered"] + python["internal_errors"]

    assert python["sent"] + python_drops == python["emitted"]
    assert native.received == python["sent"]

    assert native.received ==
             native.delivered + native.dropped_unknown_event + native.dropped_malformed +
               native.dropped_buffer_full + native.dropped_encode

    # Unknown names: half are unique 3-part names, half 20-part names (over
    # the part limit, so malformed).
    assert native.dropped_unknown_event + native.dropped_malformed == kinds["unknown_name"] + 25
    assert native.dropped_malformed > 0
    assert native.dropped_measurements > 0
    assert native.truncated_metadata > 0 or native.dropped_metadata > 0

    :erlang.garbage_collect()
    Enum.each(Process.list(), &:erlang.garbage_collect/1)
    growth = :erlang.memory(:total) - memory
    assert growth < 64 * 1024 * 1024, "BEAM memory grew by #{growth} bytes"
  end

  defp accounted?(worker, worker_id) do
    python = command!(worker, %{cmd: "stats"})
    native = stream(worker_id).stats

    python["queue_len"] == 0 and native.received == python["sent"] and
      native.received ==
        native.delivered + native.dropped_unknown_event + native.dropped_malformed +
          native.dropped_buffer_full + native.dropped_encode
  end
end
