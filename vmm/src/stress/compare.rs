//! `--compare`: the runs of one round side by side, range mode's ratios to the other
//! modes, and (`--rounds`) the median of each ratio over all rounds.

use super::report::fmt_ns;
use super::{MemLock, Report};

/// The reference mode's figures over another mode's, in one round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Ratios {
    /// The mode the others are measured against (range, when it ran).
    pub(super) reference: MemLock,
    /// The mode it is measured against.
    pub(super) other: MemLock,
    /// p50 touch latency, reference / other.
    pub(super) p50: f64,
    /// p99 touch latency, reference / other.
    pub(super) p99: f64,
    /// Faults per second, reference / other.
    pub(super) faults_per_sec: f64,
}

/// `a / b`, with 0 / 0 as 1 and x / 0 as infinity.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else if a > 0.0 {
        f64::INFINITY
    } else {
        1.0
    }
}

/// The run every other run of `round` is compared with: range mode, else the first.
fn reference(round: &[Report]) -> Option<&Report> {
    round
        .iter()
        .find(|r| r.mode == MemLock::Range)
        .or_else(|| round.first())
}

/// The reference run's ratios to every other run of `round`, in run order.
pub(super) fn ratios(round: &[Report]) -> Vec<Ratios> {
    let Some(refr) = reference(round) else {
        return Vec::new();
    };
    let [r50, r99, ..] = refr.percentiles_ns();
    round
        .iter()
        .filter(|r| r.mode != refr.mode)
        .map(|other| {
            let [o50, o99, ..] = other.percentiles_ns();
            Ratios {
                reference: refr.mode,
                other: other.mode,
                p50: ratio(r50 as f64, o50 as f64),
                p99: ratio(r99 as f64, o99 as f64),
                faults_per_sec: ratio(refr.faults_per_sec(), other.faults_per_sec()),
            }
        })
        .collect()
}

/// The `range / none:` label of a ratio line, padded to line up.
fn label(r: &Ratios) -> String {
    format!("{:<16}", format!("{} / {}:", r.reference, r.other))
}

/// Prints the runs of one round side by side, then the reference's ratios.
pub(super) fn print_round(round: &[Report], number: u32, rounds: u32, paired: bool) {
    println!();
    let how = if paired {
        "same work in each mode, interleaved touch by touch"
    } else {
        "same work in each mode"
    };
    if rounds > 1 {
        println!("round {number} of {rounds}, {how}:");
    } else {
        println!("{how}:");
    }
    println!(
        "  {:<12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>15}",
        "mode", "faults/s", "p50", "p99", "p99.9", "lock waits", "disjoint waits"
    );
    for r in round {
        let [p50, p99, p999, _] = r.percentiles_ns();
        println!(
            "  {:<12} {:>12.0} {:>10} {:>10} {:>10} {:>10} {:>15}",
            r.label(),
            r.faults_per_sec(),
            fmt_ns(p50),
            fmt_ns(p99),
            fmt_ns(p999),
            r.lock_waits,
            r.disjoint_waits
        );
    }
    for r in ratios(round) {
        println!(
            "  {}p50 {:.3}x   p99 {:.3}x   faults/s {:.3}x",
            label(&r),
            r.p50,
            r.p99,
            r.faults_per_sec
        );
    }
    let find = |mode| round.iter().find(|r| r.mode == mode);
    if let (Some(range), Some(global)) = (find(MemLock::Range), find(MemLock::Global)) {
        println!(
            "range / global throughput: {:.2}x",
            ratio(range.faults_per_sec(), global.faults_per_sec())
        );
    }
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// `median [each round]` of one ratio.
fn summary(values: &[f64]) -> String {
    let each: Vec<String> = values.iter().map(|v| format!("{v:.3}")).collect();
    format!("{:.3}x [{}]", median(&mut values.to_vec()), each.join(" "))
}

/// Prints, for each pair of modes, the median of each ratio over all rounds and the
/// ratio of every round.
pub(super) fn print_medians(rounds: &[Vec<Ratios>]) {
    let Some(first) = rounds.first() else {
        return;
    };
    println!();
    println!(
        "over {} rounds, median [each round in order]:",
        rounds.len()
    );
    for (i, pair) in first.iter().enumerate() {
        let column = |f: fn(&Ratios) -> f64| -> Vec<f64> {
            rounds.iter().filter_map(|r| r.get(i)).map(f).collect()
        };
        println!(
            "  {}p50 {}   p99 {}   faults/s {}",
            label(pair),
            summary(&column(|r| r.p50)),
            summary(&column(|r| r.p99)),
            summary(&column(|r| r.faults_per_sec))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stress::report::latency_histogram;
    use crate::stress::Engine;

    fn report(mode: MemLock, latency_ns: u64, faults: u64) -> Report {
        let mut latency = latency_histogram();
        latency.saturating_record_n(latency_ns, 100);
        Report {
            engine: Engine::Threads,
            mode,
            round: 1,
            shards: 1,
            seconds: 1.0,
            touches: 100,
            faults,
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
    fn range_is_measured_against_every_other_mode() {
        let round = [
            report(MemLock::None, 10_000, 1000),
            report(MemLock::Range, 10_200, 980),
            report(MemLock::Global, 20_400, 490),
        ];
        let r = ratios(&round);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].reference, r[0].other),
            (MemLock::Range, MemLock::None)
        );
        assert!((r[0].p50 - 1.02).abs() < 0.005, "{r:?}");
        assert!((r[0].faults_per_sec - 0.98).abs() < 1e-9, "{r:?}");
        assert_eq!(r[1].other, MemLock::Global);
        assert!((r[1].p50 - 0.5).abs() < 0.005, "{r:?}");
        assert!((r[1].faults_per_sec - 2.0).abs() < 1e-9, "{r:?}");
        // Without range, the first mode listed is the reference.
        let r = ratios(
            &round[..1]
                .iter()
                .chain(&round[2..])
                .cloned()
                .collect::<Vec<_>>(),
        );
        assert_eq!(
            (r[0].reference, r[0].other),
            (MemLock::None, MemLock::Global)
        );
        assert!(ratios(&round[..1]).is_empty());
    }

    #[test]
    fn medians_and_odd_ratios() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
        assert_eq!(ratio(0.0, 0.0), 1.0);
        assert_eq!(ratio(1.0, 0.0), f64::INFINITY);
        assert_eq!(summary(&[1.0, 1.02, 0.99]), "1.000x [1.000 1.020 0.990]");
    }
}
