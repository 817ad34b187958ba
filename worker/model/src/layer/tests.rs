//! Layer tests: finite-difference gradient checks (f64) and behavioural checks.

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::attention::{ActivationUnit, AttentionMode};
use super::attention_gru::{AttentionGru, EvolveKind};
use super::aux::AuxNet;
use super::bilinear::BilinearAttention;
use super::dice::Dice;
use super::gradcheck::{assert_ok, check};
use super::gru::{Gru, GruInit};
use super::mlp::{Activation, Mlp};
use super::mode::Mode;
use super::params::ParamBuilder;
use super::prelu::PRelu;

const H: f64 = 1e-5;
const TOL: f64 = 1e-3;

fn rand_var(shape: &[usize], seed: u64, scale: f64) -> Result<Var> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn pb(seed: u64) -> ParamBuilder {
    ParamBuilder::new(DType::F64, &Device::Cpu, seed)
}

/// mask [B, T] from lengths.
fn mask_of(lens: &[usize], t: usize) -> Result<Tensor> {
    let mut m = vec![0f64; lens.len() * t];
    for (b, &l) in lens.iter().enumerate() {
        for s in 0..l {
            m[b * t + s] = 1.0;
        }
    }
    Tensor::from_vec(m, (lens.len(), t), &Device::Cpu)
}

/// A fixed random projection so the checked scalar depends on every output.
fn proj_loss(y: &Tensor, seed: u64) -> Result<Tensor> {
    let w = rand_var(y.dims(), seed, 1.0)?;
    (y * w.as_tensor())?.sum_all()
}

#[test]
fn prelu_gradcheck() -> Result<()> {
    let b = pb(1);
    let p = PRelu::new(5, &b)?;
    let x = rand_var(&[4, 5], 2, 2.0)?;
    let mut vars = b.finish().params;
    vars.push(("x".into(), x.clone()));
    let rep = check(
        &vars,
        || proj_loss(&p.forward(x.as_tensor())?, 3),
        100,
        H,
        TOL,
    )?;
    assert_ok("prelu", &rep);
    Ok(())
}

#[test]
fn dice_gradcheck_train_mode() -> Result<()> {
    let b = pb(4);
    let d = Dice::new(3, &b)?;
    d.alpha
        .set(&Tensor::new(&[0.2f64, -0.3, 0.5], &Device::Cpu)?)?;
    let x = rand_var(&[6, 3], 5, 2.0)?;
    let mut vars = b.finish().params;
    vars.push(("x".into(), x.clone()));
    let rep = check(
        &vars,
        || proj_loss(&d.forward(x.as_tensor(), Mode::TRAIN_FROZEN)?, 6),
        100,
        H,
        TOL,
    )?;
    assert_ok("dice", &rep);
    Ok(())
}

#[test]
fn dice_is_prelu_with_zero_stats_and_uses_running_stats_at_inference() -> Result<()> {
    let dev = Device::Cpu;
    let b = pb(7);
    let d = Dice::new(4, &b)?;
    let p = PRelu::new(4, &b)?;
    d.alpha.set(p.alpha.as_tensor())?;
    // Values away from 0 (p(s) = sigmoid(s / 1e-4) is a step there).
    let x = Tensor::new(&[[1.5f64, -0.7, 0.3, -2.0], [-0.1, 0.2, -3.0, 4.0]], &dev)?;
    let zeros = Tensor::zeros(4, DType::F64, &dev)?;
    let yd = d.apply_with_stats(&x, &zeros, &zeros)?.to_vec2::<f64>()?;
    let yp = p.forward(&x)?.to_vec2::<f64>()?;
    for (a, b) in yd.iter().flatten().zip(yp.iter().flatten()) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
    // One training step updates running stats BatchNorm-style.
    let xt = rand_var(&[8, 4], 8, 1.0)?;
    d.forward(xt.as_tensor(), Mode::TRAIN)?;
    let col0: Vec<f64> = xt.as_tensor().narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
    let mean = col0.iter().sum::<f64>() / 8.0;
    let var_u = col0.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 7.0;
    let rm = d.running_mean.as_tensor().to_vec1::<f64>()?;
    let rv = d.running_var.as_tensor().to_vec1::<f64>()?;
    assert!((rm[0] - 0.1 * mean).abs() < 1e-12);
    assert!((rv[0] - (0.9 + 0.1 * var_u)).abs() < 1e-12);
    // Inference uses the running stats, not the batch's.
    let ye = d.forward(&x, Mode::EVAL)?.to_vec2::<f64>()?;
    let want = d
        .apply_with_stats(&x, d.running_mean.as_tensor(), d.running_var.as_tensor())?
        .to_vec2::<f64>()?;
    assert_eq!(ye, want);
    let batch = d.forward(&x, Mode::TRAIN_FROZEN)?.to_vec2::<f64>()?;
    assert_ne!(ye, batch);
    Ok(())
}

