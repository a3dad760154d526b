defmodule Snakepit.Telemetry.CorrelationTest do
  use ExUnit.Case, async: true
  doctest Snakepit.Telemetry.Correlation

  alias Snakepit.Telemetry.Correlation

  test "new ids are unique and look like UUIDs" do
    ids = for _ <- 1..1000, do: Correlation.new()
    assert length(Enum.uniq(ids)) == 1000

    assert Enum.all?(
             ids,
             &String.match?(
               &1,
               ~r/\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\z/
             )
           )
  end

  test "the current id is per process, in Logger metadata, and restored by with_id" do
    assert Correlation.get() == nil
    :ok = Correlation.put("outer")
    assert Logger.metadata()[:correlation_id] == "outer"

    assert Correlation.with_id("inner", fn ->
             assert Task.async(&Correlation.get/0) |> Task.await() == nil
             Correlation.get()
           end) == "inner"

    assert Correlation.get() == "outer"
    Correlation.delete()
    assert Correlation.get() == nil
    assert Logger.metadata()[:correlation_id] == nil
  end

  test "grpc metadata carries the current id" do
    assert Correlation.grpc_metadata() == %{}

    Correlation.with_id("x1", fn ->
      assert Correlation.grpc_metadata() == %{"x-snakepit-correlation-id" => "x1"}
    end)

    assert Correlation.header_name() == "x-snakepit-correlation-id"
  end
end
