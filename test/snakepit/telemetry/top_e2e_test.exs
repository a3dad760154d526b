defmodule Snakepit.Telemetry.TopE2ETest do
  # `mix snakepit.telemetry.top` end to end: the view runs in tmux, in a VM
  # of its own (a hidden node started with the compiled code; running `mix`
  # here would rebuild and lock _build), attached to this test VM over
  # distribution, where a real Python worker streams. The test reads the
  # screen and presses keys; steering must change the worker's control
  # state on this node and show on the screen.
  use Snakepit.Telemetry.Case, async: false

  alias Snakepit.Telemetry.{ClusterHelpers, GrpcStream}
  alias Snakepit.Telemetry.Top.State

  @moduletag timeout: 300_000
  # Booting a VM and the first frames, with one core busy: generous.
  @deadline 90_000

  setup_all do
    tmux = System.find_executable("tmux")
    assert tmux, "tmux is needed (script/setup installs it)"
    ClusterHelpers.ensure_distributed!()
    %{tmux: tmux}
  end

  defp tmux(ctx, args) do
    System.cmd(ctx.tmux, ["-L", ctx.socket | args], stderr_to_stdout: true)
  end

  defp screen(ctx) do
    {out, _} = tmux(ctx, ["capture-pane", "-p", "-t", ctx.session])
    out
  end

  # Awaits a screen for which `check` holds; fails showing the last screen.
  defp await_screen(ctx, check) do
    await(fn -> check.(screen(ctx)) end, @deadline)
  rescue
    e in ExUnit.AssertionError ->
      flunk("#{Exception.message(e)}; last screen:\n#{screen(ctx)}")
  end

  defp keys(ctx, keys), do: {_, 0} = tmux(ctx, ["send-keys", "-t", ctx.session | keys])

  defp command(argv) do
    paths =
      :code.get_path()
      |> Enum.map(&List.to_string/1)
      |> Enum.filter(&String.contains?(&1, "/_build/"))
      |> Enum.flat_map(&["-pa", &1])

    call = "Snakepit.Telemetry.Top.CLI.main(#{inspect(argv)})"

    ["elixir", "--hidden", "--name", "top_#{System.unique_integer([:positive])}@127.0.0.1"] ++
      ["--cookie", Atom.to_string(Node.get_cookie())] ++ paths ++ ["-e", call]
  end

  setup ctx do
    socket = "snakepit_top_#{System.unique_integer([:positive])}"
    ctx = Map.merge(ctx, %{socket: socket, session: "top"})

    on_exit(fn ->
      # The view's VM (the pane's process) ends with the test, even if it
      # never got its q.
      case System.cmd(ctx.tmux, ["-L", socket, "list-panes", "-a", "-F", "\#{pane_pid}"]) do
        {pids, 0} -> Enum.each(String.split(pids), &System.cmd("kill", [&1]))
        _ -> :ok
      end

      System.cmd(ctx.tmux, ["-L", socket, "kill-server"], stderr_to_stdout: true)
    end)

    {:ok, ctx}
  end

  defp start_top(ctx, argv) do
    # exec: the pane's process is the view's VM itself.
    line = "exec " <> (argv |> command() |> Enum.map_join(" ", &shell_quote/1))

    {_, 0} = tmux(ctx, ["new-session", "-d", "-s", ctx.session, "-x", "160", "-y", "50", line])
  end

  defp shell_quote(arg), do: "'" <> String.replace(arg, "'", "'\\''") <> "'"

  test "shows a worker's stream live; r sets its sampling rate and t toggles it on the node",
       ctx do
    worker = start_worker!()
    worker_id = register!(worker, pool_name: :top_e2e)
    command!(worker, %{cmd: "workload", calls: 1_000_000, interval_ms: 5})

    start_top(ctx, ["--node", Atom.to_string(node()), "--pool", "top_e2e"])

    # The worker's row: selected, open, on the batches protocol, events
    # flowing (the busiest events list the Python calls with durations).
    await_screen(ctx, fn s ->
      s =~ ~r/^> #{worker_id}\s+top_e2e\s+open\s+batches\s+\d+/m and
        s =~ ~r/python\.call\.stop\s+\d+(\.\d)?\/s\s+p50\s+\d+(us|\.\dms)/ and
        s =~ "control: enabled  default rate 1.0"
    end)

    assert screen(ctx) =~ "node #{node()}  events/s"

    # r, a rate, Enter: the node records it, and the screen shows it.
    keys(ctx, ["r", "0", ".", "5"])
    await_screen(ctx, &(&1 =~ "(0..1, Enter/Esc): 0.5_"))
    keys(ctx, ["Enter"])
    await(fn -> stream(worker_id).control.default_rate == 0.5 end, @deadline)

    await_screen(ctx, fn s ->
      s =~ "sampling rate 0.5 for #{worker_id} on #{node()}: ok" and
        s =~ "control: enabled  default rate 0.5" and s =~ ~r/^> #{worker_id}.*on rate 0\.5/m
    end)

    # t: off, through GrpcStream.toggle/3, and the reply shown.
    keys(ctx, ["t"])
    await(fn -> stream(worker_id).control.enabled == false end, @deadline)

    await_screen(ctx, fn s ->
      s =~ "toggle #{worker_id} on #{node()} off: ok" and s =~ "control: DISABLED"
    end)

    # A narrower terminal: every line is cut to it (a longer one would wrap).
    {_, 0} = tmux(ctx, ["resize-window", "-t", ctx.session, "-x", "60", "-y", "30"])

    await_screen(ctx, fn s ->
      lines = String.split(s, "\n")
      String.slice(State.help(), 0, 60) in lines and Enum.all?(lines, &(String.length(&1) <= 60))
    end)

    # q quits; the collector the view ran on this node detaches its handler.
    keys(ctx, ["q"])
    await(fn -> elem(tmux(ctx, ["has-session", "-t", ctx.session]), 1) != 0 end, @deadline)

    await(fn ->
      not Enum.any?(
        :telemetry.list_handlers([]),
        &match?({Snakepit.Telemetry.Top.Collector, _}, &1.id)
      )
    end)

    assert GrpcStream.toggle(worker_id, true) == :ok
  end

  test "--once prints one frame and exits; without a terminal, one line per second" do
    worker = start_worker!()
    worker_id = register!(worker, pool_name: :top_once)

    {out, 0} =
      System.cmd(
        "sh",
        [
          "-c",
          Enum.map_join(
            command(["--node", Atom.to_string(node()), "--once"]),
            " ",
            &shell_quote/1
          )
        ],
        stderr_to_stdout: true
      )

    assert out =~ ~r/^snakepit top  #{node()}/m
    assert out =~ ~r/#{worker_id}\s+top_once\s+open\s+batches/
    refute out =~ "\e["

    # --lines into a pipe, read two lines, then stop it.
    port =
      Port.open(
        {:spawn_executable, System.find_executable("sh")},
        [
          :binary,
          :exit_status,
          {:line, 10_000},
          args: [
            "-c",
            "exec " <>
              Enum.map_join(
                command(["--node", Atom.to_string(node()), "--lines"]),
                " ",
                &shell_quote/1
              )
          ]
        ]
      )

    {:os_pid, os_pid} = Port.info(port, :os_pid)
    on_exit(fn -> System.cmd("kill", [Integer.to_string(os_pid)]) end)

    for _ <- 1..2 do
      assert_receive {^port, {:data, {:eol, line}}}, @deadline
      assert line =~ ~r/^\d\d:\d\d:\d\d nodes #{node()}=\d+\/s workers \d+ /
      assert line =~ "#{worker_id}:open:"
    end
  end
end
