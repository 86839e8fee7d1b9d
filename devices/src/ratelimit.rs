//! Rate-limited logging for events the guest can cause.
//!
//! A guest can poke an unclaimed register, or keep writing to a serial port whose
//! output is gone, in a tight loop. Logging every occurrence would flood the VMM's log
//! and slow the vCPU down. A [`LogLimiter`] lets the first occurrence through and then
//! every `every`-th one, tagged with the running count, so the log still shows that it
//! happens and roughly how often.
//!
//! The limit is by count, not by time: it needs no clock, costs one relaxed atomic
//! add per occurrence, and behaves the same in tests as in production. Use it through
//! [`log_limited!`](crate::log_limited), which keeps the caller's module as the log
//! target.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lets the first of a kind of event be logged, then every `every`-th.
#[derive(Debug)]
pub struct LogLimiter {
    every: u64,
    seen: AtomicU64,
}

impl LogLimiter {
    /// The default period: the 1st occurrence, then the 1000th, 2000th, ...
    pub const DEFAULT_EVERY: u64 = 1000;

    /// A limiter that logs the 1st occurrence and then every `every`-th (0 counts as 1:
    /// log everything).
    pub const fn new(every: u64) -> Self {
        LogLimiter {
            every: if every == 0 { 1 } else { every },
            seen: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence; returns its 1-based number if this one should be logged.
    pub fn tick(&self) -> Option<u64> {
        let n = self.seen.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        (n == 1 || n % self.every == 0).then_some(n)
    }

    /// How many occurrences have been counted so far (logged or not).
    pub fn count(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(Self::DEFAULT_EVERY)
    }
}

/// Logs through a [`LogLimiter`]: `log_limited!(limiter, log::Level::Warn, "fmt", args..)`.
///
/// The first occurrence is logged as written; later ones that pass the limiter get
/// " (N times so far)" appended.
#[macro_export]
macro_rules! log_limited {
    ($limiter:expr, $level:expr, $($arg:tt)+) => {
        if let ::core::option::Option::Some(n) = $limiter.tick() {
            if n == 1 {
                $crate::__log::log!($level, $($arg)+);
            } else {
                $crate::__log::log!(
                    $level,
                    "{} ({} times so far)",
                    ::core::format_args!($($arg)+),
                    n
                );
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_and_every_nth() {
        let limiter = LogLimiter::new(3);
        let logged: Vec<u64> = (0..10).filter_map(|_| limiter.tick()).collect();
        assert_eq!(logged, vec![1, 3, 6, 9]);
        assert_eq!(limiter.count(), 10);
    }

    #[test]
    fn zero_period_logs_everything() {
        let limiter = LogLimiter::new(0);
        assert!((0..5).all(|_| limiter.tick().is_some()));
    }

    #[test]
    fn macro_expands_with_arguments() {
        let limiter = LogLimiter::new(2);
        for i in 0..4 {
            log_limited!(limiter, log::Level::Debug, "value {}", i);
        }
        assert_eq!(limiter.count(), 4);
    }
}
