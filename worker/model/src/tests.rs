//! Model tests: f64 gradient checks (dense parameters and embedding rows),
//! padding, errors, the trait surface, and a small end-to-end training run.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::base::BaseModel;
use super::dien::Dien;
use super::din::Din;
use super::net::{CtrNet, Inputs, Network};
use super::testing::{
    batches, evaluate, synthetic_samples, train_epoch, InMemoryStore, SyntheticSpec,
};
use super::*;
use crate::layer::attention::AttentionMode;
use crate::layer::attention_gru::EvolveKind;
use crate::layer::embedding::EmbeddingBlock;
use crate::layer::gradcheck::{assert_ok, check};
use crate::layer::mlp::Activation;
use crate::layer::mode::Mode;
use ember_data::batch::{Batch, ITEM_TABLE};

fn small(kind: ModelKind) -> ModelConfig {
    ModelConfig {
        kind,
        item_dim: 3,
        cat_dim: 3,
        user_dim: 2,
        dien_hidden: 6,
        mlp_hidden: vec![8, 4],
        attention_hidden: vec![6, 4],
        ..ModelConfig::default()
    }
}

fn small_batch(seed: u64, b: usize) -> Batch {
    let spec = SyntheticSpec {
        items: 12,
        cats: 4,
        users: 5,
        hist_len: (0, 5),
        negatives: false,
    };
    let mut s = synthetic_samples(&spec, b, seed);
    // One row with an empty history, one with the full length.
    s[0].hist_items.clear();
    s[0].hist_cats.clear();
    s[1].hist_items = vec![1, 2, 3, 4, 5];
    s[1].hist_cats = vec![2, 3, 4, 1, 2];
    let mut batch = Batch::from_samples(&s, 5);
    // Negatives at valid steps: the history shifted by one step (ids already
    // in the batch); padded steps use the pad index.
    let t = batch.max_len;
    let mut ni = vec![batch.items.pad_index(); b * t];
    let mut nc = vec![batch.cats.pad_index(); b * t];
    for r in 0..b {
        for k in 0..batch.lens[r] {
            let src = r * t + (k + 1) % batch.lens[r];
            ni[r * t + k] = batch.hist_item_idx[src];
            nc[r * t + k] = batch.hist_cat_idx[src];
        }
    }
    batch.neg_item_idx = Some(ni);
    batch.neg_cat_idx = Some(nc);
    batch
}

fn rand_rows(u: usize, d: usize, seed: u64) -> Var {
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f64> = (0..u * d).map(|_| rng.random_range(-0.5..0.5)).collect();
    Var::from_tensor(&Tensor::from_vec(v, (u, d), &Device::Cpu).unwrap()).unwrap()
}

fn gradcheck_model<N: Network>(cfg: &ModelConfig, what: &str) {
    let net = CtrNet::<N>::new(cfg, &Device::Cpu, DType::F64).unwrap();
    let batch = small_batch(3, 6);
    let iv = rand_rows(batch.items.unique.len(), cfg.item_dim, 1);
    let cv = rand_rows(batch.cats.unique.len(), cfg.cat_dim, 2);
    let uv = rand_rows(batch.users.unique.len(), cfg.user_dim, 3);
    let f = || {
        let user = if cfg.use_user {
            Some(EmbeddingBlock::from_var(uv.clone())?)
        } else {
            None
        };
        let inp = Inputs::from_blocks(
            &batch,
            EmbeddingBlock::from_var(iv.clone())?,
            EmbeddingBlock::from_var(cv.clone())?,
            user,
        )?;
        Ok(net.objective(&inp, Mode::TRAIN_FROZEN)?.total)
    };
    let mut vars = net.param_set().params.clone();
    vars.push(("rows.item".into(), iv.clone()));
    vars.push(("rows.cat".into(), cv.clone()));
    if cfg.use_user {
        vars.push(("rows.user".into(), uv.clone()));
    }
    // Every parameter and row block receives a gradient, except those the
    // objective does not depend on: the last attention bias under a softmax
    // (shift invariance) and the attention of the plain-GRU ablation.
    let softmax = cfg.kind == ModelKind::Dien || cfg.attention_mode == AttentionMode::Code;
    let exempt = |n: &str| {
        (softmax && n == "att.fc2.bias")
            || (cfg.kind == ModelKind::Dien
                && cfg.evolve == EvolveKind::Gru
                && (n.starts_with("att.") || n.starts_with("bilinear.")))
    };
    let g = f().unwrap().backward().unwrap();
    for (name, v) in vars.iter().filter(|(n, _)| !exempt(n)) {
        let gv = g.get(v.as_tensor());
        assert!(gv.is_some(), "{what}: no gradient for {name}");
        let n = gv
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(n > 0.0, "{what}: zero gradient for {name}");
    }
    let rep = check(&vars, f, 12, 1e-5, 1e-3).unwrap();
    assert_ok(what, &rep);
}