#[test]
fn mlp_gradcheck_prelu_and_dice() -> Result<()> {
    for act in [Activation::Prelu, Activation::Dice, Activation::Sigmoid] {
        let b = pb(9);
        let m = Mlp::new(6, &[7, 5], 1, act, &b)?;
        let x = rand_var(&[5, 6], 10, 1.0)?;
        let mut vars = b.finish().params;
        vars.push(("x".into(), x.clone()));
        let rep = check(
            &vars,
            || proj_loss(&m.forward(x.as_tensor(), Mode::TRAIN_FROZEN)?, 11),
            40,
            H,
            TOL,
        )?;
        assert_ok(&format!("mlp {act:?}"), &rep);
    }
    Ok(())
}

fn attention_case(att: AttentionMode, fused: bool) -> Result<()> {
    let (bsz, t, e) = (3, 5, 4);
    let lens = [5, 2, 0];
    let b = pb(12);
    let mut unit = ActivationUnit::new(e, &[6, 3], Activation::Sigmoid, &b)?;
    unit.fused = fused;
    let q = rand_var(&[bsz, e], 13, 1.0)?;
    let k = rand_var(&[bsz, t, e], 14, 1.0)?;
    let mask = mask_of(&lens, t)?;
    let mut vars = b.finish().params;
    vars.push(("q".into(), q.clone()));
    vars.push(("k".into(), k.clone()));
    let f = || {
        let (v, w) = unit.forward(
            q.as_tensor(),
            k.as_tensor(),
            &mask,
            &lens,
            att,
            Mode::TRAIN_FROZEN,
        )?;
        proj_loss(&v, 15)? + proj_loss(&w, 16)?
    };
    let rep = check(&vars, f, 60, H, TOL)?;
    assert_ok(&format!("attention {att:?} fused={fused}"), &rep);
    // Padded keys get exactly zero gradient.
    let g = f()?.backward()?;
    let gk = g.get(k.as_tensor()).unwrap().to_vec3::<f64>()?;
    for (bi, &l) in lens.iter().enumerate() {
        for (s, row) in gk[bi].iter().enumerate().skip(l) {
            assert!(row.iter().all(|&v| v == 0.0), "pad grad at {bi},{s}");
        }
    }
    Ok(())
}

/// Bilinear scores equal `h_t W q` summed by hand, and the masked softmax
/// over them passes the finite-difference check for `W`, `q` and the states.
#[test]
fn bilinear_attention_is_h_w_q_and_gradchecks() -> Result<()> {
    let (bsz, t, h, e) = (3, 4, 5, 3);
    let lens = [4, 1, 0];
    let b = pb(21);
    let unit = BilinearAttention::new(h, e, &b)?;
    let q = rand_var(&[bsz, e], 22, 1.0)?;
    let k = rand_var(&[bsz, t, h], 23, 1.0)?;
    let s = unit
        .scores(q.as_tensor(), k.as_tensor())?
        .to_vec2::<f64>()?;
    let w = unit.w.as_tensor().to_vec2::<f64>()?;
    let (qv, kv) = (
        q.as_tensor().to_vec2::<f64>()?,
        k.as_tensor().to_vec3::<f64>()?,
    );
    for bi in 0..bsz {
        for ti in 0..t {
            let mut want = 0.0;
            for i in 0..h {
                for j in 0..e {
                    want += kv[bi][ti][i] * w[i][j] * qv[bi][j];
                }
            }
            assert!(
                (s[bi][ti] - want).abs() < 1e-12,
                "{bi},{ti}: {} vs {want}",
                s[bi][ti]
            );
        }
    }
    let mask = mask_of(&lens, t)?;
    let mut vars = b.finish().params;
    vars.push(("q".into(), q.clone()));
    vars.push(("k".into(), k.clone()));
    let f = || {
        let s = unit.scores(q.as_tensor(), k.as_tensor())?;
        let a = ActivationUnit::weights(&s, &mask, AttentionMode::Code)?;
        proj_loss(&ActivationUnit::pool(&a, k.as_tensor())?, 24)
    };
    assert_ok("bilinear attention", &check(&vars, f, 60, H, TOL)?);
    Ok(())
}

