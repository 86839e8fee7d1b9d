//! One run's figures, as text or JSON.

use super::{Engine, MemLock, StressArgs};
use hdrhistogram::Histogram;

/// Highest latency a histogram tells apart: one hour, in nanoseconds. Longer ones
/// count as one hour.
const MAX_LATENCY_NS: u64 = 3_600_000_000_000;

/// An empty latency histogram: 1 ns to one hour, three significant digits.
pub(super) fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low,
    // sigfig <= 5), so this cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).unwrap_or_else(|_| unreachable!())
}

/// Adds `from` into `into` (same bounds, so it cannot fail).
pub(super) fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    if let Err(e) = into.add(from) {
        log::error!("Merging latency histograms failed: {e}");
    }
}

/// One run's figures.
#[derive(Debug, Clone)]
pub struct Report {
    pub(super) engine: Engine,
    pub(super) mode: MemLock,
    /// Which round of `--rounds` (1 when there is one).
    pub(super) round: u32,
    pub(super) shards: usize,
    pub(super) seconds: f64,
    pub(super) touches: u64,
    pub(super) faults: u64,
    pub(super) wrong_content: u64,
    /// Touch latencies in nanoseconds (kvm engine: per page, as the host sees it).
    pub(super) latency: Histogram<u64>,
    pub(super) lock_waits: u64,
    pub(super) lock_wait_ms: f64,
    pub(super) disjoint_waits: u64,
    pub(super) churn_ops: u64,
    pub(super) harvests: u64,
}

impl Report {
    /// Resolved faults per second.
    pub fn faults_per_sec(&self) -> f64 {
        self.faults as f64 / self.seconds
    }

    /// p50, p99, p99.9 and the maximum touch latency, in nanoseconds (0 when nothing
    /// was timed).
    pub fn percentiles_ns(&self) -> [u64; 4] {
        let h = &self.latency;
        if h.is_empty() {
            return [0; 4];
        }
        [
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
        ]
    }

    /// A short name for the run: `range`, or `kvm/range` for the kvm engine.
    pub fn label(&self) -> String {
        match self.engine {
            Engine::Threads => self.mode.to_string(),
            Engine::Kvm => format!("kvm/{}", self.mode),
        }
    }

    /// The run as one JSON object on one line.
    pub fn to_json(&self, args: &StressArgs) -> String {
        let [p50, p99, p999, max] = self.percentiles_ns();
        format!(
            "{{\"engine\":\"{}\",\"mem_lock\":\"{}\",\"pattern\":\"{:?}\",\"workers\":{},\"handlers\":{},\"shards\":{},\"memory\":{},\"seconds\":{:.3},\"touches\":{},\"faults\":{},\"faults_per_sec\":{:.0},\"latency_ns\":{{\"p50\":{p50},\"p99\":{p99},\"p999\":{p999},\"max\":{max}}},\"lock_waits\":{},\"lock_wait_ms\":{:.3},\"disjoint_waits\":{},\"churn_ops\":{},\"harvests\":{},\"wrong_content\":{},\"round\":{}}}",
            self.engine,
            self.mode,
            args.pattern,
            args.workers,
            args.handlers,
            self.shards,
            args.memory,
            self.seconds,
            self.touches,
            self.faults,
            self.faults_per_sec(),
            self.lock_waits,
            self.lock_wait_ms,
            self.disjoint_waits,
            self.churn_ops,
            self.harvests,
            self.wrong_content,
            self.round
        )
    }

    /// Prints the run, as text or (`--json`) JSON.
    pub fn print(&self, args: &StressArgs) {
        if args.json {
            println!("{}", self.to_json(args));
            return;
        }
        let [p50, p99, p999, max] = self.percentiles_ns();
        let what = match self.engine {
            Engine::Threads => "touch",
            Engine::Kvm => "guest page",
        };
        println!(
            "{:<10} {:>10.0} faults/s   {what} latency p50 {} p99 {} p99.9 {} max {}",
            format!("{}:", self.label()),
            self.faults_per_sec(),
            fmt_ns(p50),
            fmt_ns(p99),
            fmt_ns(p999),
            fmt_ns(max)
        );
        println!(
            "           {} faults, {} touches in {:.2} s; lock: {} waits, {:.1} ms waiting, {} waits between non-overlapping ranges{}{}",
            self.faults,
            self.touches,
            self.seconds,
            self.lock_waits,
            self.lock_wait_ms,
            self.disjoint_waits,
            if args.balloon_churn {
                format!("; {} balloon ops", self.churn_ops)
            } else {
                String::new()
            },
            if args.harvest_interval > 0 {
                format!("; {} harvests", self.harvests)
            } else {
                String::new()
            },
        );
        if self.wrong_content > 0 {
            println!(
                "           WARNING: {} touches saw the wrong page content",
                self.wrong_content
            );
        }
    }
}

/// `ns` with a unit a person reads at a glance.
pub(super) fn fmt_ns(ns: u64) -> String {
    match ns {
        0..=9_999 => format!("{ns} ns"),
        10_000..=9_999_999 => format!("{:.1} µs", ns as f64 / 1e3),
        _ => format!("{:.1} ms", ns as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(samples: &[u64]) -> Report {
        let mut latency = latency_histogram();
        for &s in samples {
            latency.saturating_record(s);
        }
        Report {
            engine: Engine::Threads,
            mode: MemLock::Range,
            round: 1,
            shards: 1,
            seconds: 2.0,
            touches: samples.len() as u64,
            faults: 10,
            wrong_content: 0,
            latency,
            lock_waits: 0,
            lock_wait_ms: 0.0,
            disjoint_waits: 0,
            churn_ops: 0,
            harvests: 0,
        }
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        // 1000 samples: 990 of 10 µs, 9 of 1 ms, one of 1 s.
        let mut samples = vec![10_000u64; 990];
        samples.extend([1_000_000; 9]);
        samples.push(1_000_000_000);
        let [p50, p99, p999, max] = report(&samples).percentiles_ns();
        let near = |got: u64, want: u64| got.abs_diff(want) * 1000 <= want;
        assert!(near(p50, 10_000), "{p50}");
        assert!(near(p99, 10_000), "{p99}");
        assert!(near(p999, 1_000_000), "{p999}");
        assert!(near(max, 1_000_000_000), "{max}");
        assert_eq!(report(&[]).percentiles_ns(), [0; 4]);
    }

    #[test]
    fn over_an_hour_saturates_instead_of_being_lost() {
        let r = report(&[u64::MAX]);
        assert_eq!(r.latency.len(), 1);
        assert!(r.percentiles_ns()[3] >= MAX_LATENCY_NS);
    }

    #[test]
    fn merged_histograms_count_both() {
        let mut a = report(&[5, 6]).latency;
        merge(&mut a, &report(&[7]).latency);
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn units_fit_the_size() {
        assert_eq!(fmt_ns(950), "950 ns");
        assert_eq!(fmt_ns(12_340), "12.3 µs");
        assert_eq!(fmt_ns(25_000_000), "25.0 ms");
    }
}
