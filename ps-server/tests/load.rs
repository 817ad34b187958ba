//! Load: 8 concurrent gRPC clients pull and push (SGD) against one shard
//! over loopback for ~3 s. No deadlock (bounded by a timeout), memory
//! bounded (rows <= id space), and the final rows equal a serial replay of
//! the same pushes bit for bit (see `ember_ps::load`).

use ember_ps::load::{run, LoadConfig};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_match_serial_replay() {
    let cfg = LoadConfig {
        clients: 8,
        duration: Duration::from_secs(3),
        rows: 20_000,
        dim: 8,
        batch: 256,
        seed: 5,
    };
    let r = tokio::time::timeout(Duration::from_secs(60), run(cfg.clone()))
        .await
        .expect("load run deadlocked")
        .unwrap();
    println!("{}", r.markdown(&cfg));
    assert!(r.rounds.iter().all(|&n| n > 0), "a client starved: {r:?}");
    assert_eq!(r.mismatched_rows, 0, "{r:?}");
    assert!(r.stored_rows <= cfg.rows);
    // 20k rows x (5 + 8) f32 + index: a few MB at most.
    assert!(r.resident_bytes < 16 << 20, "{r:?}");
}
