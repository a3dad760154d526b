defmodule Snakepit.Telemetry.PythonWorker do
  @moduledoc """
  Runs the synthetic Python command worker
  (`support/python/command_worker.py`) under a port, for the demo, the tests
  and the benchmarks.

  Not part of the library: it is compiled only for `MIX_ENV=dev` and `test`
  (`elixirc_paths` in `mix.exs`), and `bench/` loads it with
  `support/load.exs`. In production Snakepit spawns its own workers, which
  serve the telemetry stream with `snakepit_telemetry.telemetry.add_to_server`.
  The command worker serves it too and runs commands sent as JSON lines on its
  stdin. It exits when its stdin closes, so it never outlives the process that
  started it.

  ## Options

    * `:listen` - `"127.0.0.1:0"` (default: a free TCP port) or
      `"unix:/absolute/path.sock"`: the worker's grpcio server.
    * `:telemetry_listen` - serve the telemetry calls from the native
      implementation's Rust server in the worker (`telemetry.serve`) on this
      address, e.g. `"127.0.0.1:0"` or `Snakepit.Telemetry.Config.socket_path(id)`;
      `address/1` is then the Rust server's (register the worker with it). The
      worker fails to start (`{:worker_exited, 1}`) when it runs the python
      implementation. Default `nil`: the grpcio server serves them (unless the
      `:env` has `SNAKEPIT_TELEMETRY_LISTEN`, see the command worker).
    * `:implementation` - `:native`, `:python` or `:auto`: sets
      `SNAKEPIT_TELEMETRY_IMPLEMENTATION` for the worker (default: inherited).
      `info/1` tells which one runs.
    * `:python` - the interpreter; default `SNAKEPIT_TELEMETRY_PYTHON`, then
      the project's `.venv/bin/python`, then `python3` on the PATH.
    * `:args` - extra worker arguments, e.g. `["--queue-size", "64"]`.
    * `:script` - another worker script that speaks the same stdout protocol
      (`SNAKEPIT_TELEMETRY_READY`, `SNAKEPIT_TELEMETRY_ACK`), e.g. the tests'
      Snakepit v0.13-style `test/support/python/old_worker.py`; default the
      command worker.
    * `:env` - extra environment variables, e.g.
      `Snakepit.Telemetry.Config.worker_env(pool, secret: secret)` (register
      the worker with the same `:secret`).
    * `:ready_timeout` - milliseconds to wait for the worker to listen (10 000).
    * `:stderr_telemetry` - `%{worker_id: ..., pool_name: ...}`: read the
      worker's stderr too and fold its telemetry lines (the Python `stderr`
      backend) into `:telemetry` with `Snakepit.Telemetry.Stderr`.

  Output is read in pieces of at most 1 MiB; a longer line is put back
  together before it is handled, but only its first `max_message_bytes + 1`
  bytes are kept (the pool's `:stream` setting), so a telemetry line over
  the limit is refused (and counted) as `:too_large` and a flood of output
  never costs more memory than that. `lines/1` keeps the last
  10 000 other lines (the most recent).
  """
  use GenServer

  alias Snakepit.Telemetry.{Config, JSON}

  @ready "SNAKEPIT_TELEMETRY_READY "
  @ack "SNAKEPIT_TELEMETRY_ACK "
  # Output lines remembered for lines/1.
  @max_lines 10_000
  # The checkout this module was compiled from, where script/setup puts .venv.
  @project_root Path.expand("..", __DIR__)
  @command_worker Path.join(@project_root, "support/python/command_worker.py")

  @type t :: GenServer.server()

  @defaults [
    listen: "127.0.0.1:0",
    telemetry_listen: nil,
    implementation: nil,
    python: nil,
    args: [],
    script: nil,
    env: [],
    ready_timeout: 10_000,
    stderr_telemetry: nil
  ]

  @doc "Starts a worker and waits until it listens."
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    opts = Keyword.validate!(opts, @defaults)
    GenServer.start_link(__MODULE__, opts)
  end

  @doc "Starts a worker not linked to the caller (e.g. from `:erpc`)."
  @spec start(keyword()) :: GenServer.on_start()
  def start(opts \\ []) do
    opts = Keyword.validate!(opts, @defaults)
    GenServer.start(__MODULE__, opts)
  end

  @doc """
  The address the worker serves its telemetry stream on (the Rust server's
  with `:telemetry_listen`): the one to register it with.
  """
  @spec address(t()) :: String.t()
  def address(worker), do: GenServer.call(worker, :address)

  @doc """
  What the worker runs: `%{"implementation" => "native" | "python",
  "telemetry_address" => ..., "grpc_address" => ..., "serving" => "rust" | "grpcio"}`.
  """
  @spec info(t()) :: {:ok, map()} | {:error, term()}
  def info(worker), do: command(worker, %{cmd: "info"})

  @doc "The worker's OS process id."
  @spec os_pid(t()) :: non_neg_integer()
  def os_pid(worker), do: GenServer.call(worker, :os_pid)

  @doc """
  Sends one command (see `support/python/command_worker.py`)
  and waits for its acknowledgement: `{:ok, result}` or `{:error, reason}`.
  """
  @spec command(t(), map(), timeout()) :: {:ok, term()} | {:error, term()}
  def command(worker, command, timeout \\ 30_000) when is_map(command) do
    GenServer.call(worker, {:command, command}, timeout)
  end

  @doc "Output lines the worker printed that were not acknowledgements."
  @spec lines(t()) :: [String.t()]
  def lines(worker), do: GenServer.call(worker, :lines)

  @doc "Stops the worker (closing its stdin) and waits for it to exit."
  @spec stop(t()) :: :ok
  def stop(worker), do: GenServer.stop(worker, :normal, 10_000)

  @doc "The interpreter used when none is given."
  @spec default_python() :: String.t()
  def default_python do
    venv = Path.join(@project_root, ".venv/bin/python")

    System.get_env("SNAKEPIT_TELEMETRY_PYTHON") ||
      if(File.exists?(venv), do: venv, else: System.find_executable("python3") || "python3")
  end

  ## Server

  @impl GenServer
  def init(opts) do
    Process.flag(:trap_exit, true)
    python = opts[:python] || default_python()

    if System.find_executable(python) do
      start_port(python, opts)
    else
      {:stop, {:python_not_found, python}}
    end
  end

  defp start_port(python, opts) do
    python_path = Path.join(:code.priv_dir(:snakepit_telemetry), "python")

    telemetry_listen =
      if opts[:telemetry_listen], do: ["--telemetry-listen", opts[:telemetry_listen]], else: []

    args =
      ["-u", opts[:script] || @command_worker, "--listen", opts[:listen]] ++
        telemetry_listen ++ opts[:args]

    env =
      [{~c"PYTHONPATH", String.to_charlist(python_path)}] ++
        implementation_env(opts[:implementation]) ++
        for({k, v} <- opts[:env], do: {String.to_charlist(k), String.to_charlist(v)})

    # The stderr backend's lines arrive with stdout when asked for.
    stderr = if opts[:stderr_telemetry], do: [:stderr_to_stdout], else: []

    port =
      Port.open(
        {:spawn_executable, python},
        [:binary, :exit_status, :use_stdio, :hide, {:line, 1_048_576}, {:args, args}, {:env, env}] ++
          stderr
      )

    {:os_pid, os_pid} = Port.info(port, :os_pid)

    case await_ready(port, opts[:ready_timeout]) do
      {:ok, address} ->
        {:ok,
         %{
           port: port,
           os_pid: os_pid,
           address: address,
           waiting: :queue.new(),
           lines: [],
           line_count: 0,
           partial: [],
           partial_size: 0,
           line_limit: line_limit(opts[:stderr_telemetry]),
           stderr_telemetry: opts[:stderr_telemetry]
         }}

      {:error, reason} ->
        Port.close(port)
        {:stop, reason}
    end
  end

  defp implementation_env(nil), do: []

  defp implementation_env(which) when which in [:native, :python, :auto],
    do: [{~c"SNAKEPIT_TELEMETRY_IMPLEMENTATION", Atom.to_charlist(which)}]

  defp await_ready(port, timeout) do
    receive do
      {^port, {:data, {:eol, @ready <> address}}} -> {:ok, address}
      {^port, {:data, _other}} -> await_ready(port, timeout)
      {^port, {:exit_status, status}} -> {:error, {:worker_exited, status}}
    after
      timeout -> {:error, :worker_not_ready}
    end
  end

  @impl GenServer
  def handle_call(:address, _from, state), do: {:reply, state.address, state}
  def handle_call(:os_pid, _from, state), do: {:reply, state.os_pid, state}
  def handle_call(:lines, _from, state), do: {:reply, Enum.reverse(state.lines), state}

  def handle_call({:command, command}, from, state) do
    Port.command(state.port, [JSON.encode!(command), ?\n])
    {:noreply, %{state | waiting: :queue.in(from, state.waiting)}}
  end

  @impl GenServer
  def handle_info({port, {:data, {:noeol, chunk}}}, %{port: port} = state) do
    {:noreply, keep(state, chunk)}
  end

  def handle_info({port, {:data, {:eol, chunk}}}, %{port: port} = state) do
    %{partial: partial} = state = keep(state, chunk)
    line = partial |> Enum.reverse() |> IO.iodata_to_binary()
    {:noreply, handle_output(line, %{state | partial: [], partial_size: 0})}
  end

  def handle_info({port, {:exit_status, status}}, %{port: port} = state) do
    exited({:worker_exited, status}, state)
  end

  def handle_info({:EXIT, port, reason}, %{port: port} = state) do
    exited({:worker_exited, reason}, state)
  end

  def handle_info(_message, state), do: {:noreply, state}

  @impl GenServer
  def terminate(_reason, %{port: port}) do
    # Closing stdin is the worker's signal to stop; wait for it briefly.
    if Port.info(port) != nil do
      Port.close(port)
    end

    :ok
  end

  # Appends a piece of the current line, keeping at most line_limit bytes.
  defp keep(%{partial_size: size, line_limit: limit} = state, _chunk) when size >= limit,
    do: state

  defp keep(%{partial_size: size, line_limit: limit} = state, chunk) do
    piece = binary_part(chunk, 0, min(byte_size(chunk), limit - size))
    %{state | partial: [piece | state.partial], partial_size: size + byte_size(piece)}
  end

  defp handle_output(@ack <> ack = line, state) do
    case :queue.out(state.waiting) do
      {{:value, from}, waiting} ->
        GenServer.reply(from, parse_ack(ack))
        %{state | waiting: waiting}

      {:empty, _} ->
        remember(line, state)
    end
  end

  defp handle_output(line, %{stderr_telemetry: nil} = state), do: remember(line, state)

  defp handle_output(line, state) do
    case Snakepit.Telemetry.Stderr.handle_line(line, state.stderr_telemetry) do
      :ignored -> remember(line, state)
      _handled -> state
    end
  end

  defp remember(line, %{line_count: count} = state) when count >= @max_lines,
    do: %{
      state
      | lines: [line | Enum.take(state.lines, div(@max_lines, 2) - 1)],
        line_count: div(@max_lines, 2)
    }

  defp remember(line, state),
    do: %{state | lines: [line | state.lines], line_count: state.line_count + 1}

  # One byte over the limit, so that a longer telemetry line is refused and
  # counted as :too_large.
  # The pool's max_message_bytes + 1 (the built-in default when the pool's
  # settings are invalid: the line is then refused by Stderr anyway).
  defp line_limit(ctx) do
    pool = if is_map(ctx) or Keyword.keyword?(ctx || []), do: ctx[:pool_name]

    stream =
      case Config.fetch(:stream, pool) do
        {:ok, stream} -> stream
        {:error, _} -> Config.defaults(:stream)
      end

    Keyword.fetch!(stream, :max_message_bytes) + 1
  end

  defp exited(reason, state) do
    for from <- :queue.to_list(state.waiting), do: GenServer.reply(from, {:error, reason})
    {:stop, reason, %{state | waiting: :queue.new()}}
  end

  defp parse_ack(ack) do
    case String.split(ack, " ", parts: 2) do
      ["error", json] -> {:error, decode(json)}
      [_cmd, json] -> {:ok, decode(json)}
      [_cmd] -> {:ok, nil}
    end
  end

  defp decode(json) do
    case JSON.decode(json) do
      {:ok, value} -> value
      {:error, _} -> json
    end
  end
end