#[test]
fn attention_gradcheck_paper_and_code() -> Result<()> {
    for fused in [false, true] {
        attention_case(AttentionMode::Paper, fused)?;
        attention_case(AttentionMode::Code, fused)?;
    }
    Ok(())
}

#[test]
fn fused_attention_matches_reference() -> Result<()> {
    let (bsz, t, e) = (4, 7, 6);
    let lens = [7, 3, 1, 0];
    let b = pb(30);
    let mut unit = ActivationUnit::new(e, &[8, 5], Activation::Sigmoid, &b)?;
    let q = rand_var(&[bsz, e], 31, 1.0)?;
    let k = rand_var(&[bsz, t, e], 32, 1.0)?;
    let mask = mask_of(&lens, t)?;
    unit.fused = false;
    let r = (unit.scores(q.as_tensor(), k.as_tensor(), &lens, Mode::TRAIN)? * &mask)?
        .to_vec2::<f64>()?;
    unit.fused = true;
    let f = (unit.scores(q.as_tensor(), k.as_tensor(), &lens, Mode::TRAIN)? * &mask)?
        .to_vec2::<f64>()?;
    for (a, b) in r.iter().flatten().zip(f.iter().flatten()) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
    Ok(())
}

#[test]
fn gru_gradcheck_and_masking() -> Result<()> {
    let (bsz, t, i, hd) = (3, 4, 5, 3);
    let lens = [4, 2, 0];
    for fused in [false, true] {
        let b = pb(17);
        let mut gru = Gru::new(i, hd, &b)?;
        gru.fused = fused;
        let x = rand_var(&[bsz, t, i], 18, 1.0)?;
        let mask = mask_of(&lens, t)?;
        let mut vars = b.finish().params;
        vars.push(("x".into(), x.clone()));
        let f = || proj_loss(&gru.forward(x.as_tensor(), &mask)?, 19);
        assert_ok(&format!("gru fused={fused}"), &check(&vars, f, 60, H, TOL)?);
        let g = f()?.backward()?;
        let gx = g.get(x.as_tensor()).unwrap().to_vec3::<f64>()?;
        for (bi, &l) in lens.iter().enumerate() {
            for (s, row) in gx[bi].iter().enumerate().skip(l) {
                assert!(row.iter().all(|&v| v == 0.0), "pad grad at {bi},{s}");
            }
        }
        // State carried past the valid length.
        let hs = gru.forward(x.as_tensor(), &mask)?.to_vec3::<f64>()?;
        assert_eq!(hs[1][1], hs[1][3]);
        assert!(hs[2][3].iter().all(|&v| v == 0.0));
    }
    Ok(())
}

