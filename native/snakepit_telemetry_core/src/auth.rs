//! The per-worker secret that authenticates every telemetry call.
//!
//! Elixir makes a random secret for each worker and hands it to the worker at
//! spawn (its environment); the stream sends it as the gRPC metadata entry
//! [`SECRET_HEADER`] on every telemetry call it makes (`StreamTelemetryBatches`,
//! the `StreamTelemetry` fallback, every reconnect). A worker that knows its
//! secret refuses calls without it (`UNAUTHENTICATED`) before they can take
//! its stream over.
//!
//! [`Secret`] never shows its value: its `Debug` is redacted and the metadata
//! value is marked sensitive (hpack never indexes it).

use std::fmt;

use tonic::metadata::AsciiMetadataValue;

/// The gRPC metadata key that carries the secret.
pub const SECRET_HEADER: &str = "x-snakepit-telemetry-secret";

/// Shortest accepted secret, in bytes (a base64url secret of 16 random
/// bytes is 22 characters; Elixir's are 32 random bytes, 43 characters).
pub const MIN_SECRET_BYTES: usize = 22;
/// Longest accepted secret, in bytes.
pub const MAX_SECRET_BYTES: usize = 256;

/// A worker's secret, ready to be sent as metadata. Its `Debug` is redacted.
#[derive(Clone)]
pub struct Secret(AsciiMetadataValue);

/// Why bytes are not a usable secret (the message never holds them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretError(pub &'static str);

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for SecretError {}

impl Secret {
    /// A secret of [`MIN_SECRET_BYTES`]..=[`MAX_SECRET_BYTES`] visible ASCII
    /// characters (no spaces), e.g. base64url.
    pub fn new(bytes: &[u8]) -> Result<Secret, SecretError> {
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(SecretError("secret too short (at least 22 characters)"));
        }
        if bytes.len() > MAX_SECRET_BYTES {
            return Err(SecretError("secret too long (at most 256 characters)"));
        }
        if !bytes.iter().all(|b| b.is_ascii_graphic()) {
            return Err(SecretError(
                "secret must be visible ASCII characters (e.g. base64url)",
            ));
        }
        let mut value = AsciiMetadataValue::try_from(bytes)
            .map_err(|_| SecretError("secret is not a valid metadata value"))?;
        value.set_sensitive(true);
        Ok(Secret(value))
    }

    /// The value to put in a request's metadata.
    pub fn metadata_value(&self) -> AsciiMetadataValue {
        self.0.clone()
    }

    /// The secret's bytes (to hand it to the worker at spawn).
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Adds the secret to a request's metadata.
    pub fn apply<T>(&self, request: &mut tonic::Request<T>) {
        request
            .metadata_mut()
            .insert(SECRET_HEADER, self.metadata_value());
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"Zm9vYmFyYmF6cXV4cXV1eF9hYmNkZWZnaGlqa2xtbm8";

    #[test]
    fn accepts_base64url_and_refuses_the_rest() {
        assert!(Secret::new(GOOD).is_ok());
        assert!(Secret::new(b"short").is_err());
        assert!(Secret::new(&[b'a'; MAX_SECRET_BYTES + 1]).is_err());
        assert!(Secret::new(&[b'a'; MAX_SECRET_BYTES]).is_ok());
        assert!(Secret::new(b"with a space in the middle of it").is_err());
        assert!(Secret::new(b"with\nnewline-in-the-middle-of-it").is_err());
        assert!(Secret::new("ünïcode-is-not-ascii-at-all-xx".as_bytes()).is_err());
    }

    #[test]
    fn debug_and_errors_never_show_the_value() {
        let secret = Secret::new(GOOD).unwrap();
        let shown = format!("{secret:?} {:?}", Some(secret.clone()));
        assert!(!shown.contains("Zm9v"), "{shown}");
        assert!(shown.contains("redacted"));
        let err = Secret::new(b"with a space in the middle of it").unwrap_err();
        assert!(!err.to_string().contains("space in"));
    }

    #[test]
    fn goes_into_the_request_metadata_as_sensitive() {
        let secret = Secret::new(GOOD).unwrap();
        let mut request = tonic::Request::new(());
        secret.apply(&mut request);
        let value = request.metadata().get(SECRET_HEADER).unwrap();
        assert_eq!(value.as_bytes(), GOOD);
        assert!(value.is_sensitive());
        assert_eq!(secret.expose(), GOOD);
    }
}
