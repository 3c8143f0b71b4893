//! Progress of a transfer: an indicatif bar on a terminal, nothing
//! otherwise. Owns only the drawing; the counting is the transfer's.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Draws nothing.
    pub fn hidden() -> Progress {
        Progress { bar: None }
    }

    /// A bar over `total` bytes on stderr, if both stdout and stderr are a
    /// terminal (a pipe or a file gets no control sequences).
    pub fn for_terminal(total: u64, label: &str) -> Progress {
        if !(std::io::stderr().is_terminal() && std::io::stdout().is_terminal()) {
            return Progress::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("the template is valid")
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_message(label.to_string());
        // Redraws rate and ETA while the server is slow to answer.
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress { bar: Some(bar) }
    }

    pub fn shown(&self) -> bool {
        self.bar.is_some()
    }

    pub fn advance(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    /// Leaves the full bar on screen.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
            eprintln!(); // the bar leaves the cursor on its line
        }
    }

    /// Leaves the bar where it stopped.
    pub fn abandon(&self) {
        if let Some(b) = &self.bar {
            b.abandon();
            eprintln!();
        }
    }
}
