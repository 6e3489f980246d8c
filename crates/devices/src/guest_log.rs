//! Log lines a guest can cause, rate-limited.
//!
//! Every warning or error a device logs about what the guest did (a bad register
//! access, a malformed descriptor chain, a request for a missing queue) goes through
//! [`guest_warn!`](crate::guest_warn) or [`guest_error!`](crate::guest_error): at most
//! [`PER_SECOND`] such lines a second per VM process (each VM is one process), the rest
//! counted and reported as one line when the next second's first line is let through.
//! A guest that pokes a bad register in a loop would otherwise fill the host's disk
//! with the VM's log. What the host does wrong (a backend that fails, a registration
//! the event loop refuses) is logged with plain `tracing`, never suppressed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most guest-caused lines logged in one second.
pub const PER_SECOND: u32 = 20;

/// A one-second window of guest-caused log lines.
#[derive(Debug)]
pub struct Limiter {
    window: Mutex<Option<Window>>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    used: u32,
    suppressed: u64,
}

/// What [`Limiter::check`] decided for one line.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Whether to log the line.
    pub log: bool,
    /// Lines suppressed in earlier windows, to report before this one (0: none).
    pub suppressed_before: u64,
}

impl Limiter {
    /// A limiter that has let nothing through yet.
    pub const fn new() -> Self {
        Self {
            window: Mutex::new(None),
        }
    }

    /// Whether a line at `now` may be logged.
    pub fn check(&self, now: Instant) -> Verdict {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let win = w.get_or_insert(Window {
            start: now,
            used: 0,
            suppressed: 0,
        });
        let mut suppressed_before = 0;
        if now.saturating_duration_since(win.start) >= Duration::from_secs(1) {
            suppressed_before = std::mem::take(&mut win.suppressed);
            win.start = now;
            win.used = 0;
        }
        if win.used < PER_SECOND {
            win.used += 1;
            Verdict {
                log: true,
                suppressed_before,
            }
        } else {
            win.suppressed += 1;
            Verdict {
                log: false,
                suppressed_before,
            }
        }
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

/// This process's limiter.
static LIMITER: Limiter = Limiter::new();

/// Whether a guest-caused line may be logged now; reports lines suppressed before it.
/// Used by [`guest_warn!`](crate::guest_warn) and [`guest_error!`](crate::guest_error).
#[doc(hidden)]
pub fn allow() -> bool {
    let v = LIMITER.check(Instant::now());
    if v.suppressed_before > 0 {
        tracing::warn!(
            suppressed = v.suppressed_before,
            "{} log lines the guest caused were suppressed (at most {PER_SECOND} a second)",
            v.suppressed_before
        );
    }
    v.log
}

/// `tracing::warn!` for what a guest did, rate-limited ([`guest_log`](crate::guest_log)).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {
        if $crate::guest_log::allow() {
            ::tracing::warn!($($arg)+)
        }
    };
}

/// `tracing::error!` for what a guest did, rate-limited ([`guest_log`](crate::guest_log)).
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => {
        if $crate::guest_log::allow() {
            ::tracing::error!($($arg)+)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_rate_and_counted() {
        let l = Limiter::new();
        let t0 = Instant::now();
        let logged = (0..1000)
            .filter(|i| l.check(t0 + Duration::from_micros(*i)).log)
            .count();
        assert_eq!(logged, PER_SECOND as usize);
        // The next second: its first line goes through and reports the rest.
        let v = l.check(t0 + Duration::from_millis(1500));
        assert_eq!(
            v,
            Verdict {
                log: true,
                suppressed_before: 1000 - PER_SECOND as u64
            }
        );
        assert_eq!(
            l.check(t0 + Duration::from_millis(1501)).suppressed_before,
            0
        );
    }
}
