//! Neural-network layers, one file per layer, each stating its formula.
//!
//! Layers are plain structs holding `Var` parameters created through a
//! [`params::ParamBuilder`] (stable dotted names, seeded init), with a
//! `forward` taking a [`mode::Mode`] where behaviour differs between training
//! and inference. All work in any float dtype on any candle device; gradient
//! checks run in `f64` (see [`gradcheck`]).
//!
//! Hot layers have fused CPU kernels (candle `CustomOp`s with hand-written
//! backward, `f32`/`f64`): [`fused_attention`] (DIN activation unit over the
//! valid steps), [`fused_gru`] (masked GRU / AUGRU / AGRU recurrence with
//! BPTT), [`fused_aux`] (DIEN auxiliary net), [`fused_bag`] (masked
//! sum / mean pooling of gathered rows, an embedding bag) and [`fused_bias`]
//! (a bias added to every row, with a one-pass row sum for its gradient). Each layer keeps its composed
//! candle version (used on other devices and with `fused = false`), and the
//! tests check both against finite differences.

pub mod attention;
pub mod attention_gru;
pub mod aux;
pub mod bilinear;
pub mod dice;
pub mod embedding;
pub mod fused_attention;
pub mod fused_aux;
pub mod fused_bag;
pub mod fused_bias;
pub mod fused_gru;
pub mod fused_linear;
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
pub mod skinny_gemm;

#[cfg(test)]
mod tests;
