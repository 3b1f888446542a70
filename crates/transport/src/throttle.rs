//! Throttled log lines: a line that a flood could repeat thousands of times a second (a failed
//! accept, a refused connection) is written at most once per interval and says how many like
//! it were left out since the last one, so the log stays readable and small under attack.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Decides when a repeated log line may be written again.
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    /// When the last line was written, and how many were left out since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    /// At most one line per `interval`.
    pub const fn new(interval: Duration) -> Self {
        Self { interval, state: Mutex::new((None, 0)) }
    }

    /// `Some(left_out)` when a line may be written now (`left_out` lines were dropped since the
    /// last one), `None` when this one should be dropped.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (last, left_out) = &mut *state;
        match last {
            Some(at) if now.saturating_duration_since(*at) < self.interval => {
                *left_out += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(left_out))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_counting_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(throttle.admit(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(throttle.admit(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(throttle.admit(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(throttle.admit(t0 + Duration::from_secs(11)), None);
        assert_eq!(throttle.admit(t0 + Duration::from_secs(30)), Some(1));
    }
}
