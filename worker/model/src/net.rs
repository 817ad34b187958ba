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
use ember_data::batch::Batch;
use ember_data::schema::{FeatureSchema, Pooling};

/// One feature's positions in a batch: which row block it reads and its
/// index array (`width` ids per position; pad index = the block's `U`).
#[derive(Debug, Clone, Copy)]
pub struct FieldRef<'a> {
    /// Index into [`Inputs::blocks`].
    pub block: usize,
    /// Indices into the block, `width` per position.
    pub idx: &'a [u32],
    /// Ids per position (1: one-hot; more: multi-hot, pooled).
    pub width: usize,
    /// Multi-hot pooling: mean over the non-padding ids (else sum).
    pub mean: bool,
}

/// A behaviour feature with the ad feature it is aligned with in the
/// attention (and its DIEN negatives).
#[derive(Debug, Clone, Copy)]
pub struct AlignedField<'a> {
    /// The candidate's feature: one position per sample.
    pub ad: FieldRef<'a>,
    /// The behaviour feature: `T` positions per sample.
    pub hist: FieldRef<'a>,
    /// DIEN's negative behaviours, when the batch has them.
    pub neg: Option<FieldRef<'a>>,
}

/// A feature outside the attention that joins the MLP input.
#[derive(Debug, Clone, Copy)]
pub enum OtherField<'a> {
    /// An embedded (pooled, when multi-hot) feature, one position per sample.
    Emb(FieldRef<'a>),
    /// Column `col` of the batch's dense values `[B, n]`.
    Dense {
        /// Column.
        col: usize,
        /// Number of dense columns n.
        n: usize,
    },
}

/// The tensors of one batch a model body consumes: the pulled row blocks and
/// how the batch's features read them. The fixed ids-only layout is the
/// special case blocks `[item, cat(, user)]`, aligned pairs `(item,
/// hist_item)`, `(cat, hist_cat)` and the user as the one other feature.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The batch (indices, lengths).
    pub batch: &'a Batch,
    /// Pulled rows per table, in [`ModelConfig::tables`] order.
    pub blocks: Vec<EmbeddingBlock>,
    /// Aligned ad/behaviour features, in schema order.
    pub aligned: Vec<AlignedField<'a>>,
    /// Features outside the attention, in schema order.
    pub others: Vec<OtherField<'a>>,
    /// History mask `[B, T]`.
    pub mask: Tensor,
    /// Labels `[B]`.
    pub labels: Tensor,
}

