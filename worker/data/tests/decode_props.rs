//! The worker's decoders against hostile input (the stable-toolchain
//! companions of the `counts_file` and `sample_line` fuzz targets in
//! `fuzz/`): the counts-file decoder and the sample-line reader never panic,
//! never allocate from an untrusted length, reject every corruption of a
//! valid counts file, and accept only canonical input.

use ember_data::batch::Sample;
use ember_data::counts::{decode_counts, encode_counts, TableCounts, MAGIC, VERSION};
use ember_data::format::encode_sample;
use ember_data::reader::SampleReader;
use ember_data::DataError;
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use std::path::Path;

const LABEL: &str = "data/counts.bin";

fn decode(b: &[u8]) -> Result<TableCounts, DataError> {
    decode_counts(Path::new(LABEL), b)
}

/// Appends the sha256 trailer, so that the body parser itself sees `body`.
fn seal(body: &[u8]) -> Vec<u8> {
    let mut b = body.to_vec();
    b.extend_from_slice(&Sha256::digest(body));
    b
}

fn header(n_tables: u32, samples: u64) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&n_tables.to_le_bytes());
    b.extend_from_slice(&samples.to_le_bytes());
    b
}

fn assert_counts_error(r: Result<TableCounts, DataError>, what: &str) {
    match r {
        Err(DataError::Counts { path, reason }) => {
            assert_eq!(path, Path::new(LABEL), "{what}: {reason}");
        }
        other => panic!("{what}: {other:?}"),
    }
}

fn counts() -> impl Strategy<Value = TableCounts> {
    let table = (
        "[a-z_]{0,12}",
        prop::collection::btree_map(1u64.., any::<u32>(), 0..40),
    )
        .prop_map(|(name, m)| (name, m.into_iter().collect::<Vec<_>>()));
    (any::<u64>(), prop::collection::vec(table, 0..4))
        .prop_map(|(samples, tables)| TableCounts { samples, tables })
}

#[test]
fn huge_length_fields_are_rejected() {
    let mut t = header(1, 5);
    t.extend_from_slice(&4u16.to_le_bytes());
    t.extend_from_slice(b"item");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("u32::MAX tables", header(u32::MAX, 0)),
        ("u64::MAX ids", [&t[..], &u64::MAX.to_le_bytes()].concat()),
        (
            "ids * 12 overflows",
            [&t[..], &(u64::MAX / 12).to_le_bytes()].concat(),
        ),
        (
            "ids * 12 just past usize",
            [&t[..], &(usize::MAX as u64 / 12 + 1).to_le_bytes()].concat(),
        ),
        ("2^40 ids", [&t[..], &(1u64 << 40).to_le_bytes()].concat()),
        (
            "name of 65535 bytes",
            [&header(1, 5)[..], &u16::MAX.to_le_bytes()].concat(),
        ),
    ];
    for (what, body) in cases {
        assert_counts_error(decode(&seal(&body)), what);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// Valid files round-trip; any one changed byte, truncation or extra
    /// byte is rejected as a counts error.
    #[test]
    fn counts_round_trip_and_corruption_is_rejected(
        c in counts(),
        i in any::<prop::sample::Index>(),
        x in 1u8..=255,
        cut in any::<prop::sample::Index>(),
        extra in prop::collection::vec(any::<u8>(), 1..40),
    ) {
        let b = encode_counts(&c);
        prop_assert_eq!(decode(&b).unwrap(), c);
        let mut flipped = b.clone();
        flipped[i.index(b.len())] ^= x;
        assert_counts_error(decode(&flipped), "flipped byte");
        assert_counts_error(decode(&b[..cut.index(b.len())]), "truncated");
        assert_counts_error(decode(&[&b[..], &extra].concat()), "extended");
    }

    /// Arbitrary bytes: an error, never a panic.
    #[test]
    fn random_bytes_are_rejected(b in prop::collection::vec(any::<u8>(), 0..300)) {
        prop_assert!(decode(&b).is_err());
    }

    /// Arbitrary bodies behind a valid header and checksum reach the
    /// parser: never a panic, and whatever it accepts is canonical (it
    /// encodes back to the same bytes).
    #[test]
    fn sealed_random_bodies_never_panic(
        n_tables in 0u32..5,
        tail in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let body = [&header(n_tables, 9)[..], &tail].concat();
        let b = seal(&body);
        if let Ok(c) = decode(&b) {
            prop_assert_eq!(encode_counts(&c), b);
        }
    }

    /// A real file with random edits, resealed: never a panic; accepted
    /// files are canonical.
    #[test]
    fn sealed_mutations_never_panic(
        c in counts(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..5),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let b = encode_counts(&c);
        let mut body = b[..b.len() - 32].to_vec();
        for (i, v) in edits {
            let i = i.index(body.len());
            body[i] = v;
        }
        if truncate {
            body.truncate(cut.index(body.len()));
        }
        let sealed = seal(&body);
        if let Ok(c) = decode(&sealed) {
            prop_assert_eq!(encode_counts(&c), sealed);
        }
    }
}

