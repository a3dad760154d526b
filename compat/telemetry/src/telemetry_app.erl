%% @private
%% Application callback module: starts the supervision tree that owns the
%% handler table.
-module(telemetry_app).

-behaviour(application).

-export([start/2, stop/1]).

-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_StartType, _StartArgs) ->
    telemetry_sup:start_link().

-spec stop(term()) -> ok.
stop(_State) ->
    ok.