impl<'a> Inputs<'a> {
    /// Assembles the fixed ids-only layout from row blocks (already
    /// shape-checked).
    pub fn from_blocks(
        batch: &'a Batch,
        item: EmbeddingBlock,
        cat: EmbeddingBlock,
        user: Option<EmbeddingBlock>,
    ) -> candle_core::Result<Self> {
        let one = |block: usize, idx: &'a [u32]| FieldRef {
            block,
            idx,
            width: 1,
            mean: false,
        };
        let aligned = vec![
            AlignedField {
                ad: one(0, &batch.item_idx),
                hist: one(0, &batch.hist_item_idx),
                neg: batch.neg_item_idx.as_deref().map(|i| one(0, i)),
            },
            AlignedField {
                ad: one(1, &batch.cat_idx),
                hist: one(1, &batch.hist_cat_idx),
                neg: batch.neg_cat_idx.as_deref().map(|i| one(1, i)),
            },
        ];
        let mut blocks = vec![item, cat];
        let mut others = Vec::new();
        if let Some(u) = user {
            blocks.push(u);
            others.push(OtherField::Emb(one(2, &batch.user_idx)));
        }
        Self::assemble(batch, blocks, aligned, others)
    }

    /// Assembles a schema batch's inputs: `blocks` in `schema.tables()`
    /// order, features per the schema (the batch was checked against it).
    pub fn from_schema(
        batch: &'a Batch,
        schema: &FeatureSchema,
        blocks: Vec<EmbeddingBlock>,
    ) -> candle_core::Result<Self> {
        let sparse = schema.sparse();
        let dense = schema.dense();
        let field = |i: usize| -> candle_core::Result<FieldRef<'a>> {
            let slot = sparse
                .iter()
                .position(|&j| j == i)
                .ok_or_else(|| candle_core::Error::Msg(format!("feature {i} is not sparse")))?;
            let f = batch.features.get(slot).ok_or_else(|| {
                candle_core::Error::Msg(format!("batch lacks feature slot {slot}"))
            })?;
            Ok(FieldRef {
                block: f.table,
                idx: &f.idx,
                width: f.width,
                mean: schema.features()[i].pooling == Pooling::Mean,
            })
        };
        let mut aligned = Vec::new();
        for p in schema.pairs() {
            let hist = field(p.behaviour)?;
            let slot = sparse.iter().position(|&j| j == p.behaviour).unwrap_or(0);
            let neg = batch.features[slot]
                .neg
                .as_deref()
                .map(|idx| FieldRef { idx, ..hist });
            aligned.push(AlignedField {
                ad: field(p.ad)?,
                hist,
                neg,
            });
        }
        let mut others = Vec::new();
        for i in schema.others() {
            if schema.features()[i].is_sparse() {
                others.push(OtherField::Emb(field(i)?));
            } else {
                let col = dense.iter().position(|&j| j == i).unwrap_or(0);
                others.push(OtherField::Dense {
                    col,
                    n: dense.len(),
                });
            }
        }
        Self::assemble(batch, blocks, aligned, others)
    }

    fn assemble(
        batch: &'a Batch,
        blocks: Vec<EmbeddingBlock>,
        aligned: Vec<AlignedField<'a>>,
        others: Vec<OtherField<'a>>,
    ) -> candle_core::Result<Self> {
        let first = blocks
            .first()
            .ok_or_else(|| candle_core::Error::Msg("no embedding table".into()))?;
        let dev = first.padded.device().clone();
        let dtype = first.padded.dtype();
        let (b, t) = (batch.batch_size, batch.max_len);
        let mask = Tensor::from_slice(&batch.mask, (b, t), &dev)?.to_dtype(dtype)?;
        let labels = Tensor::from_slice(&batch.labels, b, &dev)?.to_dtype(dtype)?;
        Ok(Inputs {
            batch,
            blocks,
            aligned,
            others,
            mask,
            labels,
        })
    }

    /// Embeddings of `f` at its positions, `[P, D]`: the row for one-hot
    /// fields, `sum_k e_k` (or the mean over the non-padding ids) for
    /// multi-hot ones.
    pub fn field(&self, f: &FieldRef) -> candle_core::Result<Tensor> {
        let block = &self.blocks[f.block];
        let e = block.lookup(f.idx)?;
        if f.width <= 1 {
            return Ok(e);
        }
        let p = f.idx.len() / f.width;
        let pooled = e.reshape((p, f.width, block.dim))?.sum(1)?;
        if !f.mean {
            return Ok(pooled);
        }
        let pad = block.unique as u32;
        let inv: Vec<f32> = f
            .idx
            .chunks(f.width)
            .map(|c| {
                let n = c.iter().filter(|&&i| i != pad).count();
                if n == 0 {
                    0.0
                } else {
                    1.0 / n as f32
                }
            })
            .collect();
        let inv = Tensor::from_slice(&inv, (p, 1), pooled.device())?.to_dtype(pooled.dtype())?;
        pooled.broadcast_mul(&inv)
    }

    /// Target behaviour (the attention query), the aligned ad features
    /// concatenated: `[B, E]` (`[e_item; e_cat]` for the ids-only layout).
    pub fn target(&self) -> candle_core::Result<Tensor> {
        let parts = self
            .aligned
            .iter()
            .map(|a| self.field(&a.ad))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }

    fn behaviours(
        &self,
        pick: impl Fn(&AlignedField<'a>) -> Option<FieldRef<'a>>,
    ) -> candle_core::Result<Option<Tensor>> {
        let (b, t) = (self.batch.batch_size, self.batch.max_len);
        let mut parts = Vec::with_capacity(self.aligned.len());
        for a in &self.aligned {
            match pick(a) {
                Some(f) => parts.push(self.field(&f)?),
                None => return Ok(None),
            }
        }
        let e = Tensor::cat(&parts, 1)?;
        let width = e.dim(1)?;
        Ok(Some(e.reshape((b, t, width))?))
    }

    /// History behaviours `[B, T, E]` (padded steps are zero rows).
    pub fn history(&self) -> candle_core::Result<Tensor> {
        self.behaviours(|a| Some(a.hist))?
            .ok_or_else(|| candle_core::Error::Msg("no behaviour features".into()))
    }

    /// Masked pooling of the history behaviours, `[B, E]`: the sum
    /// `sum_t m_t e_t` or (with `mean`) the mean over the valid steps, as
    /// `pooling::masked_sum` / `masked_mean` of [`Inputs::history`]. With
    /// `fused` on a CPU float tensor and one id per step it runs the
    /// embedding bag of `fused_bag` on the pulled rows (no padded
    /// intermediate).
    pub fn history_pool(&self, mean: bool, fused: bool) -> candle_core::Result<Tensor> {
        use crate::layer::fused_bag::EmbeddingBag;
        use crate::layer::pooling::{masked_mean, masked_sum};
        let one_hot = self.aligned.iter().all(|a| a.hist.width == 1);
        if !(fused && one_hot && crate::layer::kernels::cpu_real(&self.blocks[0].padded)) {
            let h = self.history()?;
            return if mean {
                masked_mean(&h, &self.mask)
            } else {
                masked_sum(&h, &self.mask)
            };
        }
        let parts = self
            .aligned
            .iter()
            .map(|a| {
                EmbeddingBag {
                    idx: a.hist.idx.to_vec(),
                    lens: self.batch.lens.clone(),
                    t: self.batch.max_len,
                    mean,
                }
                .apply(self.blocks[a.hist.block].rows.as_tensor())
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)
    }

    /// DIEN negative behaviours `[B, T, E]`, when the batch has them.
    pub fn negatives(&self) -> candle_core::Result<Option<Tensor>> {
        self.behaviours(|a| a.neg)
    }

    /// The features outside the attention concatenated, `[B, O]` (the user
    /// embedding in the ids-only layout), or `None` when there are none.
    pub fn others(&self) -> candle_core::Result<Option<Tensor>> {
        if self.others.is_empty() {
            return Ok(None);
        }
        // The batch's dense values as one `[B, n]` tensor, built once.
        let dense = match self.others.iter().find_map(|o| match o {
            OtherField::Dense { n, .. } => Some(*n),
            OtherField::Emb(_) => None,
        }) {
            Some(n) => Some(
                Tensor::from_slice(
                    &self.batch.dense,
                    (self.batch.batch_size, n),
                    self.labels.device(),
                )?
                .to_dtype(self.labels.dtype())?,
            ),
            None => None,
        };
        let mut parts = Vec::with_capacity(self.others.len());
        for o in &self.others {
            parts.push(match (o, &dense) {
                (OtherField::Emb(f), _) => self.field(f)?,
                (OtherField::Dense { col, .. }, Some(d)) => d.narrow(1, *col, 1)?,
                (OtherField::Dense { .. }, None) => {
                    return Err(candle_core::Error::Msg(
                        "dense feature without dense values".into(),
                    ))
                }
            });
        }
        Ok(Some(Tensor::cat(&parts, 1)?))
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
pub trait Network: Sized + Send + Sync {
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
    /// Threads a step is split across (data-parallel over the batch; 1 = none).
    threads: usize,
}

/// Fewest samples a thread's part of a batch gets when a step is split.
pub const MIN_PART: usize = 8;

/// `[lo, hi)` ranges splitting `b` samples into at most `threads` parts of
/// at least [`MIN_PART`] samples (sizes differ by at most one).
pub fn part_ranges(b: usize, threads: usize) -> Vec<std::ops::Range<usize>> {
    let p = threads.min(b / MIN_PART).max(1);
    let (q, r) = (b / p, b % p);
    let mut lo = 0;
    (0..p)
        .map(|i| {
            let hi = lo + q + usize::from(i < r);
            let range = lo..hi;
            lo = hi;
            range
        })
        .collect()
}

/// DIEN's auxiliary-loss pairs of a batch: valid steps `t` with `t + 1`
/// also valid, `sum_b max(len_b - 1, 0)` (the loss is their mean).
fn aux_pairs(batch: &Batch) -> usize {
    batch
        .lens
        .iter()
        .map(|&l| l.min(batch.max_len).saturating_sub(1))
        .sum()
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
            threads: 1,
        })
    }

    /// One forward (and, in training, backward) pass over `batch` whose
    /// gradients are those of `w_bce * bce + aux_alpha * w_aux * aux`: the
    /// part of a split step, weighted so that the parts' gradients add up to
    /// the whole batch's (`w_bce = n_part / B`, `w_aux = pairs_part / pairs`).
    fn step_part(
        &self,
        batch: &Batch,
        blocks: Vec<EmbeddingBlock>,
        train: bool,
        w_bce: f64,
        w_aux: f64,
    ) -> Result<StepOutput> {
        let inp = self.inputs_with(batch, blocks)?;
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
            let total = if w_bce == 1.0 && w_aux == 1.0 {
                obj.total
            } else {
                let bce = (&obj.bce * w_bce)?;
                match &obj.aux {
                    Some(a) => (bce + (a * (self.cfg.aux_alpha * w_aux))?)?,
                    None => bce,
                }
            };
            let grads = total.backward()?;
            for ((table, _), block) in self.cfg.tables().into_iter().zip(&inp.blocks) {
                out.sparse_grads.insert(table, block.grad(&grads)?);
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
        let blocks = self.blocks(batch, rows, train)?;
        self.inputs_with(batch, blocks)
    }

    /// Checks `batch` and its pulled rows and builds one [`EmbeddingBlock`]
    /// per table (in [`ModelConfig::tables`] order). The blocks serve any
    /// part of the batch (`Batch::rows` keeps its unique ids), so a split
    /// step builds them once.
    fn blocks(&self, batch: &Batch, rows: &SparseRows, train: bool) -> Result<Vec<EmbeddingBlock>> {
        let negatives = train && N::needs_negatives(&self.cfg);
        match &self.cfg.features {
            Some(schema) => validate_schema_batch(batch, schema, negatives)?,
            None => validate_batch(batch, negatives)?,
        }
        self.cfg
            .tables()
            .iter()
            .zip(batch.tables())
            .map(|((table, dim), ids)| {
                let (unique, dim) = (ids.unique.len(), *dim);
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
            })
            .collect()
    }

    /// [`Inputs`] of `batch` over `blocks` (from [`Self::blocks`]).
    fn inputs_with<'a>(&self, batch: &'a Batch, blocks: Vec<EmbeddingBlock>) -> Result<Inputs<'a>> {
        if let Some(schema) = &self.cfg.features {
            return Ok(Inputs::from_schema(batch, schema, blocks)?);
        }
        let mut it = blocks.into_iter();
        let (Some(item), Some(cat)) = (it.next(), it.next()) else {
            return Err(ModelError::Batch("item and cat row blocks missing".into()));
        };
        Ok(Inputs::from_blocks(batch, item, cat, it.next())?)
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

    fn sparse_tables(&self) -> Vec<(String, usize)> {
        self.cfg.tables()
    }

    fn step(&mut self, batch: &Batch, rows: &SparseRows, train: bool) -> Result<StepOutput> {
        // Batch statistics (Dice in training) are not split: one part.
        let threads = if train && !self.set.state.is_empty() {
            1
        } else {
            self.threads
        };
        let blocks = self.blocks(batch, rows, train)?;
        let ranges = part_ranges(batch.batch_size, threads);
        if ranges.len() <= 1 {
            return self.step_part(batch, blocks, train, 1.0, 1.0);
        }
        let parts: Vec<Batch> = ranges.iter().map(|r| batch.rows(r.clone())).collect();
        let (b, pairs) = (batch.batch_size as f64, aux_pairs(batch) as f64);
        let weights: Vec<(f64, f64)> = parts
            .iter()
            .map(|p| {
                let w_aux = if pairs > 0.0 {
                    aux_pairs(p) as f64 / pairs
                } else {
                    0.0
                };
                (p.batch_size as f64 / b, w_aux)
            })
            .collect();
        let this = &*self;
        let outs: Vec<Result<StepOutput>> = std::thread::scope(|s| {
            let handles: Vec<_> = parts[1..]
                .iter()
                .zip(&weights[1..])
                .map(|(p, &(wb, wa))| {
                    let blocks = blocks.clone();
                    s.spawn(move || this.step_part(p, blocks, train, wb, wa))
                })
                .collect();
            let (wb, wa) = weights[0];
            let mut outs = vec![this.step_part(&parts[0], blocks.clone(), train, wb, wa)];
            for h in handles {
                outs.push(h.join().unwrap_or_else(|_| {
                    Err(ModelError::Candle(candle_core::Error::Msg(
                        "a thread of a split step panicked".into(),
                    )))
                }));
            }
            outs
        });
        let mut total = StepOutput::default();
        let mut aux_sum: Option<f32> = None;
        for (i, out) in outs.into_iter().enumerate() {
            let out = out?;
            let (wb, wa) = weights[i];
            total.loss += (wb as f32) * out.loss;
            if let Some(a) = out.aux_loss {
                *aux_sum.get_or_insert(0.0) += (wa as f32) * a;
            }
            total.probs.extend(out.probs);
            for (table, g) in out.sparse_grads {
                match total.sparse_grads.get_mut(&table) {
                    Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, v)| *a += v),
                    None => {
                        total.sparse_grads.insert(table, g);
                    }
                }
            }
            if total.dense_grads.is_empty() {
                total.dense_grads = out.dense_grads;
            } else {
                for ((_, acc), (_, g)) in total.dense_grads.iter_mut().zip(&out.dense_grads) {
                    acc.iter_mut().zip(g).for_each(|(a, v)| *a += v);
                }
            }
        }
        total.aux_loss = aux_sum;
        Ok(total)
    }

    fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
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

