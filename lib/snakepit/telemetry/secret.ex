defmodule Snakepit.Telemetry.Secret do
  @moduledoc """
  A worker's telemetry secret: only the process that started a worker may
  read or steer its telemetry.

  Each worker gets its own random secret (`new/0`: 32 bytes from
  `:crypto.strong_rand_bytes/1`, base64url, 43 characters). It reaches the
  worker at spawn, in its environment (`Snakepit.Telemetry.Config.worker_env/2`
  with `secret: secret` sets `SNAKEPIT_TELEMETRY_SECRET`), and the NIF sends
  it as the gRPC metadata entry `x-snakepit-telemetry-secret` on every
  telemetry call (`StreamTelemetryBatches`, the `StreamTelemetry` fallback,
  every reconnect) when the worker is registered with it
  (`GrpcStream.register_worker(secret: secret, ...)`). The worker refuses a
  call without it with `UNAUTHENTICATED` before the call can replace the
  owner's stream.

      secret = Snakepit.Telemetry.Secret.new()
      env = Snakepit.Telemetry.Config.worker_env(:default, secret: secret)
      # ... spawn the worker with env, then:
      :ok = GrpcStream.register_worker(worker_id: "w1", pool_name: :default,
                                       address: address, secret: secret)

  The struct holds only a NIF resource (a reference): `inspect/1` shows
  `#Snakepit.Telemetry.Secret<redacted>`, and `:sys.get_state/1`, crash
  reports and logs of the processes that keep it (GrpcStream, the
  registrations table) show no secret, even formatted by Erlang. `expose/1`
  gives the value, for the worker's environment only.

  A secret belongs to the node that made it (the resource does not cross
  nodes): to register a worker on another node, send the string there and
  `wrap/1` it on that node; `register_worker/2` refuses a secret from
  another node (`{:error, {:invalid_worker_ctx, {:secret, why}}}`).
  """

  alias Snakepit.Telemetry.Native

  @enforce_keys [:ref]
  defstruct [:ref]

  @type t :: %__MODULE__{ref: reference()}

  @env "SNAKEPIT_TELEMETRY_SECRET"
  @header "x-snakepit-telemetry-secret"
  @random_bytes 32

  @doc "The environment variable that hands the secret to the worker."
  @spec env_var() :: String.t()
  def env_var, do: @env

  @doc "The gRPC metadata key that carries the secret on each telemetry call."
  @spec header() :: String.t()
  def header, do: @header

  @doc "A new random secret (256 bits)."
  @spec new() :: t()
  def new do
    {:ok, secret} =
      @random_bytes |> :crypto.strong_rand_bytes() |> Base.url_encode64(padding: false) |> wrap()

    secret
  end

  @doc """
  Wraps a secret made elsewhere: 22 to 256 visible ASCII characters (no
  spaces), e.g. base64url of at least 16 random bytes. The error never holds
  the value.
  """
  @spec wrap(String.t() | t()) :: {:ok, t()} | {:error, {:invalid_secret, String.t()}}
  def wrap(%__MODULE__{} = secret), do: {:ok, secret}

  def wrap(value) when is_binary(value) do
    case Native.secret_new(value) do
      {:ok, ref} -> {:ok, %__MODULE__{ref: ref}}
      {:error, {:invalid_secret, why}} -> {:error, {:invalid_secret, why}}
    end
  end

  def wrap(_value), do: {:error, {:invalid_secret, "expected a string"}}

  @doc "Whether the secret was made on this node (see the moduledoc)."
  @spec local?(t()) :: boolean()
  def local?(%__MODULE__{ref: ref}) when is_reference(ref), do: node(ref) == node()
  def local?(_secret), do: false

  @doc """
  The secret's value. Only for handing it to the worker at spawn
  (`Config.worker_env/2` calls it); never log it.
  """
  @spec expose(t()) :: String.t()
  def expose(%__MODULE__{ref: ref}), do: Native.secret_expose(ref)

  defimpl Inspect do
    def inspect(_secret, _opts), do: "#Snakepit.Telemetry.Secret<redacted>"
  end
end
