//! Sample files with a header: any number of declared features per sample.
//!
//! ```text
//! #ember-samples  v2  label  user  <feature>  <feature> ...  [neg:<behaviour feature> ...]
//! 1  17  42  3^B9  5^B8^B2  0.25  ...
//! ```
//!
//! The first line names the columns (tab-separated); every later line is one
//! sample. `label` is 0 or 1, `user` the raw user id (GAUC groups by it).
//! A feature's cell holds, by kind and group ([`crate::schema`]):
//! - sparse, not behaviour: one id (`0` = missing);
//! - multi-hot, not behaviour: ids joined by 0x02 (may be empty);
//! - sparse behaviour: one id per step, oldest first, joined by 0x02;
//! - multi-hot behaviour: steps joined by 0x02, each step's ids joined by
//!   0x03 (a step may be empty);
//! - dense: a decimal float.
//!
//! `neg:<name>` columns carry DIEN's sampled negative behaviour sequence of a
//! behaviour feature, laid out like it. A reader maps the header to its job's
//! schema by name: columns the schema does not declare are ignored (so one
//! prepared file serves an ids-only and a full schema with the same rows),
//! a declared feature missing from the header is an error naming it and the
//! file. Within a line every behaviour feature must have the same number of
//! steps.

use std::path::Path;

use crate::batch::Sample;
use crate::format::{parse_u64, push_u64, show, LIST_SEP};
use crate::schema::{FeatureKind, FeatureSchema};
use crate::DataError;

/// First cell of the header line.
pub const MAGIC: &str = "#ember-samples";
/// Format version (second cell of the header).
pub const VERSION: &str = "v2";
/// Separator of the ids inside one behaviour step of a multi-hot feature.
pub const STEP_SEP: u8 = 0x03;
/// Prefix of DIEN negative-sequence columns.
pub const NEG_PREFIX: &str = "neg:";

/// Whether a file's first line is a schema header.
pub fn is_header(line: &[u8]) -> bool {
    line.starts_with(MAGIC.as_bytes())
}

/// The header line (with `\n`) of files carrying `schema`'s features, with
/// `neg:` columns for every behaviour feature when `with_neg`.
pub fn header(schema: &FeatureSchema, with_neg: bool) -> String {
    let mut cols = vec![
        MAGIC.to_string(),
        VERSION.into(),
        "label".into(),
        "user".into(),
    ];
    cols.extend(schema.features().iter().map(|f| f.name.clone()));
    if with_neg {
        for p in schema.pairs() {
            cols.push(format!(
                "{NEG_PREFIX}{}",
                schema.features()[p.behaviour].name
            ));
        }
    }
    let mut s = cols.join("\t");
    s.push('\n');
    s
}

fn push_ids(out: &mut Vec<u8>, ids: &[u64], sep: u8) {
    for (k, &id) in ids.iter().enumerate() {
        if k > 0 {
            out.push(sep);
        }
        push_u64(out, id);
    }
}

/// Appends a behaviour cell: `ids` holds `width` ids per step (zero-padded
/// for multi-hot; padding is not written).
fn push_steps(out: &mut Vec<u8>, ids: &[u64], width: usize, multi: bool) {
    if !multi {
        push_ids(out, ids, LIST_SEP);
        return;
    }
    for (k, step) in ids.chunks(width.max(1)).enumerate() {
        if k > 0 {
            out.push(LIST_SEP);
        }
        let n = step.iter().position(|&i| i == 0).unwrap_or(step.len());
        push_ids(out, &step[..n], STEP_SEP);
    }
}

