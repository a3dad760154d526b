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
          healthy_after_ms: 10_000,     # the backoff starts again from
                                        # backoff_initial_ms only after a stream
                                        # stayed open this long (0: after any open)
          max_batch: 512,               # events per batch from the NIF
          max_pending_events: 8_192,    # unacknowledged events on their way to
                                        # GrpcStream, per stream; beyond, the NIF
                                        # stops reading and the worker sheds load
          max_message_bytes: 4_194_304, # largest gRPC message accepted; Python's
                                        # batches stay within 1 MiB and this
                                        # (worker_env/1 passes it to Python)
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
        python: [queue_size: 1024, stats_interval_ms: 1_000, flush_interval_ms: 50],
        # Cluster-wide calls (Snakepit.Telemetry.Cluster, GrpcStream control):
        # how long to wait for each node, in parallel.
        cluster: [query_timeout_ms: 500, control_timeout_ms: 2_000],
        pools: %{
          inference: [control: [sampling_rate: 0.1], python: [queue_size: 4096]]
        }

  A pool's settings are merged key by key over the global ones (`:cluster`
  is global only).
  `worker_env/2` gives the environment variables to start a pool's Python
  workers with, so that Python begins with the same defaults that Elixir
  applies when the stream opens (and, with `secret:`, the worker's
  `Snakepit.Telemetry.Secret`). `socket_path/1` gives a worker's default
  telemetry address on this host: a unix socket in a private (0700)
  directory, `socket_dir/0`.

  ## Validation

  `validate/0` checks the `:stream`, `:control`, `:python`, `:cluster` and
  `:pools` settings against a schema: each section is a keyword list of known keys,
  each value of the expected type (millisecond and size settings are
  integers in `0..4_294_967_295`, some of them positive; `backoff_max_ms`
  is at least `backoff_initial_ms`; `:pools` is a map of pool name to a
  keyword list with `:stream`, `:control` and `:python` sections). An error
  names the key and the expected type:

      invalid :snakepit_telemetry config: pools[:inference].python.queue_size:
      expected a positive integer, got: 0

  The application does not start with an invalid configuration (the error
  is its start failure). Settings changed at run time are checked where
  they are read: `Snakepit.Telemetry.GrpcStream.register_worker/2` answers
  `{:error, {:invalid_config, message}}`, and a restarted GrpcStream logs
  the error and uses the built-in defaults of the invalid section rather
  than crash. `stream/1`, `control/1`, `python/1` and `worker_env/1` raise
  `ArgumentError` with the same message; `fetch/2` returns it.
  """

  alias Snakepit.Telemetry.{Control, Secret}

  @stream [
    connect_timeout_ms: 10_000,
    retry_interval_ms: 100,
    open_timeout_ms: 5_000,
    keepalive_interval_ms: 300_000,
    keepalive_timeout_ms: 5_000,
    backoff_initial_ms: 100,
    backoff_max_ms: 5_000,
    healthy_after_ms: 10_000,
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
  @python [queue_size: 1024, stats_interval_ms: 1_000, flush_interval_ms: 50]
  @cluster [query_timeout_ms: 500, control_timeout_ms: 2_000]

  @defaults %{stream: @stream, control: @control, python: @python}

  # The type of every key each section accepts.
  @schema %{
    stream: [
      connect_timeout_ms: :non_neg_integer,
      retry_interval_ms: :pos_integer,
      backoff_initial_ms: :pos_integer,
      backoff_max_ms: :pos_integer,
      healthy_after_ms: :non_neg_integer,
      # Bounds on opening a stream and on a hung open stream (the NIF's).
      open_timeout_ms: :non_neg_integer,
      keepalive_interval_ms: :non_neg_integer,
      keepalive_timeout_ms: :non_neg_integer,
      max_batch: :pos_integer,
      max_pending_events: :pos_integer,
      max_message_bytes: :pos_integer,
      health_interval_ms: :non_neg_integer,
      max_event_parts: :pos_integer,
      max_part_bytes: :pos_integer,
      max_measurements: :non_neg_integer,
      max_metadata: :non_neg_integer,
      max_key_bytes: :pos_integer,
      max_value_bytes: :non_neg_integer
    ],
    control: [
      enabled: :boolean,
      sampling_rate: :rate,
      sampling_rules: :sampling_rules,
      allow: :patterns,
      deny: :patterns
    ],
    python: [
      queue_size: :pos_integer,
      stats_interval_ms: :non_neg_integer,
      flush_interval_ms: :non_neg_integer
    ],
    cluster: [query_timeout_ms: :pos_integer, control_timeout_ms: :pos_integer]
  }
  @sections [:stream, :control, :python]
  @max_integer 4_294_967_295

  @type section :: :stream | :control | :python

  @doc """
  Checks every section (see "Validation"): `{:ok, sections}` with the
  global settings of each section, defaults included, or
  `{:error, message}` naming the first bad key.
  """
  @spec validate() :: {:ok, %{section() => keyword()}} | {:error, String.t()}
  def validate do
    with {:ok, pools} <- pools(),
         :ok <- each(@sections, &check_global/1),
         {:ok, _} <- fetch_cluster(),
         :ok <- each(pools, &check_pool/1),
         :ok <- check_backoff(nil),
         :ok <- each(Map.keys(pools), &check_backoff/1) do
      {:ok, Map.new(@sections, &{&1, merged(&1, nil)})}
    end
  end

  @doc """
  A section's settings for a pool (`nil`: the global ones), defaults
  included: `{:ok, keyword}` or `{:error, message}` when the global or the
  pool's settings are invalid.
  """
  @spec fetch(section(), term()) :: {:ok, keyword()} | {:error, String.t()}
  def fetch(section, pool \\ nil) when section in @sections do
    with {:ok, pools} <- pools(),
         :ok <- check_global(section),
         :ok <- check_pool_section(pools, pool, section),
         :ok <- if(section == :stream, do: check_backoff(pool), else: :ok) do
      {:ok, merged(section, pool)}
    end
  end

  @doc """
  The `:cluster` settings (global only), defaults included: `{:ok, keyword}`
  or `{:error, message}`.
  """
  @spec fetch_cluster() :: {:ok, keyword()} | {:error, String.t()}
  def fetch_cluster do
    opts = Application.get_env(:snakepit_telemetry, :cluster, [])

    with :ok <- check_section("cluster", :cluster, opts) do
      {:ok, Keyword.merge(@cluster, opts)}
    end
  end

  @doc """
  The `:cluster` settings; on an invalid setting (changed at run time) the
  built-in defaults, so cluster calls never raise on configuration.
  """
  @spec cluster() :: keyword()
  def cluster do
    case fetch_cluster() do
      {:ok, opts} -> opts
      {:error, _message} -> @cluster
    end
  end

  @doc "The built-in defaults of a section (what `fetch/2` fills in)."
  @spec defaults(section()) :: keyword()
  def defaults(section) when section in @sections, do: Map.fetch!(@defaults, section)

  @doc "Stream settings for a pool (or the global ones for `nil`); raises on invalid settings."
  @spec stream(term()) :: keyword()
  def stream(pool \\ nil), do: fetch!(:stream, pool)

  @doc "The initial control state of a pool's workers; raises on invalid settings."
  @spec control(term()) :: Control.t()
  def control(pool \\ nil) do
    case fetch_control(pool) do
      {:ok, control} -> control
      {:error, message} -> raise ArgumentError, message
    end
  end

  @doc "The initial control state of a pool's workers, or `{:error, message}`."
  @spec fetch_control(term()) :: {:ok, Control.t()} | {:error, String.t()}
  def fetch_control(pool \\ nil) do
    with {:ok, opts} <- fetch(:control, pool) do
      case Control.new(opts) do
        {:ok, control} -> {:ok, control}
        # The schema checks each value; Control.new may still refuse (e.g. too many patterns).
        {:error, reason} -> {:error, message("control", "a valid control state", reason)}
      end
    end
  end

  @doc "Python-side settings for a pool; raises on invalid settings."
  @spec python(term()) :: keyword()
  def python(pool \\ nil), do: fetch!(:python, pool)

  # The address `telemetry.serve()` binds in a worker (see worker_env/2).
  @listen_env "SNAKEPIT_TELEMETRY_LISTEN"

  @doc """
  Environment variables for a pool's Python workers:

      iex> Snakepit.Telemetry.Config.worker_env(nil) |> Map.new() |> Map.take(["SNAKEPIT_TELEMETRY_QUEUE_SIZE"])
      %{"SNAKEPIT_TELEMETRY_QUEUE_SIZE" => "1024"}

  Options:

    * `:secret` - the worker's `Snakepit.Telemetry.Secret` (or its string):
      adds `SNAKEPIT_TELEMETRY_SECRET`, so the worker refuses telemetry
      calls without it. Register the worker with the same secret
      (`GrpcStream.register_worker(secret: secret, ...)`). Make a new one
      per worker (`Secret.new/0`). Raises `ArgumentError` for an invalid
      secret (the message never holds it).
    * `:telemetry_address` - where the worker's Rust telemetry server
      listens (`"unix:/path"`, e.g. from `socket_path/1`, or `"host:port"`):
      adds `SNAKEPIT_TELEMETRY_LISTEN`, which the Python package's
      `telemetry.serve()` binds when it runs the native implementation.
      Register the worker with this address (`register_worker(address: ...)`).
      Raises `ArgumentError` for anything but a non-empty string.
  """
  @spec worker_env(term(), keyword()) :: [{String.t(), String.t()}]
  def worker_env(pool \\ nil, opts \\ []) do
    control = control(pool)
    python = python(pool)

    [
      {"SNAKEPIT_TELEMETRY_ENABLED", to_string(control.enabled)},
      {"SNAKEPIT_TELEMETRY_SAMPLING_RATE", Float.to_string(control.default_rate)},
      {"SNAKEPIT_TELEMETRY_ALLOW", Enum.join(control.allow, ",")},
      {"SNAKEPIT_TELEMETRY_DENY", Enum.join(control.deny, ",")},
      {"SNAKEPIT_TELEMETRY_QUEUE_SIZE", Integer.to_string(python[:queue_size])},
      {"SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", Integer.to_string(python[:stats_interval_ms])},
      {"SNAKEPIT_TELEMETRY_FLUSH_INTERVAL_MS", Integer.to_string(python[:flush_interval_ms])},
      # Python never sends a message the stream would refuse.
      {"SNAKEPIT_TELEMETRY_MAX_MESSAGE_BYTES",
       Integer.to_string(stream(pool)[:max_message_bytes])}
    ] ++
      secret_env(Keyword.get(opts, :secret)) ++
      listen_env(Keyword.get(opts, :telemetry_address))
  end

  defp listen_env(nil), do: []
  defp listen_env(address) when is_binary(address) and address != "", do: [{@listen_env, address}]

  defp listen_env(other),
    do:
      raise(
        ArgumentError,
        "invalid :telemetry_address, expected a string, got: #{inspect(other)}"
      )

  defp secret_env(nil), do: []

  defp secret_env(secret) do
    case Secret.wrap(secret) do
      {:ok, secret} -> [{Secret.env_var(), Secret.expose(secret)}]
      {:error, {:invalid_secret, why}} -> raise ArgumentError, "invalid telemetry secret: #{why}"
    end
  end

  @doc """
  A private directory for the workers' telemetry sockets: created once per
  VM, with a random name, under `$XDG_RUNTIME_DIR` (else `System.tmp_dir!/0`),
  mode 0700, so only this OS user can reach the sockets in it. Returns
  `{:ok, dir}` or `{:error, reason}`. See `socket_path/1`. The directory is
  not removed when the VM stops (sockets are the workers' to remove).
  """
  @spec socket_dir() :: {:ok, Path.t()} | {:error, term()}
  def socket_dir do
    case :persistent_term.get({__MODULE__, :socket_dir}, nil) do
      dir when is_binary(dir) ->
        if File.dir?(dir), do: {:ok, dir}, else: make_socket_dir()

      nil ->
        make_socket_dir()
    end
  end

  defp make_socket_dir(tries \\ 5) do
    base = System.get_env("XDG_RUNTIME_DIR") |> usable_base() || System.tmp_dir!()

    dir =
      Path.join(
        base,
        "snakepit_telemetry-" <> Base.encode16(:crypto.strong_rand_bytes(8), case: :lower)
      )

    # mkdir fails when the name exists, so the directory is ours; chmod
    # before any socket goes in.
    with :ok <- File.mkdir(dir),
         :ok <- File.chmod(dir, 0o700) do
      :persistent_term.put({__MODULE__, :socket_dir}, dir)
      {:ok, dir}
    else
      {:error, :eexist} when tries > 1 -> make_socket_dir(tries - 1)
      {:error, reason} -> {:error, {reason, dir}}
    end
  end

  defp usable_base(nil), do: nil
  defp usable_base(dir), do: if(File.dir?(dir), do: dir)

  @doc """
  The default telemetry address for a worker on this host: a unix socket in
  `socket_dir/0` (mode 0700), e.g. `"unix:/run/user/1000/snakepit_telemetry-…/w1.sock"`.
  The worker binds it (Python: `telemetry.add_port(server, address)`, which
  makes the socket 0600); pass the same address to `register_worker/1`.
  Raises if the directory cannot be made. Worker ids that are not short
  and plain (`[A-Za-z0-9_-]`, at most 48) are hashed into the file name.
  """
  @spec socket_path(String.t()) :: String.t()
  def socket_path(worker_id) when is_binary(worker_id) do
    case socket_dir() do
      {:ok, dir} ->
        "unix:" <> Path.join(dir, socket_name(worker_id) <> ".sock")

      {:error, reason} ->
        raise ArgumentError, "cannot make the telemetry socket directory: #{inspect(reason)}"
    end
  end

  defp socket_name(worker_id) do
    if worker_id =~ ~r/\A[A-Za-z0-9_-]{1,48}\z/ do
      worker_id
    else
      "w-" <>
        (:crypto.hash(:sha256, worker_id) |> Base.encode16(case: :lower) |> binary_part(0, 32))
    end
  end

  defp fetch!(section, pool) do
    case fetch(section, pool) do
      {:ok, opts} -> opts
      {:error, message} -> raise ArgumentError, message
    end
  end

  defp merged(section, pool) do
    global = Application.get_env(:snakepit_telemetry, section, [])
    per_pool = pool_section(Application.get_env(:snakepit_telemetry, :pools, %{}), pool, section)
    defaults(section) |> Keyword.merge(global) |> Keyword.merge(per_pool)
  end

  defp pool_section(pools, pool, section) when is_map(pools) do
    pools |> Map.get(pool, []) |> Keyword.get(section, [])
  end

  ## Checks

  defp pools do
    case Application.get_env(:snakepit_telemetry, :pools, %{}) do
      pools when is_map(pools) -> {:ok, pools}
      other -> {:error, message("pools", "a map of pool name to keyword list", other)}
    end
  end

  defp check_global(section) do
    check_section(
      Atom.to_string(section),
      section,
      Application.get_env(:snakepit_telemetry, section, [])
    )
  end

  defp check_pool({pool, settings}) do
    path = "pools[#{inspect(pool)}]"

    if keyword?(settings) do
      each(settings, fn
        {section, opts} when section in @sections ->
          check_section("#{path}.#{section}", section, opts)

        {key, _} ->
          {:error,
           error_prefix() <>
             "unknown key #{inspect(key)} in #{path} (known keys: :stream, :control, :python)"}
      end)
    else
      {:error, message(path, "a keyword list with :stream, :control and :python", settings)}
    end
  end

  defp check_pool_section(_pools, nil, _section), do: :ok

  defp check_pool_section(pools, pool, section) do
    case Map.fetch(pools, pool) do
      :error ->
        :ok

      {:ok, settings} ->
        if keyword?(settings) do
          check_section("pools[#{inspect(pool)}].#{section}", section, settings[section] || [])
        else
          check_pool({pool, settings})
        end
    end
  end

  # A rule over two keys, on the merged stream settings.
  defp check_backoff(pool) do
    stream = merged(:stream, pool)

    if stream[:backoff_max_ms] >= stream[:backoff_initial_ms] do
      :ok
    else
      path = if pool, do: "pools[#{inspect(pool)}].stream", else: "stream"

      {:error,
       message(
         "#{path}.backoff_max_ms",
         "an integer >= backoff_initial_ms (#{stream[:backoff_initial_ms]})",
         stream[:backoff_max_ms]
       )}
    end
  end

  defp check_section(path, section, opts) do
    schema = Map.fetch!(@schema, section)

    if keyword?(opts) do
      each(opts, fn {key, value} ->
        case Keyword.fetch(schema, key) do
          {:ok, type} ->
            if valid?(type, value),
              do: :ok,
              else: {:error, message("#{path}.#{key}", describe(type), value)}

          :error ->
            known = schema |> Keyword.keys() |> Enum.map_join(", ", &inspect/1)

            {:error,
             error_prefix() <> "unknown key #{inspect(key)} in #{path} (known keys: #{known})"}
        end
      end)
    else
      {:error, message(path, "a keyword list", opts)}
    end
  end

  defp each(items, check) do
    Enum.reduce_while(items, :ok, fn item, :ok ->
      case check.(item) do
        :ok -> {:cont, :ok}
        error -> {:halt, error}
      end
    end)
  end

  defp keyword?(value), do: is_list(value) and Keyword.keyword?(value)

  defp valid?(:boolean, v), do: is_boolean(v)
  defp valid?(:pos_integer, v), do: is_integer(v) and v > 0 and v <= @max_integer
  defp valid?(:non_neg_integer, v), do: is_integer(v) and v >= 0 and v <= @max_integer
  defp valid?(:rate, v), do: Control.validate_rate(v) == :ok
  defp valid?(:patterns, v), do: Control.validate_patterns(v) == :ok

  defp valid?(:sampling_rules, v) do
    is_list(v) and
      Enum.all?(v, fn
        {patterns, rate} -> patterns != [] and valid?(:patterns, patterns) and valid?(:rate, rate)
        _ -> false
      end)
  end

  defp describe(:boolean), do: "a boolean"
  defp describe(:pos_integer), do: "a positive integer (at most #{@max_integer})"
  defp describe(:non_neg_integer), do: "a non-negative integer (at most #{@max_integer})"
  defp describe(:rate), do: "a number in 0..1"
  defp describe(:patterns), do: "a list of glob patterns (see Snakepit.Telemetry.Control)"

  defp describe(:sampling_rules),
    do: "a list of {patterns, rate} with a non-empty pattern list and a rate in 0..1"

  defp error_prefix, do: "invalid :snakepit_telemetry config: "

  defp message(path, expected, got) do
    error_prefix() <> "#{path}: expected #{expected}, got: #{inspect(got, limit: 20)}"
  end
end
