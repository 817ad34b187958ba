//! Ember worker library: the data path ([`data`]), the batch contract
//! ([`batch`]), layers and models in candle ([`layer`], [`model`]), metrics
//! ([`metrics`]) and the training loop against the parameter server ([`train`]).

pub mod batch;
pub mod data;
pub mod layer;
pub mod metrics;
pub mod model;
pub mod train;
