//! Fuzz target: the sample-file reader (`SampleReader`: line splitting,
//! worker split, the DIEN-format line parser, long-line and malformed-line
//! handling) over an in-memory stream, and `Batch::from_samples` over what
//! it accepts.
//!
//! The first byte chooses the options (skip malformed lines, worker `i` of
//! `M`, history `max_len`); the rest is the file. Every accepted sample must
//! satisfy the format's invariants and re-encode to a line that parses to
//! the same sample; every error must name the stream and the line.
#![no_main]

use ember_worker::batch::{Batch, Sample};
use ember_worker::data::format::{encode_sample, parse_sample};
use ember_worker::data::reader::SampleReader;
use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&opts, text)) = data.split_first() else {
        return;
    };
    let skip = opts & 1 != 0;
    let m = 1 + usize::from((opts >> 1) & 3);
    let i = usize::from(opts >> 3) % m;
    let max_len = 1 + usize::from(opts >> 5);
    let mut r = SampleReader::from_reader("fuzz/train.txt", Cursor::new(text.to_vec()), i, m, skip)
        .expect("valid options");
    let mut samples: Vec<Sample> = Vec::new();
    for x in &mut r {
        match x {
            Ok(s) => {
                assert_eq!(s.hist_cats.len(), s.hist_items.len());
                assert!(s.neg_items.is_empty() || s.neg_items.len() == s.hist_items.len());
                assert_eq!(s.neg_cats.len(), s.neg_items.len());
                assert!(s.label == 0.0 || s.label == 1.0);
                let mut line = Vec::new();
                encode_sample(&mut line, &s, false);
                let back = parse_sample(Path::new("re"), 1, &line[..line.len() - 1])
                    .expect("an encoded sample parses");
                assert_eq!(back, s);
                samples.push(s);
            }
            Err(e) => {
                assert!(!skip, "skip_malformed returned {e}");
                let msg = e.to_string();
                assert!(msg.starts_with("fuzz/train.txt:"), "{msg}");
                break;
            }
        }
    }
    if !samples.is_empty() {
        let b = Batch::from_samples(&samples, max_len);
        assert_eq!(b.batch_size, samples.len());
    }
});