/// Appends one sample (a line with `\n`) in the column order of
/// [`header`]`(schema, with_neg)`. `s.fields`, `s.neg_fields` and `s.dense`
/// must follow the schema's layout (see [`Sample::fields`]).
pub fn encode(out: &mut Vec<u8>, s: &Sample, schema: &FeatureSchema, with_neg: bool) {
    out.push(if s.label >= 0.5 { b'1' } else { b'0' });
    out.push(b'\t');
    push_u64(out, s.user);
    let (mut si, mut di) = (0, 0);
    for f in schema.features() {
        out.push(b'\t');
        if !f.is_sparse() {
            let v = s.dense.get(di).copied().unwrap_or(0.0);
            out.extend_from_slice(format!("{v}").as_bytes());
            di += 1;
            continue;
        }
        let empty = Vec::new();
        let ids = s.fields.get(si).unwrap_or(&empty);
        si += 1;
        if f.is_behaviour() {
            push_steps(out, ids, f.width(), f.kind == FeatureKind::MultiHot);
        } else {
            push_ids(out, ids, LIST_SEP);
        }
    }
    if with_neg {
        for (k, p) in schema.pairs().iter().enumerate() {
            let f = &schema.features()[p.behaviour];
            out.push(b'\t');
            if let Some(ids) = s.neg_fields.get(k) {
                push_steps(out, ids, f.width(), f.kind == FeatureKind::MultiHot);
            }
        }
    }
    out.push(b'\n');
}

/// What one column of a file is, for a given schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    Label,
    User,
    /// Sparse feature: slot in `Sample::fields`, feature index.
    Sparse {
        slot: usize,
        feature: usize,
    },
    /// DIEN negatives of pair `k` (slot in `Sample::neg_fields`), feature index.
    Neg {
        slot: usize,
        feature: usize,
    },
    /// Dense feature: slot in `Sample::dense`.
    Dense {
        slot: usize,
    },
    /// Not declared by the schema: ignored.
    Skip,
}

/// The mapping of one file's header onto a schema.
#[derive(Debug, Clone)]
pub struct Layout {
    cols: Vec<Col>,
    names: Vec<String>,
    n_sparse: usize,
    n_dense: usize,
    /// Negative columns present for every behaviour feature.
    with_neg: bool,
    n_pairs: usize,
}

