//! The declared feature schema: what a sample carries beyond its label, how
//! each feature is embedded, and how the models combine them (the DIN
//! paper's Table 1: user profile, user behaviours, candidate ad, context).
//!
//! A job file lists its features as `[[features]]` (DeepCTR users know them
//! as `SparseFeat`, `VarLenSparseFeat` and `DenseFeat`):
//!
//! ```toml
//! [[features]]
//! name = "movie"            # the candidate ad's goods id
//! kind = "sparse"           # one id per sample
//! group = "ad"
//! table = "item"            # embedding table on the shards (default: the name)
//! dim = 18
//!
//! [[features]]
//! name = "hist_movie"       # the visited goods ids, oldest first
//! kind = "sparse"           # one id per behaviour step
//! group = "behaviour"
//! table = "item"            # shares the ad's table, as DIN does
//! dim = 18
//! align = "movie"           # keyed by the candidate's `movie` in the attention
//!
//! [[features]]
//! name = "genres"
//! kind = "multi_hot"        # up to max_len ids per sample (or per step)
//! max_len = 6
//! pooling = "mean"          # "sum" or "mean" over the ids
//! group = "ad"
//! dim = 18
//!
//! [[features]]
//! name = "age"
//! kind = "dense"            # one float
//! group = "user"
//! ```
//!
//! How the models use them: every behaviour feature is aligned with one ad
//! feature of the same table and dim; the *query* of the attention is the
//! concatenation of the aligned ad features (pooled when multi-hot), the
//! *keys* the concatenation of the behaviour features per step, in schema
//! order. Every other feature (user, context, ad features no behaviour aligns
//! with) is embedded (one-hot), pooled (multi-hot) or taken as is (dense) and
//! concatenated into the final MLP's input next to the ad and the pooled
//! behaviours. The fixed ids-only layout of the legacy files is the schema
//! `configs/din_ml100k_ids.toml` spells out.
//!
//! `column` and `transform` say where `ember-data prepare --config` finds a
//! feature in tabular files and how it turns the raw value into an id or a
//! float (see [`Transform`]); the models ignore them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How a feature is represented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureKind {
    /// One id per sample (per step for behaviour features), embedded.
    Sparse,
    /// Up to `max_len` ids per sample (per step), embedded and pooled.
    MultiHot,
    /// One float per sample, used as is.
    Dense,
}

/// The paper's feature groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureGroup {
    /// User profile (gender, age, ...).
    User,
    /// User behaviour sequences (visited goods, their shops and categories).
    Behaviour,
    /// The candidate ad (goods id, shop id, category).
    Ad,
    /// Context (time, position, ...).
    Context,
}

/// How a multi-hot feature's embeddings are pooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// `sum_k e_k`.
    #[default]
    Sum,
    /// `sum_k e_k / n` over the n non-padding ids (zero when n = 0).
    Mean,
}

/// How `ember-data prepare --config` turns a raw column value into the
/// feature's id(s) or float. Tokens become ids per table, 1.. over the
/// table's sorted tokens (numerically when all are unsigned integers; 0 is
/// padding / missing), as the ML-100k preparation remaps its ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Transform {
    /// The value as a token (the default for sparse features).
    Token,
    /// A list column: split by `sep` (default: whitespace), each part a token
    /// (the default for multi-hot features).
    Split {
        /// Separator; absent = any run of whitespace.
        #[serde(default)]
        sep: Option<String>,
    },
    /// A number put into the bucket of sorted `boundaries`: id `1 + #{b <= x}`.
    Bucket {
        /// Ascending bucket boundaries.
        boundaries: Vec<f64>,
    },
    /// The first part of a list column (split as [`Transform::Split`]), as a
    /// token (ML-100k's category = the first genre).
    First {
        /// Separator; absent = any run of whitespace.
        #[serde(default)]
        sep: Option<String>,
    },
    /// The first `chars` characters of the value, as a token.
    Prefix {
        /// How many characters to keep.
        chars: usize,
    },
    /// A Unix timestamp (seconds) -> day of the week (UTC), token 1..7.
    Weekday,
    /// A Unix timestamp (seconds) -> hour of the day (UTC), token 1..24.
    Hour,
    /// A number as a float (the default for dense features).
    Float,
    /// `ln(1 + max(x, 0))` of a number.
    Log1p,
}

