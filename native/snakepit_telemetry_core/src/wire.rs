//! Decoding of the worker's gRPC messages, one event at a time.
//!
//! prost decodes a `TelemetryEventBatch` as a whole: one invalid UTF-8
//! string in one event fails the message, and tonic then fails the call.
//! Here a batch is walked field by field and each event is decoded on its
//! own, so a bad event is dropped and counted (`dropped_malformed`) while
//! the rest of its batch is delivered; a message that cannot be walked at
//! all is skipped and counted (`malformed_messages`). Nothing here fails
//! the call.
//!
//! [`WireCodec`] plugs this into tonic for both RPCs. The pure functions
//! ([`parse_batch`], [`parse_event`], [`decode_batch_payload`],
//! [`decode_event_payload`]) never panic, whatever the input; the fuzz
//! targets drive them.

use std::marker::PhantomData;

use prost::bytes::Buf;
use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder as TonicDecoder};
use tonic_prost::ProstEncoder;

use crate::decode::{Decoded, Decoder};
use crate::proto::{TelemetryControl, TelemetryEvent};
use crate::stats::StreamStats;

/// One gRPC message from the worker, parsed but not yet decoded against
/// the catalog.
#[derive(Debug, Default, PartialEq)]
pub struct Wire {
    /// The events that decoded, in order, with absolute timestamps (a
    /// batch's `base_timestamp_ns` already added, saturating).
    pub events: Vec<TelemetryEvent>,
    /// Events that did not decode (invalid UTF-8, a bad wire type, a
    /// truncated event...).
    pub malformed_events: usize,
    /// The message could not be walked at all (garbage, truncated): its
    /// events are unknown.
    pub malformed_message: bool,
}

impl Wire {
    /// Wire events this message counts for when batching (at least one, so
    /// draining always ends).
    pub fn len(&self) -> usize {
        (self.events.len() + self.malformed_events).max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.malformed_events == 0
    }

    fn malformed() -> Wire {
        Wire {
            malformed_message: true,
            ..Wire::default()
        }
    }
}

/// `TelemetryEventBatch` field numbers (proto/snakepit_bridge.proto).
const BATCH_EVENTS: u32 = 1;
const BATCH_BASE_TIMESTAMP: u32 = 2;

/// Walks a `TelemetryEventBatch` payload: each event (field 1) is decoded
/// on its own; `base_timestamp_ns` (field 2, last one wins as in protobuf)
/// is added to every event's timestamp; unknown fields are skipped. A
/// payload whose framing is broken, or whose known fields have the wrong
/// wire type, is a malformed message.
pub fn parse_batch(mut payload: &[u8]) -> Wire {
    let mut events = Vec::new();
    let mut malformed_events = 0;
    let mut base: i64 = 0;
    while !payload.is_empty() {
        let Ok((tag, wire_type)) = decode_key(&mut payload) else {
            return Wire::malformed();
        };
        match (tag, wire_type) {
            (BATCH_EVENTS, WireType::LengthDelimited) => {
                let Ok(len) = decode_varint(&mut payload) else {
                    return Wire::malformed();
                };
                let Some(len) = usize::try_from(len).ok().filter(|l| *l <= payload.len()) else {
                    return Wire::malformed();
                };
                let (event, rest) = payload.split_at(len);
                payload = rest;
                match TelemetryEvent::decode(event) {
                    Ok(event) => events.push(event),
                    Err(_) => malformed_events += 1,
                }
            }
            (BATCH_BASE_TIMESTAMP, WireType::Varint) => match decode_varint(&mut payload) {
                // int64 is sent as its two's complement bits.
                Ok(value) => base = value as i64,
                Err(_) => return Wire::malformed(),
            },
            (BATCH_EVENTS | BATCH_BASE_TIMESTAMP, _) => return Wire::malformed(),
            (tag, wire_type) => {
                if skip_field(wire_type, tag, &mut payload, DecodeContext::default()).is_err() {
                    return Wire::malformed();
                }
            }
        }
    }
    if base != 0 {
        for event in &mut events {
            event.timestamp_ns = event.timestamp_ns.saturating_add(base);
        }
    }
    Wire {
        events,
        malformed_events,
        malformed_message: false,
    }
}