#[test]
fn gradcheck_base_and_din() {
    for act in [Activation::Prelu, Activation::Dice] {
        let mut c = small(ModelKind::Base);
        c.activation = act;
        c.use_user = act == Activation::Dice;
        gradcheck_model::<BaseModel>(&c, &format!("base {act:?}"));
        for mode in [AttentionMode::Paper, AttentionMode::Code] {
            for fused in [false, true] {
                let mut c = small(ModelKind::Din);
                c.activation = act;
                c.attention_mode = mode;
                c.fused = fused;
                c.use_user = mode == AttentionMode::Code;
                gradcheck_model::<Din>(&c, &format!("din {act:?} {mode:?} fused={fused}"));
            }
        }
    }
}

#[test]
fn gradcheck_dien_variants() {
    use crate::config::DienAttention::{Bilinear, Mlp};
    for (evolve, aux, att) in [
        (EvolveKind::Augru, true, Mlp),
        (EvolveKind::Augru, false, Mlp),
        (EvolveKind::Agru, true, Mlp),
        (EvolveKind::Aigru, true, Mlp),
        (EvolveKind::Gru, false, Mlp),
        (EvolveKind::Attpool, true, Mlp),
        (EvolveKind::Attpool, false, Bilinear),
        (EvolveKind::Augru, true, Bilinear),
        (EvolveKind::Aigru, false, Bilinear),
    ] {
        for fused in [false, true] {
            let mut c = small(ModelKind::Dien);
            c.evolve = evolve;
            c.aux_loss = aux;
            c.dien_attention = att;
            c.fused = fused;
            c.activation = if aux {
                Activation::Dice
            } else {
                Activation::Prelu
            };
            gradcheck_model::<Dien>(
                &c,
                &format!("dien {evolve:?} aux={aux} {att:?} fused={fused}"),
            );
        }
    }
}

fn rows_for(batch: &Batch, model: &dyn CtrModel, seed: u64) -> SparseRows {
    let mut store = InMemoryStore::new(&model.sparse_tables(), 0.1, seed);
    store.init_scale = 0.5;
    store.pull(batch)
}

