//! `ember-worker`: the training worker. Its own code is the training loop
//! against the parameter server ([`train`]: config, shard clients, the task
//! loop, one segment's steps, evaluation, cluster setup) and the `worker`,
//! `ember-data` and `model-bench` binaries. The data path and the models are
//! crates of their own, re-exported here under their old paths:
//!
//! - [`data`] and [`batch`]: the `ember-data` crate (formats, preparation,
//!   reader, counts, synthetic data; no model, no network);
//! - [`model`], [`layer`] and [`metrics`]: the `ember-model` crate (candle
//!   layers and models, metrics; no network, no parameter server).

pub use ember_data as data;
pub use ember_data::batch;
pub use ember_model as model;
pub use ember_model::{layer, metrics};

pub mod train;
