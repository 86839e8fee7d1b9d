//! The `rangevm` binary as a user runs it.

use std::process::Command;

fn rangevm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rangevm"))
        .args(args)
        .output()
        .expect("run rangevm")
}

#[test]
fn help_explains_the_range_lock_and_lists_commands() {
    let out = rangevm(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("guest-physical range"), "{text}");
    assert!(text.contains("host-check"), "{text}");
    assert!(text.contains("--log-level"), "{text}");
}

#[test]
fn unknown_command_fails_with_usage() {
    let out = rangevm(&["teleport"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unrecognized subcommand 'teleport'"), "{err}");
}

#[test]
fn host_check_json_reports_the_page_size() {
    let out = rangevm(&["host-check", "--json"]);
    // Exit status 1 only means KVM is unusable here; the report is printed either way.
    let text = String::from_utf8_lossy(&out.stdout);
    let page_size = rangevm_memory::host_page_size();
    assert!(
        text.contains(&format!("\"host_page_size\":{page_size}")),
        "{text}"
    );
    assert_eq!(out.status.success(), text.contains("\"api_version\":12"));
}

#[test]
fn stress_compare_reports_both_modes_and_no_disjoint_waits_in_range_mode() {
    let out = rangevm(&[
        "stress",
        "--duration",
        "0.3",
        "--memory",
        "8M",
        "--workers",
        "2",
        "--pattern",
        "random",
        "--balloon-churn",
        "--harvest-interval",
        "20",
        "--compare",
        "--json",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].contains("\"mem_lock\":\"range\""), "{text}");
    assert!(lines[1].contains("\"mem_lock\":\"global\""), "{text}");
    for line in &lines {
        assert!(line.contains("\"wrong_content\":0"), "{line}");
        assert!(!line.contains("\"faults\":0,"), "no faults: {line}");
    }
    assert!(lines[0].contains("\"disjoint_waits\":0"), "{}", lines[0]);
}

#[test]
fn stress_rejects_bad_options_in_one_sentence() {
    let out = rangevm(&["stress", "--memory", "10X"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown suffix 'X'"), "{err}");
    let out = rangevm(&["stress", "--memory", "4K", "--workers", "4"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("give each at least one"), "{err}");
}
