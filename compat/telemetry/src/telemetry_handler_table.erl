%% @private
%% Storage for attached handlers.
%%
%% A gen_server owns a named, protected ETS table. Every write (attach,
%% detach) is serialised through the server, so a handler id can never be
%% attached twice. Reads are done by the calling process directly against
%% ETS, so `telemetry:execute/3' never waits for the server.
%%
%% The table is a `set' keyed by event name. Each row holds the handlers for
%% that event, oldest first:
%%
%%   {EventName, [{SortKey, Handler}]}
%%
%% `SortKey' is `{AttachSeq, Position}': the sequence number of the attach
%% call and the position of the event in the list given to `attach_many/4'.
%% It makes `list_by_prefix/1' return handlers in attach order.
%%
%% The server state maps each handler id to the event names it is attached
%% to, which is what `delete/1' needs.
%%
%% After `persist/0' the ETS table stays the source of truth, and after every
%% write the server also publishes a map `#{EventName => [Handler]}' as one
%% persistent_term under the key `telemetry_handler_table'.
%% `list_for_event/1' reads that term when it exists (no copying, no ETS
%% access) and ETS otherwise; the check is a single persistent_term lookup
%% by atom. The term is erased when the server starts and when it stops, so
%% a restarted application is not persisted and never sees stale handlers.
-module(telemetry_handler_table).

-behaviour(gen_server).

%% prefix_pattern/1 builds an ETS match pattern whose tail is '_' on purpose.
-dialyzer({no_improper_lists, prefix_pattern/1}).

-export([start_link/0,
         insert/4,
         delete/1,
         persist/0,
         list_for_event/1,
         list_by_prefix/1]).

-export([init/1,
         handle_call/3,
         handle_cast/2,
         handle_info/2,
         terminate/2]).

-define(TABLE, ?MODULE).
-define(PERSISTED_KEY, ?MODULE).

-type sort_key() :: {non_neg_integer(), pos_integer()}.
-type entry() :: {sort_key(), telemetry:handler()}.
-type state() :: #{next_seq := non_neg_integer(),
                   persisted := boolean(),
                   handlers := #{telemetry:handler_id() => [telemetry:event_name()]}}.

%%--------------------------------------------------------------------
%% API

-spec start_link() -> {ok, pid()} | ignore | {error, term()}.
start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

-spec insert(HandlerId, EventNames, Function, Config) -> ok | {error, already_exists} when
      HandlerId :: telemetry:handler_id(),
      EventNames :: [telemetry:event_name()],
      Function :: telemetry:handler_function(),
      Config :: telemetry:handler_config().
insert(HandlerId, EventNames, Function, Config) ->
    gen_server:call(?MODULE, {insert, HandlerId, EventNames, Function, Config}).

-spec delete(telemetry:handler_id()) -> ok | {error, not_found}.
delete(HandlerId) ->
    gen_server:call(?MODULE, {delete, HandlerId}).

%% Switches lookups to persistent_term (see the module comment). Idempotent.
-spec persist() -> ok.
persist() ->
    gen_server:call(?MODULE, persist).

%% Handlers attached to exactly `EventName', in attach order. Returns `[]'
%% when the table does not exist (the application is not started), so
%% emitting events before start-up is harmless.
-spec list_for_event(telemetry:event_name()) -> [telemetry:handler()].
list_for_event(EventName) ->
    case persistent_term:get(?PERSISTED_KEY, undefined) of
        undefined ->
            try ets:lookup(?TABLE, EventName) of
                [{_, Entries}] -> [Handler || {_, Handler} <- Entries];
                [] -> []
            catch
                error:badarg -> []
            end;
        ByEvent ->
            maps:get(EventName, ByEvent, [])
    end.

