defmodule Snakepit.Telemetry.Top.Terminal do
  @moduledoc """
  The terminal side of `Snakepit.Telemetry.Top`, with no dependency: is
  standard output a terminal, its size, and keys read one at a time.

  OTP 25's `:io` has no raw mode, so for keys the controlling terminal is
  put in raw mode with `stty raw -echo </dev/tty` (its settings saved with
  `stty -g` first) and a reader process reads bytes from `/dev/tty` and
  sends them as `{:top_keys, bytes}`. `restore/1` puts the saved settings
  back; a guard process that traps exits does it too when the viewer dies.
  Under iex (`keys: :stdin`), keys are read as lines from standard input
  instead: type a key (or `r0.5`) and Enter.
  """

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

  @doc "`{columns, rows}` of the terminal: `stty size </dev/tty`, else `:io`, else 80x24."
  @spec size() :: {pos_integer(), pos_integer()}
  def size do
    with {out, 0} <- System.cmd("sh", ["-c", "(stty size </dev/tty) 2>/dev/null"]),
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
  Starts reading keys for `owner`: `:tty` (raw `/dev/tty`), `:stdin` (lines)
  or `:none`. Returns a handle for `restore/1`.
  """
  @spec start_keys(:tty | :stdin | :none, pid()) :: term()
  def start_keys(:none, _owner), do: nil

  def start_keys(:stdin, owner) do
    spawn_link(fn -> read_lines(owner) end)
    nil
  end

  def start_keys(:tty, owner) do
    case System.cmd("sh", ["-c", "(stty -g </dev/tty) 2>/dev/null"]) do
      {saved, 0} ->
        saved = String.trim(saved)
        {_, 0} = System.cmd("sh", ["-c", "stty raw -echo </dev/tty"])
        guard(saved, owner)

        case :file.open(~c"/dev/tty", [:read, :raw, :binary]) do
          {:ok, fd} ->
            spawn_link(fn -> read_tty(fd, owner) end)

          {:error, _} ->
            :ok
        end

        saved

      _ ->
        # No controlling terminal: no keys.
        nil
    end
  end

  @doc "Puts back the terminal settings saved by `start_keys(:tty, _)`."
  @spec restore(term()) :: :ok
  def restore(nil), do: :ok

  def restore(saved) when is_binary(saved) do
    System.cmd("sh", ["-c", "(stty #{saved} </dev/tty || stty sane </dev/tty) 2>/dev/null"])
    :ok
  end

  # Restores the terminal when the viewer exits, whatever the reason.
  defp guard(saved, owner) do
    spawn(fn ->
      Process.flag(:trap_exit, true)
      ref = Process.monitor(owner)

      receive do
        {:DOWN, ^ref, :process, _, _} -> restore(saved)
      end
    end)
  end

  defp read_tty(fd, owner) do
    case :file.read(fd, 64) do
      {:ok, bytes} ->
        send(owner, {:top_keys, bytes})
        read_tty(fd, owner)

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
