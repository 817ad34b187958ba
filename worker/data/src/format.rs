//! The sample text format (DIEN's): one sample per line, tab-separated
//! columns, list elements separated by the byte 0x02:
//!
//! ```text
//! label  user_id  item_id  cat_id  hist_item_ids  hist_cat_ids  [neg_hist_item_ids  neg_hist_cat_ids]
//! ```
//!
//! Ember's files carry numeric ids (already remapped, 0 = padding). The label
//! is `0` or `1` (written as integers; the parser also accepts `0.0`/`1.0`).
//! Lists may be empty (an empty column). `hist_cat_ids` must have as many
//! elements as `hist_item_ids`; when the two DIEN columns are present they must
//! both have that length too. A trailing `\r` is ignored.
//!
//! The user-sequence file (GRU4Rec) has one line per user:
//! `user_id \t item_1 0x02 item_2 0x02 ...`, items in time order.

use std::io::{self, Write};
use std::path::Path;

use super::DataError;
use crate::batch::Sample;

/// List element separator (0x02).
pub const LIST_SEP: u8 = 0x02;

/// Names of the columns, in order (used in error messages).
pub const COLUMNS: [&str; 8] = [
    "label",
    "user_id",
    "item_id",
    "cat_id",
    "hist_item_ids",
    "hist_cat_ids",
    "neg_hist_item_ids",
    "neg_hist_cat_ids",
];

/// Appends `v` in decimal to `out` (no allocation).
#[inline]
pub fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends ids joined by [`LIST_SEP`].
#[inline]
pub fn push_list(out: &mut Vec<u8>, ids: &[u64]) {
    for (k, &id) in ids.iter().enumerate() {
        if k > 0 {
            out.push(LIST_SEP);
        }
        push_u64(out, id);
    }
}

/// Appends one sample as a line (with `\n`) to `out`. DIEN columns are
/// written when `s.neg_items` is non-empty or `with_neg` is set.
pub fn encode_sample(out: &mut Vec<u8>, s: &Sample, with_neg: bool) {
    out.push(if s.label >= 0.5 { b'1' } else { b'0' });
    for id in [s.user, s.item, s.cat] {
        out.push(b'\t');
        push_u64(out, id);
    }
    out.push(b'\t');
    push_list(out, &s.hist_items);
    out.push(b'\t');
    push_list(out, &s.hist_cats);
    if with_neg || !s.neg_items.is_empty() {
        out.push(b'\t');
        push_list(out, &s.neg_items);
        out.push(b'\t');
        push_list(out, &s.neg_cats);
    }
    out.push(b'\n');
}

/// Writes one sample as a line to `w`.
pub fn write_sample<W: Write>(w: &mut W, s: &Sample, with_neg: bool) -> io::Result<()> {
    let mut buf = Vec::with_capacity(256);
    encode_sample(&mut buf, s, with_neg);
    w.write_all(&buf)
}

/// Shortened, lossy rendering of a bad value for error messages.
pub(crate) fn show(value: &[u8]) -> String {
    const MAX: usize = 48;
    let s = String::from_utf8_lossy(&value[..value.len().min(MAX)]).replace('\u{2}', "^B");
    if value.len() > MAX {
        format!("{s}...")
    } else {
        s
    }
}

/// Parses a decimal u64 (ASCII digits only, no sign, no spaces).
#[inline]
pub fn parse_u64(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in b {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// Error context for one line: file and 1-based line number.
#[derive(Clone, Copy)]
pub(crate) struct LineCtx<'a> {
    pub path: &'a Path,
    pub line: u64,
}

impl LineCtx<'_> {
    pub(crate) fn err(&self, column: &str, value: &[u8], reason: impl Into<String>) -> DataError {
        DataError::Malformed {
            path: self.path.to_path_buf(),
            line: self.line,
            column: column.to_string(),
            value: show(value),
            reason: reason.into(),
        }
    }
}

#[inline]
fn parse_id(ctx: LineCtx<'_>, col: usize, b: &[u8]) -> Result<u64, DataError> {
    parse_u64(b).ok_or_else(|| ctx.err(COLUMNS[col], b, "not an unsigned 64-bit integer id"))
}

fn parse_list(ctx: LineCtx<'_>, col: usize, b: &[u8], out: &mut Vec<u64>) -> Result<(), DataError> {
    out.clear();
    if b.is_empty() {
        return Ok(());
    }
    for (k, e) in b.split(|&c| c == LIST_SEP).enumerate() {
        match parse_u64(e) {
            Some(v) => out.push(v),
            None => {
                return Err(ctx.err(
                    COLUMNS[col],
                    e,
                    format!("element {k} is not an unsigned 64-bit integer id"),
                ))
            }
        }
    }
    Ok(())
}