/// A `StreamTelemetry` message: one event, or one malformed event.
pub fn parse_event(payload: &[u8]) -> Wire {
    match TelemetryEvent::decode(payload) {
        Ok(event) => Wire {
            events: vec![event],
            ..Wire::default()
        },
        Err(_) => Wire {
            malformed_events: 1,
            ..Wire::default()
        },
    }
}

/// Counts a parsed message in `stats` and decodes its events against the
/// catalog onto `out`: malformed events count as received and
/// `dropped_malformed`, a malformed message as `malformed_messages`, and
/// [`Decoder::decode`] counts the rest. Returns how many were appended.
pub fn fold(
    wire: Wire,
    decoder: &mut Decoder,
    stats: &StreamStats,
    out: &mut Vec<Decoded>,
) -> usize {
    StreamStats::add(&stats.wire_messages, 1);
    if wire.malformed_message {
        StreamStats::add(&stats.malformed_messages, 1);
    }
    if wire.malformed_events > 0 {
        let n = wire.malformed_events as u64;
        StreamStats::add(&stats.received, n);
        StreamStats::add(&stats.dropped_malformed, n);
    }
    let before = out.len();
    out.extend(
        wire.events
            .into_iter()
            .filter_map(|event| decoder.decode(event, stats).ok()),
    );
    out.len() - before
}

/// Decodes one `StreamTelemetryBatches` message payload (the gRPC message
/// body) onto `out`, counting everything in `stats`; see [`fold`].
pub fn decode_batch_payload(
    payload: &[u8],
    decoder: &mut Decoder,
    stats: &StreamStats,
    out: &mut Vec<Decoded>,
) -> usize {
    fold(parse_batch(payload), decoder, stats, out)
}

/// Decodes one `StreamTelemetry` message payload onto `out`, counting
/// everything in `stats`; see [`fold`].
pub fn decode_event_payload(
    payload: &[u8],
    decoder: &mut Decoder,
    stats: &StreamStats,
    out: &mut Vec<Decoded>,
) -> usize {
    fold(parse_event(payload), decoder, stats, out)
}

/// The size of a message tonic refused for being over the decoding limit,
/// from its status (tonic checks the length prefix before reading the
/// body: `OUT_OF_RANGE`, "Error, decoded message length too large: found N
/// bytes, ...").
pub fn oversized_message_bytes(status: &tonic::Status) -> Option<u64> {
    if status.code() != tonic::Code::OutOfRange {
        return None;
    }
    let rest = status
        .message()
        .strip_prefix("Error, decoded message length too large: found ")?;
    let digits = rest.split(' ').next()?;
    digits.parse().ok()
}

/// Which message the worker sends.
#[derive(Copy, Clone, Debug)]
pub enum Framing {
    /// `TelemetryEventBatch` (`StreamTelemetryBatches`).
    Batch,
    /// `TelemetryEvent` (`StreamTelemetry`).
    Event,
}

/// A tonic codec that sends `TelemetryControl`s and reads [`Wire`]
/// messages; its decoder never fails the call on a bad payload.
#[derive(Debug)]
pub struct WireCodec {
    framing: Framing,
    _controls: PhantomData<TelemetryControl>,
}

impl WireCodec {
    pub fn new(framing: Framing) -> Self {
        WireCodec {
            framing,
            _controls: PhantomData,
        }
    }
}

impl Codec for WireCodec {
    type Encode = TelemetryControl;
    type Decode = Wire;
    type Encoder = ProstEncoder<TelemetryControl>;
    type Decoder = WireDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireDecoder {
            framing: self.framing,
        }
    }
}

#[derive(Debug)]
pub struct WireDecoder {
    framing: Framing,
}

