//! Ember parameter-server shard: a compact embedding store, sparse and dense
//! optimizers with MBA regularization, the `ember.v1` gRPC service,
//! checkpoints and metrics.
//!
//! The data path inside a shard:
//! `service` (gRPC, validation of wire bytes) -> [`Shard`] (plain Rust API,
//! validation, routing check) -> [`store::Table`] (striped arena rows) ->
//! [`optim::Optimizer`] (updates over `&mut [f32]`).

pub mod error;
pub mod index;
pub mod init;
pub mod optim;
pub mod row;
pub mod sizing;
pub mod store;

pub use error::{PsError, Result};
pub mod checkpoint;
pub mod ckpt_chain;
pub mod dedup;
pub mod dense;
pub mod metrics;
pub mod shard;

pub use dense::DenseTensor;
pub use shard::{Shard, ShardConfig};
pub use store::{PushOutcome, TableStats};
pub mod server;
pub mod service;

pub mod bench;

pub use server::{
    client_endpoint, serve, serve_shard, spawn, RunningShard, ServerConfig, ShutdownHandle,
};
pub mod load;
