//! A worker's telemetry secret as an opaque resource.
//!
//! `Snakepit.Telemetry.Secret` holds only this resource: the term is a
//! reference, so `inspect`, `:sys.get_state/1`, crash reports and ETS dumps
//! of the processes that keep it (GrpcStream, the registrations table) show
//! no secret. `stream_open` takes the resource and reads the bytes here.

use rustler::{Atom, Binary, Env, NewBinary, ResourceArc};
use snakepit_telemetry_core::auth::Secret;

use crate::atoms;

pub struct SecretHandle(pub Secret);

#[rustler::resource_impl]
impl rustler::Resource for SecretHandle {}

/// Wraps a secret (22 to 256 visible ASCII characters);
/// `{:error, {:invalid_secret, why}}` otherwise (the message never holds it).
#[rustler::nif]
fn secret_new(bytes: Binary) -> Result<ResourceArc<SecretHandle>, (Atom, String)> {
    Secret::new(bytes.as_slice())
        .map(|secret| ResourceArc::new(SecretHandle(secret)))
        .map_err(|e| (atoms::invalid_secret(), e.to_string()))
}

/// The secret's bytes, to hand them to the worker at spawn.
#[rustler::nif]
fn secret_expose<'a>(env: Env<'a>, handle: ResourceArc<SecretHandle>) -> Binary<'a> {
    let bytes = handle.0.expose();
    let mut out = NewBinary::new(env, bytes.len());
    out.as_mut_slice().copy_from_slice(bytes);
    out.into()
}
