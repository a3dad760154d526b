//! Protobuf wire-format writing, byte for byte what prost (and the Python
//! encoder in `_internal/wire.py`) produce for `proto/snakepit_bridge.proto`.

/// Field tags: (field number << 3) | wire type.
pub const TAG_BATCH_EVENT: u8 = 0x0a; // TelemetryEventBatch.events
pub const TAG_BATCH_BASE: u8 = 0x10; // TelemetryEventBatch.base_timestamp_ns, varint
pub const TAG_PART: u8 = 0x0a; // TelemetryEvent.event_parts
pub const TAG_MEASUREMENT: u8 = 0x12; // TelemetryEvent.measurements (map entry)
pub const TAG_METADATA: u8 = 0x1a; // TelemetryEvent.metadata (map entry)
pub const TAG_TIMESTAMP: u8 = 0x20; // TelemetryEvent.timestamp_ns, varint
pub const TAG_CORRELATION: u8 = 0x2a; // TelemetryEvent.correlation_id
pub const TAG_SPAN_ID: u8 = 0x31; // TelemetryEvent.span_id, fixed64
pub const TAG_FRAME: u8 = 0x3a; // TelemetryEvent.stacktrace
pub const TAG_FRAME_FILE: u8 = 0x0a;
pub const TAG_FRAME_LINE: u8 = 0x10;
pub const TAG_FRAME_FUNCTION: u8 = 0x1a;
pub const TAG_KEY: u8 = 0x0a; // map entry key
pub const TAG_VALUE: u8 = 0x12; // map entry value
pub const TAG_INT: u8 = 0x08; // TelemetryValue.int_value
pub const TAG_FLOAT: u8 = 0x11; // TelemetryValue.float_value, fixed64
pub const TAG_STRING: u8 = 0x1a; // TelemetryValue.string_value

/// Bytes of `value` as a base-128 varint.
#[inline]
pub fn varint_len(value: u64) -> usize {
    // ceil(bits / 7), at least 1
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A length-delimited string or bytes field.
#[inline]
pub fn put_bytes_field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Size of a length-delimited field with a payload of `len` bytes.
#[inline]
pub fn delimited_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_prost() {
        for value in [
            0u64,
            1,
            127,
            128,
            16383,
            16384,
            1 << 28,
            u64::MAX,
            (-1i64) as u64,
        ] {
            let mut ours = Vec::new();
            put_varint(&mut ours, value);
            let mut theirs = Vec::new();
            prost::encoding::encode_varint(value, &mut theirs);
            assert_eq!(ours, theirs, "{value}");
            assert_eq!(varint_len(value), theirs.len(), "{value}");
        }
    }
}
