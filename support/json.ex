defmodule Snakepit.Telemetry.JSON do
  @moduledoc false
  # A small JSON codec for the command worker's protocol (PythonWorker) and the
  # benchmarks; dev/test support, not part of the library (see support/load.exs).
  # Elixir 1.14 / OTP 25 ship no JSON module and hex packages are not
  # always reachable, so the project carries its own. It handles what the
  # protocol uses: objects, arrays, strings, numbers, booleans and null.

  @spec encode!(term()) :: String.t()
  def encode!(term), do: IO.iodata_to_binary(enc(term))

  defp enc(nil), do: "null"
  defp enc(true), do: "true"
  defp enc(false), do: "false"
  defp enc(a) when is_atom(a), do: enc(Atom.to_string(a))
  defp enc(i) when is_integer(i), do: Integer.to_string(i)
  defp enc(f) when is_float(f), do: :erlang.float_to_binary(f, [:short])
  defp enc(s) when is_binary(s), do: [?", escape(s), ?"]
  defp enc(l) when is_list(l), do: [?[, Enum.map_intersperse(l, ?,, &enc/1), ?]]

  defp enc(%{} = m) do
    pairs = Enum.map_intersperse(m, ?,, fn {k, v} -> [enc(to_string(k)), ?:, enc(v)] end)
    [?{, pairs, ?}]
  end

  defp escape(s) do
    for <<c::utf8 <- s>>, into: "" do
      case c do
        ?" -> "\\\""
        ?\\ -> "\\\\"
        ?\n -> "\\n"
        ?\r -> "\\r"
        ?\t -> "\\t"
        c when c < 0x20 -> "\\u" <> String.pad_leading(Integer.to_string(c, 16), 4, "0")
        c -> <<c::utf8>>
      end
    end
  end

  @spec decode(String.t()) :: {:ok, term()} | {:error, term()}
  def decode(text) do
    case value(skip(text)) do
      {v, rest} ->
        if skip(rest) == "", do: {:ok, v}, else: {:error, {:trailing, rest}}
    end
  catch
    {:json_error, reason} -> {:error, reason}
  end

  defp skip(<<c, rest::binary>>) when c in [?\s, ?\t, ?\n, ?\r], do: skip(rest)
  defp skip(rest), do: rest

  defp value("null" <> rest), do: {nil, rest}
  defp value("true" <> rest), do: {true, rest}
  defp value("false" <> rest), do: {false, rest}
  defp value("\"" <> rest), do: string(rest, [])
  defp value("{" <> rest), do: object(skip(rest), %{})
  defp value("[" <> rest), do: array(skip(rest), [])
  defp value(<<c, _::binary>> = text) when c in ?0..?9 or c == ?-, do: number(text)
  defp value(other), do: throw({:json_error, {:unexpected, String.slice(other, 0, 20)}})

  # An empty collection closes at once; after a comma another entry must follow.
  defp object("}" <> rest, acc) when map_size(acc) == 0, do: {acc, rest}

  defp object("\"" <> rest, acc) do
    {key, rest} = string(rest, [])
    ":" <> rest = expect(skip(rest), ":")
    {v, rest} = value(skip(rest))
    acc = Map.put(acc, key, v)

    case skip(rest) do
      "," <> rest -> object(skip(rest), acc)
      "}" <> rest -> {acc, rest}
      other -> throw({:json_error, {:unexpected, String.slice(other, 0, 20)}})
    end
  end

  defp object(other, _), do: throw({:json_error, {:unexpected, String.slice(other, 0, 20)}})

  defp array("]" <> rest, []), do: {[], rest}

  defp array(text, acc) do
    {v, rest} = value(text)

    case skip(rest) do
      "," <> rest -> array(skip(rest), [v | acc])
      "]" <> rest -> {Enum.reverse([v | acc]), rest}
      other -> throw({:json_error, {:unexpected, String.slice(other, 0, 20)}})
    end
  end

  defp expect(text, prefix) do
    if String.starts_with?(text, prefix),
      do: text,
      else: throw({:json_error, {:expected, prefix}})
  end

  defp string("\"" <> rest, acc), do: {IO.iodata_to_binary(Enum.reverse(acc)), rest}
  defp string("\\\"" <> rest, acc), do: string(rest, [?" | acc])
  defp string("\\\\" <> rest, acc), do: string(rest, [?\\ | acc])
  defp string("\\/" <> rest, acc), do: string(rest, [?/ | acc])
  defp string("\\n" <> rest, acc), do: string(rest, [?\n | acc])
  defp string("\\r" <> rest, acc), do: string(rest, [?\r | acc])
  defp string("\\t" <> rest, acc), do: string(rest, [?\t | acc])
  defp string("\\b" <> rest, acc), do: string(rest, [?\b | acc])
  defp string("\\f" <> rest, acc), do: string(rest, [?\f | acc])

  defp string("\\u" <> <<hex::binary-4, rest::binary>>, acc) do
    code = String.to_integer(hex, 16)

    case {code, rest} do
      {hi, "\\u" <> <<lo_hex::binary-4, rest2::binary>>} when hi in 0xD800..0xDBFF ->
        lo = String.to_integer(lo_hex, 16)
        string(rest2, [<<0x10000 + (hi - 0xD800) * 0x400 + (lo - 0xDC00)::utf8>> | acc])

      {code, _} ->
        string(rest, [<<code::utf8>> | acc])
    end
  end

  defp string(<<c::utf8, rest::binary>>, acc), do: string(rest, [<<c::utf8>> | acc])
  defp string(_, _), do: throw({:json_error, :unterminated_string})

  defp number(text) do
    [literal] = Regex.run(~r/^-?\d+(\.\d+)?([eE][-+]?\d+)?/, text, capture: :first)
    rest = binary_part(text, byte_size(literal), byte_size(text) - byte_size(literal))

    if String.contains?(literal, [".", "e", "E"]) do
      {float(literal), rest}
    else
      {String.to_integer(literal), rest}
    end
  end

  defp float(literal) do
    # Erlang wants a fraction before an exponent: 1e5 -> 1.0e5.
    normalized =
      if String.contains?(literal, "."),
        do: literal,
        else: String.replace(literal, ~r/[eE]/, ".0e")

    String.to_float(normalized)
  end
end
