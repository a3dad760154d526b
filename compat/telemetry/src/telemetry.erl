%% @doc Dynamic dispatching of events to attached handlers.
%%
%% Local, API-compatible stand-in for the hex package `telemetry' 1.x
%% (beam-telemetry/telemetry), written from its documented behaviour. It is
%% only used when hex.pm cannot be reached; see README.md.
%%
%% Handlers are functions of arity 4 attached under a unique id to one or
%% more event names (non-empty lists of atoms). `execute/3' runs the
%% handlers attached to exactly that event name, synchronously in the
%% calling process, in attach order. A handler that raises, throws or exits
%% is detached, the failure is logged and the event
%% `[telemetry, handler, failure]' is emitted; `execute/3' itself never
%% fails because of a handler.
%%
%% Bad arguments fail the way the hex package does: a malformed event name
%% or prefix raises `badarg'; a handler function that is not of arity 4, an
%% empty or non-list event name given to `execute/2,3', or non-map
%% measurements/metadata raise `function_clause'.
%%
%% Matches hex `telemetry' 1.4.x, including `persist/0' and the logger
%% output: attaching a local function logs an `info' report
%% `#{handler_id, event_names, function, config, type => local}' (formatted
%% by `report_cb/1'); a failing handler logs an `error' message naming the
%% handler id, class, reason and stacktrace.
-module(telemetry).

-export([attach/4,
         attach_many/4,
         persist/0,
         detach/1,
         list_handlers/1,
         execute/2,
         execute/3,
         span/3]).

%% Logger report callback for the local-function report; not for callers.
-export([report_cb/1]).

-include_lib("kernel/include/logger.hrl").

-type handler_id() :: term().
-type event_name() :: [atom(), ...].
-type event_measurements() :: map().
-type event_metadata() :: map().
-type event_value() :: number().
-type event_prefix() :: [atom()].
-type handler_config() :: term().
-type handler_function() ::
        fun((event_name(), event_measurements(), event_metadata(), handler_config()) -> any()).
-type span_result() :: term().
-type span_function() ::
        fun(() -> {span_result(), event_metadata()}
                | {span_result(), event_measurements(), event_metadata()}).
-type handler() :: #{id := handler_id(),
                     event_name := event_name(),
                     function := handler_function(),
                     config := handler_config()}.

-export_type([handler_id/0,
              event_name/0,
              event_measurements/0,
              event_metadata/0,
              event_value/0,
              event_prefix/0,
              handler_config/0,
              handler_function/0,
              handler/0,
              span_result/0,
              span_function/0]).

-define(FAILURE_EVENT, [telemetry, handler, failure]).

%%--------------------------------------------------------------------
%% Attaching and detaching

%% @doc Attaches `Function' to `EventName' under the unique id `HandlerId'.
%%
%% Returns `{error, already_exists}' if a handler with that id is already
%% attached. Prefer external captures (`fun mod:fun/4', `&Mod.fun/4') over
%% anonymous or local functions; the latter are accepted, but an `info'
%% report is logged (even when the id already exists), as the hex package
%% does.
-spec attach(HandlerId, EventName, Function, Config) -> ok | {error, already_exists} when
      HandlerId :: handler_id(),
      EventName :: event_name(),
      Function :: handler_function(),
      Config :: handler_config().
attach(HandlerId, EventName, Function, Config) ->
    attach_many(HandlerId, [EventName], Function, Config).

%% @doc Attaches `Function' to every event in `EventNames' under one id.
%%
%% Detaching the id (explicitly or because the handler failed) removes it
%% from all of those events.
-spec attach_many(HandlerId, [EventName], Function, Config) -> ok | {error, already_exists} when
      HandlerId :: handler_id(),
      EventName :: event_name(),
      Function :: handler_function(),
      Config :: handler_config().
attach_many(HandlerId, EventNames, Function, Config) when is_function(Function, 4) ->
    ok = check_event_names(EventNames),
    ok = report_if_local(HandlerId, EventNames, Function, Config),
    telemetry_handler_table:insert(HandlerId, EventNames, Function, Config).

