//! Forward-pass mode shared by all layers.

/// Whether a forward pass trains (batch statistics) and whether it may update
/// non-trained state (Dice running averages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Training: Dice uses mini-batch statistics.
    pub train: bool,
    /// Update running statistics (only meaningful when `train`).
    pub update_state: bool,
}

impl Mode {
    /// Training step: batch statistics, running averages updated.
    pub const TRAIN: Mode = Mode {
        train: true,
        update_state: true,
    };
    /// Training statistics without touching state (gradient checks).
    pub const TRAIN_FROZEN: Mode = Mode {
        train: true,
        update_state: false,
    };
    /// Inference: running statistics.
    pub const EVAL: Mode = Mode {
        train: false,
        update_state: false,
    };
}