fn read_all(text: &[u8], skip: bool) -> (Vec<Result<Sample, String>>, u64) {
    let mut r = SampleReader::from_reader(
        "mem/train.txt",
        std::io::Cursor::new(text.to_vec()),
        0,
        1,
        skip,
    )
    .unwrap();
    let mut out = Vec::new();
    loop {
        match r.read() {
            Ok(Some(s)) => out.push(Ok(s)),
            Ok(None) => break,
            Err(e) => {
                out.push(Err(e.to_string()));
                break;
            }
        }
    }
    (out, r.skipped())
}

/// A line: either a sample-shaped one (6 or 8 columns of plausible or
/// slightly wrong values) or plausible pieces (digits, separators, junk).
fn line() -> impl Strategy<Value = Vec<u8>> {
    let id = prop_oneof![
        12 => "[0-9]{1,4}",
        1 => Just("18446744073709551615".to_string()),
        1 => Just("18446744073709551616".to_string()),
        1 => Just(String::new()),
        1 => Just("x1".to_string()),
    ]
    .boxed();
    let label = prop_oneof![
        4 => Just("0"),
        4 => Just("1"),
        1 => Just("1.0"),
        1 => Just("-0"),
        1 => Just("2"),
        1 => Just("")
    ]
    .boxed();
    let list = |n: std::ops::RangeInclusive<usize>| {
        prop::collection::vec("[0-9]{1,3}", n).prop_map(|v| v.join("\u{2}"))
    };
    // Lists mostly of the history's length, sometimes not.
    let sample = (0usize..4)
        .prop_flat_map(move |n| {
            (
                label.clone(),
                id.clone(),
                id.clone(),
                id.clone(),
                list(n..=n),
                prop_oneof![6 => list(n..=n), 1 => list(0..=3)],
                prop::option::of((list(n..=n), prop_oneof![6 => list(n..=n), 1 => list(0..=3)])),
                any::<bool>(),
            )
        })
        .prop_map(|(l, u, i, c, h, hc, neg, crlf)| {
            let mut cols = vec![l.to_string(), u, i, c, h, hc];
            if let Some((n, nc)) = neg {
                cols.extend([n, nc]);
            }
            let mut s = cols.join("\t");
            if crlf {
                s.push('\r');
            }
            s.into_bytes()
        });
    let piece = prop_oneof![
        4 => "[0-9]{1,3}".prop_map(String::into_bytes),
        3 => Just(b"\t".to_vec()),
        2 => Just(vec![0x02]),
        1 => prop::collection::vec(any::<u8>(), 1..3),
        1 => Just(b"99999999999999999999999".to_vec()),
        1 => Just(b"\r".to_vec()),
    ];
    let pieces = prop::collection::vec(piece, 0..24).prop_map(|v| v.concat());
    prop_oneof![3 => sample, 1 => pieces]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random lines: the reader never panics; every sample it returns
    /// satisfies the format's invariants and re-encodes to a line that
    /// parses to the same sample; every error names the stream, the line
    /// and the column; skipping counts exactly the malformed lines.
    #[test]
    fn sample_reader_never_panics(lines in prop::collection::vec(line(), 0..6)) {
        let text = lines.join(&b'\n');
        let (strict, _) = read_all(&text, false);
        let (skipping, skipped) = read_all(&text, true);
        let ok: Vec<&Sample> = skipping.iter().map(|r| r.as_ref().unwrap()).collect();
        let newlines = text.iter().filter(|&&c| c == b'\n').count() as u64;
        let n_lines = newlines + u64::from(text.last().is_some_and(|&c| c != b'\n'));
        prop_assert_eq!(ok.len() as u64 + skipped, n_lines);
        for s in &ok {
            prop_assert_eq!(s.hist_cats.len(), s.hist_items.len());
            prop_assert!(s.neg_items.is_empty() || s.neg_items.len() == s.hist_items.len());
            prop_assert!(s.label == 0.0 || s.label == 1.0);
            let mut enc = Vec::new();
            encode_sample(&mut enc, s, false);
            let (back, _) = read_all(&enc, false);
            prop_assert_eq!(back.len(), 1);
            prop_assert_eq!(back[0].as_ref().unwrap(), *s);
        }
        for (k, r) in strict.iter().enumerate() {
            match r {
                Ok(s) => prop_assert_eq!(s, ok[k]),
                Err(e) => {
                    let want = format!("mem/train.txt:{}: column ", k + 1);
                    prop_assert!(e.starts_with(&want), "{} / {}", e, want);
                }
            }
        }
    }
}

