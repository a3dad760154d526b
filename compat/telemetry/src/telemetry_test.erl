%% @doc Helpers for testing that code emits the expected telemetry events.
%%
%% Same API as the `telemetry_test' module of hex `telemetry' (1.2.0+).
-module(telemetry_test).

-export([attach_event_handlers/2, handle_event/4]).

%% @doc Attaches a handler to every event in `Events' that sends
%% `{EventName, Ref, Measurements, Metadata}' to `DestinationPid' each time
%% one of them is emitted, and returns `Ref'.
%%
%% `Ref' is a fresh reference and is also the handler id, so the handler is
%% removed with `telemetry:detach(Ref)'. The handler is an external function
%% (`telemetry_test:handle_event/4'), so no local-function report is logged.
-spec attach_event_handlers(DestinationPid, Events) -> reference() when
      DestinationPid :: pid(),
      Events :: [telemetry:event_name(), ...].
attach_event_handlers(DestinationPid, Events)
  when is_pid(DestinationPid), is_list(Events) ->
    Ref = erlang:make_ref(),
    ok = telemetry:attach_many(Ref, Events, fun ?MODULE:handle_event/4,
                               #{dest_pid => DestinationPid, ref => Ref}),
    Ref.

%% @private The handler attached by `attach_event_handlers/2'.
-spec handle_event(telemetry:event_name(), telemetry:event_measurements(),
                   telemetry:event_metadata(), #{dest_pid := pid(), ref := reference()}) ->
          {telemetry:event_name(), reference(), telemetry:event_measurements(),
           telemetry:event_metadata()}.
handle_event(EventName, Measurements, Metadata, #{dest_pid := Pid, ref := Ref}) ->
    Pid ! {EventName, Ref, Measurements, Metadata}.
