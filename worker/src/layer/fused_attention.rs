//! Fused CPU kernel for the DIN activation-unit scores (placeholder: not yet
//! fused; always falls back to the composed version).

use candle_core::{Result, Tensor};

use super::attention::ActivationUnit;

/// Whether the fused kernel can run on `k`'s device and dtype.
pub fn supported(_k: &Tensor) -> bool {
    false
}

/// Fused scores (see [`ActivationUnit::scores_reference`]).
pub fn scores(unit: &ActivationUnit, q: &Tensor, k: &Tensor, _lens: &[usize]) -> Result<Tensor> {
    unit.scores_reference(q, k, super::mode::Mode::TRAIN_FROZEN)
}