/// Writes the seed corpora of the `counts_file` and `sample_line` fuzz
/// targets from real files: `cargo test -p ember-data --test decode_props
/// write_fuzz_seeds -- --ignored` (see docs/fuzzing.md).
#[test]
#[ignore = "writes fuzz/corpus/{counts_file,sample_line}"]
fn write_fuzz_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let counts_dir = root.join("counts_file");
    let lines_dir = root.join("sample_line");
    std::fs::create_dir_all(&counts_dir).unwrap();
    std::fs::create_dir_all(&lines_dir).unwrap();
    let c = TableCounts {
        samples: 3,
        tables: vec![
            ("item".into(), vec![(1, 2), (5, 1), (u64::MAX, 7)]),
            ("cat".into(), vec![]),
            ("user".into(), vec![(9, 3)]),
        ],
    };
    let file = encode_counts(&c);
    std::fs::write(
        counts_dir.join("body-three-tables"),
        &file[..file.len() - 32],
    )
    .unwrap();
    std::fs::write(counts_dir.join("file-three-tables"), &file).unwrap();
    let din = Sample {
        label: 1.0,
        user: 3,
        item: 10,
        cat: 2,
        hist_items: vec![4, 5, 6],
        hist_cats: vec![1, 2, 1],
        ..Sample::default()
    };
    let dien = Sample {
        label: 0.0,
        neg_items: vec![7, 8, 9],
        neg_cats: vec![2, 2, 1],
        ..din.clone()
    };
    let empty = Sample {
        hist_items: vec![],
        hist_cats: vec![],
        ..din.clone()
    };
    let mut text = Vec::new();
    for s in [&din, &dien, &empty] {
        encode_sample(&mut text, s, false);
    }
    for (name, opts, tail) in [
        ("din-dien-empty", 0u8, &b""[..]),
        ("crlf-two-workers", 0b0000_0010, &b"0\t1\t2\t3\t\t\r\n"[..]),
        (
            "malformed-skip",
            0b0010_0001,
            &b"1.0\t1\t2\t3\t4\x025\t1\n"[..],
        ),
    ] {
        let mut b = vec![opts];
        b.extend_from_slice(&text);
        b.extend_from_slice(tail);
        std::fs::write(lines_dir.join(name), b).unwrap();
    }
}
