//! `rangevm stress` as a user runs it: the kvm engine on this machine's KVM, the
//! latency plot, and the options the kvm engine refuses.

use std::path::PathBuf;
use std::process::{Command, Output};

fn rangevm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rangevm"))
        .args(args)
        .output()
        .expect("run rangevm")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The unsigned number after `"key":` in a one-line JSON object.
fn field(line: &str, key: &str) -> u64 {
    let at = line
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + key.len()
        + 3;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {line}"))
}

fn temp_svg(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// Checks `path` is an SVG with at least `curves` drawn latency curves of many points.
fn assert_svg_with_curves(path: &PathBuf, curves: usize) {
    let svg = std::fs::read_to_string(path).expect("the plot was written");
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    assert!(svg.trim_end().ends_with("</svg>"));
    // The curves are the only lines drawn two pixels wide.
    let drawn: Vec<&str> = svg
        .lines()
        .filter(|l| l.starts_with("<polyline") && l.contains("stroke-width=\"2\""))
        .collect();
    assert!(drawn.len() >= curves, "{} curves in\n{svg}", drawn.len());
    for line in drawn {
        let points = line.split("points=\"").nth(1).unwrap_or("");
        assert!(
            points.split_whitespace().count() >= 5,
            "a short curve: {line}"
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn kvm_engine_faults_through_a_real_vcpu_and_checks_every_page() {
    let out = rangevm(&[
        "stress",
        "--engine",
        "kvm",
        "--workers",
        "1",
        "--memory",
        "8M",
        "--duration",
        "1",
        "--json",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line = lines[0];
    assert!(line.contains("\"engine\":\"kvm\""), "{line}");
    assert!(line.contains("\"mem_lock\":\"range\""), "{line}");
    assert!(field(line, "faults") > 0, "{line}");
    // Every page the guest touched was checked, and the walk reports in batches.
    let touches = field(line, "touches");
    assert!(touches > 0 && touches % 16 == 0, "{line}");
    // Each touch faults (the page was given back), plus the code page.
    assert!(field(line, "faults") >= touches, "{line}");
    assert_eq!(field(line, "wrong_content"), 0, "{line}");
    assert!(field(line, "p50") > 0, "{line}");
    assert_eq!(field(line, "disjoint_waits"), 0, "{line}");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn kvm_engine_compares_both_modes_with_churn_and_plots_them() {
    let svg = temp_svg("kvm-compare.svg");
    let out = rangevm(&[
        "stress",
        "--engine",
        "kvm",
        "--workers",
        "2",
        "--memory",
        "4M",
        "--pattern",
        "random",
        "--balloon-churn",
        "--harvest-interval",
        "20",
        "--duration",
        "0.5",
        "--compare",
        "--json",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("\"mem_lock\":\"range\""), "{text}");
    assert!(lines[1].contains("\"mem_lock\":\"global\""), "{text}");
    for line in &lines {
        assert!(line.contains("\"engine\":\"kvm\""), "{line}");
        assert!(field(line, "faults") > 0, "{line}");
        assert!(field(line, "churn_ops") > 0, "{line}");
        assert_eq!(field(line, "wrong_content"), 0, "{line}");
    }
    assert_eq!(field(lines[0], "disjoint_waits"), 0, "{}", lines[0]);
    assert_svg_with_curves(&svg, 2);
}

#[test]
fn plot_draws_both_modes_of_a_comparison() {
    let svg = temp_svg("threads-compare.svg");
    let out = rangevm(&[
        "stress",
        "--workers",
        "2",
        "--memory",
        "8M",
        "--duration",
        "0.3",
        "--compare",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("range / global throughput"), "{text}");
    assert!(
        text.contains(&format!("latency plot: {}", svg.display())),
        "{text}"
    );
    assert_svg_with_curves(&svg, 2);
    let content = std::fs::read_to_string(&svg).unwrap();
    assert!(content.contains("range: p50"), "no legend for range mode");
    assert!(content.contains("global: p50"), "no legend for global mode");
}

#[test]
fn threads_json_names_its_engine_and_keeps_its_fields() {
    let out = rangevm(&[
        "stress",
        "--workers",
        "1",
        "--memory",
        "1M",
        "--duration",
        "0.2",
        "--json",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("\"engine\":\"threads\""), "{text}");
    for key in [
        "faults",
        "touches",
        "p50",
        "p99",
        "p999",
        "max",
        "lock_waits",
    ] {
        field(&text, key);
    }
    assert!(field(&text, "p50") <= field(&text, "p99"), "{text}");
    assert!(field(&text, "p99") <= field(&text, "max"), "{text}");
}

#[test]
fn bad_engine_and_plot_options_get_one_clear_sentence() {
    let out = rangevm(&["stress", "--engine", "qemu"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("possible values: threads, kvm"), "{err}");

    let out = rangevm(&["stress", "--plot", "latency.png", "--duration", "0.1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("ending in .svg"), "{err}");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn kvm_engine_refuses_what_its_guest_cannot_walk() {
    let out = rangevm(&["stress", "--engine", "kvm", "--memory", "3G"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("walks at most 2 GiB"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let page = rangevm_memory::host_page_size();
    let memory = (2 * page).to_string();
    let out = rangevm(&[
        "stress",
        "--engine",
        "kvm",
        "--memory",
        &memory,
        "--workers",
        "2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("besides the guest's code page"), "{err}");
}

#[cfg(not(target_arch = "x86_64"))]
#[test]
fn kvm_engine_is_refused_off_x86_64() {
    let out = rangevm(&["stress", "--engine", "kvm", "--duration", "0.1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("needs an x86_64 host"), "{err}");
}

#[test]
fn every_pattern_runs_on_every_engine_with_the_right_content() {
    let engines: &[&str] = if cfg!(target_arch = "x86_64") {
        &["threads", "kvm"]
    } else {
        &["threads"]
    };
    for engine in engines {
        for pattern in ["disjoint", "shared", "random", "sequential"] {
            let out = rangevm(&[
                "stress",
                "--engine",
                engine,
                "--pattern",
                pattern,
                "--workers",
                "3",
                "--memory",
                "2M",
                "--duration",
                "0.2",
                "--json",
            ]);
            let text = stdout(&out);
            assert!(
                out.status.success(),
                "{engine} {pattern}: {text}\n{}",
                stderr(&out)
            );
            assert!(field(&text, "faults") > 0, "{engine} {pattern}: {text}");
            assert_eq!(
                field(&text, "wrong_content"),
                0,
                "{engine} {pattern}: {text}"
            );
            assert_eq!(
                field(&text, "disjoint_waits"),
                0,
                "{engine} {pattern}: {text}"
            );
        }
    }
}

#[test]
fn no_lock_baseline_still_fills_every_page_with_the_right_content() {
    let engines: &[&str] = if cfg!(target_arch = "x86_64") {
        &["threads", "kvm"]
    } else {
        &["threads"]
    };
    for engine in engines {
        for pattern in ["disjoint", "shared", "random", "sequential"] {
            let out = rangevm(&[
                "stress",
                "--engine",
                engine,
                "--mem-lock",
                "none",
                "--pattern",
                pattern,
                "--workers",
                "2",
                "--memory",
                "2M",
                "--harvest-interval",
                "10",
                "--duration",
                "0.3",
                "--json",
            ]);
            let text = stdout(&out);
            let what = format!("{engine} {pattern}: {text}\n{}", stderr(&out));
            assert!(out.status.success(), "{what}");
            assert!(text.contains("\"mem_lock\":\"none\""), "{what}");
            assert!(field(&text, "faults") > 0, "{what}");
            assert!(field(&text, "touches") > 0, "{what}");
            assert_eq!(field(&text, "wrong_content"), 0, "{what}");
            assert_eq!(field(&text, "disjoint_waits"), 0, "{what}");
        }
    }
    // Without harvests, only each disjoint worker's own give-backs lock, each on its
    // own pages: nobody waits, the engine itself never locks.
    let out = rangevm(&[
        "stress",
        "--mem-lock",
        "none",
        "--workers",
        "2",
        "--memory",
        "4M",
        "--duration",
        "0.3",
        "--json",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(field(&text, "faults") > 0, "{text}");
    assert_eq!(field(&text, "wrong_content"), 0, "{text}");
    assert_eq!(field(&text, "lock_waits"), 0, "{text}");
}

#[test]
fn no_lock_baseline_refuses_balloon_churn_in_one_sentence() {
    for args in [
        &["--mem-lock", "none", "--balloon-churn"][..],
        &["--compare", "none,range", "--balloon-churn"][..],
        &[
            "--engine",
            "kvm",
            "--compare",
            "range,none",
            "--balloon-churn",
            "--harvest-interval",
            "5",
        ][..],
    ] {
        let mut all = vec!["stress", "--duration", "0.1"];
        all.extend_from_slice(args);
        let out = rangevm(&all);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("cannot run with --balloon-churn"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(stdout(&out).is_empty(), "{args:?} ran: {}", stdout(&out));
    }
    // Churn without the baseline still runs.
    let out = rangevm(&[
        "stress",
        "--memory",
        "2M",
        "--duration",
        "0.1",
        "--balloon-churn",
        "--compare",
        "range,global",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn no_lock_is_a_stress_mode_only_and_bad_modes_are_named() {
    let out = rangevm(&["stress", "--compare", "none,fast"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("possible values: none, range, global"),
        "{err}"
    );
    if cfg!(target_arch = "x86_64") {
        // `rangevm run` locks guest memory for real: range or global only.
        let out = rangevm(&["run", "--mem-lock", "none", "--kernel", "/nonexistent"]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("none"), "{err}");
    }
}

#[test]
fn compare_runs_every_listed_mode_side_by_side_with_ratios() {
    let out = rangevm(&[
        "stress",
        "--workers",
        "1",
        "--memory",
        "2M",
        "--duration",
        "0.2",
        "--compare",
        "none,range,global",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    let table: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("same work in each mode"))
        .collect();
    assert!(table.len() >= 7, "{text}");
    assert!(
        table[1].contains("faults/s") && table[1].contains("p50"),
        "{text}"
    );
    for (line, mode) in table[2..5].iter().zip(["none", "range", "global"]) {
        assert!(line.trim_start().starts_with(mode), "{text}");
    }
    assert!(
        table[5].contains("range / none:") && table[5].contains("p50"),
        "{text}"
    );
    assert!(table[6].contains("range / global:"), "{text}");
    assert!(text.contains("range / global throughput"), "{text}");

    // Rounds repeat the comparison, interleaved, and end with the medians.
    let out = rangevm(&[
        "stress",
        "--workers",
        "1",
        "--memory",
        "2M",
        "--duration",
        "0.1",
        "--compare",
        "none,range",
        "--rounds",
        "3",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("round 3 of 3"), "{text}");
    let medians = text
        .lines()
        .skip_while(|l| !l.starts_with("over 3 rounds"))
        .nth(1)
        .unwrap_or_else(|| panic!("no medians in {text}"));
    assert!(medians.contains("range / none:"), "{text}");
    // The median, then each of the three rounds.
    assert_eq!(medians.matches('[').count(), 3, "{medians}");

    let out = rangevm(&[
        "stress",
        "--workers",
        "1",
        "--memory",
        "2M",
        "--duration",
        "0.1",
        "--compare",
        "none,range,global",
        "--rounds",
        "2",
        "--json",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    for (i, line) in lines.iter().enumerate() {
        let mode = ["none", "range", "global"][i % 3];
        assert!(line.contains(&format!("\"mem_lock\":\"{mode}\"")), "{line}");
        assert_eq!(field(line, "round"), i as u64 / 3 + 1, "{line}");
        assert_eq!(field(line, "wrong_content"), 0, "{line}");
    }
}

#[test]
fn pages_given_back_late_or_at_once_still_fault_on_every_touch() {
    for lag in ["0", "8", "32", "4096"] {
        let out = rangevm(&[
            "stress",
            "--workers",
            "2",
            "--memory",
            "1M",
            "--give-back-lag",
            lag,
            "--duration",
            "0.2",
            "--json",
        ]);
        let text = stdout(&out);
        assert!(out.status.success(), "{text}\n{}", stderr(&out));
        // Each worker walks 128 pages; a lag longer than that is cut to fit, so a page
        // is always missing again by the time its worker comes back to it.
        assert!(field(&text, "touches") > 0, "lag {lag}: {text}");
        assert!(
            field(&text, "faults") >= field(&text, "touches"),
            "lag {lag}: {text}"
        );
        assert_eq!(field(&text, "wrong_content"), 0, "lag {lag}: {text}");
    }
}

#[test]
fn paired_runs_give_every_mode_the_same_touches_at_the_same_moments() {
    let out = rangevm(&[
        "stress",
        "--workers",
        "2",
        "--memory",
        "2M",
        "--pattern",
        "shared",
        "--duration",
        "0.3",
        "--compare",
        "none,range,global",
        "--paired",
        "--json",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let touches: Vec<u64> = lines.iter().map(|l| field(l, "touches")).collect();
    for (line, mode) in lines.iter().zip(["none", "range", "global"]) {
        assert!(line.contains(&format!("\"mem_lock\":\"{mode}\"")), "{line}");
        assert!(field(line, "faults") > 0, "{line}");
        assert_eq!(field(line, "wrong_content"), 0, "{line}");
        if mode != "global" {
            assert_eq!(field(line, "disjoint_waits"), 0, "{line}");
        }
    }
    // A worker stopped between two lanes of one page at most.
    let (lo, hi) = (touches.iter().min().unwrap(), touches.iter().max().unwrap());
    assert!(*lo > 0 && hi - lo <= 2, "{touches:?}");

    let out = rangevm(&[
        "stress",
        "--workers",
        "1",
        "--memory",
        "2M",
        "--duration",
        "0.2",
        "--compare",
        "none,range",
        "--paired",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("interleaved touch by touch"), "{text}");
    assert!(text.contains("range / none:"), "{text}");

    for (args, why) in [
        (&["--paired"][..], "give --compare too"),
        (
            &["--paired", "--compare", "--engine", "kvm"][..],
            "threads engine only",
        ),
        (
            &["--paired", "--compare", "--balloon-churn"][..],
            "runs no churn",
        ),
        (
            &["--paired", "--compare", "--harvest-interval", "5"][..],
            "runs no churn",
        ),
    ] {
        let mut all = vec!["stress", "--duration", "0.1"];
        all.extend_from_slice(args);
        let out = rangevm(&all);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
}