/// TF1 `GRUCell` initialisation: gate columns inside the gate kernel's
/// Glorot bound, candidate columns inside theirs (and spread to it), biases
/// `-1` (update, Ember's sign), `+1` (reset), `0` (candidate); the uniform
/// default keeps PyTorch's bound and zero bias.
#[test]
fn gru_tf1_initialisation() -> Result<()> {
    let (i, h) = (36usize, 36usize);
    let g = Gru::with_init(i, h, GruInit::Tf1, &pb(3))?;
    let gate_b = (6.0 / (i + 3 * h) as f64).sqrt();
    let cand_b = (6.0 / (i + 2 * h) as f64).sqrt();
    for w in [&g.w_ih, &g.w_hh] {
        let rows = w.as_tensor().to_vec2::<f64>()?;
        let (mut gate_max, mut cand_max) = (0f64, 0f64);
        for r in &rows {
            for (c, &v) in r.iter().enumerate() {
                if c < 2 * h {
                    gate_max = gate_max.max(v.abs());
                } else {
                    cand_max = cand_max.max(v.abs());
                }
            }
        }
        assert!(
            gate_max <= gate_b && gate_max > 0.9 * gate_b,
            "gate {gate_max} vs {gate_b}"
        );
        assert!(
            cand_max <= cand_b && cand_max > gate_b,
            "cand {cand_max} vs {cand_b}"
        );
    }
    let bias = g.bias.as_tensor().to_vec1::<f64>()?;
    assert!(bias[..h].iter().all(|&v| v == -1.0));
    assert!(bias[h..2 * h].iter().all(|&v| v == 1.0));
    assert!(bias[2 * h..].iter().all(|&v| v == 0.0));
    let u = Gru::new(i, h, &pb(3))?;
    let bound = 1.0 / (h as f64).sqrt();
    let w = u.w_hh.as_tensor().flatten_all()?.to_vec1::<f64>()?;
    assert!(w.iter().all(|v| v.abs() <= bound));
    assert!(u
        .bias
        .as_tensor()
        .to_vec1::<f64>()?
        .iter()
        .all(|&v| v == 0.0));
    // Same parameter names and order either way (checkpoints stay compatible).
    let names = |b: &ParamBuilder| {
        b.finish()
            .params
            .into_iter()
            .map(|(n, _)| n)
            .collect::<Vec<_>>()
    };
    let (b1, b2) = (pb(1), pb(1));
    Gru::with_init(4, 3, GruInit::Tf1, &b1)?;
    Gru::new(4, 3, &b2)?;
    assert_eq!(names(&b1), names(&b2));
    Ok(())
}

#[test]
fn attention_grus_gradcheck() -> Result<()> {
    let (bsz, t, hd) = (3, 4, 3);
    let lens = [4, 3, 1];
    for (kind, fused) in [
        EvolveKind::Augru,
        EvolveKind::Agru,
        EvolveKind::Aigru,
        EvolveKind::Gru,
    ]
    .into_iter()
    .flat_map(|k| [(k, false), (k, true)])
    {
        let b = pb(20);
        let mut g = AttentionGru::new(kind, hd, hd, &b)?;
        g.cell.fused = fused;
        let x = rand_var(&[bsz, t, hd], 21, 1.0)?;
        let a = rand_var(&[bsz, t], 22, 1.0)?;
        let mask = mask_of(&lens, t)?;
        let mut vars = b.finish().params;
        vars.push(("x".into(), x.clone()));
        if kind != EvolveKind::Gru {
            vars.push(("a".into(), a.clone()));
        }
        let f = || proj_loss(&g.forward(x.as_tensor(), a.as_tensor(), &mask)?, 23);
        assert_ok(
            &format!("{kind:?} fused={fused}"),
            &check(&vars, f, 60, H, TOL)?,
        );
    }
    Ok(())
}

#[test]
fn augru_attention_zero_freezes_and_one_is_gru() -> Result<()> {
    for fused in [false, true] {
        augru_freeze_case(fused)?;
    }
    Ok(())
}

fn augru_freeze_case(fused: bool) -> Result<()> {
    let (bsz, t, hd) = (2, 5, 4);
    let b = pb(24);
    let mut g = AttentionGru::new(EvolveKind::Augru, hd, hd, &b)?;
    g.cell.fused = fused;
    let x = rand_var(&[bsz, t, hd], 25, 1.0)?;
    let mask = mask_of(&[5, 5], t)?;
    // a = 1 everywhere: the plain GRU with the same parameters.
    let ones = Tensor::ones((bsz, t), DType::F64, &Device::Cpu)?;
    let h1 = g.forward(x.as_tensor(), &ones, &mask)?.to_vec2::<f64>()?;
    let plain = g
        .cell
        .forward(x.as_tensor(), &mask)?
        .narrow(1, t - 1, 1)?
        .squeeze(1)?
        .to_vec2::<f64>()?;
    for (a, b) in h1.iter().flatten().zip(plain.iter().flatten()) {
        assert!((a - b).abs() < 1e-12);
    }
    // a = 1 for the first 2 steps then 0: the state after step 2 is frozen.
    let a = Tensor::new(
        &[[1f64, 1., 0., 0., 0.], [1., 1., 0., 0., 0.]],
        &Device::Cpu,
    )?;
    let frozen = g.forward(x.as_tensor(), &a, &mask)?.to_vec2::<f64>()?;
    let two = g
        .cell
        .forward(&x.as_tensor().narrow(1, 0, 2)?, &mask.narrow(1, 0, 2)?)?
        .narrow(1, 1, 1)?
        .squeeze(1)?
        .to_vec2::<f64>()?;
    for (a, b) in frozen.iter().flatten().zip(two.iter().flatten()) {
        assert!((a - b).abs() < 1e-12);
    }
    // a = 0 everywhere: the initial (zero) state.
    let zeros = Tensor::zeros((bsz, t), DType::F64, &Device::Cpu)?;
    let z = g.forward(x.as_tensor(), &zeros, &mask)?.to_vec2::<f64>()?;
    assert!(z.iter().flatten().all(|&v| v == 0.0));
    Ok(())
}

