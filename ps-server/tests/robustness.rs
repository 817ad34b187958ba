//! Bad input: property tests of every request type through the `Shard` API
//! and of Pull / Push / PushDense / LoadCounts over real gRPC on loopback.
//! Random ids, lengths, dims, NaN/Inf, empty batches, huge counts: the shard
//! never panics, answers the status an oracle predicts, and a rejected
//! request leaves its full state unchanged: Stats, every stored row
//! (embedding, optimizer state, count, step), pending counts, dense values
//! and step (`common::full_state`).

mod common;

use bytes::Bytes;
use ember_proto::codec::{decode_f32, encode_f32, encode_u32, encode_u64};
use ember_proto::v1::parameter_server_client::ParameterServerClient;
use ember_proto::v1::*;
use ember_ps::{DenseTensor, PsError, Shard, ShardConfig};
use proptest::prelude::*;
use std::collections::HashSet;
use tonic::Code;

const DIM: usize = 4;
const PROBE: [u64; 6] = [0, 1, 2, 3, 1000, u64::MAX];

fn table_cfg(name: &str) -> TableConfig {
    TableConfig {
        name: name.into(),
        dim: DIM as u32,
        init: Some(Initializer {
            kind: initializer::Kind::Uniform as i32,
            scale: 0.05,
        }),
        seed: 3,
        optimizer: Some(OptimizerConfig {
            kind: Some(optimizer_config::Kind::Adagrad(Adagrad {
                lr: 0.1,
                initial_accumulator: 0.1,
                eps: 1e-8,
            })),
        }),
        mba_lambda: 0.01,
        count_mode: CountMode::CountOnline as i32,
        ..Default::default()
    }
}

/// A shard with table `t` (rows 0..4 pushed) and dense params `a` (3) and `b` (2).
fn shard() -> Shard {
    let s = Shard::new(ShardConfig::default()).unwrap();
    s.create_table(table_cfg("t")).unwrap();
    s.push("t", &[0, 1, 2, 3], &[0.25; 16], &[1, 2, 3, 4], 1)
        .unwrap();
    s.init_dense(
        &[
            DenseTensor::new("a", vec![0.5; 3]),
            DenseTensor::new("b", vec![-1.0; 2]),
        ],
        None,
    )
    .unwrap();
    s
}

/// Everything a rejected request must not change (rows_pulled and
/// rejected excluded: probing pulls, rejections count).
#[derive(Debug, PartialEq)]
struct State {
    tables: Vec<TableInfo>,
    dense_step: u64,
    rows_pushed: u64,
    probe: Vec<u32>,
    full: common::FullState,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn state(s: &Shard) -> State {
    let st = s.stats();
    let mut out = Vec::new();
    s.pull("t", &PROBE, &mut out).unwrap();
    State {
        tables: st.tables,
        dense_step: st.dense_step,
        rows_pushed: st.rows_pushed,
        probe: bits(&out),
        full: common::full_state(s),
    }
}

/// Checks the outcome against the oracle's expected code (`None` = ok) and,
/// on rejection, that the state is unchanged and `rejected` grew by one.
fn check<T: std::fmt::Debug>(
    s: &Shard,
    before: &State,
    rejected0: u64,
    r: Result<T, PsError>,
    want: Option<Code>,
) -> Result<(), TestCaseError> {
    match (r, want) {
        (Ok(_), None) => {}
        (Err(e), Some(code)) => {
            prop_assert_eq!(e.code(), code, "{}", e);
            prop_assert_eq!(&state(s), before);
            prop_assert_eq!(s.stats().rejected, rejected0 + 1);
        }
        (r, want) => prop_assert!(false, "got {:?}, expected {:?}", r, want),
    }
    Ok(())
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => -4.0f32..4.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(f32::MAX),
    ]
}

fn id() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..8, any::<u64>()]
}

fn count() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), 1u32..5, Just(u32::MAX)]
}

fn table_name() -> impl Strategy<Value = String> {
    prop_oneof![4 => Just("t".to_string()), 1 => Just("nope".to_string()), 1 => Just(String::new())]
}

fn dense_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("zz".to_string())
    ]
}

