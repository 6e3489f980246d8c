//! How long each step of a VM's start took, in order: what a fork child spends before
//! it reports running, logged in one line once it does (`forkvm bench fork` reads that
//! line from each child's log and tables the steps).

use std::time::Instant;

/// The steps of a start so far, each with its duration from the step before, and
/// counts of what a step did (extents mapped, ...).
#[derive(Debug)]
pub struct Steps {
    last: Instant,
    /// Each step or count: its name, value, and unit (` us` for a step, none for a count).
    done: Vec<(&'static str, u128, &'static str)>,
}

impl Steps {
    /// Steps counted from `from` (a fork child: its launch's arrival).
    pub fn new(from: Instant) -> Self {
        Self {
            last: from,
            done: Vec::new(),
        }
    }

    /// Adds `step`, measured elsewhere: `us` long, before the steps that follow.
    pub fn add(&mut self, step: &'static str, us: u128) {
        self.done.push((step, us, " us"));
    }

    /// Records a count of what the last step did: `n` of `what`.
    pub fn count(&mut self, what: &'static str, n: usize) {
        self.done.push((what, n as u128, ""));
    }

    /// Ends `step` now.
    pub fn mark(&mut self, step: &'static str) {
        let now = Instant::now();
        self.done.push((step, (now - self.last).as_micros(), " us"));
        self.last = now;
    }
}

impl std::fmt::Display for Steps {
    /// `step 812 us, a count 3, next 40 us, ...`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, n, unit)) in self.done.iter().enumerate() {
            write!(f, "{}{step} {n}{unit}", if i == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_listed_in_order_each_from_the_one_before() {
        let t0 = Instant::now();
        let mut s = Steps::new(t0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        s.mark("first");
        s.mark("second");
        s.add("third", 7);
        s.count("things", 3);
        let line = s.to_string();
        let parts: Vec<&str> = line.split(", ").collect();
        assert_eq!(parts.len(), 4, "{line}");
        assert_eq!(parts[2], "third 7 us");
        assert_eq!(parts[3], "things 3");
        let us = |p: &str, name: &str| -> u128 {
            p.strip_prefix(name)
                .and_then(|r| r.trim().strip_suffix(" us"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{p}"))
        };
        assert!(us(parts[0], "first") >= 2000, "{line}");
        assert!(us(parts[1], "second") < us(parts[0], "first"), "{line}");
        assert_eq!(Steps::new(t0).to_string(), "");
    }
}