/// One declared feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    /// Unique name (the column of the sample file).
    pub name: String,
    /// Representation.
    pub kind: FeatureKind,
    /// The paper's feature group.
    pub group: FeatureGroup,
    /// Embedding table on the shards (sparse and multi-hot); default: `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// Embedding width (sparse and multi-hot; required for them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dim: Option<usize>,
    /// Multi-hot: the most ids per sample (per step); extra ids are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
    /// Multi-hot pooling.
    #[serde(default)]
    pub pooling: Pooling,
    /// Behaviour features: the ad feature this one is keyed by in the attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub align: Option<String>,
    /// `prepare`: the source column (default: `name`). Behaviour features
    /// have none: they are the history of their aligned ad feature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// `prepare`: how the raw value becomes ids or a float.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<Transform>,
}

impl Feature {
    /// The embedding table (sparse and multi-hot features).
    pub fn table_name(&self) -> &str {
        self.table.as_deref().unwrap_or(&self.name)
    }

    /// Ids per position: 1 for sparse, `max_len` for multi-hot, 0 for dense.
    pub fn width(&self) -> usize {
        match self.kind {
            FeatureKind::Sparse => 1,
            FeatureKind::MultiHot => self.max_len.unwrap_or(0),
            FeatureKind::Dense => 0,
        }
    }

    /// Whether the feature has embeddings.
    pub fn is_sparse(&self) -> bool {
        self.kind != FeatureKind::Dense
    }

    /// Whether this is a behaviour (sequence) feature.
    pub fn is_behaviour(&self) -> bool {
        self.group == FeatureGroup::Behaviour
    }

    /// The embedding width (0 for dense features).
    pub fn emb_dim(&self) -> usize {
        if self.is_sparse() {
            self.dim.unwrap_or(0)
        } else {
            0
        }
    }

    /// The source column for `prepare`.
    pub fn column_name(&self) -> &str {
        self.column.as_deref().unwrap_or(&self.name)
    }

    /// The transform `prepare` applies (explicit or the kind's default).
    pub fn transform_or_default(&self) -> Transform {
        self.transform.clone().unwrap_or(match self.kind {
            FeatureKind::Sparse => Transform::Token,
            FeatureKind::MultiHot => Transform::Split { sep: None },
            FeatureKind::Dense => Transform::Float,
        })
    }
}

/// A schema problem, naming the feature (and the field) at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("feature `{feature}`: {msg}")]
pub struct SchemaError {
    /// The feature (or `features` for the whole list).
    pub feature: String,
    /// What is wrong.
    pub msg: String,
}

fn err<T>(feature: &str, msg: impl Into<String>) -> Result<T, SchemaError> {
    Err(SchemaError {
        feature: feature.to_string(),
        msg: msg.into(),
    })
}

/// A behaviour feature with the ad feature it is aligned with (indices into
/// [`FeatureSchema::features`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlignedPair {
    /// The ad feature (the attention query part).
    pub ad: usize,
    /// The behaviour feature (the attention key part).
    pub behaviour: usize,
}

/// A validated list of features with its derived layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Feature>", into = "Vec<Feature>")]
pub struct FeatureSchema {
    features: Vec<Feature>,
}

impl TryFrom<Vec<Feature>> for FeatureSchema {
    type Error = SchemaError;
    fn try_from(features: Vec<Feature>) -> Result<Self, SchemaError> {
        FeatureSchema::new(features)
    }
}

impl From<FeatureSchema> for Vec<Feature> {
    fn from(s: FeatureSchema) -> Self {
        s.features
    }
}

