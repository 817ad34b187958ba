//! Transport settings both ends of a parameter-server connection agree on:
//! message limits, HTTP/2 flow-control windows and frame size.
//!
//! h2's defaults (64 KiB windows, 16 KiB frames) make a 0.5 MiB pull reply
//! wait for several WINDOW_UPDATE round trips, so the shards' server and every
//! client of it ([`tune_endpoint`]) raise them to the values here.

use tonic::transport::Endpoint;

/// Default gRPC message limit of the shards and their clients (both
/// directions): 64 MiB.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// HTTP/2 per-stream flow-control window of the shard server and its clients.
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;

/// HTTP/2 per-connection flow-control window of the shard server and its
/// clients.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;

/// Largest HTTP/2 DATA frame the shard server and its clients accept.
pub const MAX_FRAME_BYTES: u32 = 1 << 20;

/// Applies the shard transport settings to a client endpoint: TCP_NODELAY,
/// the windows and the frame size above. Raise the generated client's
/// message limits to [`MAX_MESSAGE_BYTES`] (or the server's configured
/// limit) separately.
pub fn tune_endpoint(ep: Endpoint) -> Endpoint {
    ep.tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
}