fn parse_label(ctx: LineCtx<'_>, b: &[u8]) -> Result<f32, DataError> {
    match b {
        b"1" => return Ok(1.0),
        b"0" => return Ok(0.0),
        _ => {}
    }
    let v: Option<f32> = std::str::from_utf8(b).ok().and_then(|s| s.parse().ok());
    match v {
        Some(v) if v == 0.0 || v == 1.0 => Ok(v),
        _ => Err(ctx.err(COLUMNS[0], b, "label must be 0 or 1")),
    }
}

/// Parses one line (without its `\n`) into `s`, reusing its vectors. With
/// `negatives` false the DIEN columns are skipped unparsed and `s` carries
/// none (a model without the auxiliary loss must not pull or push them).
pub(crate) fn parse_sample_into(
    ctx: LineCtx<'_>,
    line: &[u8],
    s: &mut Sample,
    negatives: bool,
) -> Result<(), DataError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut cols: [&[u8]; 8] = [&[]; 8];
    let mut n = 0usize;
    for c in line.split(|&c| c == b'\t') {
        if n < 8 {
            cols[n] = c;
        }
        n += 1;
    }
    if n != 6 && n != 8 {
        return Err(ctx.err(
            "line",
            line,
            format!("expected 6 or 8 tab-separated columns, found {n}"),
        ));
    }
    s.label = parse_label(ctx, cols[0])?;
    s.user = parse_id(ctx, 1, cols[1])?;
    s.item = parse_id(ctx, 2, cols[2])?;
    s.cat = parse_id(ctx, 3, cols[3])?;
    parse_list(ctx, 4, cols[4], &mut s.hist_items)?;
    parse_list(ctx, 5, cols[5], &mut s.hist_cats)?;
    if s.hist_cats.len() != s.hist_items.len() {
        return Err(ctx.err(
            COLUMNS[5],
            cols[5],
            format!(
                "has {} elements but hist_item_ids has {}",
                s.hist_cats.len(),
                s.hist_items.len()
            ),
        ));
    }
    if n == 8 && negatives {
        parse_list(ctx, 6, cols[6], &mut s.neg_items)?;
        parse_list(ctx, 7, cols[7], &mut s.neg_cats)?;
        for (col, len) in [(6, s.neg_items.len()), (7, s.neg_cats.len())] {
            if len != s.hist_items.len() {
                return Err(ctx.err(
                    COLUMNS[col],
                    cols[col],
                    format!(
                        "has {len} elements but hist_item_ids has {}",
                        s.hist_items.len()
                    ),
                ));
            }
        }
    } else {
        s.neg_items.clear();
        s.neg_cats.clear();
    }
    Ok(())
}

/// Parses one line of the sample format. `path` and `line` (1-based) only
/// label errors.
pub fn parse_sample(path: &Path, line: u64, text: &[u8]) -> Result<Sample, DataError> {
    let mut s = Sample::default();
    parse_sample_into(LineCtx { path, line }, text, &mut s, true)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Sample {
        Sample {
            label: 1.0,
            user: 3,
            item: 10,
            cat: 2,
            hist_items: vec![4, 5],
            hist_cats: vec![1, 2],
            neg_items: vec![7, 8],
            neg_cats: vec![2, 2],
            ..Default::default()
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let mut buf = Vec::new();
        encode_sample(&mut buf, &s, false);
        assert_eq!(buf, b"1\t3\t10\t2\t4\x025\t1\x022\t7\x028\t2\x022\n");
        let back = parse_sample(Path::new("x"), 1, &buf[..buf.len() - 1]).unwrap();
        assert_eq!(back, s);

        let mut din = sample();
        din.neg_items.clear();
        din.neg_cats.clear();
        din.label = 0.0;
        buf.clear();
        encode_sample(&mut buf, &din, false);
        assert_eq!(buf, b"0\t3\t10\t2\t4\x025\t1\x022\n");
        assert_eq!(
            parse_sample(Path::new("x"), 1, &buf[..buf.len() - 1]).unwrap(),
            din
        );
    }

    #[test]
    fn empty_history_and_crlf() {
        let s = parse_sample(Path::new("x"), 1, b"1.0\t1\t2\t3\t\t\r").unwrap();
        assert!(s.hist_items.is_empty() && s.hist_cats.is_empty());
        assert_eq!(s.label, 1.0);
    }

    #[test]
    fn parse_u64_edges() {
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b" 1"), None);
    }
}