/// A step split across threads (`set_threads`) is the same step: loss, aux
/// loss, probabilities and every sparse and dense gradient equal the
/// one-thread step's (f64 models; parts of 8+ samples, uneven, with empty
/// and full histories and DIEN's aux pairs spread unevenly over the parts;
/// the fixed layout and a schema with multi-hot, dense and context
/// features), fused and composed, in training and evaluation. With Dice in training
/// (batch statistics) the step is not split and stays bit-identical.
#[test]
fn a_step_split_across_threads_equals_the_whole_step() {
    let fixed = small_batch(11, 27);
    let schema = ember_data::schema::FeatureSchema::from_toml(FULL_SCHEMA).unwrap();
    let wide = Batch::from_schema_samples(&full_samples(26, 7), 4, &schema);
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + a.abs().max(b.abs()));
    let cases = [ModelKind::Base, ModelKind::Din, ModelKind::Dien]
        .into_iter()
        .flat_map(|k| [(k, false), (k, true)]);
    for (kind, with_schema) in cases {
        let batch = if with_schema { &wide } else { &fixed };
        for (fused, activation) in [
            (true, Activation::Prelu),
            (false, Activation::Prelu),
            (true, Activation::Dice),
        ] {
            let mut cfg = ModelConfig {
                fused,
                activation,
                ..small(kind)
            };
            if with_schema {
                cfg.features = Some(schema.clone());
                cfg.dien_hidden = 5;
            }
            let what = format!("{kind:?} schema={with_schema} fused={fused} {activation:?}");
            let mut one = build_model_with_dtype(&cfg, &Device::Cpu, DType::F64).unwrap();
            let mut three = build_model_with_dtype(&cfg, &Device::Cpu, DType::F64).unwrap();
            three.set_threads(3);
            let rows = rows_for(batch, one.as_ref(), 5);
            for train in [true, false] {
                let a = one.step(batch, &rows, train).unwrap();
                let b = three.step(batch, &rows, train).unwrap();
                if activation == Activation::Dice && train {
                    assert_eq!(a, b, "{what}: Dice training must not be split");
                    continue;
                }
                assert!(
                    close(a.loss, b.loss),
                    "{what} train={train}: loss {} vs {}",
                    a.loss,
                    b.loss
                );
                assert_eq!(a.aux_loss.is_some(), b.aux_loss.is_some(), "{what}");
                if let (Some(x), Some(y)) = (a.aux_loss, b.aux_loss) {
                    assert!(close(x, y), "{what}: aux {x} vs {y}");
                }
                assert_eq!(a.probs.len(), b.probs.len());
                for (x, y) in a.probs.iter().zip(&b.probs) {
                    assert!(close(*x, *y), "{what}: prob {x} vs {y}");
                }
                assert_eq!(
                    a.sparse_grads.keys().collect::<Vec<_>>(),
                    b.sparse_grads.keys().collect::<Vec<_>>()
                );
                for (t, g) in &a.sparse_grads {
                    for (x, y) in g.iter().zip(&b.sparse_grads[t]) {
                        assert!(close(*x, *y), "{what}: {t} grad {x} vs {y}");
                    }
                }
                assert_eq!(a.dense_grads.len(), b.dense_grads.len());
                for ((n, g), (m, h)) in a.dense_grads.iter().zip(&b.dense_grads) {
                    assert_eq!(n, m);
                    for (x, y) in g.iter().zip(h) {
                        assert!(close(*x, *y), "{what}: {n} grad {x} vs {y}");
                    }
                }
            }
        }
    }
    // The parts: 27 samples over 3 threads -> 9/9/9; 20 over 3 -> 2 parts
    // (8 samples at least each); 7 -> not split.
    let sizes = |b, t| {
        net::part_ranges(b, t)
            .iter()
            .map(|r| r.len())
            .collect::<Vec<_>>()
    };
    assert_eq!(sizes(27, 3), vec![9, 9, 9]);
    assert_eq!(sizes(20, 3), vec![10, 10]);
    assert_eq!(sizes(7, 4), vec![7]);
    assert_eq!(sizes(130, 4), vec![33, 33, 32, 32]);
}

/// Padded positions: redirect every padded history (and negative) position to
/// an extra id with random non-zero rows. Its gradient must be exactly zero and
/// the loss unchanged.
#[test]
fn padded_positions_get_exactly_zero_gradient() {
    for kind in [ModelKind::Base, ModelKind::Din, ModelKind::Dien] {
        for mode in [AttentionMode::Paper, AttentionMode::Code] {
            let mut cfg = small(kind);
            cfg.attention_mode = mode;
            let mut model = build_model_with_dtype(&cfg, &Device::Cpu, DType::F64).unwrap();
            let batch = small_batch(5, 6);
            let rows = rows_for(&batch, &*model, 9);
            let base = model.step(&batch, &rows, true).unwrap();

            let mut b2 = batch.clone();
            let (pi, pc) = (b2.items.pad_index(), b2.cats.pad_index());
            b2.items.unique.push(999_999);
            b2.items.counts.push(1);
            b2.cats.unique.push(999_999);
            b2.cats.counts.push(1);
            // The old pad index now names the extra id: every padded history
            // and negative position reads its (non-zero) rows.
            let mut rows2 = rows.clone();
            rows2
                .tables
                .get_mut("item")
                .unwrap()
                .extend([0.3, -0.7, 0.9]);
            rows2
                .tables
                .get_mut("cat")
                .unwrap()
                .extend([-0.4, 0.8, 0.2]);
            let out = model.step(&b2, &rows2, true).unwrap();
            let what = format!("{kind:?} {mode:?}");
            assert!(
                (out.loss - base.loss).abs() < 1e-6,
                "{what}: loss changed {} vs {}",
                out.loss,
                base.loss
            );
            let gi = &out.sparse_grads["item"];
            let gc = &out.sparse_grads["cat"];
            let (ui, uc) = (pi as usize, pc as usize);
            assert!(
                gi[ui * 3..ui * 3 + 3].iter().all(|&g| g == 0.0),
                "{what}: pad item grad {:?}",
                &gi[ui * 3..]
            );
            assert!(
                gc[uc * 3..uc * 3 + 3].iter().all(|&g| g == 0.0),
                "{what}: pad cat grad"
            );
            assert_eq!(&gi[..ui * 3], &base.sparse_grads["item"][..], "{what}");
        }
    }
}