%% @doc Stores the handlers so that `execute/3' reads them from
%% persistent_term instead of ETS: faster dispatch, at the cost of much
%% slower `attach/4', `attach_many/4' and `detach/1' (each one rewrites the
%% persistent term, which makes the runtime scan every process). Attaching
%% and detaching still work afterwards. Lasts until the application stops.
%% Added in hex `telemetry' 1.4.0.
-spec persist() -> ok.
persist() ->
    telemetry_handler_table:persist().

%% @doc Detaches the handler with id `HandlerId' from all its events.
-spec detach(handler_id()) -> ok | {error, not_found}.
detach(HandlerId) ->
    telemetry_handler_table:delete(HandlerId).

%% @doc Returns the handlers attached to events starting with `EventPrefix'
%% (`[]' lists every handler). A handler attached to several matching
%% events is listed once per event.
-spec list_handlers(event_prefix()) -> [handler()].
list_handlers(EventPrefix) ->
    case is_atom_list(EventPrefix) of
        true -> telemetry_handler_table:list_by_prefix(EventPrefix);
        false -> erlang:error(badarg, [EventPrefix])
    end.

%%--------------------------------------------------------------------
%% Emitting events

%% @doc Same as `execute(EventName, Measurements, #{})'.
-spec execute(EventName, Measurements) -> ok when
      EventName :: event_name(),
      Measurements :: event_measurements() | event_value().
execute(EventName, Measurements) ->
    execute(EventName, Measurements, #{}).

%% @doc Emits an event: calls every handler attached to `EventName' with
%% `(EventName, Measurements, Metadata, Config)' in the calling process.
%%
%% A number given as `Measurements' is the deprecated single-value form; it
%% is passed to handlers as `#{value => Number}' and a warning is logged.
-spec execute(EventName, Measurements, Metadata) -> ok when
      EventName :: event_name(),
      Measurements :: event_measurements() | event_value(),
      Metadata :: event_metadata().
execute(EventName, Value, Metadata) when is_number(Value) ->
    ?LOG_WARNING("telemetry:execute/3 called with a single number as measurements for ~p; "
                 "this form is deprecated, pass a map of measurements instead",
                 [EventName]),
    execute(EventName, #{value => Value}, Metadata);
execute([_ | _] = EventName, Measurements, Metadata)
  when is_map(Measurements), is_map(Metadata) ->
    lists:foreach(
      fun(Handler) -> invoke(Handler, EventName, Measurements, Metadata) end,
      telemetry_handler_table:list_for_event(EventName)).

%% @doc Runs `SpanFunction' between a start event and a stop or exception
%% event.
%%
%% Emits `EventPrefix ++ [start]' with measurements
%% `#{monotonic_time, system_time}' and `StartMetadata'. `SpanFunction' must
%% return `{Result, StopMetadata}' or `{Result, ExtraMeasurements,
%% StopMetadata}'; then `EventPrefix ++ [stop]' is emitted with
%% `#{duration, monotonic_time}' (merged over `ExtraMeasurements') and
%% `StopMetadata', and `Result' is returned. If `SpanFunction' raises,
%% throws or exits, `EventPrefix ++ [exception]' is emitted with
%% `#{duration, monotonic_time}' and `StartMetadata' plus `kind', `reason'
%% and `stacktrace', and the exception is re-raised unchanged.
%%
%% All three metadata maps carry `telemetry_span_context' (a fresh
%% reference) unless the caller's metadata already has that key. Times and
%% durations are in `native' time units.
-spec span(event_prefix(), event_metadata(), span_function()) -> span_result().
span(EventPrefix, StartMetadata, SpanFunction)
  when is_list(EventPrefix), is_map(StartMetadata), is_function(SpanFunction, 0) ->
    StartTime = erlang:monotonic_time(),
    Context = erlang:make_ref(),
    execute(EventPrefix ++ [start],
            #{monotonic_time => StartTime, system_time => erlang:system_time()},
            with_span_context(StartMetadata, Context)),
    try SpanFunction() of
        {Result, StopMetadata} ->
            span_stop(EventPrefix, StartTime, #{}, StopMetadata, Context),
            Result;
        {Result, ExtraMeasurements, StopMetadata} ->
            span_stop(EventPrefix, StartTime, ExtraMeasurements, StopMetadata, Context),
            Result
    catch
        Class:Reason:Stacktrace ->
            StopTime = erlang:monotonic_time(),
            ExceptionMetadata = StartMetadata#{kind => Class,
                                               reason => Reason,
                                               stacktrace => Stacktrace},
            execute(EventPrefix ++ [exception],
                    #{duration => StopTime - StartTime, monotonic_time => StopTime},
                    with_span_context(ExceptionMetadata, Context)),
            erlang:raise(Class, Reason, Stacktrace)
    end.

%%--------------------------------------------------------------------
%% Internal

-spec span_stop(event_prefix(), integer(), event_measurements(), event_metadata(),
                reference()) -> ok.
span_stop(EventPrefix, StartTime, ExtraMeasurements, StopMetadata, Context) ->
    StopTime = erlang:monotonic_time(),
    Measurements = maps:merge(ExtraMeasurements,
                              #{duration => StopTime - StartTime,
                                monotonic_time => StopTime}),
    execute(EventPrefix ++ [stop], Measurements, with_span_context(StopMetadata, Context)).

-spec with_span_context(event_metadata(), reference()) -> event_metadata().
with_span_context(#{telemetry_span_context := _} = Metadata, _Context) ->
    Metadata;
with_span_context(Metadata, Context) ->
    Metadata#{telemetry_span_context => Context}.

-spec invoke(handler(), event_name(), event_measurements(), event_metadata()) -> ok.
invoke(#{id := HandlerId, function := Function, config := Config},
       EventName, Measurements, Metadata) ->
    try
        _ = Function(EventName, Measurements, Metadata, Config),
        ok
    catch
        Class:Reason:Stacktrace ->
            handler_failed(HandlerId, Config, EventName, Class, Reason, Stacktrace)
    end.

%% Order as in the hex package: detach, emit the failure event, then log.
-spec handler_failed(handler_id(), handler_config(), event_name(),
                     error | exit | throw, term(), list()) -> ok.
handler_failed(HandlerId, Config, EventName, Class, Reason, Stacktrace) ->
    _ = try detach(HandlerId)
        catch exit:_ -> ok
        end,
    ok = execute(?FAILURE_EVENT,
                 #{monotonic_time => erlang:monotonic_time(),
                   system_time => erlang:system_time()},
                 #{event_name => EventName,
                   handler_id => HandlerId,
                   handler_config => Config,
                   kind => Class,
                   reason => Reason,
                   stacktrace => Stacktrace}),
    ?LOG_ERROR("Handler ~p has failed and has been detached. "
               "Class=~p~nReason=~p~nStacktrace=~p~n",
               [HandlerId, Class, Reason, Stacktrace]).

-spec report_if_local(handler_id(), [event_name()], handler_function(), handler_config()) -> ok.
report_if_local(HandlerId, EventNames, Function, Config) ->
    case erlang:fun_info(Function, type) of
        {type, local} ->
            ?LOG_INFO(#{handler_id => HandlerId,
                        event_names => EventNames,
                        function => Function,
                        config => Config,
                        type => local},
                      #{report_cb => fun ?MODULE:report_cb/1});
        {type, external} ->
            ok
    end.

%% @private Formats the local-function report logged by `attach_many/4'.
-spec report_cb(logger:report()) -> {io:format(), [term()]}.
report_cb(#{handler_id := HandlerId}) ->
    {"The function passed as a handler with ID ~w is a local function.~n"
     "It is an anonymous function or a capture of a function without a module, "
     "which may make calling the handler slower. Prefer an external capture "
     "(fun mod:handle_event/4, &Mod.handle_event/4); see the note in the "
     "telemetry:attach/4 documentation.~n~n"
     "https://hexdocs.pm/telemetry/telemetry.html#attach/4",
     [HandlerId]}.

-spec check_event_names(term()) -> ok.
check_event_names(EventNames) when is_list(EventNames) ->
    lists:foreach(
      fun([_ | _] = EventName) ->
              case is_atom_list(EventName) of
                  true -> ok;
                  false -> erlang:error(badarg, [EventName])
              end;
         (Other) ->
              erlang:error(badarg, [Other])
      end,
      EventNames);
check_event_names(Other) ->
    erlang:error(badarg, [Other]).

%% True for a proper list of atoms (including `[]').
-spec is_atom_list(term()) -> boolean().
is_atom_list([]) ->
    true;
is_atom_list([Segment | Rest]) when is_atom(Segment) ->
    is_atom_list(Rest);
is_atom_list(_) ->
    false.