impl FeatureSchema {
    /// Validates `features`: unique names, dims and widths where needed,
    /// every behaviour feature aligned with an ad feature of the same table
    /// and dim, every table used with one dim, at least one behaviour feature.
    pub fn new(features: Vec<Feature>) -> Result<Self, SchemaError> {
        if features.is_empty() {
            return err("features", "the schema declares no features");
        }
        let mut seen = BTreeMap::new();
        for (i, f) in features.iter().enumerate() {
            if f.name.is_empty() || f.name.contains(['\t', '\n', ':']) {
                return err(
                    &f.name,
                    "a name must be non-empty, without tabs, newlines or ':'",
                );
            }
            if seen.insert(f.name.as_str(), i).is_some() {
                return err(&f.name, "declared twice");
            }
        }
        let mut table_dims: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
        for f in &features {
            match f.kind {
                FeatureKind::Dense => {
                    if f.table.is_some() || f.dim.is_some() || f.max_len.is_some() {
                        return err(&f.name, "a dense feature has no table, dim or max_len");
                    }
                    if f.is_behaviour() {
                        return err(
                            &f.name,
                            "behaviour features are sparse or multi_hot, not dense",
                        );
                    }
                }
                FeatureKind::Sparse | FeatureKind::MultiHot => {
                    let dim = match f.dim {
                        Some(d) if d > 0 => d,
                        _ => return err(&f.name, "`dim` must be set and > 0"),
                    };
                    if f.kind == FeatureKind::MultiHot && f.max_len.unwrap_or(0) == 0 {
                        return err(&f.name, "a multi_hot feature needs `max_len` > 0");
                    }
                    if f.kind == FeatureKind::Sparse && f.max_len.is_some() {
                        return err(&f.name, "`max_len` is for multi_hot features");
                    }
                    if f.table_name().is_empty() {
                        return err(&f.name, "`table` must not be empty");
                    }
                    match table_dims.get(f.table_name()) {
                        Some(&(d, other)) if d != dim => {
                            return err(
                                &f.name,
                                format!(
                                    "dim {dim} differs from dim {d} of `{other}`, which shares table `{}`",
                                    f.table_name()
                                ),
                            )
                        }
                        Some(_) => {}
                        None => {
                            table_dims.insert(f.table_name(), (dim, &f.name));
                        }
                    }
                }
            }
            if f.is_behaviour() {
                let Some(a) = f.align.as_deref() else {
                    return err(
                        &f.name,
                        "a behaviour feature needs `align` (the ad feature it is keyed by)",
                    );
                };
                let Some(&ai) = seen.get(a) else {
                    return err(
                        &f.name,
                        format!("aligned with `{a}`, which is not declared"),
                    );
                };
                let ad = &features[ai];
                if ad.group != FeatureGroup::Ad {
                    return err(
                        &f.name,
                        format!("aligned with `{a}`, which is not in group \"ad\""),
                    );
                }
                if ad.kind != f.kind || ad.dim != f.dim {
                    return err(
                        &f.name,
                        format!("aligned with `{a}` but kind/dim differ (a behaviour step and the ad are compared in the attention)"),
                    );
                }
                if f.column.is_some() || f.transform.is_some() {
                    return err(&f.name, "a behaviour feature is the history of its aligned ad feature: no `column` or `transform`");
                }
            } else if f.align.is_some() {
                return err(&f.name, "`align` is for behaviour features");
            }
        }
        let schema = FeatureSchema { features };
        if schema.pairs().is_empty() {
            return err(
                "features",
                "at least one behaviour feature (aligned with an ad feature) is needed",
            );
        }
        let mut aligned_ads = std::collections::BTreeSet::new();
        for p in schema.pairs() {
            if !aligned_ads.insert(p.ad) {
                return err(
                    &schema.features[p.behaviour].name,
                    format!(
                        "`{}` already has a behaviour feature aligned with it",
                        schema.features[p.ad].name
                    ),
                );
            }
        }
        Ok(schema)
    }

