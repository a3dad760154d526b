defmodule Snakepit.Telemetry.BackpressureTest do
  # A producer ten times faster than the Elixir handlers: the mailbox of the
  # worker's delivery process stays bounded by max_pending_events, memory does not grow on
  # either side, the worker sheds the excess (counted), and every event is
  # accounted for.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{GrpcStream, Native, PythonWorker, SlowHandler}

  @moduletag timeout: 60_000

  @stop [:snakepit, :python, :call, :stop]
  @dropped [:snakepit, :telemetry, :events, :dropped]
  @max_pending 256
  # Handler: 100 µs per event, so at most ~10 000 events/s.
  @busy_us 100
  # Producer: a flood of @chunk events every @period_ms (~100 000 events/s
  # asked for), for @produce_ms.
  @chunk 5_000
  @period_ms 50
  @produce_ms 5_000
  @warm_up_ms 1_000

  @python_drops ~w(dropped_queue_full dropped_invalid dropped_disabled dropped_sampled
                   dropped_filtered internal_errors interrupted_sends)
  @native_drops [
    :dropped_unknown_event,
    :dropped_malformed,
    :dropped_buffer_full,
    :dropped_receiver_down,
    :dropped_encode
  ]

  # The worker's --wire option: which RPCs it offers, and so which protocol
  # the NIF negotiates.
  @wires %{batches: "batches", events: "single"}

  setup context do
    Application.put_env(:snakepit_telemetry, :stream, max_pending_events: @max_pending)
    on_exit(fn -> Application.delete_env(:snakepit_telemetry, :stream) end)

    worker =
      start_worker!(
        args: ["--queue-size", "1024", "--wire", @wires[context[:protocol] || :batches]],
        # Stats reports (how Python's drops reach Elixir) only where a test
        # asks: they are events too, and would blur the exact counts.
        env: [{"SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", context[:stats_interval] || "0"}]
      )

    %{worker: worker}
  end

  for protocol <- [:batches, :events] do
    @tag protocol: protocol
    test "#{protocol}: a slow handler: bounded mailbox and memory, load shed in Python, " <>
           "exact accounting",
         %{worker: worker, protocol: protocol} do
      slow_handler(worker, protocol)
    end

    @tag protocol: protocol
    test "#{protocol}: an owner that never acknowledges gets about max_pending_events, " <>
           "then more per ack",
         %{worker: worker, protocol: protocol} do
      never_acks(worker, protocol)
    end
  end

  defp slow_handler(worker, protocol) do
    worker_id = register!(worker)
    assert stream(worker_id).protocol == protocol
    # The handler holds its first event until the NIF has stopped reading
    # for want of credit: slower than the producer by construction, whatever
    # the machine's speed.
    counter = SlowHandler.attach!(@stop, worker_id, @busy_us, hold: true)
    delivery = stream(worker_id).delivery
    handle = native_handle(worker_id)
    os_pid = PythonWorker.os_pid(worker)
    started = System.monotonic_time(:millisecond)

    producer = Task.async(fn -> produce(worker, started + @produce_ms) end)
    queue_watch = Task.async(fn -> max_queue_len(delivery, producer.pid, 0) end)

    await(fn -> SlowHandler.holding?(counter) end, 20_000)
    await(fn -> Native.stream_stats(handle).credit_waits > 0 end, 20_000)
    # Paused: what reached Elixir is bounded by the credit (plus one wire
    # message, at most Python's batch of 1024).
    assert Native.stream_stats(handle).delivered <= @max_pending + 1024
    SlowHandler.release(counter)

    Process.sleep(@warm_up_ms)
    :erlang.garbage_collect()
    beam_base = :erlang.memory(:total)
    rss_base = rss(os_pid)

    samples =
      Stream.repeatedly(fn ->
        Process.sleep(250)
        :erlang.garbage_collect()
        {:erlang.memory(:total) - beam_base, rss(os_pid) - rss_base}
      end)
      |> Stream.with_index(1)
      # While the flood lasts, and at least 8 samples whatever the machine's speed.
      |> Enum.take_while(fn {_, n} -> n <= 8 or Process.alive?(producer.pid) end)
      |> Enum.map(&elem(&1, 0))

    {emitted_asked, produce_seconds} = Task.await(producer, 30_000)
    max_queue = Task.await(queue_watch, 30_000)

    beam_growth = samples |> Enum.map(&elem(&1, 0)) |> Enum.max()
    rss_growth = samples |> Enum.map(&elem(&1, 1)) |> Enum.max()
    assert beam_growth < 32 * 1024 * 1024, "BEAM memory grew by #{beam_growth} bytes"
    assert rss_growth < 16 * 1024 * 1024, "worker RSS grew by #{rss_growth} bytes"

    # max_pending_events events are a few messages, never a backlog (the
    # rest of the bound: lifecycle and health events while the handler held
    # the delivery process).
    assert max_queue <= 16, "the delivery process's mailbox reached #{max_queue} messages"

    # Drain: Python's queue empties into gRPC, the NIF reads everything Python
    # sent, and the handler executes everything the NIF delivered.
    await(fn -> command!(worker, %{cmd: "wait_drained", timeout_ms: 200})["drained"] end, 15_000)
    python = command!(worker, %{cmd: "stats"})

    # The NIF may still hold decoded events back for a busy owner (counted
    # once handed on), so wait until it holds none.
    await(
      fn ->
        native = stream(worker_id).stats
        native_drops = Enum.sum(for k <- @native_drops, do: Map.fetch!(native, k))

        native.received == python["sent"] and
          native.received == native.delivered + native_drops and
          SlowHandler.seen(counter) == native.delivered
      end,
      15_000
    )

    native = stream(worker_id).stats
    seen = SlowHandler.seen(counter)
    python_drops = Enum.sum(for k <- @python_drops, do: python[k])
    native_drops = Enum.sum(for k <- @native_drops, do: Map.fetch!(native, k))

    assert python["emitted"] == emitted_asked
    assert python["emitted"] == seen + python_drops + native_drops
    assert python["dropped_queue_full"] > 0, "the worker shed no load"
    assert native_drops == 0
    assert native.credit_waits > 0
    assert native.fallbacks == if(protocol == :events, do: 1, else: 0)

    elapsed = System.monotonic_time(:millisecond) - started

    IO.puts(
      "\nbackpressure (#{protocol}): #{python["emitted"]} emitted in #{Float.round(produce_seconds, 2)} s " <>
        "of flood, #{seen} handled, #{python["dropped_queue_full"]} shed in Python, " <>
        "max mailbox #{max_queue}, BEAM +#{div(beam_growth, 1024)} KiB, " <>
        "RSS +#{div(rss_growth, 1024)} KiB, #{native.wire_messages} wire messages, " <>
        "#{native.credit_waits} credit waits, #{elapsed} ms"
    )
  end

  @tag stats_interval: "100"
  test "load shed in Python is reported as health events, to the exact count", %{worker: worker} do
    worker_id = register!(worker)
    forward_events([@dropped])
    SlowHandler.attach!(@stop, worker_id, @busy_us)
    started = System.monotonic_time(:millisecond)
    {_asked, _seconds} = produce(worker, started + 2_000)
    await(fn -> command!(worker, %{cmd: "wait_drained", timeout_ms: 200})["drained"] end, 15_000)
    shed = command!(worker, %{cmd: "stats"})["dropped_queue_full"]
    assert shed > 0

    deadline = System.monotonic_time(:millisecond) + 15_000
    assert reported_drops(worker_id, shed, 0, deadline) == shed
    # Nothing more is reported afterwards.
    assert reported_drops(worker_id, 1, 0, System.monotonic_time(:millisecond) + 1_500) == 0
  end

  # Sums the health events for Python's queue-full drops until `want` is
  # reached (or the deadline passes); more than `want` would be over-reporting.
  defp reported_drops(worker_id, want, acc, deadline) do
    wait = max(deadline - System.monotonic_time(:millisecond), 0)

    receive do
      {:event, @dropped, %{count: n},
       %{worker_id: ^worker_id, reason: :dropped_queue_full, hop: :python}} ->
        if acc + n >= want, do: acc + n, else: reported_drops(worker_id, want, acc + n, deadline)
    after
      wait -> acc
    end
  end

  defp never_acks(worker, expected) do
    stream_id = System.unique_integer([:positive])
    options = Map.new(Snakepit.Telemetry.Config.stream())

    options =
      Map.merge(options, %{
        max_pending_events: 100,
        max_batch: 64,
        connect_timeout_ms: 5_000,
        native_per_sec: System.convert_time_unit(1, :second, :native)
      })

    {:ok, handle} = Native.stream_open(self(), stream_id, PythonWorker.address(worker), options)

    on_exit(fn -> Native.stream_close(handle) end)
    assert_receive {:snakepit_telemetry, ^stream_id, {:open, ^expected}}, 5_000

    # Paced so that Python's queue (1024) never overflows: every event is
    # sent, and waits in gRPC's buffers (well within the HTTP/2 window)
    # while the stream holds back.
    for _ <- 1..10 do
      command!(worker, %{cmd: "flood", event: "python.call.stop", count: 500})
      await(fn -> command!(worker, %{cmd: "wait_drained", timeout_ms: 1_000})["drained"] end)
    end

    # Every event is sent: the stream must have stopped reading for credit.
    await(fn -> Native.stream_stats(handle).credit_waits >= 1 end)
    first = receive_events(stream_id, 0)
    # One wire message is never split, so a batch may overshoot the bound;
    # Python's batches are bounded by its queue (1024). One event each: exact.
    assert first >= 100 and first < 100 + 1024, "#{first} events without an ack"
    if expected == :events, do: assert(first == 100)
    stats = Native.stream_stats(handle)
    assert stats.delivered == first
    assert stats.credit_waits >= 1

    assert Native.stream_ack(handle, first) == :ok
    second = receive_events(stream_id, 0)
    assert second >= 100 and second < 100 + 1024, "#{second} after an ack of #{first}"
    assert Native.stream_stats(handle).delivered == first + second

    # An owner that acknowledges what it gets receives every event, in
    # messages of at most about max_pending_events.
    python = command!(worker, %{cmd: "stats"})
    assert python["emitted"] == 5_000
    assert python["sent"] == 5_000
    :ok = Native.stream_ack(handle, second)
    assert ack_each(handle, stream_id, first + second) == 5_000
    assert Native.stream_stats(handle).delivered == 5_000
  end

  test "stream_ack with a bad argument raises ArgumentError" do
    {:ok, handle} =
      Native.stream_open(
        self(),
        1,
        "unix:/nonexistent/ack.sock",
        Map.merge(Map.new(Snakepit.Telemetry.Config.stream()), %{
          connect_timeout_ms: 0,
          native_per_sec: 1_000_000_000
        })
      )

    assert Native.stream_ack(handle, 0) == :ok
    assert Native.stream_ack(handle, 1_000_000) == :ok
    assert_raise ArgumentError, fn -> Native.stream_ack(handle, -1) end
    assert_raise ArgumentError, fn -> Native.stream_ack(handle, 1.5) end
    assert_raise ArgumentError, fn -> Native.stream_ack(handle, :many) end
    assert_raise ArgumentError, fn -> Native.stream_ack(make_ref(), 1) end
    assert_raise ArgumentError, fn -> Native.stream_ack(:not_a_handle, 1) end
    Native.stream_close(handle)
  end

  # Floods in chunks at a fixed pace until `deadline`; returns the events
  # asked for and the seconds Python spent emitting them.
  defp produce(worker, deadline, asked \\ 0, seconds \\ 0.0) do
    now = System.monotonic_time(:millisecond)

    if now >= deadline do
      {asked, seconds}
    else
      %{"count" => n, "seconds" => s} =
        command!(worker, %{cmd: "flood", event: "python.call.stop", count: @chunk})

      Process.sleep(max(0, now + @period_ms - System.monotonic_time(:millisecond)))
      produce(worker, deadline, asked + n, seconds + s)
    end
  end

  # The NIF handle of the worker's current stream, read from GrpcStream's
  # state so the test can read its counters directly.
  defp native_handle(worker_id) do
    %{workers: %{^worker_id => %{handle: handle}}} = :sys.get_state(GrpcStream)
    handle
  end

  # The largest message queue of `pid` seen while `producer` runs.
  defp max_queue_len(pid, producer, max) do
    if Process.alive?(producer) do
      {:message_queue_len, n} = Process.info(pid, :message_queue_len)
      Process.sleep(2)
      max_queue_len(pid, producer, max(n, max))
    else
      max
    end
  end

  defp rss(os_pid) do
    "/proc/#{os_pid}/status"
    |> File.read!()
    |> then(&Regex.run(~r/VmRSS:\s+(\d+) kB/, &1, capture: :all_but_first))
    |> hd()
    |> String.to_integer()
    |> Kernel.*(1024)
  end

  defp ack_each(handle, stream_id, total) do
    receive do
      {:snakepit_telemetry_events, ^stream_id, events} ->
        assert length(events) < 100 + 1024
        :ok = Native.stream_ack(handle, length(events))
        ack_each(handle, stream_id, total + length(events))
    after
      500 -> total
    end
  end

  # Counts events of `stream_id` until none arrive for 500 ms.
  defp receive_events(stream_id, acc) do
    receive do
      {:snakepit_telemetry_events, ^stream_id, events} ->
        receive_events(stream_id, acc + length(events))
    after
      500 -> acc
    end
  end
end
