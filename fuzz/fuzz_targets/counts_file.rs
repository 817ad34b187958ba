//! Fuzz target: the counts-file decoder
//! (`ember_worker::data::counts::decode_counts`, the code behind
//! `load_counts`).
//!
//! Each input is decoded as a whole file (magic / size / sha256 checks) and,
//! with a correct sha256 appended, as a file body, so the parser (version,
//! table count, name lengths, id counts) sees the input itself. Accepted
//! input must be canonical: it encodes back to the same bytes.
#![no_main]

use ember_worker::data::counts::{decode_counts, encode_counts};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let label = Path::new("fuzz/counts.bin");
    let _ = decode_counts(label, data);
    let mut sealed = data.to_vec();
    sealed.extend_from_slice(&Sha256::digest(data));
    if let Ok(c) = decode_counts(label, &sealed) {
        assert_eq!(encode_counts(&c), sealed, "accepted a non-canonical file");
    }
});
