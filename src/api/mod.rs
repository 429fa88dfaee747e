//! The gRPC edge: authentication, validation, limits and the conversion
//! between protobuf and domain types. Nothing past this module sees
//! protobuf, and nothing that leaves it (a status message, a log line)
//! carries what the client sent.

pub mod auth;
pub mod codec;
pub mod convert;
pub mod schedule;
pub mod service;

/// The generated `crisis.v1` types and service.
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("crisis.v1");

    /// For the reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("crisis_descriptor");
}