fn dense_len(name: &str) -> Option<usize> {
    match name {
        "a" => Some(3),
        "b" => Some(2),
        _ => None,
    }
}

/// Oracle of a sparse push.
fn push_oracle(table: &str, ids: &[u64], grads: &[f32], counts: &[u32]) -> Option<Code> {
    if table != "t" {
        return Some(Code::NotFound);
    }
    let unique = ids.iter().collect::<HashSet<_>>().len() == ids.len();
    let ok = grads.len() == ids.len() * DIM
        && (counts.is_empty() || counts.len() == ids.len())
        && !counts.contains(&0)
        && grads.iter().all(|g| g.is_finite())
        && unique;
    (!ok).then_some(Code::InvalidArgument)
}

/// Oracle of PushDense / AssignDense (same validation).
fn dense_oracle(grads: &[DenseTensor]) -> Option<Code> {
    let mut seen = HashSet::new();
    if !grads.iter().all(|g| seen.insert(g.name.clone())) {
        return Some(Code::InvalidArgument);
    }
    for g in grads {
        match dense_len(&g.name) {
            None => return Some(Code::NotFound),
            Some(n) if n != g.values.len() => return Some(Code::InvalidArgument),
            _ => {}
        }
        if !g.values.iter().all(|v| v.is_finite()) {
            return Some(Code::InvalidArgument);
        }
    }
    None
}

fn push_case() -> impl Strategy<Value = (String, Vec<u64>, Vec<f32>, Vec<u32>)> {
    (table_name(), prop::collection::vec(id(), 0..6)).prop_flat_map(|(t, ids)| {
        let n = ids.len();
        (
            Just(t),
            Just(ids),
            prop_oneof![
                4 => prop::collection::vec(float(), n * DIM..=n * DIM),
                1 => prop::collection::vec(float(), 0..(n + 2) * DIM),
            ],
            prop_oneof![
                Just(Vec::new()),
                prop::collection::vec(count(), n..=n),
                prop::collection::vec(count(), 0..n + 2),
            ],
        )
    })
}