#[test]
fn wrong_row_block_names_table_and_sizes() {
    let mut model = build_model(&ModelConfig::of(ModelKind::Din), &Device::Cpu).unwrap();
    let batch = small_batch(1, 4);
    let mut rows = SparseRows::new();
    rows.insert("item", vec![0.0; batch.items.unique.len() * 18 - 1]);
    rows.insert("cat", vec![0.0; batch.cats.unique.len() * 18]);
    let err = model.step(&batch, &rows, true).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::RowShape { .. }));
    assert!(
        msg.contains("`item`") && msg.contains(&format!("{}", batch.items.unique.len() * 18)),
        "{msg}"
    );
    rows.tables.remove("cat");
    rows.insert("item", vec![0.0; batch.items.unique.len() * 18]);
    assert!(
        matches!(model.step(&batch, &rows, true), Err(ModelError::MissingTable(t)) if t == "cat")
    );
    // DIEN with aux needs negatives in training, not in eval.
    let mut dien = build_model(&ModelConfig::of(ModelKind::Dien), &Device::Cpu).unwrap();
    let mut nb = batch.clone();
    nb.neg_item_idx = None;
    nb.neg_cat_idx = None;
    let rows = rows_for(&nb, &*dien, 1);
    assert!(matches!(
        dien.step(&nb, &rows, true),
        Err(ModelError::Batch(_))
    ));
    assert!(dien.step(&nb, &rows, false).is_ok());
}

#[test]
fn trait_surface_names_grads_and_state() {
    let cfg: ModelConfig = toml::from_str("kind = \"dien\"\nactivation = \"dice\"").unwrap();
    assert_eq!(cfg.item_dim, 18);
    assert_eq!(cfg.mlp_hidden, vec![200, 80]);
    assert_eq!(cfg.evolve, EvolveKind::Augru);
    assert!(cfg.aux_loss);
    assert!(toml::from_str::<ModelConfig>("kind = \"dien\"\nbogus = 1").is_err());
    let mut bad = cfg.clone();
    bad.dien_hidden = 10;
    assert!(matches!(
        bad.validate(),
        Err(ModelError::Config {
            field: "dien_hidden",
            ..
        })
    ));

    let mut model = build_model(&cfg, &Device::Cpu).unwrap();
    assert_eq!(
        model.sparse_tables(),
        vec![("item".to_string(), 18), ("cat".to_string(), 18)]
    );
    let names: Vec<String> = model.dense_params().into_iter().map(|(n, _)| n).collect();
    for want in [
        "gru.w_ih",
        "att.fc0.weight",
        "evolve.w_hh",
        "aux.fc2.bias",
        "mlp.act1.alpha",
        "mlp.fc2.weight",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing {want} in {names:?}"
        );
    }
    let shapes = model.dense_shapes();
    assert_eq!(
        shapes
            .iter()
            .find(|(n, _)| n == "mlp.fc0.weight")
            .unwrap()
            .1,
        vec![144, 200]
    );
    let state: Vec<String> = model.dense_state().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        state,
        vec![
            "mlp.act0.running_mean",
            "mlp.act0.running_var",
            "mlp.act1.running_mean",
            "mlp.act1.running_var"
        ]
    );

    let batch = small_batch(2, 8);
    let rows = rows_for(&batch, &*model, 3);
    let out = model.step(&batch, &rows, true).unwrap();
    assert_eq!(out.probs.len(), 8);
    assert!(out.aux_loss.is_some());
    let gnames: Vec<&String> = out.dense_grads.iter().map(|(n, _)| n).collect();
    assert_eq!(gnames, names.iter().collect::<Vec<_>>());
    assert_eq!(
        out.sparse_grads[ITEM_TABLE].len(),
        batch.items.unique.len() * 18
    );
    // Dice running stats moved in training, not in eval.
    let st1 = model.dense_state();
    assert_ne!(st1[0].1, vec![0.0; 200]);
    let ev = model.step(&batch, &rows, false).unwrap();
    assert!(ev.dense_grads.is_empty() && ev.sparse_grads.is_empty() && ev.aux_loss.is_none());
    assert_eq!(model.dense_state(), st1);
    // set_dense / set_state round trip and errors.
    model.set_dense("mlp.fc2.bias", &[0.25]).unwrap();
    assert_eq!(
        model
            .dense_params()
            .iter()
            .find(|(n, _)| n == "mlp.fc2.bias")
            .unwrap()
            .1,
        vec![0.25]
    );
    model.set_state("mlp.act1.running_var", &[2.0; 80]).unwrap();
    assert!(matches!(
        model.set_dense("nope", &[1.0]),
        Err(ModelError::UnknownParam(_))
    ));
    assert!(matches!(
        model.set_dense("mlp.fc2.bias", &[1.0, 2.0]),
        Err(ModelError::ParamShape {
            expected: 1,
            actual: 2,
            ..
        })
    ));
    // Same seed, same parameters.
    let again = build_model(&cfg, &Device::Cpu).unwrap();
    let fresh = build_model(&cfg, &Device::Cpu).unwrap();
    assert_eq!(again.dense_params(), fresh.dense_params());
}