impl Layout {
    /// Maps the header `line` of `path` onto `schema`; names the first
    /// declared feature the file lacks. With `negatives` false the DIEN
    /// `neg:` columns are skipped unparsed (only the auxiliary loss reads them).
    pub fn from_header(
        path: &Path,
        line: &[u8],
        schema: &FeatureSchema,
        negatives: bool,
    ) -> Result<Self, DataError> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let text = String::from_utf8_lossy(line);
        let names: Vec<String> = text.split('\t').map(str::to_string).collect();
        let bad = |reason: String| DataError::Inconsistent {
            path: path.to_path_buf(),
            reason,
        };
        if names.len() < 4
            || names[0] != MAGIC
            || names[1] != VERSION
            || names[2] != "label"
            || names[3] != "user"
        {
            return Err(bad(format!(
                "the header must start with `{MAGIC}\\t{VERSION}\\tlabel\\tuser`, found {:?}",
                show(line)
            )));
        }
        let sparse = schema.sparse();
        let dense = schema.dense();
        let pairs = schema.pairs();
        let mut cols = vec![Col::Label, Col::User];
        let mut found = vec![false; schema.features().len()];
        let mut neg_found = vec![false; pairs.len()];
        for name in &names[4..] {
            let col = if let Some(b) = name.strip_prefix(NEG_PREFIX) {
                match pairs
                    .iter()
                    .position(|p| schema.features()[p.behaviour].name == b)
                {
                    Some(k) => {
                        neg_found[k] = true;
                        Col::Neg {
                            slot: k,
                            feature: pairs[k].behaviour,
                        }
                    }
                    None => Col::Skip,
                }
            } else {
                match schema.index_of(name) {
                    Some(i) => {
                        if found[i] {
                            return Err(bad(format!(
                                "column `{name}` appears twice in the header"
                            )));
                        }
                        found[i] = true;
                        if let Some(slot) = sparse.iter().position(|&j| j == i) {
                            Col::Sparse { slot, feature: i }
                        } else {
                            Col::Dense {
                                slot: dense.iter().position(|&j| j == i).unwrap_or(0),
                            }
                        }
                    }
                    None => Col::Skip,
                }
            };
            cols.push(col);
        }
        if let Some(i) = found.iter().position(|f| !f) {
            return Err(bad(format!(
                "feature `{}` of the schema has no column in this file (columns: {})",
                schema.features()[i].name,
                names[4..].join(", ")
            )));
        }
        let with_neg = negatives && !neg_found.is_empty() && neg_found.iter().all(|&f| f);
        if !with_neg {
            // Partial negatives are unusable: ignore them all.
            for c in cols.iter_mut() {
                if matches!(c, Col::Neg { .. }) {
                    *c = Col::Skip;
                }
            }
        }
        Ok(Layout {
            cols,
            names,
            n_sparse: sparse.len(),
            n_dense: dense.len(),
            with_neg,
            n_pairs: pairs.len(),
        })
    }

    /// Whether the file carries DIEN negatives for every behaviour feature.
    pub fn has_negatives(&self) -> bool {
        self.with_neg
    }

    /// Parses one sample line (without `\n`) into `s`, reusing its vectors.
    /// `line_no` (1-based) labels errors.
    pub fn parse_into(
        &self,
        schema: &FeatureSchema,
        path: &Path,
        line_no: u64,
        line: &[u8],
        s: &mut Sample,
    ) -> Result<(), DataError> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let err = |col: usize, value: &[u8], reason: String| DataError::Malformed {
            path: path.to_path_buf(),
            line: line_no,
            column: self
                .names
                .get(col + 2)
                .cloned()
                .unwrap_or_else(|| "line".into()),
            value: show(value),
            reason,
        };
        s.fields.resize_with(self.n_sparse, Vec::new);
        s.fields.truncate(self.n_sparse);
        s.neg_fields
            .resize_with(if self.with_neg { self.n_pairs } else { 0 }, Vec::new);
        s.neg_fields
            .truncate(if self.with_neg { self.n_pairs } else { 0 });
        s.dense.clear();
        s.dense.resize(self.n_dense, 0.0);
        let mut n = 0usize;
        let mut steps: Option<usize> = None;
        for (c, cell) in line.split(|&b| b == b'\t').enumerate() {
            n += 1;
            let Some(&col) = self.cols.get(c) else {
                continue;
            };
            match col {
                Col::Label => {
                    s.label = match cell {
                        b"1" | b"1.0" => 1.0,
                        b"0" | b"0.0" => 0.0,
                        _ => return Err(err(c, cell, "label must be 0 or 1".into())),
                    }
                }
                Col::User => {
                    s.user = parse_u64(cell)
                        .ok_or_else(|| err(c, cell, "not an unsigned 64-bit integer id".into()))?
                }
                Col::Dense { slot } => {
                    let v: Option<f32> =
                        std::str::from_utf8(cell).ok().and_then(|t| t.parse().ok());
                    match v {
                        Some(v) if v.is_finite() => s.dense[slot] = v,
                        _ => return Err(err(c, cell, "not a finite float".into())),
                    }
                }
                Col::Sparse { slot, feature } | Col::Neg { slot, feature } => {
                    let f = &schema.features()[feature];
                    let out = match col {
                        Col::Neg { .. } => &mut s.neg_fields[slot],
                        _ => &mut s.fields[slot],
                    };
                    out.clear();
                    let id = |e: &[u8], k: usize| {
                        parse_u64(e).ok_or_else(|| {
                            err(
                                c,
                                e,
                                format!("element {k} is not an unsigned 64-bit integer id"),
                            )
                        })
                    };
                    if !f.is_behaviour() {
                        if f.kind == FeatureKind::Sparse {
                            out.push(id(cell, 0)?);
                        } else if !cell.is_empty() {
                            for (k, e) in cell.split(|&b| b == LIST_SEP).enumerate() {
                                if k < f.width() {
                                    out.push(id(e, k)?);
                                }
                            }
                        }
                        continue;
                    }
                    let mut t = 0usize;
                    if !cell.is_empty() {
                        for (k, step) in cell.split(|&b| b == LIST_SEP).enumerate() {
                            t += 1;
                            if f.kind == FeatureKind::Sparse {
                                out.push(id(step, k)?);
                                continue;
                            }
                            let w = f.width();
                            let start = out.len();
                            if !step.is_empty() {
                                for (j, e) in step.split(|&b| b == STEP_SEP).enumerate() {
                                    if j < w {
                                        out.push(id(e, k)?);
                                    }
                                }
                            }
                            out.resize(start + w, 0);
                        }
                    }
                    match steps {
                        None => steps = Some(t),
                        Some(t0) if t0 != t => {
                            return Err(err(
                                c,
                                cell,
                                format!(
                                "has {t} behaviour steps but an earlier behaviour column has {t0}"
                            ),
                            ))
                        }
                        Some(_) => {}
                    }
                }
                Col::Skip => {}
            }
        }
        if n != self.cols.len() {
            return Err(DataError::Malformed {
                path: path.to_path_buf(),
                line: line_no,
                column: "line".into(),
                value: show(line),
                reason: format!(
                    "expected {} tab-separated columns (as the header), found {n}",
                    self.cols.len()
                ),
            });
        }
        Ok(())
    }
}