fn dense_case() -> impl Strategy<Value = Vec<DenseTensor>> {
    prop::collection::vec((dense_name(), prop::collection::vec(float(), 0..5)), 0..4).prop_map(
        |v| {
            v.into_iter()
                .map(|(n, vals)| DenseTensor::new(n, vals))
                .collect()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn shard_push((table, ids, grads, counts) in push_case(), step in any::<u64>()) {
        let s = shard();
        let (before, rej) = (state(&s), s.stats().rejected);
        let want = push_oracle(&table, &ids, &grads, &counts);
        check(&s, &before, rej, s.push(&table, &ids, &grads, &counts, step), want)?;
    }

    #[test]
    fn shard_pull(table in table_name(), ids in prop::collection::vec(id(), 0..10)) {
        let s = shard();
        let (before, rej) = (state(&s), s.stats().rejected);
        let mut out = Vec::new();
        let r = s.pull(&table, &ids, &mut out);
        let want = (table != "t").then_some(Code::NotFound);
        if want.is_none() {
            prop_assert_eq!(out.len(), ids.len() * DIM);
            prop_assert!(out.iter().all(|v| v.is_finite()));
            // A pull stores nothing.
            prop_assert_eq!(&state(&s), &before);
        }
        check(&s, &before, rej, r, want)?;
    }

    #[test]
    fn shard_load_counts(
        table in table_name(),
        ids in prop::collection::vec(id(), 0..6),
        counts in prop::collection::vec(count(), 0..7),
        replace in any::<bool>(),
    ) {
        let s = shard();
        let (before, rej) = (state(&s), s.stats().rejected);
        let want = if table != "t" {
            Some(Code::NotFound)
        } else if ids.len() != counts.len() {
            Some(Code::InvalidArgument)
        } else {
            None
        };
        check(&s, &before, rej, s.load_counts(&table, &ids, &counts, replace), want)?;
    }

    #[test]
    fn shard_dense(
        grads in dense_case(),
        num_workers in prop_oneof![Just(0u32), Just(1u32), 2u32..4],
        worker in 0u32..4,
        assign in any::<bool>(),
    ) {
        let s = shard();
        let (before, rej) = (state(&s), s.stats().rejected);
        let mut want = dense_oracle(&grads);
        if assign {
            check(&s, &before, rej, s.assign_dense(&grads), want)?;
        } else {
            if want.is_none() && num_workers > 1 && worker >= num_workers {
                want = Some(Code::InvalidArgument);
            }
            check(&s, &before, rej, s.push_dense(&grads, 0, num_workers, worker), want)?;
        }
    }

    #[test]
    fn shard_init_and_pull_dense(
        params in dense_case(),
        names in prop::collection::vec(dense_name(), 0..3),
    ) {
        let s = shard();
        let (before, rej) = (state(&s), s.stats().rejected);
        // Never panics; a rejection changes nothing.
        if let Err(e) = s.init_dense(&params, None) {
            prop_assert!(matches!(e.code(), Code::InvalidArgument | Code::NotFound), "{}", e);
            prop_assert_eq!(&state(&s), &before);
            prop_assert_eq!(s.stats().rejected, rej + 1);
        }
        let s = shard();
        let (before, rej) = (state(&s), s.stats().rejected);
        let want = names.iter().any(|n| dense_len(n).is_none()).then_some(Code::NotFound);
        check(&s, &before, rej, s.pull_dense(&names), want)?;
    }

    #[test]
    fn shard_create_table(
        name in prop_oneof![Just("t".to_string()), Just("u".to_string()), Just(String::new()), Just("x".repeat(200))],
        dim in prop_oneof![Just(0u32), 1u32..8, Just(5000u32)],
        scale in float(),
        lambda in float(),
        mode in 0i32..4,
        kind in 0i32..5,
    ) {
        let s = shard();
        let (before, rej) = (state(&s), s.stats().rejected);
        let mut c = table_cfg(&name);
        c.dim = dim;
        c.init = Some(Initializer { kind, scale });
        c.mba_lambda = lambda;
        c.count_mode = mode;
        match s.create_table(c) {
            Ok(_) => {}
            Err(e) => {
                prop_assert_eq!(e.code(), Code::InvalidArgument, "{}", e);
                prop_assert_eq!(&state(&s), &before);
                prop_assert_eq!(s.stats().rejected, rej + 1);
            }
        }
    }
}

// ---- over real gRPC ----

type Client = ParameterServerClient<tonic::transport::Channel>;

/// Wire-level state: Stats (minus rows_pulled / rejected) + probe rows.
async fn wire_state(c: &mut Client) -> (StatsResponse, Vec<u8>, u64) {
    let mut st = c.stats(StatsRequest {}).await.unwrap().into_inner();
    let rej = st.rejected;
    st.rejected = 0;
    st.rows_pulled = 0;
    let rows = c
        .pull(PullRequest {
            table: "t".into(),
            ids: encode_u64(&PROBE),
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    let d = c
        .pull_dense(PullDenseRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut all = rows.to_vec();
    for p in d.params {
        all.extend_from_slice(&p.values);
    }
    (st, all, rej)
}

/// Ragged byte strings: usually well-formed, sometimes cut.
fn ragged(b: Bytes, cut: Option<usize>) -> Bytes {
    match cut {
        Some(k) if !b.is_empty() => b.slice(..b.len() - 1 - k % b.len()),
        _ => b,
    }
}

/// One gRPC case: request kind, push fields, byte cut, dense tensors.
type GrpcCase = (
    u8,
    (String, Vec<u64>, Vec<f32>, Vec<u32>),
    Option<usize>,
    Vec<DenseTensor>,
);

fn grpc_case() -> impl Strategy<Value = GrpcCase> {
    (
        0u8..4,
        push_case(),
        prop_oneof![4 => Just(None), 1 => (0usize..16).prop_map(Some)],
        dense_case(),
    )
}

#[test]
fn grpc_bad_inputs_never_panic_and_change_nothing() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (rs, client) = rt.block_on(async {
        let rs = ember_ps::spawn(ember_ps::ServerConfig::local(0, 1))
            .await
            .unwrap();
        let ch = ember_ps::client_endpoint(rs.addr)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = ParameterServerClient::new(ch);
        c.create_table(CreateTableRequest {
            config: Some(table_cfg("t")),
        })
        .await
        .unwrap();
        (rs, c)
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let mut c = client;
    rt.block_on(async {
        c.init_dense(InitDenseRequest {
            params: vec![
                DenseParam {
                    name: "a".into(),
                    values: encode_f32(&[0.5; 3]),
                },
                DenseParam {
                    name: "b".into(),
                    values: encode_f32(&[-1.0; 2]),
                },
            ],
            optimizer: None,
        })
        .await
        .unwrap();
    });
    runner
        .run(
            &grpc_case(),
            |(kind, (table, ids, grads, counts), cut, dense)| {
                // Accepted requests change the state; each case compares its
                // own before / after.
                let mut c = c.clone();
                rt.block_on(async {
                    let (before, rows_before, rej) = wire_state(&mut c).await;
                    let (r, want): (Result<(), tonic::Status>, Option<Code>) = match kind {
                        0 => {
                            let idb = ragged(encode_u64(&ids), cut);
                            let want = if !idb.len().is_multiple_of(8) {
                                Some(Code::InvalidArgument)
                            } else if table != "t" {
                                Some(Code::NotFound)
                            } else {
                                None
                            };
                            let r = c
                                .pull(PullRequest {
                                    table: table.clone(),
                                    ids: idb.clone(),
                                })
                                .await;
                            if let Ok(resp) = &r {
                                let rows = decode_f32("rows", &resp.get_ref().rows).unwrap();
                                prop_assert_eq!(rows.len(), idb.len() / 8 * DIM);
                            }
                            (r.map(|_| ()), want)
                        }
                        1 => {
                            let gb = ragged(encode_f32(&grads), cut.filter(|k| k % 2 == 0));
                            let idb = ragged(encode_u64(&ids), cut.filter(|k| k % 2 == 1));
                            let want =
                                if !idb.len().is_multiple_of(8) || !gb.len().is_multiple_of(4) {
                                    Some(Code::InvalidArgument)
                                } else {
                                    let g = decode_f32("g", &gb).unwrap();
                                    let i: Vec<u64> = ids[..idb.len() / 8].to_vec();
                                    push_oracle(&table, &i, &g, &counts)
                                };
                            let r = c
                                .push(PushRequest {
                                    table: table.clone(),
                                    ids: idb,
                                    grads: gb,
                                    counts: encode_u32(&counts),
                                    step: 7,
                                    request_id: 0,
                                })
                                .await;
                            (r.map(|_| ()), want)
                        }
                        2 => {
                            let want = dense_oracle(&dense);
                            let r = c
                                .push_dense(PushDenseRequest {
                                    grads: dense
                                        .iter()
                                        .map(|t| DenseParam {
                                            name: t.name.clone(),
                                            values: encode_f32(&t.values),
                                        })
                                        .collect(),
                                    step: 0,
                                    num_workers: 1,
                                    worker_index: 0,
                                })
                                .await;
                            (r.map(|_| ()), want)
                        }
                        _ => {
                            let idb = ragged(encode_u64(&ids), cut);
                            let want = if !idb.len().is_multiple_of(8) {
                                Some(Code::InvalidArgument)
                            } else if table != "t" {
                                Some(Code::NotFound)
                            } else if idb.len() / 8 != counts.len() {
                                Some(Code::InvalidArgument)
                            } else {
                                None
                            };
                            let r = c
                                .load_counts(LoadCountsRequest {
                                    table: table.clone(),
                                    ids: idb,
                                    counts: encode_u32(&counts),
                                    replace: false,
                                })
                                .await;
                            (r.map(|_| ()), want)
                        }
                    };
                    match (&r, want) {
                        (Ok(()), None) => {}
                        (Err(e), Some(code)) => {
                            prop_assert_eq!(e.code(), code, "{:?}", e);
                            let (after, rows_after, rej2) = wire_state(&mut c).await;
                            prop_assert_eq!(after, before);
                            prop_assert_eq!(rows_after, rows_before);
                            prop_assert_eq!(rej2, rej + 1);
                        }
                        _ => prop_assert!(false, "kind {}: got {:?}, expected {:?}", kind, r, want),
                    }
                    Ok(())
                })?;
                Ok(())
            },
        )
        .unwrap();
    rt.block_on(rs.shutdown()).unwrap();
}
