defmodule Snakepit.Telemetry.Top.Terminal do
  @moduledoc """
  The terminal side of `Snakepit.Telemetry.Top`, with no dependency: is
  standard output a terminal, its size, and keys read one at a time.

  OTP 25's `:io` has no raw mode, so for keys the terminal (`tty_path/0`)
  is put in raw mode with `stty raw -echo` (its settings saved with
  `stty -g` first) and a reader process reads standard input one byte at a
  time (without a shell, the VM's `user` port reads the terminal as bytes
  arrive; opening `/dev/tty` a second time would race with it) and sends
  them as `{:top_keys, bytes}`. `stop_keys/1` stops the reader and puts the
  saved settings back; a guard process does it too when the viewer dies.
  Under iex (`keys: :stdin`), keys are read as lines from standard input
  instead: type a key (or `r0.5`) and Enter.
  """

  @doc """
  The path of this VM's terminal (`/dev/pts/N`, from `/proc/self/fd/0..2`),
  else `/dev/tty`. Commands run with `System.cmd/3` have no controlling
  terminal (the VM starts them in a session of their own), so `stty` is
  pointed at this path.
  """
  @spec tty_path() :: String.t()
  def tty_path do
    Enum.find_value([0, 1, 2], "/dev/tty", fn fd ->
      case File.read_link("/proc/self/fd/#{fd}") do
        {:ok, "/dev/pts/" <> _ = path} -> path
        {:ok, "/dev/tty" <> _ = path} -> path
        _ -> nil
      end
    end)
  end

  defp tty_stdin? do
    case File.read_link("/proc/self/fd/0") do
      {:ok, "/dev/pts/" <> _} -> true
      {:ok, "/dev/tty" <> _} -> true
      {:ok, _other} -> false
      # No /proc: trust the caller.
      {:error, _} -> true
    end
  end

  defp stty(args) do
    System.cmd("sh", ["-c", "(stty #{args} <'#{tty_path()}') 2>/dev/null"])
  end

  @doc "Whether standard output is a terminal (Linux: `/proc/self/fd/1`; else `:io.columns/0`)."
  @spec tty_stdout?() :: boolean()
  def tty_stdout? do
    case File.read_link("/proc/self/fd/1") do
      {:ok, "/dev/pts/" <> _} -> true
      {:ok, "/dev/tty" <> _} -> true
      {:ok, "/dev/console"} -> true
      {:ok, _other} -> false
      {:error, _} -> match?({:ok, _}, :io.columns())
    end
  end

  @doc "`{columns, rows}` of the terminal: `stty size`, else `:io`, else 80x24."
  @spec size() :: {pos_integer(), pos_integer()}
  def size do
    with {out, 0} <- stty("size"),
         [rows, cols] <- String.split(out),
         {rows, ""} <- Integer.parse(rows),
         {cols, ""} <- Integer.parse(cols),
         true <- rows > 0 and cols > 0 do
      {cols, rows}
    else
      _ ->
        case {:io.columns(), :io.rows()} do
          {{:ok, c}, {:ok, r}} -> {c, r}
          _ -> {80, 24}
        end
    end
  end

  @doc """
  Starts reading keys for `owner`: `:tty` (raw terminal), `:stdin` (lines)
  or `:none`. Returns a handle for `stop_keys/1`.
  """
  @spec start_keys(:tty | :stdin | :none, pid()) :: map()
  def start_keys(:none, _owner), do: %{saved: nil, reader: nil}

  def start_keys(:stdin, owner) do
    %{saved: nil, reader: spawn_link(fn -> read_lines(owner) end)}
  end

  def start_keys(:tty, owner) do
    # Keys come from standard input: only when it is the terminal (else raw
    # mode would leave the terminal without its Ctrl-C and no way to quit).
    case tty_stdin?() && stty("-g") do
      {saved, 0} ->
        saved = String.trim(saved)
        {_, 0} = stty("raw -echo")
        guard(saved, owner)
        %{saved: saved, reader: spawn_link(fn -> read_tty(owner) end)}

      _ ->
        # No terminal: no keys.
        %{saved: nil, reader: nil}
    end
  end

  @doc "Stops reading keys and puts back the terminal settings saved by `start_keys/2`."
  @spec stop_keys(map()) :: :ok
  def stop_keys(%{saved: saved, reader: reader}) do
    if reader do
      Process.unlink(reader)
      Process.exit(reader, :kill)
    end

    restore(saved)
  end

  @doc false
  def restore(nil), do: :ok

  def restore(saved) when is_binary(saved) do
    with {_, status} when status != 0 <- stty(saved), do: stty("sane")
    :ok
  end

  # Restores the terminal when the viewer exits, whatever the reason.
  defp guard(saved, owner) do
    spawn(fn ->
      ref = Process.monitor(owner)

      receive do
        {:DOWN, ^ref, :process, _, _} -> restore(saved)
      end
    end)
  end

  # Without a shell (`elixir -e`, `mix`), standard input is read by the
  # VM's own `user` port as soon as bytes arrive: with the terminal in raw
  # mode, each key comes out of a one-byte read at once.
  defp read_tty(owner) do
    case IO.binread(:stdio, 1) do
      bytes when is_binary(bytes) ->
        send(owner, {:top_keys, bytes})
        read_tty(owner)

      _ ->
        :ok
    end
  end

  defp read_lines(owner) do
    case IO.gets("") do
      line when is_binary(line) ->
        send(owner, {:top_keys, line})
        read_lines(owner)

      _ ->
        send(owner, {:top_keys, "q"})
    end
  end
end