/// f32 and f64 models agree; sparse gradients are of the mean loss.
#[test]
fn sparse_grads_are_of_the_mean_loss() {
    let cfg = small(ModelKind::Din);
    let mut m = build_model_with_dtype(&cfg, &Device::Cpu, DType::F64).unwrap();
    let mut m32 = build_model(&cfg, &Device::Cpu).unwrap();
    // Duplicate the batch: the mean loss and its gradient are unchanged.
    let b1 = small_batch(4, 5);
    let spec = SyntheticSpec {
        items: 12,
        cats: 4,
        users: 5,
        hist_len: (1, 5),
        negatives: false,
    };
    let s = synthetic_samples(&spec, 5, 77);
    let mut twice = s.clone();
    twice.extend(s.clone());
    let (ba, bb) = (Batch::from_samples(&s, 5), Batch::from_samples(&twice, 5));
    assert_eq!(ba.items.unique, bb.items.unique);
    let rows = rows_for(&ba, &*m, 5);
    let oa = m.step(&ba, &rows, true).unwrap();
    let ob = m.step(&bb, &rows, true).unwrap();
    assert!((oa.loss - ob.loss).abs() < 1e-6);
    for (x, y) in oa.sparse_grads["item"].iter().zip(&ob.sparse_grads["item"]) {
        assert!((x - y).abs() < 1e-6);
    }
    let o32 = m32.step(&ba, &rows, true).unwrap();
    assert!((o32.loss - oa.loss).abs() < 1e-5);
    let _ = b1;
}

#[test]
fn din_learns_synthetic_signal() {
    let spec = SyntheticSpec {
        negatives: false,
        ..Default::default()
    };
    let train = synthetic_samples(&spec, 6000, 1);
    let test = synthetic_samples(&spec, 1500, 2);
    let (tb, eb) = (batches(&train, 64, 50), batches(&test, 256, 50));
    let cfg = ModelConfig::of(ModelKind::Din);
    let mut model = build_model(&cfg, &Device::Cpu).unwrap();
    let mut store = InMemoryStore::new(&model.sparse_tables(), 0.05, 7);
    let mut opt = DenseOptimizer::adam(2e-3);
    let before = evaluate(&mut *model, &mut store, &eb).unwrap();
    let mut loss = 0.0;
    for _ in 0..2 {
        loss = train_epoch(&mut *model, &mut store, &mut opt, &tb).unwrap();
    }
    let after = evaluate(&mut *model, &mut store, &eb).unwrap();
    eprintln!("DIN synthetic: before {before:?}, after {after:?}, last train loss {loss}");
    assert!(
        after.auc > 0.75,
        "held-out AUC {} (before {})",
        after.auc,
        before.auc
    );
    assert!(after.logloss < before.logloss);
}

