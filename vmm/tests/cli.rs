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
