//! The generic CTR-model shell: row validation, embedding gathering, loss,
//! backward and gradient collection, shared by BaseModel, DIN and DIEN.
//!
//! A model body implements [`Network`] (build its layers, map [`Inputs`] to
//! logits and an optional auxiliary loss); [`CtrNet`] wraps it into a
//! [`CtrModel`]. The objective is
//! `L = mean_b bce(logit_b, y_b) + aux_alpha * L_aux` with the stable
//! `bce(x, y) = relu(x) - x*y + log(1 + exp(-|x|))`.

use candle_core::{DType, Device, Tensor};

use super::config::ModelConfig;
use super::{CtrModel, ModelError, Result, SparseRows, StepOutput};
use crate::layer::attention::ActivationUnit;
use crate::layer::embedding::EmbeddingBlock;
use crate::layer::loss::mean_bce_with_logits;
use crate::layer::mlp::Mlp;
use crate::layer::mode::Mode;
use crate::layer::params::{to_f32_vec, ParamBuilder, ParamSet};
use ember_data::batch::{Batch, CAT_TABLE, ITEM_TABLE, USER_TABLE};

/// The tensors of one batch a model body consumes.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The batch (indices, lengths).
    pub batch: &'a Batch,
    /// Item rows.
    pub item: EmbeddingBlock,
    /// Category rows.
    pub cat: EmbeddingBlock,
    /// User rows (when the model uses them).
    pub user: Option<EmbeddingBlock>,
    /// History mask `[B, T]`.
    pub mask: Tensor,
    /// Labels `[B]`.
    pub labels: Tensor,
}

impl<'a> Inputs<'a> {
    /// Assembles inputs from row blocks (already shape-checked).
    pub fn from_blocks(
        batch: &'a Batch,
        item: EmbeddingBlock,
        cat: EmbeddingBlock,
        user: Option<EmbeddingBlock>,
    ) -> candle_core::Result<Self> {
        let dev = item.padded.device().clone();
        let dtype = item.padded.dtype();
        let (b, t) = (batch.batch_size, batch.max_len);
        let mask = Tensor::from_slice(&batch.mask, (b, t), &dev)?.to_dtype(dtype)?;
        let labels = Tensor::from_slice(&batch.labels, b, &dev)?.to_dtype(dtype)?;
        Ok(Inputs {
            batch,
            item,
            cat,
            user,
            mask,
            labels,
        })
    }

    /// Target behaviour `[e_item; e_cat]`: `[B, E]`.
    pub fn target(&self) -> candle_core::Result<Tensor> {
        Tensor::cat(
            &[
                &self.item.lookup(&self.batch.item_idx)?,
                &self.cat.lookup(&self.batch.cat_idx)?,
            ],
            1,
        )
    }

    fn behaviours(&self, items: &[u32], cats: &[u32]) -> candle_core::Result<Tensor> {
        let (b, t) = (self.batch.batch_size, self.batch.max_len);
        let e = Tensor::cat(&[&self.item.lookup(items)?, &self.cat.lookup(cats)?], 1)?;
        e.reshape((b, t, self.item.dim + self.cat.dim))
    }

    /// History behaviours `[B, T, E]` (padded steps are zero rows).
    pub fn history(&self) -> candle_core::Result<Tensor> {
        self.behaviours(&self.batch.hist_item_idx, &self.batch.hist_cat_idx)
    }

    /// Masked pooling of the history behaviours, `[B, E]`: the sum
    /// `sum_t m_t e_t` or (with `mean`) the mean over the valid steps, as
    /// `pooling::masked_sum` / `masked_mean` of [`Inputs::history`]. With
    /// `fused` on a CPU float tensor it runs the embedding bag of
    /// `fused_bag` on the pulled rows (no padded intermediate).
    pub fn history_pool(&self, mean: bool, fused: bool) -> candle_core::Result<Tensor> {
        use crate::layer::fused_bag::EmbeddingBag;
        use crate::layer::pooling::{masked_mean, masked_sum};
        if !(fused && crate::layer::kernels::cpu_real(&self.item.padded)) {
            let h = self.history()?;
            return if mean {
                masked_mean(&h, &self.mask)
            } else {
                masked_sum(&h, &self.mask)
            };
        }
        let bag = |idx: &[u32], rows: &Tensor| {
            EmbeddingBag {
                idx: idx.to_vec(),
                lens: self.batch.lens.clone(),
                t: self.batch.max_len,
                mean,
            }
            .apply(rows)
        };
        Tensor::cat(
            &[
                &bag(&self.batch.hist_item_idx, self.item.rows.as_tensor())?,
                &bag(&self.batch.hist_cat_idx, self.cat.rows.as_tensor())?,
            ],
            1,
        )
    }

