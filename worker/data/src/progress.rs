//! Progress bars (indicatif) shared by prepare, count and synth.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A row counter with rate (`rows/s`), drawn on stderr when `show` is set
/// (and stderr is a terminal), hidden otherwise. `total` gives a bar with ETA.
pub fn rows_bar(label: &str, total: Option<u64>, show: bool) -> ProgressBar {
    let bar = match total {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template(
                "{msg:>8} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows ({per_sec}, eta {eta})",
            )
            .expect("valid template"),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{msg:>8} [{elapsed_precise}] {spinner} {human_pos} rows ({per_sec})")
                .expect("valid template"),
        ),
    };
    bar.set_message(label.to_string());
    if !show {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}
