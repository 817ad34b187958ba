//! Configuration of the CTR models (serde; every field has the MODELS.md
//! default, so `kind = "dien"` alone is a complete config).

use serde::{Deserialize, Serialize};

use super::{ModelError, Result};
use crate::layer::attention::AttentionMode;
use crate::layer::attention_gru::EvolveKind;
use crate::layer::gru::GruInit;
use crate::layer::mlp::Activation;
use ember_data::batch::{CAT_TABLE, ITEM_TABLE, USER_TABLE};
use ember_data::schema::FeatureSchema;

/// Which CTR model to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Embedding + MLP on `[e_target, mean(history)]`.
    Base,
    /// Deep Interest Network.
    #[default]
    Din,
    /// Deep Interest Evolution Network.
    Dien,
}

/// How DIEN's interest-evolving attention scores an interest state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DienAttention {
    /// The DIN activation unit on `[q, h_t, q - h_t, q * h_t]` (reference code).
    #[default]
    Mlp,
    /// `h_t W e_target` (paper Eq. 8).
    Bilinear,
}

/// Everything needed to build a CTR model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Model kind: `"base"`, `"din"` (default), `"dien"`.
    pub kind: ModelKind,
    /// Item embedding width (18).
    pub item_dim: usize,
    /// Category embedding width (18). A behaviour is `[e_item; e_cat]`.
    pub cat_dim: usize,
    /// Add a user embedding to the MLP input (false).
    pub use_user: bool,
    /// User embedding width (18).
    pub user_dim: usize,
    /// The declared feature schema (a job's `[[features]]`); `None` = the
    /// fixed ids-only layout (`item_dim`, `cat_dim`, `use_user`, `user_dim`).
    /// With a schema the query/keys of the attention are its aligned
    /// ad/behaviour features and every other feature joins the MLP input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub features: Option<FeatureSchema>,
    /// Hidden sizes of the final MLP (`[200, 80]`; output 1).
    pub mlp_hidden: Vec<usize>,
    /// Hidden activation of the final MLP: `"prelu"` (default) or `"dice"`.
    pub activation: Activation,
    /// Hidden sizes of the attention FFN (`[80, 40]`; output 1).
    pub attention_hidden: Vec<usize>,
    /// Hidden activation of the attention FFN: `"sigmoid"` (default, the
    /// reference code; fused on CPU), `"prelu"` or `"dice"`.
    pub attention_activation: Activation,
    /// DIN attention weights: `"paper"` (default, no softmax) or `"code"`
    /// (masked softmax). DIEN always uses the masked softmax (MODELS.md).
    pub attention_mode: AttentionMode,
    /// DIEN GRU hidden size (36; must equal `item_dim + cat_dim`, since the
    /// attention compares the target behaviour with the states).
    pub dien_hidden: usize,
    /// DIEN interest evolving layer: `"augru"` (default), `"agru"`, `"aigru"`, `"gru"`,
    /// or `"attpool"` (no evolving GRU: attention-weighted sum of the states).
    pub evolve: EvolveKind,
    /// DIEN auxiliary loss on (true). Needs `neg_item_idx` in training batches.
    pub aux_loss: bool,
    /// DIEN attention scores: `"mlp"` (default, the DIN activation unit as
    /// in the reference code) or `"bilinear"` (`h_t W e_target`, paper Eq. 8);
    /// both are softmax-normalised over the valid steps.
    pub dien_attention: DienAttention,
    /// Weight of the auxiliary loss (1.0).
    pub aux_alpha: f64,
    /// Initialisation of DIEN's GRUs (extractor and evolving layer):
    /// `"uniform"` (default, PyTorch's) or `"tf1"` (the reference code's
    /// TF1 `GRUCell`: Glorot kernels, gate bias 1.0; see [`GruInit`]).
    pub gru_init: GruInit,
    /// Use the fused CPU kernels where available (true; off = composed candle ops).
    pub fused: bool,
    /// Dice: momentum of the running mean/variance,
    /// `r <- (1 - momentum) r + momentum * batch_stat` (0.1); in (0, 1].
    pub dice_momentum: f64,
    /// Dice: epsilon of `sqrt(Var[s] + eps)` (1e-8); > 0.
    pub dice_eps: f64,
    /// Seed of the dense-parameter initialisation (42).
    pub seed: u64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            kind: ModelKind::Din,
            item_dim: 18,
            cat_dim: 18,
            use_user: false,
            user_dim: 18,
            features: None,
            mlp_hidden: vec![200, 80],
            activation: Activation::Prelu,
            attention_hidden: vec![80, 40],
            attention_activation: Activation::Sigmoid,
            attention_mode: AttentionMode::Paper,
            dien_hidden: 36,
            evolve: EvolveKind::Augru,
            aux_loss: true,
            dien_attention: DienAttention::Mlp,
            aux_alpha: 1.0,
            gru_init: GruInit::Uniform,
            fused: true,
            dice_momentum: 0.1,
            dice_eps: 1e-8,
            seed: 42,
        }
    }
}