    /// Parses a schema from a TOML file's `[[features]]` array.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct File {
            features: Vec<Feature>,
        }
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        FeatureSchema::new(f.features).map_err(|e| e.to_string())
    }

    /// All features, in declaration order.
    pub fn features(&self) -> &[Feature] {
        &self.features
    }

    /// Index of a feature by name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.features.iter().position(|f| f.name == name)
    }

    /// Indices of the sparse and multi-hot features (the order of
    /// `Sample::fields`).
    pub fn sparse(&self) -> Vec<usize> {
        (0..self.features.len())
            .filter(|&i| self.features[i].is_sparse())
            .collect()
    }

    /// Indices of the dense features (the order of `Sample::dense`).
    pub fn dense(&self) -> Vec<usize> {
        (0..self.features.len())
            .filter(|&i| !self.features[i].is_sparse())
            .collect()
    }

    /// Behaviour features with their ad features, in behaviour declaration order.
    pub fn pairs(&self) -> Vec<AlignedPair> {
        self.features
            .iter()
            .enumerate()
            .filter(|(_, f)| f.is_behaviour())
            .filter_map(|(i, f)| {
                let ad = self.index_of(f.align.as_deref()?)?;
                Some(AlignedPair { ad, behaviour: i })
            })
            .collect()
    }

    /// Features outside the attention (user, context, ad features no
    /// behaviour aligns with; sparse, multi-hot and dense), in declaration order.
    pub fn others(&self) -> Vec<usize> {
        let aligned: Vec<usize> = self.pairs().iter().map(|p| p.ad).collect();
        (0..self.features.len())
            .filter(|&i| !self.features[i].is_behaviour() && !aligned.contains(&i))
            .collect()
    }

    /// The embedding tables with their dims, in order of first use.
    pub fn tables(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = Vec::new();
        for f in self.features.iter().filter(|f| f.is_sparse()) {
            if !out.iter().any(|(t, _)| t == f.table_name()) {
                out.push((f.table_name().to_string(), f.emb_dim()));
            }
        }
        out
    }

    /// Width of one behaviour step (= of the attention query): the sum of
    /// the behaviour features' dims.
    pub fn behaviour_dim(&self) -> usize {
        self.pairs()
            .iter()
            .map(|p| self.features[p.behaviour].emb_dim())
            .sum()
    }

    /// Width of the features outside the attention: embedding dims plus one
    /// per dense feature.
    pub fn other_dim(&self) -> usize {
        self.others()
            .iter()
            .map(|&i| {
                let f = &self.features[i];
                if f.is_sparse() {
                    f.emb_dim()
                } else {
                    1
                }
            })
            .sum()
    }

    /// The legacy fixed layout as a schema: ad `item`, `cat` (tables `item`,
    /// `cat`), behaviours `hist_item`, `hist_cat` aligned with them, and with
    /// `user_dim` a user-group feature `user` (table `user`) first. Files
    /// converted by [`crate::schema_format::from_legacy`] carry exactly these.
    pub fn ids_only(
        item_dim: usize,
        cat_dim: usize,
        user_dim: Option<usize>,
    ) -> Result<Self, SchemaError> {
        let f = |name: &str, table: &str, group, dim, align: Option<&str>| Feature {
            name: name.into(),
            kind: FeatureKind::Sparse,
            group,
            table: Some(table.into()),
            dim: Some(dim),
            max_len: None,
            pooling: Pooling::Sum,
            align: align.map(str::to_string),
            column: None,
            transform: None,
        };
        let mut v = Vec::new();
        if let Some(d) = user_dim {
            v.push(f("user", "user", FeatureGroup::User, d, None));
        }
        v.push(f("item", "item", FeatureGroup::Ad, item_dim, None));
        v.push(f("cat", "cat", FeatureGroup::Ad, cat_dim, None));
        v.push(f(
            "hist_item",
            "item",
            FeatureGroup::Behaviour,
            item_dim,
            Some("item"),
        ));
        v.push(f(
            "hist_cat",
            "cat",
            FeatureGroup::Behaviour,
            cat_dim,
            Some("cat"),
        ));
        FeatureSchema::new(v)
    }

    /// A schema restricted to the named features (same order), validated.
    pub fn subset(&self, names: &[&str]) -> Result<Self, SchemaError> {
        FeatureSchema::new(
            self.features
                .iter()
                .filter(|f| names.contains(&f.name.as_str()))
                .cloned()
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: &str = r#"
[[features]]
name = "item"
kind = "sparse"
group = "ad"
dim = 18
[[features]]
name = "cat"
kind = "sparse"
group = "ad"
dim = 18
[[features]]
name = "hist_item"
kind = "sparse"
group = "behaviour"
table = "item"
dim = 18
align = "item"
[[features]]
name = "hist_cat"
kind = "sparse"
group = "behaviour"
table = "cat"
dim = 18
align = "cat"
"#;

    #[test]
    fn ids_only_layout() {
        let s = FeatureSchema::from_toml(IDS).unwrap();
        assert_eq!(s.tables(), vec![("item".into(), 18), ("cat".into(), 18)]);
        assert_eq!(
            s.pairs(),
            vec![
                AlignedPair {
                    ad: 0,
                    behaviour: 2
                },
                AlignedPair {
                    ad: 1,
                    behaviour: 3
                }
            ]
        );
        assert_eq!(s.behaviour_dim(), 36);
        assert!(s.others().is_empty());
        assert_eq!(s.other_dim(), 0);
        assert_eq!(s.sparse(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn full_layout_widths() {
        let text = format!(
            "{IDS}\n[[features]]\nname = \"genres\"\nkind = \"multi_hot\"\nmax_len = 4\ngroup = \"user\"\ndim = 8\n\
             [[features]]\nname = \"age\"\nkind = \"dense\"\ngroup = \"user\"\n"
        );
        let s = FeatureSchema::from_toml(&text).unwrap();
        assert_eq!(s.others(), vec![4, 5]);
        assert_eq!(s.other_dim(), 9);
        assert_eq!(s.dense(), vec![5]);
        assert_eq!(s.features()[4].width(), 4);
    }

    fn bad(edit: impl Fn(&mut Vec<Feature>)) -> String {
        #[derive(Deserialize)]
        struct File {
            features: Vec<Feature>,
        }
        let mut f: File = toml::from_str(IDS).unwrap();
        edit(&mut f.features);
        FeatureSchema::new(f.features).unwrap_err().to_string()
    }

    #[test]
    fn bad_schemas_name_the_feature() {
        let e = bad(|f| f[2].align = Some("shop".into()));
        assert!(
            e.contains("`hist_item`") && e.contains("`shop`, which is not declared"),
            "{e}"
        );
        let e = bad(|f| f[2].align = None);
        assert!(
            e.contains("`hist_item`") && e.contains("needs `align`"),
            "{e}"
        );
        let e = bad(|f| f[3].dim = Some(8));
        assert!(
            e.contains("`hist_cat`") && e.contains("shares table `cat`"),
            "{e}"
        );
        let e = bad(|f| f[1].dim = None);
        assert!(e.contains("`cat`") && e.contains("`dim`"), "{e}");
        let e = bad(|f| f[3].name = "item".into());
        assert!(e.contains("`item`: declared twice"), "{e}");
        let e = bad(|f| {
            f.truncate(2);
        });
        assert!(e.contains("at least one behaviour feature"), "{e}");
        let e = bad(|f| f[0].group = FeatureGroup::User);
        assert!(
            e.contains("`hist_item`") && e.contains("not in group \"ad\""),
            "{e}"
        );
        let e = bad(|f| {
            f[1].kind = FeatureKind::MultiHot;
        });
        assert!(e.contains("`cat`") && e.contains("max_len"), "{e}");
    }

    #[test]
    fn unknown_fields_and_transforms_are_refused() {
        let e = FeatureSchema::from_toml(&IDS.replace(
            "group = \"ad\"\ndim = 18\n[[features]]\nname = \"cat\"",
            "group = \"ad\"\ndimm = 18\n[[features]]\nname = \"cat\"",
        ))
        .unwrap_err();
        assert!(e.contains("dimm"), "{e}");
        let t: Transform = toml::from_str("kind = \"bucket\"\nboundaries = [18, 25]").unwrap();
        assert_eq!(
            t,
            Transform::Bucket {
                boundaries: vec![18.0, 25.0]
            }
        );
        assert!(toml::from_str::<Transform>("kind = \"weekly\"").is_err());
    }
}