impl TonicDecoder for WireDecoder {
    type Item = Wire;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Wire>, tonic::Status> {
        // The buffer holds exactly one message; this takes it without a
        // copy (tonic buffers it in one BytesMut).
        let payload = src.copy_to_bytes(src.remaining());
        Ok(Some(match self.framing {
            Framing::Batch => parse_batch(&payload),
            Framing::Event => parse_event(&payload),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::DecodeConfig;
    use crate::proto::TelemetryEventBatch;
    use prost::encoding::{encode_key, encode_varint};
    use std::collections::HashMap;

    fn event(name: &str, correlation_id: &str) -> TelemetryEvent {
        TelemetryEvent {
            event_parts: name.split('.').map(String::from).collect(),
            metadata: HashMap::from([("command".to_string(), "predict".to_string())]),
            correlation_id: correlation_id.into(),
            timestamp_ns: 5,
            ..Default::default()
        }
    }

    /// An event whose correlation id (field 5) is not UTF-8.
    fn bad_utf8_event() -> Vec<u8> {
        let mut bytes = event("python.call.stop", "").encode_to_vec();
        encode_key(5, WireType::LengthDelimited, &mut bytes);
        encode_varint(2, &mut bytes);
        bytes.extend_from_slice(&[0xff, 0xfe]);
        bytes
    }

    fn batch_field(event: &[u8], out: &mut Vec<u8>) {
        encode_key(BATCH_EVENTS, WireType::LengthDelimited, out);
        encode_varint(event.len() as u64, out);
        out.extend_from_slice(event);
    }

    fn accounted(stats: &StreamStats, delivered: usize) {
        let get = StreamStats::get;
        assert_eq!(
            get(&stats.received),
            delivered as u64 + get(&stats.dropped_malformed) + get(&stats.dropped_unknown_event)
        );
    }

    fn decoder() -> Decoder {
        Decoder::new(DecodeConfig::default())
    }

    #[test]
    fn a_bad_event_is_dropped_and_the_rest_of_its_batch_delivered() {
        let mut payload = Vec::new();
        batch_field(
            &event("python.call.start", "a").encode_to_vec(),
            &mut payload,
        );
        batch_field(&bad_utf8_event(), &mut payload);
        batch_field(
            &event("python.call.stop", "b").encode_to_vec(),
            &mut payload,
        );
        encode_key(BATCH_BASE_TIMESTAMP, WireType::Varint, &mut payload);
        encode_varint(1_000, &mut payload);
        // prost refuses the whole batch.
        assert!(TelemetryEventBatch::decode(payload.as_slice()).is_err());

        let stats = StreamStats::default();
        let mut out = Vec::new();
        let n = decode_batch_payload(&payload, &mut decoder(), &stats, &mut out);
        assert_eq!(n, 2);
        let ids: Vec<_> = out.iter().map(|d| d.correlation_id.as_deref()).collect();
        assert_eq!(ids, [Some("a"), Some("b")]);
        assert!(out.iter().all(|d| d.timestamp_ns == 1_005));
        assert_eq!(StreamStats::get(&stats.received), 3);
        assert_eq!(StreamStats::get(&stats.dropped_malformed), 1);
        assert_eq!(StreamStats::get(&stats.malformed_messages), 0);
        assert_eq!(StreamStats::get(&stats.wire_messages), 1);
        accounted(&stats, out.len());
    }

    #[test]
    fn walks_what_prost_encodes() {
        let batch = TelemetryEventBatch {
            events: vec![event("python.call.start", "x"), event("zz.unknown.evt", "")],
            base_timestamp_ns: -3,
        };
        let wire = parse_batch(&batch.encode_to_vec());
        assert!(!wire.malformed_message);
        assert_eq!(wire.malformed_events, 0);
        assert_eq!(wire.events.len(), 2);
        assert_eq!(wire.events[0].timestamp_ns, 2);
        assert_eq!(wire.events[0].correlation_id, "x");
        // Empty batch: no events, not malformed, counts as one wire event.
        let empty = parse_batch(&[]);
        assert!(empty.is_empty() && !empty.malformed_message);
        assert_eq!(empty.len(), 1);
        // Unknown fields are skipped.
        let mut payload = batch.encode_to_vec();
        encode_key(9, WireType::Varint, &mut payload);
        encode_varint(7, &mut payload);
        assert_eq!(parse_batch(&payload).events.len(), 2);
        // A saturating base.
        let mut payload = Vec::new();
        batch_field(&event("python.call.stop", "").encode_to_vec(), &mut payload);
        encode_key(BATCH_BASE_TIMESTAMP, WireType::Varint, &mut payload);
        encode_varint(i64::MAX as u64, &mut payload);
        assert_eq!(parse_batch(&payload).events[0].timestamp_ns, i64::MAX);
    }

    #[test]
    fn garbage_and_truncated_payloads_are_malformed_messages() {
        let mut good = Vec::new();
        batch_field(&event("python.call.start", "a").encode_to_vec(), &mut good);
        batch_field(&event("python.call.stop", "b").encode_to_vec(), &mut good);
        let stats = StreamStats::default();
        let mut out = Vec::new();
        let mut d = decoder();
        // Truncated in the middle of the second event's bytes.
        decode_batch_payload(&good[..good.len() - 3], &mut d, &stats, &mut out);
        // Garbage: an invalid wire type (7), then an overlong varint.
        decode_batch_payload(&[0x0f, 0x01, 0x02], &mut d, &stats, &mut out);
        decode_batch_payload(&[0x10; 11], &mut d, &stats, &mut out);
        // Events field with the wrong wire type.
        decode_batch_payload(&[0x08, 0x01], &mut d, &stats, &mut out);
        // A length prefix past the end.
        decode_batch_payload(&[0x0a, 0xff, 0xff, 0x03, 0x00], &mut d, &stats, &mut out);
        assert!(out.is_empty());
        assert_eq!(StreamStats::get(&stats.malformed_messages), 5);
        assert_eq!(StreamStats::get(&stats.wire_messages), 5);
        assert_eq!(StreamStats::get(&stats.received), 0);
        // The stream carries on with the next message.
        decode_batch_payload(&good, &mut d, &stats, &mut out);
        assert_eq!(out.len(), 2);
        accounted(&stats, out.len());
    }

    #[test]
    fn a_bad_single_event_message_counts_as_one_malformed_event() {
        let stats = StreamStats::default();
        let mut out = Vec::new();
        let mut d = decoder();
        decode_event_payload(&bad_utf8_event(), &mut d, &stats, &mut out);
        decode_event_payload(&[0xff, 0xff, 0xff], &mut d, &stats, &mut out);
        let good = event("python.call.stop", "z").encode_to_vec();
        decode_event_payload(&good, &mut d, &stats, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(StreamStats::get(&stats.received), 3);
        assert_eq!(StreamStats::get(&stats.dropped_malformed), 2);
        assert_eq!(StreamStats::get(&stats.malformed_messages), 0);
        accounted(&stats, out.len());
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        // A cheap deterministic sweep (the fuzz targets go much further):
        // every prefix and single-byte corruption of a valid batch.
        let batch = TelemetryEventBatch {
            events: vec![
                event("python.call.start", "a"),
                event("python.call.stop", "b"),
            ],
            base_timestamp_ns: 77,
        };
        let good = batch.encode_to_vec();
        let stats = StreamStats::default();
        let mut d = decoder();
        let mut out = Vec::new();
        let mut inputs: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
        for i in 0..good.len() {
            for b in [0x00, 0x07, 0x80, 0xff] {
                let mut bytes = good.clone();
                bytes[i] = b;
                inputs.push(bytes);
            }
        }
        for input in &inputs {
            out.clear();
            decode_batch_payload(input, &mut d, &stats, &mut out);
            decode_event_payload(input, &mut d, &stats, &mut out);
        }
        assert_eq!(
            StreamStats::get(&stats.wire_messages),
            2 * inputs.len() as u64
        );
    }

    #[test]
    fn reads_the_size_of_an_oversized_message_from_tonic_status() {
        let status = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 5242880 bytes, the limit is: 4194304 bytes",
        );
        assert_eq!(oversized_message_bytes(&status), Some(5_242_880));
        assert_eq!(
            oversized_message_bytes(&tonic::Status::out_of_range("something else")),
            None
        );
        assert_eq!(
            oversized_message_bytes(&tonic::Status::internal(
                "Error, decoded message length too large: found 9 bytes"
            )),
            None
        );
    }
}