#[test]
fn aux_loss_gradcheck() -> Result<()> {
    let (bsz, t, hd, e) = (3, 4, 3, 4);
    let lens = [4, 2, 1];
    for fused in [false, true] {
        let b = pb(26);
        let mut aux = AuxNet::new(hd, e, &b)?;
        aux.fused = fused;
        let h = rand_var(&[bsz, t, hd], 27, 1.0)?;
        let pos = rand_var(&[bsz, t, e], 28, 1.0)?;
        let neg = rand_var(&[bsz, t, e], 29, 1.0)?;
        let mask = mask_of(&lens, t)?;
        let mut vars = b.finish().params;
        for (n, v) in [("h", &h), ("pos", &pos), ("neg", &neg)] {
            vars.push((n.into(), v.clone()));
        }
        let f = || aux.loss(h.as_tensor(), pos.as_tensor(), neg.as_tensor(), &mask);
        assert_ok(&format!("aux fused={fused}"), &check(&vars, f, 40, H, TOL)?);
        // Only pairs with t+1 < len count: row 2 (len 1) has none, so its
        // behaviours get zero gradient; row 1 uses pos step 1 only.
        let g = f()?.backward()?;
        let gp = g.get(pos.as_tensor()).unwrap().to_vec3::<f64>()?;
        assert!(gp[2].iter().flatten().all(|&v| v == 0.0));
        assert!(gp[1][2].iter().chain(gp[1][3].iter()).all(|&v| v == 0.0));
        assert!(gp[1][1].iter().any(|&v| v != 0.0));
    }
    Ok(())
}

