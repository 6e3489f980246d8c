//! Progress reporting for imports and root filesystem builds: the [`Progress`] trait,
//! a silent implementation and a terminal one.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Receives progress of long store operations. Calls come from the calling thread.
pub trait Progress {
    /// A new step begins ("Copying blob sha256:…", "Building rootfs").
    fn step(&self, what: &str);
    /// `done` of `total` bytes of `what` are through (called repeatedly).
    fn bytes(&self, what: &str, done: u64, total: Option<u64>);
    /// The operation is over (successfully or not).
    fn done(&self);
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn step(&self, _what: &str) {}
    fn bytes(&self, _what: &str, _done: u64, _total: Option<u64>) {}
    fn done(&self) {}
}

/// Draws steps and byte counters on stderr with `indicatif`, but only when stderr is a
/// terminal; otherwise it is silent.
pub struct TermProgress {
    enabled: bool,
    /// The bar of the byte counter in progress, with what it counts.
    bar: Mutex<Option<(String, ProgressBar)>>,
}

impl TermProgress {
    /// Draws when stderr is a terminal.
    pub fn new() -> Self {
        Self {
            enabled: std::io::stderr().is_terminal(),
            bar: Mutex::new(None),
        }
    }

    fn finish_bar(slot: &mut Option<(String, ProgressBar)>) {
        if let Some((_, bar)) = slot.take() {
            bar.finish_and_clear();
        }
    }
}

impl Default for TermProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for TermProgress {
    fn step(&self, what: &str) {
        if !self.enabled {
            return;
        }
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        Self::finish_bar(&mut slot);
        eprintln!("{what}");
    }

    fn bytes(&self, what: &str, done: u64, total: Option<u64>) {
        if !self.enabled {
            return;
        }
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_none_or(|(w, _)| w != what) {
            Self::finish_bar(&mut slot);
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            let template = if total.is_some() {
                "{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}"
            } else {
                "{msg} {spinner} {bytes} {bytes_per_sec}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style);
            }
            bar.set_message(what.to_string());
            *slot = Some((what.to_string(), bar));
        }
        if let Some((_, bar)) = slot.as_ref() {
            bar.set_position(done);
        }
    }

    fn done(&self) {
        let mut slot = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        Self::finish_bar(&mut slot);
    }
}
