%% @private
%% Top-level supervisor. Its only child is the process that owns the
%% handler table.
-module(telemetry_sup).

-behaviour(supervisor).

-export([start_link/0, init/1]).

-spec start_link() -> {ok, pid()} | ignore | {error, term()}.
start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    Flags = #{strategy => one_for_one, intensity => 1, period => 5},
    Table = #{id => telemetry_handler_table,
              start => {telemetry_handler_table, start_link, []},
              restart => permanent,
              shutdown => 5000,
              type => worker,
              modules => [telemetry_handler_table]},
    {ok, {Flags, [Table]}}.
