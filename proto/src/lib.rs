//! Ember's wire contract: the generated `ember.v1` gRPC types and services,
//! the packed-bytes codecs used by every message, and the routing function
//! that maps `(table, id)` to a shard. Both the shards and the workers depend
//! on this crate, so everything they must agree on lives here, and so do the
//! mechanisms every crate shares, each written once: retry with backoff
//! ([`retry`]), SplitMix64 ([`rng`]), the HTTP/2 transport settings
//! ([`transport`]), the bearer token ([`security`]), atomic file writes
//! ([`atomic`]) and the table-setting rules ([`table`]).

pub mod atomic;
#[cfg(feature = "grpc")]
pub mod codec;
pub mod optim;
#[cfg(feature = "pki")]
pub mod pki;
#[cfg(feature = "grpc")]
pub mod retry;
pub mod rng;
pub mod route;
#[cfg(feature = "grpc")]
pub mod security;
#[cfg(feature = "grpc")]
pub mod table;
#[cfg(feature = "grpc")]
pub mod transport;

/// Generated protobuf messages and tonic client/server for `ember.v1`.
#[cfg(feature = "grpc")]
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("ember.v1");
}

#[cfg(feature = "grpc")]
pub use codec::CodecError;
pub use route::{Router, NUM_BUCKETS};