#[test]
fn dien_trains_end_to_end_in_process() {
    let spec = SyntheticSpec {
        hist_len: (2, 15),
        ..Default::default()
    };
    let train = synthetic_samples(&spec, 3000, 11);
    let test = synthetic_samples(&spec, 1000, 12);
    let (tb, eb) = (batches(&train, 64, 50), batches(&test, 250, 50));
    // The reference code's attention and the paper's bilinear one (Eq. 8).
    for att in [
        crate::config::DienAttention::Mlp,
        crate::config::DienAttention::Bilinear,
    ] {
        let cfg = ModelConfig {
            dien_attention: att,
            ..ModelConfig::of(ModelKind::Dien)
        };
        let mut model = build_model(&cfg, &Device::Cpu).unwrap();
        let mut store = InMemoryStore::new(&model.sparse_tables(), 0.05, 3);
        let mut opt = DenseOptimizer::adam(2e-3);
        for _ in 0..2 {
            train_epoch(&mut *model, &mut store, &mut opt, &tb).unwrap();
        }
        let after = evaluate(&mut *model, &mut store, &eb).unwrap();
        eprintln!("DIEN {att:?} synthetic: {after:?}");
        assert!(after.auc > 0.7, "{att:?}: held-out AUC {}", after.auc);
    }
}

#[test]
fn allocator_tuning_applies_on_glibc() {
    let applied = tune_allocator();
    if cfg!(all(target_os = "linux", target_env = "gnu")) {
        assert!(applied);
    }
}

/// `dice_momentum` reaches every Dice layer (final MLP and attention FFN):
/// after one training step from the initial statistics (mean 0, var 1), the
/// running mean with momentum 0.1 is exactly 0.1 x the one with momentum 1
/// (which is the batch mean itself), and the running variance 0.9 + 0.1 x.
/// Bad values are rejected by name.
#[test]
fn dice_momentum_and_eps_come_from_the_config() {
    let state_after_step = |momentum: f64| {
        let cfg = ModelConfig {
            activation: Activation::Dice,
            attention_activation: Activation::Dice,
            dice_momentum: momentum,
            ..small(ModelKind::Din)
        };
        let mut model = build_model(&cfg, &Device::Cpu).unwrap();
        let batch = small_batch(5, 16);
        let rows = rows_for(&batch, model.as_ref(), 9);
        model.step(&batch, &rows, true).unwrap();
        model.dense_state()
    };
    let (full, slow) = (state_after_step(1.0), state_after_step(0.1));
    assert!(full.iter().any(|(n, _)| n.starts_with("att.")), "{full:?}");
    assert!(full.iter().any(|(n, _)| n.starts_with("mlp.")), "{full:?}");
    for ((name, f), (_, s)) in full.iter().zip(&slow) {
        for (a, b) in f.iter().zip(s) {
            let want = if name.ends_with("running_mean") {
                0.1 * a
            } else {
                0.9 + 0.1 * a
            };
            assert!(
                (b - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{name}: {b} vs {want}"
            );
        }
    }
    for (field, cfg) in [
        (
            "dice_momentum",
            ModelConfig {
                dice_momentum: 0.0,
                ..ModelConfig::default()
            },
        ),
        (
            "dice_momentum",
            ModelConfig {
                dice_momentum: 1.5,
                ..ModelConfig::default()
            },
        ),
        (
            "dice_eps",
            ModelConfig {
                dice_eps: 0.0,
                ..ModelConfig::default()
            },
        ),
    ] {
        assert!(
            matches!(cfg.validate(), Err(ModelError::Config { field: f, .. }) if f == field),
            "{field}"
        );
    }
}

/// `gru_init = "tf1"` reaches both of DIEN's GRUs (the extractor and the
/// evolving layer): their biases start at `[-1; +1; 0]` per gate block,
/// while the default keeps them at 0; an unknown value is refused by name.
#[test]
fn dien_gru_init_comes_from_the_config() {
    let cfg: ModelConfig = toml::from_str("kind = \"dien\"\ngru_init = \"tf1\"").unwrap();
    let h = cfg.dien_hidden;
    let model = build_model(&cfg, &Device::Cpu).unwrap();
    let params = model.dense_params();
    for name in ["gru.bias", "evolve.bias"] {
        let (_, v) = params.iter().find(|(n, _)| n == name).unwrap();
        assert_eq!(v.len(), 3 * h, "{name}");
        assert!(v[..h].iter().all(|&x| x == -1.0), "{name}");
        assert!(v[h..2 * h].iter().all(|&x| x == 1.0), "{name}");
        assert!(v[2 * h..].iter().all(|&x| x == 0.0), "{name}");
    }
    let plain = build_model(&ModelConfig::of(ModelKind::Dien), &Device::Cpu).unwrap();
    let (_, b) = plain
        .dense_params()
        .into_iter()
        .find(|(n, _)| n == "gru.bias")
        .unwrap();
    assert!(b.iter().all(|&x| x == 0.0));
    let err = toml::from_str::<ModelConfig>("kind = \"dien\"\ngru_init = \"glorot\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("gru_init") || err.contains("glorot"), "{err}");
}

/// A schema with every feature kind: a multi-hot ad feature with a
/// multi-hot behaviour (mean), an unaligned multi-hot ad feature (sum), a
/// user id, a context id sharing no table, and a dense feature.
const FULL_SCHEMA: &str = r#"
[[features]]
name = "movie"
kind = "sparse"
group = "ad"
table = "item"
dim = 3
[[features]]
name = "genres"
kind = "multi_hot"
max_len = 3
pooling = "mean"
group = "ad"
table = "genre"
dim = 2
[[features]]
name = "hist_movie"
kind = "sparse"
group = "behaviour"
table = "item"
dim = 3
align = "movie"
[[features]]
name = "hist_genres"
kind = "multi_hot"
max_len = 3
pooling = "mean"
group = "behaviour"
table = "genre"
dim = 2
align = "genres"
[[features]]
name = "tags"
kind = "multi_hot"
max_len = 2
group = "ad"
table = "genre"
dim = 2
[[features]]
name = "user"
kind = "sparse"
group = "user"
dim = 2
[[features]]
name = "hour"
kind = "sparse"
group = "context"
dim = 2
[[features]]
name = "age"
kind = "dense"
group = "user"
"#;

/// Schema samples of [`FULL_SCHEMA`] (random ids, some empty multi-hot
/// cells and histories), with DIEN negatives.
fn full_samples(n: usize, seed: u64) -> Vec<ember_data::batch::Sample> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|r| {
            let t = if r == 0 { 0 } else { rng.random_range(1..=4) };
            let genres = |rng: &mut StdRng| -> Vec<u64> {
                let k = rng.random_range(0..=3);
                let mut v: Vec<u64> = (0..k).map(|_| rng.random_range(1..=6)).collect();
                v.resize(3, 0);
                v
            };
            let hist_genres: Vec<u64> = (0..t).flat_map(|_| genres(&mut rng)).collect();
            let neg_genres: Vec<u64> = (0..t).flat_map(|_| genres(&mut rng)).collect();
            let mut g = genres(&mut rng);
            g.retain(|&x| x != 0);
            ember_data::batch::Sample {
                label: (r % 2) as f32,
                user: r as u64 + 1,
                fields: vec![
                    vec![rng.random_range(1..=9)],
                    g,
                    (0..t).map(|_| rng.random_range(1..=9)).collect(),
                    hist_genres,
                    (0..rng.random_range(0..=2))
                        .map(|_| rng.random_range(1..=6))
                        .collect(),
                    vec![rng.random_range(1..=4)],
                    vec![rng.random_range(1..=3)],
                ],
                neg_fields: vec![
                    (0..t).map(|_| rng.random_range(1..=9)).collect(),
                    neg_genres,
                ],
                dense: vec![rng.random_range(-1.0..1.0)],
                ..Default::default()
            }
        })
        .collect()
}