    /// DIEN negative behaviours `[B, T, E]`, when the batch has them.
    pub fn negatives(&self) -> candle_core::Result<Option<Tensor>> {
        match (&self.batch.neg_item_idx, &self.batch.neg_cat_idx) {
            (Some(i), Some(c)) => Ok(Some(self.behaviours(i, c)?)),
            _ => Ok(None),
        }
    }

    /// User embeddings `[B, Du]` when used.
    pub fn user(&self) -> candle_core::Result<Option<Tensor>> {
        match &self.user {
            Some(u) => Ok(Some(u.lookup(&self.batch.user_idx)?)),
            None => Ok(None),
        }
    }
}

/// What a model body computes.
#[derive(Debug, Clone)]
pub struct NetOutput {
    /// Click logits `[B]`.
    pub logits: Tensor,
    /// Auxiliary loss (scalar), when the model has one and it was computed.
    pub aux_loss: Option<Tensor>,
}

/// The final MLP of every CTR model under `mlp`: `inp -> cfg.mlp_hidden -> 1`
/// with `cfg.activation` (Dice with `cfg.dice_momentum` and `cfg.dice_eps`).
pub fn head_mlp(cfg: &ModelConfig, inp: usize, pb: &ParamBuilder) -> candle_core::Result<Mlp> {
    let mut mlp = Mlp::new(inp, &cfg.mlp_hidden, 1, cfg.activation, &pb.pp("mlp"))?;
    mlp.set_dice(cfg.dice_momentum, cfg.dice_eps);
    Ok(mlp)
}

/// The activation unit (DIN and DIEN attention) under `att` over vectors of
/// width `width`: FFN `cfg.attention_hidden` with `cfg.attention_activation`
/// (Dice settings as in [`head_mlp`]), fused kernels per `cfg.fused`.
pub fn attention_unit(
    cfg: &ModelConfig,
    width: usize,
    pb: &ParamBuilder,
) -> candle_core::Result<ActivationUnit> {
    let mut att = ActivationUnit::new(
        width,
        &cfg.attention_hidden,
        cfg.attention_activation,
        &pb.pp("att"),
    )?;
    att.fused = cfg.fused;
    att.ffn.set_dice(cfg.dice_momentum, cfg.dice_eps);
    Ok(att)
}

/// A CTR model body.
pub trait Network: Sized + Send {
    /// Builds the layers under `pb` (dotted names).
    fn build(cfg: &ModelConfig, pb: &ParamBuilder) -> candle_core::Result<Self>;
    /// Logits (and auxiliary loss) of a batch.
    fn forward(&self, inp: &Inputs, mode: Mode) -> candle_core::Result<NetOutput>;
    /// Whether training batches must carry DIEN negatives.
    fn needs_negatives(_cfg: &ModelConfig) -> bool {
        false
    }
}

/// The objective of one forward pass.
#[derive(Debug, Clone)]
pub struct Objective {
    /// `bce + aux_alpha * aux` (scalar).
    pub total: Tensor,
    /// Mean BCE (scalar).
    pub bce: Tensor,
    /// Auxiliary loss (scalar).
    pub aux: Option<Tensor>,
    /// Logits `[B]`.
    pub logits: Tensor,
}

/// A [`Network`] with its parameters, implementing [`CtrModel`].
#[derive(Debug)]
pub struct CtrNet<N> {
    cfg: ModelConfig,
    /// The model body.
    pub net: N,
    set: ParamSet,
    dtype: DType,
    device: Device,
}