/// Dice as the attention unit's hidden activation (`attention_activation =
/// "dice"`): the scores are computed for every history step, padded ones
/// included (their keys are the zero pad row), and Dice's training
/// statistics are taken over all `B * T` rows, padded rows too, exactly as
/// the reference DIN code does (its attention FFN runs on the padded
/// `[B * T, 4E]` tensor). The pooled interest still ignores padded steps
/// (mask). Checked against a hand computation with a 1-unit hidden layer.
#[test]
fn attention_dice_statistics_run_over_padded_steps() -> Result<()> {
    use super::mlp::Act;
    let dev = Device::Cpu;
    let b = pb(11);
    // E = 1: FFN input [q, k, q - k, q * k] (4) -> 1 hidden unit (Dice) -> 1.
    let unit = ActivationUnit::new(1, &[1], Activation::Dice, &b)?;
    let (w0, b0, w1, b1) = ([1.0f64, 2.0, 0.5, -1.0], 0.25f64, 1.5f64, -0.1f64);
    let alpha = 0.2f64;
    unit.ffn.layers[0]
        .weight
        .set(&Tensor::new(&[[w0[0]], [w0[1]], [w0[2]], [w0[3]]], &dev)?)?;
    unit.ffn.layers[0].bias.set(&Tensor::new(&[b0], &dev)?)?;
    unit.ffn.layers[1]
        .weight
        .set(&Tensor::new(&[[w1]], &dev)?)?;
    unit.ffn.layers[1].bias.set(&Tensor::new(&[b1], &dev)?)?;
    let Act::Dice(dice) = &unit.ffn.acts[0] else {
        panic!("hidden activation is not Dice");
    };
    dice.alpha.set(&Tensor::new(&[alpha], &dev)?)?;

    // B = 2, T = 3: lengths 2 and 1; padded keys are zero rows.
    let q = [1.0f64, -0.5];
    let k = [[0.5f64, -1.0, 0.0], [2.0, 0.0, 0.0]];
    let lens = [2usize, 1];
    let mask = [[1.0f64, 1.0, 0.0], [1.0, 0.0, 0.0]];
    let qt = Tensor::new(&[[q[0]], [q[1]]], &dev)?;
    let kt = Tensor::new(
        &[
            [[k[0][0]], [k[0][1]], [k[0][2]]],
            [[k[1][0]], [k[1][1]], [k[1][2]]],
        ],
        &dev,
    )?;
    let mt = Tensor::new(&mask, &dev)?;

    // By hand: hidden pre-activation of every (b, t), padded included.
    let mut h = Vec::new();
    for (&qq, keys) in q.iter().zip(&k) {
        for &kk in keys {
            h.push(w0[0] * qq + w0[1] * kk + w0[2] * (qq - kk) + w0[3] * (qq * kk) + b0);
        }
    }
    let stats = |rows: &[f64]| {
        let n = rows.len() as f64;
        let mean = rows.iter().sum::<f64>() / n;
        let var = rows.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var)
    };
    let dice_of = |x: f64, (mean, var): (f64, f64)| {
        let p = 1.0 / (1.0 + (-(x - mean) / (var + 1e-8).sqrt()).exp());
        x * (alpha + p * (1.0 - alpha))
    };
    let all = stats(&h); // over the 6 rows, 3 of them padded
    let valid: Vec<f64> = [0usize, 1, 3].iter().map(|&i| h[i]).collect();
    let only_valid = stats(&valid);
    let want: Vec<f64> = h.iter().map(|&x| w1 * dice_of(x, all) + b1).collect();
    let without_pads: Vec<f64> = h
        .iter()
        .map(|&x| w1 * dice_of(x, only_valid) + b1)
        .collect();

    let s = unit
        .scores(&qt, &kt, &lens, Mode::TRAIN)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    for (i, (a, w)) in s.iter().zip(&want).enumerate() {
        assert!((a - w).abs() < 1e-12, "score {i}: {a} vs hand {w} ({s:?})");
    }
    // The padded rows change the valid steps' scores (the statistics differ).
    assert!(
        (s[0] - without_pads[0]).abs() > 1e-3,
        "padded rows did not enter the statistics: {s:?} vs {without_pads:?}"
    );
    // Running statistics (momentum 0.1, unbiased variance) over the 6 rows.
    let var_u = all.1 * 6.0 / 5.0;
    let rm = dice.running_mean.as_tensor().to_vec1::<f64>()?;
    let rv = dice.running_var.as_tensor().to_vec1::<f64>()?;
    assert!((rm[0] - 0.1 * all.0).abs() < 1e-12, "{rm:?}");
    assert!((rv[0] - (0.9 + 0.1 * var_u)).abs() < 1e-12, "{rv:?}");

    // Pooling (paper mode) uses the valid steps only: v_b = sum_t s * m * k.
    let (v, w) = unit.forward(
        &qt,
        &kt,
        &mt,
        &lens,
        AttentionMode::Paper,
        Mode::TRAIN_FROZEN,
    )?;
    let v = v.flatten_all()?.to_vec1::<f64>()?;
    let w = w.flatten_all()?.to_vec1::<f64>()?;
    for bi in 0..2 {
        let hand: f64 = (0..3)
            .map(|t| want[bi * 3 + t] * mask[bi][t] * k[bi][t])
            .sum();
        assert!(
            (v[bi] - hand).abs() < 1e-12,
            "pooled {bi}: {} vs {hand}",
            v[bi]
        );
    }
    assert_eq!(w[2], 0.0);
    assert_eq!(w[4], 0.0);
    assert_eq!(w[5], 0.0);
    Ok(())
}

