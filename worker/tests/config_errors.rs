//! Job-config loading errors name the file, the line and the problem:
//! a TOML syntax error, an unknown key, a value of the wrong type, a
//! missing required section, an invalid value, and a missing file.

use ember_worker::train::config::JobConfig;
use std::path::{Path, PathBuf};

/// A valid job file; line numbers below refer to it (1-based).
const GOOD: &str = r#"# test job
name = "t"

[model]
kind = "din"

[data]
train = "train.txt"
test = "test.txt"
batch_size = 64

[cluster]
shards = 1
workers = 1
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Replaces line `n` (1-based) of `GOOD` with `with`.
fn with_line(n: usize, with: &str) -> String {
    GOOD.lines()
        .enumerate()
        .map(|(k, l)| if k + 1 == n { with } else { l })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Loads `text` from a file and returns the error message.
fn load_err(text: &str) -> (PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "job.toml", text);
    let e = JobConfig::load(&p).expect_err("must fail");
    (p, e.to_string())
}

fn assert_names(msg: &str, file: &Path, line: Option<usize>, problem: &[&str]) {
    assert!(
        msg.contains(&file.display().to_string()),
        "file missing from: {msg}"
    );
    if let Some(n) = line {
        assert!(
            msg.contains(&format!("line {n},")) || msg.contains(&format!("line {n}\n")),
            "line {n} missing from: {msg}"
        );
    }
    for p in problem {
        assert!(msg.contains(p), "{p:?} missing from: {msg}");
    }
}

#[test]
fn the_good_file_loads() {
    let dir = tempfile::tempdir().unwrap();
    let c = JobConfig::load(&write(dir.path(), "job.toml", GOOD)).unwrap();
    assert_eq!((c.name.as_str(), c.data.batch_size), ("t", 64));
}

#[test]
fn syntax_error_names_file_and_line() {
    let (p, msg) = load_err(&with_line(10, "batch_size = = 64"));
    assert_names(&msg, &p, Some(10), &["TOML parse error"]);
    let (p, msg) = load_err(&with_line(12, "[cluster"));
    assert_names(&msg, &p, Some(12), &["TOML parse error"]);
    let (p, msg) = load_err(&with_line(8, "train = \"train.txt"));
    assert_names(&msg, &p, Some(8), &["TOML parse error"]);
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let (p, msg) = load_err(&with_line(13, "shardz = 1"));
    assert_names(&msg, &p, Some(13), &["unknown field", "shardz"]);
    let (p, msg) = load_err(&with_line(2, "nmae = \"t\""));
    assert_names(&msg, &p, Some(2), &["unknown field", "nmae"]);
    let (p, msg) = load_err(&with_line(12, "[clustr]"));
    assert_names(&msg, &p, Some(12), &["unknown field", "clustr"]);
}

#[test]
fn wrong_type_names_file_line_and_types() {
    let (p, msg) = load_err(&with_line(10, "batch_size = \"sixty-four\""));
    assert_names(&msg, &p, Some(10), &["invalid type", "sixty-four"]);
    let (p, msg) = load_err(&with_line(14, "workers = -1"));
    assert_names(&msg, &p, Some(14), &["-1"]);
    let (p, msg) = load_err(&with_line(5, "kind = 3"));
    assert_names(&msg, &p, Some(5), &["kind = 3", "wanted string or table"]);
}

#[test]
fn missing_section_and_bad_value_name_file_and_field() {
    let without_data: String = GOOD
        .lines()
        .filter(|l| !matches!(l.split('=').next().map(str::trim), Some("train" | "test")))
        .collect::<Vec<_>>()
        .join("\n");
    let (p, msg) = load_err(&without_data);
    assert_names(&msg, &p, None, &["missing field", "train"]);
    // Values that parse but are invalid name the field (no line: they are
    // checked after parsing).
    let (p, msg) = load_err(&with_line(10, "batch_size = 0"));
    assert_names(&msg, &p, None, &["data.batch_size"]);
}

#[test]
fn missing_file_names_file_and_os_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nope.toml");
    let msg = JobConfig::load(&p).unwrap_err().to_string();
    assert_names(&msg, &p, None, &["No such file or directory"]);
}
