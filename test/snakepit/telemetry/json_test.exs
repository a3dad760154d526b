defmodule Snakepit.Telemetry.JSONTest do
  use ExUnit.Case, async: true

  alias Snakepit.Telemetry.JSON

  test "round-trips the values the worker protocol uses" do
    value = %{
      "cmd" => "emit",
      "count" => 3,
      "rate" => 0.25,
      "flags" => [true, false, nil],
      "text" => "quote \" backslash \\ newline \n tab \t é ✓",
      "nested" => %{"empty" => [], "obj" => %{}}
    }

    assert {:ok, ^value} = value |> JSON.encode!() |> JSON.decode()
  end

  test "encodes atoms as strings and decodes numbers" do
    assert JSON.encode!(%{cmd: :stats}) == ~s({"cmd":"stats"})
    assert JSON.decode("[-1, 2.5, 1e3, -2E-2]") == {:ok, [-1, 2.5, 1.0e3, -0.02]}
    assert JSON.decode(~s("\\u00e9\\ud83d\\ude00")) == {:ok, "é😀"}
  end

  test "rejects malformed input with an error, not an exception" do
    for bad <- ["", "{", ~s({"a" 1}), "[1,]", ~s({"a":1,}), "nul", ~s("open), "1 2"] do
      assert {:error, _} = JSON.decode(bad), "accepted #{inspect(bad)}"
    end
  end
end