#[test]
fn embedding_bag_matches_masked_pooling_and_gradcheck() -> Result<()> {
    use super::embedding::EmbeddingBlock;
    use super::fused_bag::EmbeddingBag;
    use super::pooling::{masked_mean, masked_sum};
    // 3 bags of T = 4 over U = 5 rows (index 5 = padding), one empty bag,
    // a repeated row, and a padded index inside a valid step (id dropout).
    let (u, d, t) = (5, 3, 4);
    let lens = vec![4, 2, 0];
    let idx: Vec<u32> = vec![0, 3, 3, 5, 4, 1, 5, 5, 5, 5, 5, 5];
    let mask: Vec<f64> = lens
        .iter()
        .flat_map(|&l| (0..t).map(move |s| if s < l { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (3, t), &candle_core::Device::Cpu)?;
    let rows = rand_var(&[u, d], 31, 1.0)?;
    for mean in [false, true] {
        let bag = || {
            EmbeddingBag {
                idx: idx.clone(),
                lens: lens.clone(),
                t,
                mean,
            }
            .apply(rows.as_tensor())
        };
        let block = EmbeddingBlock::from_var(rows.clone())?;
        let h = block.lookup(&idx)?.reshape((3, t, d))?;
        let reference = if mean {
            masked_mean(&h, &mask)?
        } else {
            masked_sum(&h, &mask)?
        };
        let (a, b) = (bag()?.to_vec2::<f64>()?, reference.to_vec2::<f64>()?);
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((x - y).abs() < 1e-12, "mean={mean}: {a:?} vs {b:?}");
        }
        // Gradients equal the composed path's (scatter of index_select).
        let ga = proj_loss(&bag()?, 32)?.backward()?;
        let gb = proj_loss(&reference, 32)?.backward()?;
        let (ga, gb) = (
            ga.get(rows.as_tensor()).unwrap().to_vec2::<f64>()?,
            gb.get(rows.as_tensor()).unwrap().to_vec2::<f64>()?,
        );
        for (x, y) in ga.iter().flatten().zip(gb.iter().flatten()) {
            assert!((x - y).abs() < 1e-12, "mean={mean}: grad {ga:?} vs {gb:?}");
        }
        // Row 2 is never referenced: zero gradient.
        assert!(ga[2].iter().all(|&v| v == 0.0));
        let vars = vec![("rows".to_string(), rows.clone())];
        assert_ok(
            &format!("embedding bag mean={mean}"),
            &check(&vars, || proj_loss(&bag()?, 33), 60, H, TOL)?,
        );
    }
    // Wrong shapes are an error, not a panic.
    let bad = EmbeddingBag {
        idx: vec![0; 5],
        lens: vec![1, 1],
        t: 4,
        mean: true,
    };
    assert!(bad.apply(rows.as_tensor()).is_err());
    Ok(())
}

#[test]
fn mm_on_slices_matches_candle_matmul_for_every_transposition() -> Result<()> {
    use super::kernels::mm;
    let (m, k, n) = (7, 5, 3);
    let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
    let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.91).cos()).collect();
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let at = if ta {
            Tensor::from_slice(&a, (k, m), &Device::Cpu)?.t()?
        } else {
            Tensor::from_slice(&a, (m, k), &Device::Cpu)?
        };
        let bt = if tb {
            Tensor::from_slice(&b, (n, k), &Device::Cpu)?.t()?
        } else {
            Tensor::from_slice(&b, (k, n), &Device::Cpu)?
        };
        let want = at.matmul(&bt)?.flatten_all()?.to_vec1::<f64>()?;
        let got = mm(&a, ta, &b, tb, m, k, n)?;
        for (x, y) in got.iter().zip(&want) {
            assert!(
                (x - y).abs() < 1e-12,
                "ta={ta} tb={tb}: {got:?} vs {want:?}"
            );
        }
        let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
        let b32: Vec<f32> = b.iter().map(|&v| v as f32).collect();
        let got32 = mm(&a32, ta, &b32, tb, m, k, n)?;
        for (x, y) in got32.iter().zip(&want) {
            assert!((f64::from(*x) - y).abs() < 1e-5, "f32 ta={ta} tb={tb}");
        }
    }
    assert!(mm(&a, false, &b, false, m, k + 1, n).is_err());
    assert_eq!(
        mm::<f64>(&[], false, &[], false, 0, 0, 3)?,
        Vec::<f64>::new()
    );
    assert_eq!(mm::<f64>(&[], false, &[], false, 2, 0, 2)?, vec![0.0; 4]);
    Ok(())
}
