//! Neural-network layers, one file per layer, each stating its formula.
//!
//! Layers are plain structs holding `Var` parameters created through a
//! [`params::ParamBuilder`] (stable dotted names, seeded init), with a
//! `forward` taking a [`mode::Mode`] where behaviour differs between training
//! and inference. All work in any float dtype on any candle device; gradient
//! checks run in `f64` (see [`gradcheck`]).

pub mod attention;
pub mod attention_gru;
pub mod aux;
pub mod dice;
pub mod embedding;
pub mod fused_attention;
pub mod fused_aux;
pub mod fused_gru;
pub mod gradcheck;
pub mod gru;
pub mod kernels;
pub mod linear;
pub mod loss;
pub mod mlp;
pub mod mode;
pub mod params;
pub mod pooling;
pub mod prelu;

#[cfg(test)]
mod tests;