fn gradcheck_schema_model<N: Network>(cfg: &ModelConfig, what: &str) {
    let schema = cfg.features.clone().unwrap();
    let net = CtrNet::<N>::new(cfg, &Device::Cpu, DType::F64).unwrap();
    let batch = Batch::from_schema_samples(&full_samples(6, 5), 4, &schema);
    let rows: Vec<Var> = schema
        .tables()
        .iter()
        .enumerate()
        .map(|(i, (_, d))| rand_rows(batch.schema_tables[i].unique.len(), *d, 10 + i as u64))
        .collect();
    let f = || {
        let blocks = rows
            .iter()
            .map(|v| EmbeddingBlock::from_var(v.clone()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let inp = Inputs::from_schema(&batch, &schema, blocks)?;
        Ok(net.objective(&inp, Mode::TRAIN_FROZEN)?.total)
    };
    let mut vars = net.param_set().params.clone();
    for ((t, _), v) in schema.tables().iter().zip(&rows) {
        vars.push((format!("rows.{t}"), v.clone()));
    }
    let g = f().unwrap().backward().unwrap();
    for ((t, _), v) in schema.tables().iter().zip(&rows) {
        let n = g.get(v.as_tensor()).map(|g| {
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        });
        assert!(n.unwrap_or(0.0) > 0.0, "{what}: no gradient for table {t}");
    }
    let rep = check(&vars, f, 12, 1e-5, 1e-3).unwrap();
    assert_ok(what, &rep);
}

#[test]
fn gradcheck_schema_models_with_multi_hot_dense_and_context() {
    let schema = ember_data::schema::FeatureSchema::from_toml(FULL_SCHEMA).unwrap();
    assert_eq!(
        (schema.behaviour_dim(), schema.other_dim()),
        (5, 2 + 2 + 2 + 1)
    );
    for kind in [ModelKind::Base, ModelKind::Din, ModelKind::Dien] {
        for fused in [false, true] {
            let mut c = small(kind);
            c.features = Some(schema.clone());
            c.dien_hidden = 5;
            c.aux_loss = kind == ModelKind::Dien;
            c.fused = fused;
            let what = format!("schema {kind:?} fused={fused}");
            match kind {
                ModelKind::Base => gradcheck_schema_model::<BaseModel>(&c, &what),
                ModelKind::Din => gradcheck_schema_model::<Din>(&c, &what),
                ModelKind::Dien => gradcheck_schema_model::<Dien>(&c, &what),
            }
        }
    }
}

#[test]
fn ids_only_schema_is_bit_identical_to_the_fixed_layout() {
    use ember_data::schema::FeatureSchema;
    use ember_data::schema_format::from_legacy;
    let spec = SyntheticSpec {
        items: 40,
        cats: 5,
        users: 9,
        hist_len: (1, 7),
        negatives: true,
    };
    let samples = synthetic_samples(&spec, 32, 11);
    for kind in [ModelKind::Base, ModelKind::Din, ModelKind::Dien] {
        for use_user in [false, true] {
            let mut fixed = small(kind);
            fixed.use_user = use_user;
            fixed.aux_loss = kind == ModelKind::Dien;
            fixed.activation = Activation::Dice;
            let mut wide = fixed.clone();
            wide.use_user = false;
            wide.features = Some(FeatureSchema::ids_only(3, 3, use_user.then_some(2)).unwrap());
            let schema = wide.features.clone().unwrap();
            let lb = Batch::from_samples(&samples, 6);
            let converted: Vec<_> = samples.iter().map(|s| from_legacy(s, use_user)).collect();
            let wb = Batch::from_schema_samples(&converted, 6, &schema);
            let mut a = build_model(&fixed, &Device::Cpu).unwrap();
            let mut b = build_model(&wide, &Device::Cpu).unwrap();
            let mut rng = StdRng::seed_from_u64(3);
            let mut rows = SparseRows::new();
            for ids in lb.tables() {
                let d = if ids.table == "user" { 2 } else { 3 };
                rows.insert(
                    &ids.table,
                    (0..ids.unique.len() * d)
                        .map(|_| rng.random_range(-0.5..0.5))
                        .collect(),
                );
            }
            for train in [true, false] {
                let x = a.step(&lb, &rows, train).unwrap();
                let y = b.step(&wb, &rows, train).unwrap();
                assert_eq!(x, y, "{kind:?} use_user={use_user} train={train}");
            }
            assert_eq!(a.dense_state(), b.dense_state());
        }
    }
}

#[test]
fn schema_models_refuse_legacy_batches_and_bad_config() {
    let schema = ember_data::schema::FeatureSchema::from_toml(FULL_SCHEMA).unwrap();
    let mut c = small(ModelKind::Din);
    c.features = Some(schema.clone());
    let mut m = build_model(&c, &Device::Cpu).unwrap();
    let legacy = small_batch(1, 4);
    let e = m
        .step(&legacy, &SparseRows::new(), true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("without one"), "{e}");
    let wide = Batch::from_schema_samples(&full_samples(4, 2), 4, &schema);
    let e = m
        .step(&wide, &SparseRows::new(), true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sparse rows of table `item` missing"), "{e}");
    c.use_user = true;
    let e = build_model(&c, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("use_user"), "{e}");
    let mut d = small(ModelKind::Dien);
    d.features = Some(schema);
    d.dien_hidden = 6;
    let e = build_model(&d, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("dien_hidden") && e.contains("= 5"), "{e}");
}
