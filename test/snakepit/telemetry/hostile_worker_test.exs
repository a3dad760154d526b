defmodule Snakepit.Telemetry.HostileWorkerTest do
  # The real NIF and GrpcStream against a fake worker that speaks raw HTTP/2
  # and gRPC and misbehaves on purpose (test/support/hostile_worker.py: the
  # modes and what each sends are described there). For every misbehaviour:
  # GrpcStream survives (same pid), no atom is created, the loss is counted
  # under its named counter (or is the reason of the connection lost event),
  # the stream is open again and a valid event sent afterwards arrives.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{GrpcStream, PythonWorker}

  @moduletag timeout: 120_000
  @moduletag :capture_log

  @stop [:snakepit, :python, :call, :stop]
  @lost [:snakepit, :grpc, :connection, :lost]
  @reconnected [:snakepit, :grpc, :connection, :reconnected]
  @dropped [:snakepit, :telemetry, :events, :dropped]

  @script Path.expand("../../support/hostile_worker.py", __DIR__)

  # Native counters of whole events: received == delivered + these.
  @event_drops [
    :dropped_unknown_event,
    :dropped_malformed,
    :dropped_buffer_full,
    :dropped_receiver_down,
    :dropped_encode
  ]

  # Fast reconnects; each test may add its own settings with @tag stream: [...].
  # healthy_after_ms 0: every open stream restarts the backoff, so each
  # reconnected event's `attempts` counts the attempts since the latest loss.
  @stream [
    connect_timeout_ms: 10_000,
    retry_interval_ms: 20,
    backoff_initial_ms: 10,
    backoff_max_ms: 50,
    healthy_after_ms: 0
  ]

  setup_all do
    warm_up()
    :ok
  end

  setup context do
    Application.put_env(
      :snakepit_telemetry,
      :stream,
      Keyword.merge(@stream, context[:stream] || [])
    )

    on_exit(fn -> Application.delete_env(:snakepit_telemetry, :stream) end)
    forward_events([@lost, @reconnected, @dropped])
    %{counter: watch_stop_events()}
  end

  describe "malformed messages" do
    # A batch that cannot be walked (random bytes; a protobuf payload cut
    # inside a field, which cannot be delimited past the cut) is skipped
    # and counted; the call lives on.
    for mode <- ["garbage_frame", "truncated_payload"] do
      @tag mode: mode
      test "#{mode}: skipped and counted as a malformed message; the call lives on",
           %{mode: mode} do
        {fake, id} = open_fake!()
        before = baseline(id)

        arm!(fake, mode)
        await_line!(fake, "HOSTILE #{mode}")
        assert_receive {:stop, "after", _, _}, 10_000

        assert delta(id, before, :malformed_messages) == 1
        assert delta(id, before, :received) == 1
        assert stream(id).reconnects == before.reconnects
        refute_received {:event, @lost, _, %{worker_id: ^id}}
        assert await_dropped(id, :malformed_messages, 1) == 1
        assert_survived(id, before)
      end
    end

    test "raw bytes instead of HTTP/2 fail that connection only, on a first open and on a reconnect" do
      {id, _first, before} = spoils_a_first_open_and_a_reconnect!("garbage_preface")
      assert delta(id, before, :connect_attempts) == 2
      assert_survived(id, before)
    end
  end

  describe "calls cut mid-message" do
    # A gRPC message shorter than announced followed by END_STREAM, and the
    # TCP connection closed inside an HTTP/2 frame: the call ends in error
    # and reopens.
    for mode <- ["truncated_end_stream", "close_mid_frame"] do
      @tag mode: mode
      test "#{mode}: the call ends in error and reopens", %{mode: mode} do
        {fake, id} = open_fake!()
        before = baseline(id)

        arm!(fake, mode)
        await_line!(fake, "HOSTILE #{mode}")
        assert_receive {:event, @lost, _, %{worker_id: ^id, reason: {:error, text}}}, 10_000
        assert is_binary(text)
        assert_receive {:event, @reconnected, _, %{worker_id: ^id}}, 10_000
        assert_receive {:stop, "open", _, _}, 10_000
        assert delta(id, before, :received) == 1
        assert_survived(id, before)
      end
    end
  end

  @tag stream: [max_message_bytes: 65_536]
  test "oversized: a message over max_message_bytes is refused, counted with its size, and the stream reopens" do
    {fake, id} = open_fake!()
    before = baseline(id)

    arm!(fake, "oversized")
    "HOSTILE oversized bytes=" <> size = await_line!(fake, "HOSTILE oversized")
    size = String.to_integer(size)
    assert size > 65_536

    assert_receive {:event, @lost, _, %{worker_id: ^id}}, 10_000
    assert_receive {:event, @reconnected, _, %{worker_id: ^id}}, 10_000
    assert_receive {:stop, "open", _, _}, 10_000
    refute_received {:stop, "oversized", _, _}

    assert delta(id, before, :oversized_messages) == 1
    assert stats(id).oversized_bytes_max == size
    # Its events were never decoded: none is counted as received.
    assert delta(id, before, :received) == 1

    assert_receive {:event, @dropped, %{count: 1, bytes: ^size},
                    %{reason: :oversized_messages, hop: :native, worker_id: ^id}},
                   5_000

    assert_survived(id, before)
  end

  test "invalid UTF-8: only the events holding it are dropped and counted; the rest of the batch and the call live on" do
    {fake, id} = open_fake!()
    before = baseline(id)

    arm!(fake, "invalid_utf8")
    await_line!(fake, "HOSTILE invalid_utf8")

    for result <- ["g1", "g2", "g3"] do
      assert_receive {:stop, "utf8-good", ^result, %{duration: _}}, 10_000
    end

    assert_receive {:stop, "after", _, _}, 10_000
    refute_received {:stop, "utf8-bad", _, _}

    # Five events in the batch, then one more.
    assert delta(id, before, :received) == 6
    assert delta(id, before, :dropped_malformed) == 2
    assert delta(id, before, :malformed_messages) == 0
    assert stream(id).reconnects == before.reconnects
    refute_received {:event, @lost, _, %{worker_id: ^id}}
    assert await_dropped(id, :dropped_malformed, 2) == 2
    assert_survived(id, before)
  end

  test "status codes: every gRPC status as a trailers-only answer, and one after a valid event" do
    {fake, id} = open_fake!()
    before = baseline(id)

    # INTERNAL after an event: the event arrives, the loss is the lost reason.
    arm!(fake, "status_after_event")
    assert_receive {:stop, "before-status", _, _}, 10_000

    assert_receive {:event, @lost, _, %{worker_id: ^id, reason: {:error, "Internal" <> _}}},
                   10_000

    assert_receive {:event, @reconnected, %{attempts: 1}, %{worker_id: ^id}}, 10_000
    assert_receive {:stop, "open", _, _}, 10_000

    # The open call is ended; the next 16 calls are refused with codes 1..16
    # (UNIMPLEMENTED last): 15 failed attempts, then the fallback RPC opens.
    arm!(fake, "status_codes")
    assert_receive {:event, @lost, _, %{worker_id: ^id, reason: :end_of_stream}}, 10_000

    for code <- Enum.to_list(1..11) ++ Enum.to_list(13..16) ++ [12] do
      await_line!(fake, "HOSTILE status_codes code=#{code}")
    end

    assert_receive {:event, @reconnected, %{attempts: 16}, %{worker_id: ^id, protocol: :events}},
                   10_000

    assert_receive {:stop, "open", _, _}, 10_000
    assert stream(id).protocol == :events
    assert delta(id, before, :fallbacks) == 1
    assert delta(id, before, :connect_attempts) == 17
    assert_survived(id, before)
  end

  @tag stream: [open_timeout_ms: 1_000]
  test "hang before the response headers: the open times out, is counted, and the next attempt opens" do
    # Both the first open's retry loop and a reconnect's single attempt are
    # bounded by open_timeout_ms.
    {id, first, before} = spoils_a_first_open_and_a_reconnect!("hang_before_headers")
    assert first.open_timeouts == 1
    assert delta(id, before, :open_timeouts) == 1
    assert_survived(id, before)
  end

  # Starts a fake worker in `mode`, which spoils connections: the first open
  # fails once and its next attempt opens; then, armed again, the open call
  # is ended and the reconnect fails once the same way before the next
  # attempt opens. Returns the worker id, the counters after the first open,
  # and the baseline taken before the reconnect.
  defp spoils_a_first_open_and_a_reconnect!(mode) do
    atoms = atom_count()
    fake = start_fake!(mode)
    id = register_fake!(fake)

    await_line!(fake, "HOSTILE #{mode}")
    assert_receive {:stop, "open", _, _}, 10_000
    await(fn -> stream(id).status == :open end)
    first = stream(id).stats
    assert first.connect_attempts == 2

    before = Map.put(baseline(id), :atoms, atoms)
    arm!(fake, mode)
    assert_receive {:event, @lost, _, %{worker_id: ^id, reason: :end_of_stream}}, 10_000
    await_line!(fake, "HOSTILE #{mode}")
    assert_receive {:event, @reconnected, %{attempts: 2}, %{worker_id: ^id}}, 10_000
    assert_receive {:stop, "open", _, _}, 10_000
    {id, first, before}
  end

  @tag stream: [keepalive_interval_ms: 200, keepalive_timeout_ms: 1_000]
  test "hang after the response headers: the unanswered PING closes the stream, counted, and it reopens" do
    {fake, id} = open_fake!()
    before = baseline(id)

    arm!(fake, "hang_after_headers")
    assert_receive {:stop, "before-hang", _, _}, 10_000
    await_line!(fake, "HOSTILE hang_after_headers")
    assert_receive {:event, @lost, _, %{worker_id: ^id, reason: :keepalive_timeout}}, 10_000
    assert_receive {:event, @reconnected, _, %{worker_id: ^id}}, 10_000
    assert_receive {:stop, "open", _, _}, 10_000
    assert delta(id, before, :keepalive_timeouts) >= 1
    assert_survived(id, before)
  end

  describe "flood" do
    test "MBs of events, then a burst of 1-byte DATA frames, PINGs and SETTINGS: absorbed, memory bounded, every event accounted for",
         %{counter: counter} do
      {fake, id} = open_fake!()
      before = baseline(id)
      sampler = sample_memory()

      arm!(fake, "flood")
      line = await_line!(fake, "HOSTILE flood", 60_000)
      assert_receive {:stop, "after", _, _}, 60_000
      peak = stop_sampling(sampler)

      %{"events" => events, "bytes" => bytes} = words(line)
      assert String.to_integer(bytes) >= 32 * 1024 * 1024

      # Every event delivered ran the handlers; nothing was lost on the way.
      # (The NIF counts a batch as delivered just after sending it.)
      await(fn -> stats(id).delivered == :counters.get(counter, 1) end)
      stats = stats(id)
      assert accounted?(stats)
      assert stream(id).reconnects == before.reconnects
      assert delta(id, before, :received) == String.to_integer(events) + 1
      assert delta(id, before, :delivered) == String.to_integer(events) + 1

      # Bounded: the VM's resident memory (NIF included) grows less than the
      # flood would need if it were buffered (32 MiB of wire bytes, plus
      # ~130 MB for its ~360k events as terms); 26-63 MB was measured, the
      # same for 16, 32 and 64 MiB floods. GrpcStream's mailbox holds a few
      # batches at most.
      assert peak.rss_kb - before.rss_kb < 100 * 1024
      assert peak.queue < 64
      assert_survived(id, before)
    end

    test "empty DATA frames: the client refuses the connection (ENHANCE_YOUR_CALM) and the stream reopens" do
      {fake, id} = open_fake!()
      before = baseline(id)

      arm!(fake, "empty_frames")
      await_line!(fake, "HOSTILE empty_frames")

      assert_receive {:event, @lost, _,
                      %{worker_id: ^id, reason: {:error, "ResourceExhausted" <> _}}},
                     10_000

      assert_receive {:event, @reconnected, _, %{worker_id: ^id}}, 10_000
      assert_receive {:stop, "open", _, _}, 10_000
      refute_received {:stop, "after", _, _}
      assert_survived(id, before)
    end
  end

  ## The fake worker

  defp start_fake!(mode, args \\ []) do
    python = System.get_env("SNAKEPIT_TELEMETRY_PYTHON") || PythonWorker.default_python()

    port =
      Port.open(
        {:spawn_executable, python},
        [:binary, :exit_status, :use_stdio, {:line, 4_096}, args: ["-u", @script, mode | args]]
      )

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    on_exit(fn -> kill_fake(os_pid) end)

    receive do
      {^port, {:data, {:eol, listening}}} ->
        %{port: port, address: "127.0.0.1:" <> listening}

      {^port, {:exit_status, status}} ->
        flunk("the hostile worker exited with status #{status}")
    after
      20_000 -> flunk("the hostile worker did not start")
    end
  end

  # The port closes the worker's stdin when the test process exits, which
  # ends it; this makes sure it is gone, and kills nothing else.
  defp kill_fake(os_pid) do
    case File.read("/proc/#{os_pid}/cmdline") do
      {:ok, cmdline} ->
        if String.contains?(cmdline, "hostile_worker.py"),
          do: System.cmd("kill", ["-9", Integer.to_string(os_pid)], stderr_to_stdout: true)

      {:error, _} ->
        :ok
    end
  end

  defp arm!(fake, mode) do
    Port.command(fake.port, mode <> "\n")
    await_line!(fake, "ARMED #{mode} ")
  end

  # The next line the worker printed that starts with `prefix` (other lines
  # stay in the mailbox).
  defp await_line!(%{port: port}, prefix, timeout \\ 15_000) do
    size = byte_size(prefix)

    receive do
      {^port, {:data, {:eol, line}}} when binary_part(line, 0, size) == prefix -> line
    after
      timeout -> flunk("the hostile worker never printed #{inspect(prefix)}")
    end
  end

  defp words(line) do
    for word <- String.split(line),
        [k, v] <- [String.split(word, "=", parts: 2)],
        into: %{},
        do: {k, v}
  end

  defp register_fake!(fake) do
    id = "hostile-#{System.unique_integer([:positive])}"
    :ok = GrpcStream.register_worker(worker_id: id, pool_name: :hostile, address: fake.address)
    on_exit(fn -> GrpcStream.unregister_worker(id) end)
    id
  end

  # A fake worker behaving well, registered, its stream open and its first
  # event handled.
  defp open_fake!(mode \\ "good") do
    fake = start_fake!(mode)
    id = register_fake!(fake)
    await(fn -> stream(id).status == :open end)
    assert_receive {:stop, "open", _, _}, 10_000
    {fake, id}
  end

  ## Observations

  # `python.call.stop` events: every one counted, all but the flood's sent
  # to the test as {:stop, command, result, measurements}.
  defp watch_stop_events do
    counter = :counters.new(1, [:atomics])
    id = "hostile-stop-#{System.unique_integer([:positive])}"
    config = %{pid: self(), counter: counter}
    :ok = :telemetry.attach(id, @stop, &__MODULE__.handle_stop/4, config)
    on_exit(fn -> :telemetry.detach(id) end)
    counter
  end

  @doc false
  def handle_stop(_event, measurements, metadata, config) do
    :counters.add(config.counter, 1, 1)

    if metadata[:command] != "flood",
      do: send(config.pid, {:stop, metadata[:command], metadata[:result], measurements})
  end

  defp stats(id), do: stream(id).stats

  defp delta(id, before, key), do: Map.get(stats(id), key, 0) - Map.get(before.stats, key, 0)

  defp accounted?(stats) do
    stats.received == stats.delivered + Enum.sum(for key <- @event_drops, do: stats[key])
  end

  defp atom_count, do: :erlang.system_info(:atom_count)

  defp baseline(id) do
    %{
      pid: Process.whereis(GrpcStream),
      atoms: atom_count(),
      stats: stats(id),
      reconnects: stream(id).reconnects,
      rss_kb: rss_kb()
    }
  end

  defp assert_survived(id, before) do
    await(fn -> stream(id).status == :open end)
    assert Process.whereis(GrpcStream) == before.pid
    assert atom_count() == before.atoms
    await(fn -> accounted?(stats(id)) end)
  end

  # Sums the counts of `reason` in health events until they reach `total`
  # (they may come in several reports); returns the sum.
  defp await_dropped(id, reason, total, sum \\ 0) do
    receive do
      {:event, @dropped, %{count: count}, %{reason: ^reason, hop: :native, worker_id: ^id}} ->
        if sum + count >= total,
          do: sum + count,
          else: await_dropped(id, reason, total, sum + count)
    after
      10_000 -> sum
    end
  end

  defp rss_kb do
    "/proc/self/status"
    |> File.read!()
    |> String.split("\n")
    |> Enum.find_value(fn
      "VmRSS:" <> rest ->
        rest |> String.trim() |> String.trim_trailing(" kB") |> String.to_integer()

      _ ->
        nil
    end)
  end

  # Samples the VM's resident memory and GrpcStream's mailbox until told to stop.
  defp sample_memory do
    stream = Process.whereis(GrpcStream)

    Task.async(fn ->
      Stream.repeatedly(fn ->
        receive do
          :stop -> :stop
        after
          5 -> {rss_kb(), elem(Process.info(stream, :message_queue_len), 1)}
        end
      end)
      |> Enum.reduce_while(%{rss_kb: 0, queue: 0}, fn
        :stop, peak ->
          {:halt, peak}

        {rss, queue}, peak ->
          {:cont, %{rss_kb: max(peak.rss_kb, rss), queue: max(peak.queue, queue)}}
      end)
    end)
  end

  defp stop_sampling(task) do
    send(task.pid, :stop)
    Task.await(task, 10_000)
  end

  @doc false
  def handle_warm_up(event, _measurements, metadata, parent), do: send(parent, {event, metadata})

  # Runs the paths the tests take once (a lost stream, reconnects, a failed
  # attempt, the memory sampler), so that the modules they load and the atoms
  # those create exist before any atom count is taken.
  defp warm_up do
    stop_sampling(sample_memory())
    parent = self()
    handler = "hostile-warm-up"
    events = [@stop, @lost, @reconnected, @dropped]
    :ok = :telemetry.attach_many(handler, events, &__MODULE__.handle_warm_up/4, parent)
    fake = start_fake!("status_after_event")
    id = register_fake!(fake)
    assert_receive {@lost, %{worker_id: ^id}}, 10_000
    assert_receive {@reconnected, %{worker_id: ^id}}, 10_000
    arm!(fake, "garbage_preface")
    assert_receive {@reconnected, %{worker_id: ^id}}, 10_000
    await(fn -> stream(id).status == :open end)
    _ = baseline(id)
    :ok = GrpcStream.unregister_worker(id)
    :telemetry.detach(handler)
    Port.close(fake.port)
  end
end