%% Handlers attached to any event that starts with `EventPrefix', in attach
%% order. A handler attached to several matching events appears once per
%% event.
-spec list_by_prefix(telemetry:event_prefix()) -> [telemetry:handler()].
list_by_prefix(EventPrefix) ->
    MatchSpec = [{{prefix_pattern(EventPrefix), '$1'}, [], ['$1']}],
    Rows = try ets:select(?TABLE, MatchSpec)
           catch error:badarg -> []
           end,
    [Handler || {_, Handler} <- lists:keysort(1, lists:append(Rows))].

%%--------------------------------------------------------------------
%% gen_server callbacks

-spec init([]) -> {ok, state()}.
init([]) ->
    %% terminate/2 must run on shutdown to erase the persisted handlers.
    process_flag(trap_exit, true),
    _ = persistent_term:erase(?PERSISTED_KEY),
    _ = ets:new(?TABLE, [set, protected, named_table, {read_concurrency, true}]),
    {ok, #{next_seq => 0, persisted => false, handlers => #{}}}.

-spec handle_call(term(), gen_server:from(), state()) -> {reply, term(), state()}.
handle_call({insert, HandlerId, EventNames, Function, Config}, _From,
            #{next_seq := Seq, handlers := Handlers} = State) ->
    case maps:is_key(HandlerId, Handlers) of
        true ->
            {reply, {error, already_exists}, State};
        false ->
            Positions = lists:seq(1, length(EventNames)),
            lists:foreach(
              fun({Position, EventName}) ->
                      Handler = #{id => HandlerId,
                                  event_name => EventName,
                                  function => Function,
                                  config => Config},
                      append_entry(EventName, {{Seq, Position}, Handler})
              end,
              lists:zip(Positions, EventNames)),
            ok = publish(State),
            {reply, ok, State#{next_seq := Seq + 1,
                               handlers := Handlers#{HandlerId => EventNames}}}
    end;
handle_call({delete, HandlerId}, _From, #{handlers := Handlers} = State) ->
    case maps:take(HandlerId, Handlers) of
        error ->
            {reply, {error, not_found}, State};
        {EventNames, Rest} ->
            lists:foreach(fun(EventName) -> remove_entries(EventName, HandlerId) end,
                          lists:usort(EventNames)),
            ok = publish(State),
            {reply, ok, State#{handlers := Rest}}
    end;
handle_call(persist, _From, State) ->
    NewState = State#{persisted := true},
    ok = publish(NewState),
    {reply, ok, NewState};
handle_call(_Request, _From, State) ->
    {reply, {error, unknown_call}, State}.

-spec handle_cast(term(), state()) -> {noreply, state()}.
handle_cast(_Msg, State) ->
    {noreply, State}.

-spec handle_info(term(), state()) -> {noreply, state()}.
handle_info(_Msg, State) ->
    {noreply, State}.

-spec terminate(term(), state()) -> ok.
terminate(_Reason, _State) ->
    _ = persistent_term:erase(?PERSISTED_KEY),
    ok.

%%--------------------------------------------------------------------
%% Internal

%% After persist/0, copies the whole table into the persistent term. Every
%% put replaces the term, which makes the runtime scan all processes; that
%% is the documented cost of writes after persist/0.
-spec publish(state()) -> ok.
publish(#{persisted := false}) ->
    ok;
publish(#{persisted := true}) ->
    ByEvent = maps:from_list([{EventName, [Handler || {_, Handler} <- Entries]}
                              || {EventName, Entries} <- ets:tab2list(?TABLE)]),
    persistent_term:put(?PERSISTED_KEY, ByEvent).

%% Each row is replaced with a single ets:insert/2, so readers always see
%% either the old or the new list of handlers for an event.
-spec append_entry(telemetry:event_name(), entry()) -> true.
append_entry(EventName, Entry) ->
    Entries = case ets:lookup(?TABLE, EventName) of
                  [{_, Existing}] -> Existing;
                  [] -> []
              end,
    ets:insert(?TABLE, {EventName, Entries ++ [Entry]}).

-spec remove_entries(telemetry:event_name(), telemetry:handler_id()) -> true.
remove_entries(EventName, HandlerId) ->
    case ets:lookup(?TABLE, EventName) of
        [{_, Entries}] ->
            case [E || {_, #{id := Id}} = E <- Entries, Id =/= HandlerId] of
                [] -> ets:delete(?TABLE, EventName);
                Kept -> ets:insert(?TABLE, {EventName, Kept})
            end;
        [] ->
            true
    end.

%% Turns `[a, b]' into the match pattern `[a, b | '_']', which matches
%% every event name starting with `a, b' (including `[a, b]' itself). The
%% empty prefix becomes `'_'' and matches everything.
-spec prefix_pattern(telemetry:event_prefix()) -> term().
prefix_pattern([]) ->
    '_';
prefix_pattern([Segment | Rest]) ->
    [Segment | prefix_pattern(Rest)].
