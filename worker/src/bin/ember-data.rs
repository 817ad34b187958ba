//! `ember-data`: prepare, count, synthesize and benchmark Ember's data.
//!
//! A thin front end over [`ember_worker::data`]; every subcommand is one
//! library call.
//!
//! ```text
//! scripts/fetch-ml100k.sh
//! ember-data prepare --raw-dir data/ml-100k --out data/ml100k-din
//! ember-data prepare --config configs/din_ml100k_full.toml
//! ember-data count --train data/ml100k-din/train.txt --out data/ml100k-din/counts.bin
//! ember-data synth --ids 100000000 --users 1000000 --rows 1000000 --out data/synth.txt
//! ember-data bench-reader --file data/ml100k-din/train.txt --batch 128
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ember_worker::data::counts::{count, CountOptions};
use ember_worker::data::prepare::{prepare, PrepareOptions, Protocol};
use ember_worker::data::reader::{bench_reader, ReaderOptions};
use ember_worker::data::synth::{write_synth, SynthOptions};
use ember_worker::data::tabular::{load_job, prepare_tabular};
use ember_worker::data::DataError;

/// Ember data tools.
#[derive(Parser, Debug)]
#[command(name = "ember-data", version, about)]
struct Cli {
    /// Hide progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Protocol names on the command line.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum ProtocolArg {
    /// All ratings positive, one sampled negative per position.
    Din,
    /// Label = rating >= 4, 80/20 split by user.
    Rating4,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Raw ML-100k -> train/test sample files, sequences, id maps, meta.json;
    /// or, with --config, tabular files -> sample files of the job's features.
    Prepare {
        /// A job file: prepare its `[[features]]` from the tables its
        /// `[prepare]` section names (CSV, TSV, Parquet; other sections are
        /// ignored). Replaces the ML-100k options below.
        #[arg(long, conflicts_with_all = ["raw_dir", "seed", "protocol", "max_len", "no_neg", "test_fraction"])]
        config: Option<PathBuf>,
        /// Directory with ml-100k.inter and ml-100k.item.
        #[arg(long, default_value = "data/ml-100k")]
        raw_dir: PathBuf,
        /// Output directory [default: data/ml100k-din; with --config, the
        /// job's `prepare.out`].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Seed (negatives, shuffle, split).
        #[arg(long, default_value_t = 1234)]
        seed: u64,
        /// Labelling protocol.
        #[arg(long, value_enum, default_value = "din")]
        protocol: ProtocolArg,
        /// History truncation.
        #[arg(long, default_value_t = 100)]
        max_len: usize,
        /// Do not write the DIEN negative-history columns.
        #[arg(long)]
        no_neg: bool,
        /// Rating protocol: fraction of users in the test set.
        #[arg(long, default_value_t = 0.2)]
        test_fraction: f64,
    },
    /// Counting pass: n_j per id per table over the training samples.
    Count {
        /// Training sample file(s).
        #[arg(long, required = true, num_args = 1..)]
        train: Vec<PathBuf>,
        /// Output counts file.
        #[arg(long)]
        out: PathBuf,
        /// History truncation (as the reader's max_len).
        #[arg(long, default_value_t = 100)]
        max_len: usize,
        /// Also count DIEN negative-history ids.
        #[arg(long)]
        include_neg: bool,
        /// Skip and count malformed lines.
        #[arg(long)]
        skip_malformed: bool,
        /// A job file whose `[[features]]` the training files follow (files
        /// with a schema header); every sparse feature is counted per table.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Seeded synthetic data (Zipf item popularity, user interests).
    Synth {
        /// Item id space size.
        #[arg(long)]
        ids: u64,
        /// Number of users.
        #[arg(long)]
        users: u64,
        /// Number of rows.
        #[arg(long)]
        rows: u64,
        /// Output sample file.
        #[arg(long)]
        out: PathBuf,
        /// Seed.
        #[arg(long, default_value_t = 1234)]
        seed: u64,
        /// Number of categories.
        #[arg(long, default_value_t = 1000)]
        cats: u64,
        /// Write DIEN negative-history columns.
        #[arg(long)]
        with_neg: bool,
    },
    /// Item-popularity baseline: score each test row by its item's clicks in
    /// the training file; prints AUC and GAUC (the floor a model must beat).
    Popularity {
        /// Training sample file.
        #[arg(long)]
        train: PathBuf,
        /// Test sample file.
        #[arg(long)]
        test: PathBuf,
        /// A job file whose `[[features]]` the files follow; the item is
        /// the ad feature of its first behaviour feature.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Reader throughput (samples/s into ready batches, one thread).
    BenchReader {
        /// Sample file.
        #[arg(long)]
        file: PathBuf,
        /// Batch size.
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// History truncation.
        #[arg(long, default_value_t = 100)]
        max_len: usize,
        /// Shuffle buffer (samples; 0 = file order).
        #[arg(long, default_value_t = 10_000)]
        shuffle_buffer: usize,
        /// Epochs to read.
        #[arg(long, default_value_t = 1)]
        epochs: u64,
        /// A job file whose `[[features]]` the file follows (schema header).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Schema files: also parse the DIEN negative columns (as a DIEN
        /// job with the auxiliary loss does; DIN and Base skip them).
        #[arg(long)]
        with_neg: bool,
    },
}

/// The `[[features]]` of a job file, when a job file is given.
fn job_schema(
    config: Option<&std::path::Path>,
) -> Result<Option<std::sync::Arc<ember_worker::data::schema::FeatureSchema>>, DataError> {
    let Some(path) = config else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    ember_worker::data::schema::FeatureSchema::from_toml(&text)
        .map(|s| Some(std::sync::Arc::new(s)))
        .map_err(|reason| DataError::Inconsistent {
            path: path.to_path_buf(),
            reason,
        })
}

fn run(cli: Cli) -> Result<String, DataError> {
    let progress = !cli.quiet;
    Ok(match cli.cmd {
        Cmd::Prepare {
            config: Some(config),
            out,
            ..
        } => {
            let (schema, mut spec) = load_job(&config)?;
            if out.is_some() {
                spec.out = out;
            }
            prepare_tabular(&schema, &spec, progress)?.to_string()
        }
        Cmd::Prepare {
            config: None,
            raw_dir,
            out,
            seed,
            protocol,
            max_len,
            no_neg,
            test_fraction,
        } => prepare(&PrepareOptions {
            raw_dir,
            out_dir: out.unwrap_or_else(|| PathBuf::from("data/ml100k-din")),
            seed,
            protocol: match protocol {
                ProtocolArg::Din => Protocol::Din,
                ProtocolArg::Rating4 => Protocol::Rating4,
            },
            max_len,
            with_neg: !no_neg,
            test_fraction,
            progress,
        })?
        .to_string(),
        Cmd::Count {
            train,
            out,
            max_len,
            include_neg,
            skip_malformed,
            config,
        } => count(&CountOptions {
            train,
            out,
            max_len,
            include_neg,
            skip_malformed,
            progress,
            schema: job_schema(config.as_deref())?,
        })?
        .to_string(),
        Cmd::Synth {
            ids,
            users,
            rows,
            out,
            seed,
            cats,
            with_neg,
        } => {
            let opts = SynthOptions {
                n_ids: ids,
                n_users: users,
                n_rows: rows,
                seed,
                n_cats: cats,
                with_neg,
                progress,
                ..SynthOptions::default()
            };
            write_synth(&opts, &out)?.to_string()
        }
        Cmd::Popularity {
            train,
            test,
            config,
        } => {
            let (auc, gauc, rows) = popularity(&train, &test, job_schema(config.as_deref())?)?;
            format!(
                "popularity baseline on {} ({rows} rows): AUC {auc:.4}  GAUC {gauc:.4}",
                test.display()
            )
        }
        Cmd::BenchReader {
            file,
            batch,
            max_len,
            shuffle_buffer,
            epochs,
            config,
            with_neg,
        } => bench_reader(
            &[file],
            ReaderOptions {
                batch_size: batch,
                max_len,
                shuffle_buffer,
                epochs,
                schema: job_schema(config.as_deref())?,
                negatives: with_neg,
                ..ReaderOptions::default()
            },
        )?
        .to_string(),
    })
}

/// Popularity baseline: `(auc, gauc, test rows)`.
fn popularity(
    train: &std::path::Path,
    test: &std::path::Path,
    schema: Option<std::sync::Arc<ember_worker::data::schema::FeatureSchema>>,
) -> Result<(f64, f64, usize), DataError> {
    use ember_worker::data::reader::SampleReader;
    // The item of a schema sample: the first id of the first aligned ad feature.
    let slot = match &schema {
        Some(sc) => {
            let ad = sc.pairs().first().map(|p| p.ad).unwrap_or(0);
            Some(sc.sparse().iter().position(|&i| i == ad).unwrap_or(0))
        }
        None => None,
    };
    let item = |s: &ember_worker::batch::Sample| match slot {
        Some(k) => s
            .fields
            .get(k)
            .and_then(|v| v.first())
            .copied()
            .unwrap_or(0),
        None => s.item,
    };
    let mut clicks: std::collections::HashMap<u64, f32> = std::collections::HashMap::new();
    let mut r =
        SampleReader::open(&[train.to_path_buf()], 0, 1, false)?.with_schema(schema.clone());
    while let Some(s) = r.read()? {
        if s.label > 0.5 {
            *clicks.entry(item(&s)).or_default() += 1.0;
        }
        r.recycle(s);
    }
    let (mut scores, mut labels, mut users) = (Vec::new(), Vec::new(), Vec::new());
    let mut r = SampleReader::open(&[test.to_path_buf()], 0, 1, false)?.with_schema(schema);
    while let Some(s) = r.read()? {
        scores.push(clicks.get(&item(&s)).copied().unwrap_or(0.0));
        labels.push(s.label);
        users.push(s.user);
        r.recycle(s);
    }
    let auc = ember_worker::metrics::auc(&scores, &labels).unwrap_or(0.5);
    let gauc = ember_worker::metrics::gauc(&scores, &labels, &users).unwrap_or(0.5);
    Ok((auc, gauc, scores.len()))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ember-data: error: {e}");
            ExitCode::FAILURE
        }
    }
}
