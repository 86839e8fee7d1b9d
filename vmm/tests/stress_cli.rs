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