impl<N: Network> CtrNet<N> {
    /// Builds the body in `dtype` on `device`, seeded by `cfg.seed`.
    pub fn new(cfg: &ModelConfig, device: &Device, dtype: DType) -> Result<Self> {
        cfg.validate()?;
        let pb = ParamBuilder::new(dtype, device, cfg.seed);
        let net = N::build(cfg, &pb)?;
        Ok(CtrNet {
            cfg: cfg.clone(),
            net,
            set: pb.finish(),
            dtype,
            device: device.clone(),
        })
    }

    /// Named parameters and state (shared `Var`s).
    pub fn param_set(&self) -> &ParamSet {
        &self.set
    }

    /// Checks and converts the pulled rows of `batch` into [`Inputs`].
    pub fn inputs<'a>(
        &self,
        batch: &'a Batch,
        rows: &SparseRows,
        train: bool,
    ) -> Result<Inputs<'a>> {
        validate_batch(batch, train && N::needs_negatives(&self.cfg))?;
        let block = |table: &str, unique: usize, dim: usize| -> Result<EmbeddingBlock> {
            let r = rows
                .get(table)
                .ok_or_else(|| ModelError::MissingTable(table.to_string()))?;
            if r.len() != unique * dim {
                return Err(ModelError::RowShape {
                    table: table.to_string(),
                    unique,
                    dim,
                    expected: unique * dim,
                    actual: r.len(),
                });
            }
            Ok(EmbeddingBlock::from_rows(
                r,
                unique,
                dim,
                self.dtype,
                &self.device,
            )?)
        };
        let item = block(ITEM_TABLE, batch.items.unique.len(), self.cfg.item_dim)?;
        let cat = block(CAT_TABLE, batch.cats.unique.len(), self.cfg.cat_dim)?;
        let user = if self.cfg.use_user {
            Some(block(
                USER_TABLE,
                batch.users.unique.len(),
                self.cfg.user_dim,
            )?)
        } else {
            None
        };
        Ok(Inputs::from_blocks(batch, item, cat, user)?)
    }

    /// Loss terms and logits of `inp` in `mode`.
    pub fn objective(&self, inp: &Inputs, mode: Mode) -> candle_core::Result<Objective> {
        let out = self.net.forward(inp, mode)?;
        let bce = mean_bce_with_logits(&out.logits, &inp.labels)?;
        let total = match &out.aux_loss {
            Some(a) => (&bce + (a * self.cfg.aux_alpha)?)?,
            None => bce.clone(),
        };
        Ok(Objective {
            total,
            bce,
            aux: out.aux_loss,
            logits: out.logits,
        })
    }
}

fn scalar_f32(t: &Tensor) -> candle_core::Result<f32> {
    t.to_dtype(DType::F32)?.to_scalar::<f32>()
}

impl<N: Network> CtrModel for CtrNet<N> {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn sparse_tables(&self) -> Vec<(&'static str, usize)> {
        let mut t = vec![
            (ITEM_TABLE, self.cfg.item_dim),
            (CAT_TABLE, self.cfg.cat_dim),
        ];
        if self.cfg.use_user {
            t.push((USER_TABLE, self.cfg.user_dim));
        }
        t
    }

    fn step(&mut self, batch: &Batch, rows: &SparseRows, train: bool) -> Result<StepOutput> {
        let inp = self.inputs(batch, rows, train)?;
        let mode = if train { Mode::TRAIN } else { Mode::EVAL };
        let obj = self.objective(&inp, mode)?;
        let probs = to_f32_vec(&candle_nn::ops::sigmoid(&obj.logits)?)?;
        let mut out = StepOutput {
            loss: scalar_f32(&obj.bce)?,
            aux_loss: obj.aux.as_ref().map(scalar_f32).transpose()?,
            probs,
            ..Default::default()
        };
        if train {
            let grads = obj.total.backward()?;
            out.sparse_grads
                .insert(ITEM_TABLE.to_string(), inp.item.grad(&grads)?);
            out.sparse_grads
                .insert(CAT_TABLE.to_string(), inp.cat.grad(&grads)?);
            if let Some(u) = &inp.user {
                out.sparse_grads
                    .insert(USER_TABLE.to_string(), u.grad(&grads)?);
            }
            for (name, var) in &self.set.params {
                let g = match grads.get(var.as_tensor()) {
                    Some(g) => to_f32_vec(g)?,
                    None => vec![0.0; var.as_tensor().elem_count()],
                };
                out.dense_grads.push((name.clone(), g));
            }
        }
        Ok(out)
    }

