defmodule Snakepit.Telemetry.PythonError do
  @moduledoc """
  The `reason` of a Python span's exception event
  (`[..., :exception]` metadata `kind: :error, reason: %PythonError{}, stacktrace: [...]`,
  as `:telemetry.span/3` gives them), so tools that format exceptions
  (`Exception.message/1`, `Exception.format/3`, opentelemetry_telemetry,
  loggers) show the Python error:

      iex> error = %Snakepit.Telemetry.PythonError{type: "ValueError", message: "bad input"}
      iex> Exception.message(error)
      "ValueError: bad input"

  `type` is the Python exception's class name and `message` its text (cut
  to 1024 characters by Python), both binaries, the same values as the
  event's `error_type` and `error_message` metadata. For a failure known only
  by a status (e.g. a gRPC status of the call) they are the status name and
  details.

  The stacktrace of such an event is the Python traceback: a list of at most
  32 frames, innermost first, each
  `{:python, :frame, [function], [file: charlist, line: pos_integer]}`
  (`function` a binary; `file` and `line` left out when unknown; file
  paths and function names are cut to 256 bytes). Only these fixed atoms
  appear, so `Exception.format_stacktrace/1` and
  `Exception.format(:error, reason, stacktrace)` accept it; it is `[]` when
  Python sent no traceback (a failure without an exception, or an older
  worker).
  """

  defexception type: "", message: ""

  @type t :: %__MODULE__{type: String.t(), message: String.t()}

  @impl true
  def message(%__MODULE__{type: type, message: message}) do
    case {to_text(type), to_text(message)} do
      {"", message} -> message
      {type, ""} -> type
      {type, message} -> type <> ": " <> message
    end
  end

  defp to_text(text) when is_binary(text), do: text
  defp to_text(other), do: inspect(other)
end