/// A legacy sample as a sample of
/// [`FeatureSchema::ids_only`]`(.., with_user.then(..))`: the same ids,
/// label and DIEN negatives.
pub fn from_legacy(s: &Sample, with_user: bool) -> Sample {
    let mut fields = Vec::with_capacity(5);
    if with_user {
        fields.push(vec![s.user]);
    }
    fields.push(vec![s.item]);
    fields.push(vec![s.cat]);
    fields.push(s.hist_items.clone());
    fields.push(s.hist_cats.clone());
    let neg_fields = if s.neg_items.is_empty() {
        Vec::new()
    } else {
        vec![s.neg_items.clone(), s.neg_cats.clone()]
    };
    Sample {
        label: s.label,
        user: s.user,
        fields,
        neg_fields,
        ..Sample::default()
    }
}

/// The number of behaviour steps of a schema sample (0 without behaviour
/// features or with an empty history).
pub fn steps_of(s: &Sample, schema: &FeatureSchema) -> usize {
    // The first behaviour feature's slot in `Sample::fields` (no allocation:
    // this runs once per sample).
    for (slot, f) in schema
        .features()
        .iter()
        .filter(|f| f.is_sparse())
        .enumerate()
    {
        if f.is_behaviour() {
            return s.fields.get(slot).map_or(0, |v| v.len() / f.width().max(1));
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const FULL: &str = r#"
[[features]]
name = "movie"
kind = "sparse"
group = "ad"
table = "item"
dim = 4
[[features]]
name = "genres"
kind = "multi_hot"
max_len = 3
pooling = "mean"
group = "ad"
table = "genre"
dim = 4
[[features]]
name = "hist_movie"
kind = "sparse"
group = "behaviour"
table = "item"
dim = 4
align = "movie"
[[features]]
name = "hist_genres"
kind = "multi_hot"
max_len = 3
pooling = "mean"
group = "behaviour"
table = "genre"
dim = 4
align = "genres"
[[features]]
name = "gender"
kind = "sparse"
group = "user"
dim = 2
[[features]]
name = "age"
kind = "dense"
group = "user"
"#;

    fn sample() -> Sample {
        Sample {
            label: 1.0,
            user: 7,
            fields: vec![
                vec![5],
                vec![2, 3],
                vec![9, 8],
                vec![1, 0, 0, 2, 3, 4],
                vec![1],
            ],
            neg_fields: vec![vec![11, 12], vec![0, 0, 0, 5, 0, 0]],
            dense: vec![0.5],
            ..Sample::default()
        }
    }

    #[test]
    fn round_trip_with_and_without_negatives() {
        let schema = FeatureSchema::from_toml(FULL).unwrap();
        for with_neg in [false, true] {
            let h = header(&schema, with_neg);
            let layout = Layout::from_header(Path::new("f"), h.as_bytes(), &schema, true).unwrap();
            assert_eq!(layout.has_negatives(), with_neg);
            let mut buf = Vec::new();
            encode(&mut buf, &sample(), &schema, with_neg);
            let mut back = Sample::default();
            layout
                .parse_into(&schema, Path::new("f"), 2, &buf[..buf.len() - 1], &mut back)
                .unwrap();
            let mut want = sample();
            if !with_neg {
                want.neg_fields.clear();
            }
            assert_eq!(back, want);
            assert_eq!(steps_of(&back, &schema), 2);
            // Without negatives requested the neg: columns are skipped.
            let plain = Layout::from_header(Path::new("f"), h.as_bytes(), &schema, false).unwrap();
            assert!(!plain.has_negatives());
            plain
                .parse_into(&schema, Path::new("f"), 2, &buf[..buf.len() - 1], &mut back)
                .unwrap();
            want.neg_fields.clear();
            assert_eq!(back, want);
        }
    }

    #[test]
    fn a_subset_schema_reads_a_wider_file() {
        let full = FeatureSchema::from_toml(FULL).unwrap();
        let ids = full.subset(&["movie", "hist_movie"]).unwrap();
        let h = header(&full, true);
        let layout = Layout::from_header(Path::new("f"), h.as_bytes(), &ids, true).unwrap();
        assert!(
            layout.has_negatives(),
            "neg:hist_movie is there; neg:hist_genres is ignored"
        );
        let mut buf = Vec::new();
        encode(&mut buf, &sample(), &full, true);
        let mut back = Sample::default();
        layout
            .parse_into(&ids, Path::new("f"), 2, &buf[..buf.len() - 1], &mut back)
            .unwrap();
        assert_eq!(back.fields, vec![vec![5], vec![9, 8]]);
        assert_eq!(back.neg_fields, vec![vec![11, 12]]);
        assert!(back.dense.is_empty());
    }

    #[test]
    fn missing_columns_and_bad_cells_are_named() {
        let full = FeatureSchema::from_toml(FULL).unwrap();
        let ids = full.subset(&["movie", "hist_movie"]).unwrap();
        let e = Layout::from_header(
            Path::new("data/x.txt"),
            header(&ids, false).as_bytes(),
            &full,
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("data/x.txt") && e.contains("feature `genres`"),
            "{e}"
        );
        let e = Layout::from_header(Path::new("x"), b"label\tuser\n", &full, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("#ember-samples"), "{e}");

        let layout =
            Layout::from_header(Path::new("f"), header(&full, false).as_bytes(), &full, true)
                .unwrap();
        let mut s = Sample::default();
        let e = layout
            .parse_into(
                &full,
                Path::new("f"),
                3,
                b"1\t7\t5\t2\t9\x028\t1\x022\t1\tx",
                &mut s,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f:3") && e.contains("column age") && e.contains("finite float"),
            "{e}"
        );
        let e = layout
            .parse_into(
                &full,
                Path::new("f"),
                4,
                b"1\t7\t5\t2\t9\x028\t1\t1\t0.5",
                &mut s,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hist_genres") && e.contains("1 behaviour steps") && e.contains("has 2"),
            "{e}"
        );
        let e = layout
            .parse_into(&full, Path::new("f"), 5, b"1\t7\t5\t2", &mut s)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected 8 tab-separated columns"), "{e}");
    }
}
