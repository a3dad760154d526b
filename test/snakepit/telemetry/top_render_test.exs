defmodule Snakepit.Telemetry.TopRenderTest do
  # The view's frame and key handling are pure functions: known snapshots
  # in, text and states out.
  use ExUnit.Case, async: true

  alias Snakepit.Telemetry.Top.{Render, State}

  defp row(node, id, pool, extra \\ []) do
    Map.merge(
      %{
        node: node,
        worker_id: id,
        pool: pool,
        status: :open,
        protocol: :batches,
        rate: 0.0,
        delivered: 0,
        drops: %{native: %{}, python: %{}},
        queue_len: 0,
        reconnects: 0,
        control: %{enabled: true, default_rate: 1.0, rules: [], allow: [], deny: []}
      },
      Map.new(extra)
    )
  end

  defp node_entry(node, workers, extra \\ []) do
    Map.merge(
      %{
        node: node,
        error: nil,
        eps: 10,
        queue: %{queued: 3, python: 2, native: 1, python_age_ms: 5},
        drops: %{policy: 4, loss: 1},
        workers: workers,
        events: []
      },
      Map.new(extra)
    )
  end

  defp snapshot(nodes), do: %{time: "12:00:00", target: :a@h, error: nil, nodes: nodes}

  defp plain(frame),
    do: frame |> String.replace(~r/\e\[[0-9;?]*[A-Za-z]/, "") |> String.split("\r\n")

  defp worker_lines(lines), do: Enum.filter(lines, &(&1 =~ ~r/^[> ] w\d/))

  defp sample do
    snapshot([
      node_entry(:a@h, [
        row(:a@h, "w1", :p1, rate: 5.0, queue_len: 9),
        row(:a@h, "w2", :p2,
          rate: 50.0,
          drops: %{native: %{dropped_buffer_full: 7}, python: %{dropped_queue_full: 3}},
          implementation: :native
        ),
        row(:a@h, "w3", :p1,
          rate: 20.0,
          status: {:failed, :refused},
          control: %{
            enabled: false,
            default_rate: 0.25,
            rules: [%{patterns: ["python.call.*"], rate: 0.1}],
            allow: [],
            deny: ["tool.*"]
          }
        )
      ])
    ])
  end

  test "rows: sorted by rate (busiest first), by worker, by drops, by queue" do
    ids = fn sort -> sample() |> Render.rows(%State{sort: sort}) |> Enum.map(& &1.worker_id) end
    assert ids.(:rate) == ["w2", "w3", "w1"]
    assert ids.(:worker) == ["w1", "w2", "w3"]
    assert ids.(:drops) == ["w2", "w1", "w3"]
    assert ids.(:queue) == ["w1", "w2", "w3"]
    assert ids.(:pool) == ["w1", "w3", "w2"]

    lines = sample() |> Render.frame(width: 200, state: %State{sort: :rate}) |> plain()

    assert lines |> worker_lines() |> Enum.map(&(Regex.run(~r/^[> ] (\S+)/, &1) |> List.last())) ==
             ~w(w2 w3 w1)
  end

  test "the pool filter shows that pool's workers only" do
    state = %State{pool: :p1, sort: :worker}
    assert sample() |> Render.rows(state) |> Enum.map(& &1.worker_id) == ["w1", "w3"]
    lines = sample() |> Render.frame(width: 200, state: state) |> plain()
    assert length(worker_lines(lines)) == 2
    refute Enum.any?(lines, &(&1 =~ "w2"))
    assert hd(lines) =~ "pool: p1"
  end

  test "the selected worker is marked, shown in reverse video, with its control state and drops" do
    state = %State{selected: {:a@h, "w2"}}
    frame = Render.frame(sample(), width: 200, state: state)
    assert frame =~ "\e[7m> w2"
    lines = plain(frame)
    assert [selected] = Enum.filter(lines, &String.starts_with?(&1, "> "))
    assert selected =~ "w2"
    assert selected =~ "7/3"

    assert Enum.any?(
             lines,
             &(&1 =~ "drops: native dropped_buffer_full=7  | python dropped_queue_full=3")
           )

    assert Enum.any?(lines, &(&1 =~ "python implementation: native"))

    lines = sample() |> Render.frame(width: 200, state: %State{selected: {:a@h, "w3"}}) |> plain()

    [w3] = Enum.filter(lines, &String.starts_with?(&1, "> "))
    assert w3 =~ "failed"
    assert w3 =~ "OFF rate 0.25 rules 1 deny 1"

    assert Enum.any?(
             lines,
             &(&1 =~
                 "control: DISABLED  default rate 0.25  rules [python.call.*=0.1]  allow []  deny [tool.*]")
           )
  end

  test "every line is cut to the width; the frame fits the height, the selection kept in view" do
    for width <- [20, 40, 79] do
      lines = sample() |> Render.frame(width: width) |> plain()
      assert Enum.all?(lines, &(String.length(&1) <= width))
    end

    many = for i <- 1..40, do: row(:a@h, "w#{100 + i}", :p, rate: 1.0 * i)
    snap = snapshot([node_entry(:a@h, many)])
    state = %State{sort: :worker, selected: {:a@h, "w135"}}
    lines = snap |> Render.frame(width: 120, height: 15, state: state) |> plain()
    # 15 lines and the trailing empty piece after the last "\r\n".
    assert length(lines) == 16
    assert Enum.any?(lines, &String.starts_with?(&1, "> w135"))
    assert Enum.any?(lines, &(&1 =~ "more lines"))
    assert List.last(lines, "") == ""
    assert Enum.at(lines, -2) == State.help()
  end

  test "a node that gave no answer is shown with its reason, the others as usual" do
    snap =
      snapshot([
        node_entry(:a@h, [row(:a@h, "w1", :p1)]),
        %{node: :b@h, error: :timeout},
        node_entry(:c@h, [], eps: {:error, :noconnection}, events: {:error, :timeout})
      ])

    lines = snap |> Render.frame(width: 200) |> plain()
    assert Enum.any?(lines, &(&1 == "node b@h  no answer: timeout"))
    assert Enum.any?(lines, &(&1 =~ ~r/^node c@h  events\/s \? \(noconnection\)/))
    assert Enum.any?(lines, &(&1 =~ "busiest events: ? (timeout)"))
    assert hd(lines) =~ "nodes 3  workers 1"
    assert Render.line(snap) =~ "b@h=no answer (timeout)"

    down = %{time: "12:00:00", target: :a@h, error: :noconnection, nodes: []}

    assert Render.frame(down, width: 200) |> plain() |> Enum.at(1) =~
             "a@h: no answer (noconnection)"
  end

  test "busiest events: the top names by rate with p50/p99 durations" do
    events = [
      %{name: "python.call.stop", rate: 90.0, p50_us: 250, p99_us: 12_500},
      %{name: "python.call.start", rate: 91.0},
      %{name: "custom.thing", rate: 1.5, p50_us: 2_500_000, p99_us: 3_000_000}
    ]

    lines =
      snapshot([node_entry(:a@h, [], events: events)]) |> Render.frame(width: 200) |> plain()

    i = Enum.find_index(lines, &(&1 =~ "busiest events"))
    assert Enum.at(lines, i + 1) =~ ~r/python\.call\.start\s+91\/s\s+p50\s+-\s+p99\s+-/
    assert Enum.at(lines, i + 2) =~ ~r/python\.call\.stop\s+90\/s\s+p50\s+250us\s+p99\s+12\.5ms/
    assert Enum.at(lines, i + 3) =~ ~r/custom\.thing\s+1\.5\/s\s+p50\s+2\.50s\s+p99\s+3\.00s/
  end

  test "one line per refresh when not a terminal; the plain frame without ANSI" do
    line = Render.line(sample())
    refute line =~ "\n"
    assert line =~ "a@h=10/s"
    assert line =~ "w2:open:50/s:q0:on rate 1.0"
    frame = Render.frame(sample(), width: 200, ansi: false)
    refute frame =~ "\e"
    assert frame =~ "w3"
  end

  describe "keys" do
    setup do
      %{rows: Render.rows(sample(), %State{})}
    end

    test "decode: arrows, enter, escape, backspace, characters" do
      assert State.decode("\e[Ak\e[B\r\n\e\d x") == [
               :up,
               "k",
               :down,
               :enter,
               :enter,
               :esc,
               :backspace,
               " ",
               "x"
             ]

      assert State.decode(<<3>>) == ["q"]
    end

    test "selection moves within the rows and starts on the first", %{rows: rows} do
      {s, :none} = State.handle_key(%State{}, :down, rows)
      assert s.selected == {:a@h, "w3"}
      {s, :none} = State.handle_key(s, :down, rows)
      {s, :none} = State.handle_key(s, "j", rows)
      assert s.selected == {:a@h, "w1"}
      {s, :none} = State.handle_key(s, :up, rows)
      assert s.selected == {:a@h, "w3"}
      # A selected worker that is gone: the first row is selected.
      assert State.ensure_selection(%State{selected: {:a@h, "gone"}}, rows).selected ==
               {:a@h, "w2"}
    end

    test "sort, pool filter and pause cycle", %{rows: rows} do
      {s, :none} = State.handle_key(%State{}, "s", rows)
      assert s.sort == :worker
      s = Enum.reduce(1..4, s, fn _, s -> elem(State.handle_key(s, "s", rows), 0) end)
      assert s.sort == :rate

      s = %State{pools: [:p1, :p2]}
      {s, :none} = State.handle_key(s, "p", rows)
      assert s.pool == :p1
      {s, :none} = State.handle_key(s, "p", rows)
      assert s.pool == :p2
      {s, :none} = State.handle_key(s, "p", rows)
      assert s.pool == nil

      {s, :none} = State.handle_key(s, " ", rows)
      assert s.paused
      assert State.handle_key(s, "q", rows) == {s, :quit}
    end

    test "t toggles the selected worker, T its pool, to the opposite of its state", %{rows: rows} do
      s = %State{selected: {:a@h, "w3"}}
      assert {_, {:toggle, {:a@h, "w3"}, true}} = State.handle_key(s, "t", rows)
      assert {_, {:toggle, {:pool, :p1}, true}} = State.handle_key(s, "T", rows)
      s = %State{selected: {:a@h, "w1"}}
      assert {_, {:toggle, {:a@h, "w1"}, false}} = State.handle_key(s, "t", rows)
      assert {%State{message: "no worker selected"}, :none} = State.handle_key(%State{}, "t", [])
    end

    test "r reads a rate: digits, backspace, enter applies; out of range or esc does nothing", %{
      rows: rows
    } do
      s = %State{selected: {:a@h, "w1"}}

      type = fn s, keys ->
        Enum.reduce(keys, {s, :none}, fn k, {s, _} -> State.handle_key(s, k, rows) end)
      end

      {s1, :none} = type.(s, ["r", "0", ".", "5", "x", "7", :backspace])
      assert s1.input == {{:a@h, "w1"}, "0.5"}

      assert Render.frame(sample(), width: 200, state: s1) =~
               "sampling rate for w1 on a@h (0..1, Enter/Esc): 0.5_"

      assert {%State{input: nil}, {:sampling, {:a@h, "w1"}, 0.5}} =
               State.handle_key(s1, :enter, rows)

      assert {_, {:sampling, {:pool, :p1}, 0.25}} = type.(s, ["R", ".", "2", "5", :enter])

      assert {%State{input: nil, message: "rate: \"1.5\" is not in 0..1"}, :none} =
               type.(s, ["r", "1", ".", "5", :enter])

      assert {%State{input: nil}, :none} = type.(s, ["r", "1", :esc])
      # While typing, q is not quit.
      assert {%State{input: {_, ""}}, :none} = type.(s, ["r", "q"])
    end
  end
end
