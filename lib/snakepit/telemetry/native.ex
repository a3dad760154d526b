defmodule Snakepit.Telemetry.Native do
  @moduledoc false
  # NIF stubs for native/snakepit_telemetry_nif. Public modules wrap these;
  # see Snakepit.Telemetry.GrpcStream for the messages the streams send.

  @on_load :load_nif

  @doc false
  def load_nif do
    path = nif_path()

    case :erlang.load_nif(String.to_charlist(path), 0) do
      :ok ->
        :persistent_term.erase({__MODULE__, :load_error})
        :ok

      {:error, {reason, text}} ->
        # Let the module load anyway so that every call (and the
        # application's start) can explain what is wrong and how to fix it.
        :persistent_term.put({__MODULE__, :load_error}, {path, reason, to_string(text)})
        :ok
    end
  end

  @doc """
  Where the NIF library is loaded from: `SNAKEPIT_TELEMETRY_NIF_PATH`
  (without the `.so` extension) or `priv/native/snakepit_telemetry_nif`.
  """
  def nif_path do
    System.get_env("SNAKEPIT_TELEMETRY_NIF_PATH") ||
      Path.join([:code.priv_dir(:snakepit_telemetry), "native", "snakepit_telemetry_nif"])
  end

  @doc "`:ok`, or `{:error, message}` explaining why the NIF is not loaded."
  def status do
    case :persistent_term.get({__MODULE__, :load_error}, nil) do
      nil -> :ok
      {path, reason, text} -> {:error, load_error_message(path, reason, text)}
    end
  end

  defp load_error_message(path, reason, text) do
    """
    snakepit_telemetry: the native library could not be loaded from #{path}.so \
    (#{reason}: #{text}). Build it with `mix compile` (it runs cargo; needs Rust, \
    see script/setup), or point SNAKEPIT_TELEMETRY_NIF_PATH at a built library.\
    """
  end

  defp not_loaded do
    case status() do
      {:error, message} -> raise message
      :ok -> :erlang.nif_error(:nif_not_loaded)
    end
  end

  @default_control %{enabled: true, default_rate: 1.0, rules: [], allow: [], deny: []}

  @doc """
  Opens a stream. Its statuses go to `owner`; its events go to
  `options.receiver` (a local pid; `owner` when absent), which acknowledges
  them with `stream_ack/2`. `options.control` is the worker's control state
  at open (`%{enabled:, default_rate:, rules: [{rate, patterns}], allow:,
  deny:}`, rules oldest first; default: on, rate 1.0, no rules or filters):
  a stream that falls back to `StreamTelemetry` enforces it on what it
  receives until control messages change it.
  """
  def stream_open(owner, stream_id, address, options) do
    {receiver, control, secret} =
      if is_map(options),
        do:
          {Map.get(options, :receiver, owner), Map.get(options, :control, @default_control),
           secret_ref(Map.get(options, :secret))},
        else: {owner, @default_control, nil}

    stream_open_nif(owner, receiver, stream_id, address, options, control, secret)
  end

  # `options.secret`: a `Snakepit.Telemetry.Secret` (its resource goes to the
  # NIF, which sends it on every call) or nil.
  defp secret_ref(%Snakepit.Telemetry.Secret{ref: ref}), do: ref
  defp secret_ref(_), do: nil

  def stream_open_nif(_owner, _receiver, _stream_id, _address, _options, _control, _secret),
    do: not_loaded()

  @doc """
  Wraps a secret in a NIF resource: `{:ok, ref}` or
  `{:error, {:invalid_secret, why}}`. See `Snakepit.Telemetry.Secret`.
  """
  def secret_new(_bytes), do: not_loaded()

  @doc "The bytes of a secret resource."
  def secret_expose(_ref), do: not_loaded()

  @doc """
  Points the stream's events at `receiver`, after its previous receiver
  died. Returns how many events that receiver held unacknowledged: they are
  counted as `dropped_receiver_down` (and no longer as `delivered`) and
  their credit is released.
  """
  @spec stream_redirect(reference(), pid()) :: non_neg_integer()
  def stream_redirect(_handle, _receiver), do: not_loaded()
  def stream_toggle(_handle, _enabled), do: not_loaded()
  def stream_sampling(_handle, _rate, _patterns), do: not_loaded()
  def stream_filter(_handle, _allow, _deny), do: not_loaded()
  def stream_close(_handle), do: not_loaded()

  @doc """
  Acknowledges `n` events the stream's owner has handled, so that many more
  may be sent to it: at most the stream's `max_pending_events`
  unacknowledged events (plus one wire message) are ever on their way to the
  owner. Returns `:ok`; raises `ArgumentError` for a bad handle or a negative
  or non-integer `n`.
  """
  @spec stream_ack(reference(), non_neg_integer()) :: :ok
  def stream_ack(_handle, _n), do: not_loaded()
  def stream_stats(_handle), do: not_loaded()

  @doc "Events decoded and not yet acknowledged by the receiver (a level)."
  @spec stream_pending(reference()) :: non_neg_integer()
  def stream_pending(_handle), do: not_loaded()
  def runtime_info, do: not_loaded()
  def catalog_events, do: not_loaded()
  def catalog_metadata_keys, do: not_loaded()
  def register_custom_event(_python_name, _event_name), do: not_loaded()
  def register_custom_key(_key), do: not_loaded()
  def custom_events, do: not_loaded()

  @doc """
  Decodes one stderr telemetry line: `{:ok, {event, measurements, metadata}}`
  or `{:error, reason}`; never raises, whatever `line` and `options` are.
  Lines up to 8 KiB are decoded on the calling scheduler, longer ones on a
  dirty CPU scheduler (see native/snakepit_telemetry_nif/src/json.rs).
  """
  def decode_json_line(line, options) do
    case decode_json_line_nif(line, options) do
      :dirty -> decode_json_line_dirty(line, options)
      result -> result
    end
  end

  # decode_json_line_nif runs on the calling scheduler and returns :dirty for
  # a line it leaves to decode_json_line_dirty.
  def decode_json_line_nif(_line, _options), do: not_loaded()
  def decode_json_line_dirty(_line, _options), do: not_loaded()
  def json_count_invalid_input, do: not_loaded()
  def json_stats, do: not_loaded()
end