impl ModelConfig {
    /// Default config of `kind`.
    pub fn of(kind: ModelKind) -> Self {
        ModelConfig {
            kind,
            ..Default::default()
        }
    }

    /// Width of one behaviour step (= of the attention query): `[e_item;
    /// e_cat]`, or the schema's behaviour features concatenated.
    pub fn behaviour_dim(&self) -> usize {
        match &self.features {
            Some(s) => s.behaviour_dim(),
            None => self.item_dim + self.cat_dim,
        }
    }

    /// Width of the features outside the attention that join the MLP
    /// input: the user embedding when `use_user`, or the schema's user,
    /// context and unaligned ad features (embeddings, pooled multi-hot, dense).
    pub fn other_dim(&self) -> usize {
        match &self.features {
            Some(s) => s.other_dim(),
            None if self.use_user => self.user_dim,
            None => 0,
        }
    }

    /// The sparse tables and their widths, in pull order: the schema's
    /// tables, or item, cat (and user when `use_user`).
    pub fn tables(&self) -> Vec<(String, usize)> {
        if let Some(s) = &self.features {
            return s.tables();
        }
        let mut t = vec![
            (ITEM_TABLE.to_string(), self.item_dim),
            (CAT_TABLE.to_string(), self.cat_dim),
        ];
        if self.use_user {
            t.push((USER_TABLE.to_string(), self.user_dim));
        }
        t
    }

    /// Checks the fields; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, msg: &str| {
            Err(ModelError::Config {
                field,
                msg: msg.to_string(),
            })
        };
        if self.features.is_some() && self.use_user {
            return bad(
                "use_user",
                "with [[features]], declare a feature of group \"user\" (table \"user\") instead",
            );
        }
        if self.item_dim == 0 {
            return bad("item_dim", "must be > 0");
        }
        if self.cat_dim == 0 {
            return bad("cat_dim", "must be > 0");
        }
        if self.use_user && self.user_dim == 0 {
            return bad("user_dim", "must be > 0 when use_user");
        }
        if self.mlp_hidden.contains(&0) {
            return bad("mlp_hidden", "layer sizes must be > 0");
        }
        if self.attention_hidden.contains(&0) {
            return bad("attention_hidden", "layer sizes must be > 0");
        }
        if self.kind == ModelKind::Dien && self.dien_hidden != self.behaviour_dim() {
            return bad(
                "dien_hidden",
                &format!(
                    "must equal the behaviour width (item_dim + cat_dim, or the behaviour features' dims) = {}",
                    self.behaviour_dim()
                ),
            );
        }
        if !self.aux_alpha.is_finite() || self.aux_alpha < 0.0 {
            return bad("aux_alpha", "must be finite and >= 0");
        }
        if !(self.dice_momentum > 0.0 && self.dice_momentum <= 1.0) {
            return bad("dice_momentum", "must be in (0, 1]");
        }
        if !(self.dice_eps.is_finite() && self.dice_eps > 0.0) {
            return bad("dice_eps", "must be finite and > 0");
        }
        Ok(())
    }
}
