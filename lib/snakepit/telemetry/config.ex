defmodule Snakepit.Telemetry.Config do
  @moduledoc """
  Settings, from the application environment, with per-pool overrides.

      config :snakepit_telemetry,
        stream: [
          connect_timeout_ms: 10_000,   # first connection: keep trying this long
          retry_interval_ms: 100,       # ... this often
          open_timeout_ms: 5_000,       # bound on one attempt: connect, HTTP/2
                                        # handshake, response headers (a reconnect
                                        # is one such attempt)
          keepalive_interval_ms: 300_000, # HTTP/2 PING after this long without
                                        # a byte from the worker; 0: off. gRPC
                                        # servers refuse pings more often than
                                        # every 5 min by default (GOAWAY "too
                                        # many pings"): lower it only for workers
                                        # whose server allows it (see README)
          keepalive_timeout_ms: 5_000,  # unanswered this long: the stream closes
                                        # (:keepalive_timeout) and reconnects
          backoff_initial_ms: 100,      # reconnect after a lost stream: first delay
          backoff_max_ms: 5_000,        # ... doubling up to this cap
          max_batch: 512,               # events per batch from the NIF
          max_pending_events: 8_192,    # unacknowledged events on their way to
                                        # GrpcStream, per stream; beyond, the NIF
                                        # stops reading and the worker sheds load
          max_message_bytes: 4_194_304, # largest gRPC message accepted; Python's
                                        # batches stay near 1 MiB, so keep >= 2 MiB
          health_interval_ms: 1_000,    # drop reports ([:snakepit, :telemetry, :events, :dropped]); 0: off
          # Limits on each event from Python: over them, events are dropped
          # (parts), entries dropped (keys, counts) or values truncated, and
          # counted; never a crash.
          max_event_parts: 8, max_part_bytes: 64, max_measurements: 32,
          max_metadata: 32, max_key_bytes: 128, max_value_bytes: 4_096
        ],
        control: [
          enabled: true,
          sampling_rate: 1.0,
          sampling_rules: [{["python.call.*"], 0.5}],
          allow: [],
          deny: []
        ],
        python: [queue_size: 1024, stats_interval_ms: 1_000, flush_interval_ms: 10],
        pools: %{
          inference: [control: [sampling_rate: 0.1], python: [queue_size: 4096]]
        }

  A pool's settings are merged key by key over the global ones.
  `worker_env/1` gives the environment variables to start a pool's Python
  workers with, so that Python begins with the same defaults that Elixir
  applies when the stream opens.
  """

  alias Snakepit.Telemetry.Control

  @stream [
    connect_timeout_ms: 10_000,
    retry_interval_ms: 100,
    open_timeout_ms: 5_000,
    keepalive_interval_ms: 300_000,
    keepalive_timeout_ms: 5_000,
    backoff_initial_ms: 100,
    backoff_max_ms: 5_000,
    max_batch: 512,
    max_pending_events: 8_192,
    max_message_bytes: 4 * 1024 * 1024,
    health_interval_ms: 1_000,
    max_event_parts: 8,
    max_part_bytes: 64,
    max_measurements: 32,
    max_metadata: 32,
    max_key_bytes: 128,
    max_value_bytes: 4_096
  ]
  @control [enabled: true, sampling_rate: 1.0, sampling_rules: [], allow: [], deny: []]
  @python [queue_size: 1024, stats_interval_ms: 1_000, flush_interval_ms: 10]

  @doc "Stream settings for a pool (or the global ones for `nil`)."
  @spec stream(term()) :: keyword()
  def stream(pool \\ nil), do: section(:stream, @stream, pool)

  @doc "The initial control state of a pool's workers."
  @spec control(term()) :: Control.t()
  def control(pool \\ nil) do
    case Control.new(section(:control, @control, pool)) do
      {:ok, control} ->
        control

      {:error, reason} ->
        raise ArgumentError, "invalid :snakepit_telemetry control config: #{inspect(reason)}"
    end
  end

  @doc "Python-side settings for a pool."
  @spec python(term()) :: keyword()
  def python(pool \\ nil), do: section(:python, @python, pool)

  @doc """
  Environment variables for a pool's Python workers:

      iex> Snakepit.Telemetry.Config.worker_env(nil) |> Map.new() |> Map.take(["SNAKEPIT_TELEMETRY_QUEUE_SIZE"])
      %{"SNAKEPIT_TELEMETRY_QUEUE_SIZE" => "1024"}
  """
  @spec worker_env(term()) :: [{String.t(), String.t()}]
  def worker_env(pool \\ nil) do
    control = control(pool)
    python = python(pool)

    [
      {"SNAKEPIT_TELEMETRY_ENABLED", to_string(control.enabled)},
      {"SNAKEPIT_TELEMETRY_SAMPLING_RATE", Float.to_string(control.default_rate)},
      {"SNAKEPIT_TELEMETRY_ALLOW", Enum.join(control.allow, ",")},
      {"SNAKEPIT_TELEMETRY_DENY", Enum.join(control.deny, ",")},
      {"SNAKEPIT_TELEMETRY_QUEUE_SIZE", Integer.to_string(python[:queue_size])},
      {"SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", Integer.to_string(python[:stats_interval_ms])},
      {"SNAKEPIT_TELEMETRY_FLUSH_INTERVAL_MS", Integer.to_string(python[:flush_interval_ms])}
    ]
  end

  defp section(key, defaults, pool) do
    global = Application.get_env(:snakepit_telemetry, key, [])
    pools = Application.get_env(:snakepit_telemetry, :pools, %{})
    per_pool = pools |> Map.get(pool, []) |> Keyword.get(key, [])
    defaults |> Keyword.merge(global) |> Keyword.merge(per_pool)
  end
end