    fn dense_params(&self) -> Vec<(String, Vec<f32>)> {
        named_values(&self.set.params)
    }

    fn dense_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.set
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().dims().to_vec()))
            .collect()
    }

    fn set_dense(&mut self, name: &str, values: &[f32]) -> Result<()> {
        set_named(&self.set.params, name, values)
    }

    fn dense_state(&self) -> Vec<(String, Vec<f32>)> {
        named_values(&self.set.state)
    }

    fn set_state(&mut self, name: &str, values: &[f32]) -> Result<()> {
        set_named(&self.set.state, name, values)
    }
}

fn named_values(list: &[(String, candle_core::Var)]) -> Vec<(String, Vec<f32>)> {
    list.iter()
        .map(|(n, v)| {
            // Parameters are contiguous CPU/GPU tensors of a float dtype:
            // conversion cannot fail short of a device failure.
            (
                n.clone(),
                to_f32_vec(v.as_tensor()).expect("reading a dense parameter"),
            )
        })
        .collect()
}

fn set_named(list: &[(String, candle_core::Var)], name: &str, values: &[f32]) -> Result<()> {
    let (_, var) = list
        .iter()
        .find(|(n, _)| n == name)
        .ok_or_else(|| ModelError::UnknownParam(name.to_string()))?;
    let t = var.as_tensor();
    if t.elem_count() != values.len() {
        return Err(ModelError::ParamShape {
            name: name.to_string(),
            expected: t.elem_count(),
            actual: values.len(),
        });
    }
    let new = Tensor::from_slice(values, t.shape(), t.device())?.to_dtype(t.dtype())?;
    var.set(&new)?;
    Ok(())
}

/// Checks the array lengths and index ranges of `batch`.
pub fn validate_batch(batch: &Batch, needs_negatives: bool) -> Result<()> {
    let (b, t) = (batch.batch_size, batch.max_len);
    let bad = |m: String| Err(ModelError::Batch(m));
    if b == 0 || t == 0 {
        return bad(format!("empty batch (B = {b}, T = {t})"));
    }
    for (name, len, want) in [
        ("labels", batch.labels.len(), b),
        ("lens", batch.lens.len(), b),
        ("item_idx", batch.item_idx.len(), b),
        ("cat_idx", batch.cat_idx.len(), b),
        ("user_idx", batch.user_idx.len(), b),
        ("mask", batch.mask.len(), b * t),
        ("hist_item_idx", batch.hist_item_idx.len(), b * t),
        ("hist_cat_idx", batch.hist_cat_idx.len(), b * t),
    ] {
        if len != want {
            return bad(format!("`{name}` has {len} entries, expected {want}"));
        }
    }
    if batch.lens.iter().any(|&l| l > t) {
        return bad(format!("a history length exceeds max_len {t}"));
    }
    let check = |name: &str, idx: &[u32], pad: u32| {
        if let Some(&i) = idx.iter().find(|&&i| i > pad) {
            return Err(ModelError::Batch(format!(
                "`{name}` index {i} > pad index {pad}"
            )));
        }
        Ok(())
    };
    let (pi, pc, pu) = (
        batch.items.pad_index(),
        batch.cats.pad_index(),
        batch.users.pad_index(),
    );
    check("item_idx", &batch.item_idx, pi)?;
    check("hist_item_idx", &batch.hist_item_idx, pi)?;
    check("cat_idx", &batch.cat_idx, pc)?;
    check("hist_cat_idx", &batch.hist_cat_idx, pc)?;
    check("user_idx", &batch.user_idx, pu)?;
    match (&batch.neg_item_idx, &batch.neg_cat_idx) {
        (Some(i), Some(c)) => {
            if i.len() != b * t || c.len() != b * t {
                return bad("negative index arrays must have B*T entries".into());
            }
            check("neg_item_idx", i, pi)?;
            check("neg_cat_idx", c, pc)?;
        }
        _ if needs_negatives => {
            return bad(
                "DIEN with aux loss needs sampled negatives (neg_item_idx) in training batches"
                    .into(),
            )
        }
        _ => {}
    }
    Ok(())
}