/// Checks a schema batch against `schema`: its tables and features, array
/// lengths and index ranges, and DIEN negatives when `needs_negatives`.
pub fn validate_schema_batch(
    batch: &Batch,
    schema: &FeatureSchema,
    needs_negatives: bool,
) -> Result<()> {
    let (b, t) = (batch.batch_size, batch.max_len);
    let bad = |m: String| Err(ModelError::Batch(m));
    if !batch.is_schema() {
        return bad("the model has a feature schema ([[features]]) but the batch was read from a file without one".into());
    }
    if b == 0 || t == 0 {
        return bad(format!("empty batch (B = {b}, T = {t})"));
    }
    let tables = schema.tables();
    if batch.schema_tables.len() != tables.len()
        || batch
            .schema_tables
            .iter()
            .zip(&tables)
            .any(|(a, (n, _))| &a.table != n)
    {
        return bad("the batch's tables are not the schema's".into());
    }
    let sparse = schema.sparse();
    if batch.features.len() != sparse.len() {
        return bad(format!(
            "{} features, the schema has {} sparse ones",
            batch.features.len(),
            sparse.len()
        ));
    }
    for (name, len, want) in [
        ("labels", batch.labels.len(), b),
        ("lens", batch.lens.len(), b),
        ("mask", batch.mask.len(), b * t),
        ("dense", batch.dense.len(), b * schema.dense().len()),
    ] {
        if len != want {
            return bad(format!("`{name}` has {len} entries, expected {want}"));
        }
    }
    if batch.lens.iter().any(|&l| l > t) {
        return bad(format!("a history length exceeds max_len {t}"));
    }
    for (f, &i) in batch.features.iter().zip(&sparse) {
        let feat = &schema.features()[i];
        let name = &feat.name;
        let want = if feat.is_behaviour() {
            b * t * f.width
        } else {
            b * f.width
        };
        let pad = batch
            .schema_tables
            .get(f.table)
            .map(|s| s.pad_index())
            .ok_or_else(|| {
                ModelError::Batch(format!(
                    "`{name}` reads table {} of {}",
                    f.table,
                    tables.len()
                ))
            })?;
        if tables[f.table].0 != feat.table_name() || f.width != feat.width() {
            return bad(format!(
                "`{name}` does not match the schema (table or width)"
            ));
        }
        for (what, idx) in std::iter::once(("", Some(&f.idx)))
            .chain(std::iter::once((" negatives", f.neg.as_ref())))
        {
            let Some(idx) = idx else { continue };
            if idx.len() != want {
                return bad(format!(
                    "`{name}`{what} has {} indices, expected {want}",
                    idx.len()
                ));
            }
            if let Some(&i) = idx.iter().find(|&&i| i > pad) {
                return bad(format!("`{name}`{what} index {i} > pad index {pad}"));
            }
        }
        if needs_negatives && feat.is_behaviour() && f.neg.is_none() {
            return bad(format!(
                "DIEN with aux loss needs negative behaviours (`neg:{name}` columns) in training batches"
            ));
        }
    }
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
