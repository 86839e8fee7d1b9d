//! rangevm inside the emulated host (QEMU software emulation with real nested KVM):
//! the path every real-guest test of the boot issue takes on machines whose own KVM
//! cannot run stock guests.

use std::time::Duration;

#[path = "common/balloon_linux.rs"]
mod balloon_linux;
#[path = "common/linux_guest.rs"]
mod linux_guest;
#[path = "common/migrate_linux.rs"]
mod migrate_linux;

use rangevm_tests::{Console, DefaultGuest, EmuHost, MARKER};

/// Boots the emulated host with rangevm and the default guest in `/payload` and runs
/// `script` there.
fn run_with_default_guest(guest: &DefaultGuest, script: &str) -> Console {
    run_with_default_guest_within(guest, script, Duration::from_secs(300))
}

/// [`run_with_default_guest`] with a longer (or shorter) limit per emulated-host boot.
fn run_with_default_guest_within(guest: &DefaultGuest, script: &str, limit: Duration) -> Console {
    let console = EmuHost::new()
        .with_file(env!("CARGO_BIN_EXE_rangevm"))
        .with_file(&guest.kernel)
        .with_file(&guest.initrd)
        .run(script, limit)
        .expect("boot the emulated host");
    eprintln!("emulated host ran {:.1} s", console.elapsed.as_secs_f64());
    console
}

/// Inside one boot of the emulated host: `rangevm host-check` sees real KVM; the default
/// Linux guest boots under rangevm to its marker with 1 and 2 vCPUs, in both
/// `--mem-lock` modes, runs a command and powers off with exit status 0; and standard
/// input reaches a shell on the guest's serial console.
#[test]
fn default_linux_guest_boots_under_rangevm_inside_the_emulated_host() {
    let guest = DefaultGuest::build().expect("build the default guest");
    let cases = [(1, "range"), (2, "range"), (1, "global"), (2, "global")];
    let mut script = String::from("rangevm host-check; echo HOSTCHECK-END status=$?; ");
    for (cpus, lock) in cases {
        let cmdline = format!(
            "{} pci=off",
            guest.cmdline_running("echo guest-sees-cpus=$(grep -c ^processor /proc/cpuinfo)")
        );
        script.push_str(&format!(
            "echo CASE-BEGIN cpus={cpus} lock={lock}; \
             rangevm run --kernel vmlinuz --initrd initramfs.cpio.gz --memory 256M \
             --cpus {cpus} --mem-lock {lock} --cmdline '{cmdline}'; \
             echo CASE-END cpus={cpus} lock={lock} status=$?; "
        ));
    }
    // Serial input: a shell on the guest's console reads what arrives on rangevm's
    // standard input (a FIFO here, written once the guest is up).
    script.push_str(&format!(
        "mkfifo /tmp/in; exec 3<>/tmp/in; \
         rangevm run --kernel vmlinuz --initrd initramfs.cpio.gz --memory 256M \
         --cmdline '{} pci=off rangevm.shell=1' <&3 >/tmp/out 2>&1 & pid=$!; \
         i=0; until grep -q {MARKER} /tmp/out || [ $i -gt 600 ]; do sleep 0.2; i=$((i+1)); done; \
         sleep 2; echo 'echo from-stdin-$((6*7)); poweroff -f' >&3; \
         wait $pid; echo SHELL-END status=$?; cat /tmp/out; echo SHELL-OUT-END; ",
        guest.cmdline
    ));
    let console = run_with_default_guest(&guest, &script);
    let out = &console.output;
    assert!(out.contains("RANGEVM-EMUHOST-UP kvm=yes"), "{out}");
    assert!(out.contains("KVM              API version 12"), "{out}");
    assert!(
        out.contains("KVM_CAP_USER_MEMORY                yes"),
        "{out}"
    );
    assert!(out.contains("HOSTCHECK-END status=0"), "{out}");
    for (cpus, lock) in cases {
        let begin = format!("CASE-BEGIN cpus={cpus} lock={lock}");
        let end = format!("CASE-END cpus={cpus} lock={lock} status=");
        let start = out
            .find(&begin)
            .unwrap_or_else(|| panic!("no {begin}:\n{out}"));
        let stop = out[start..]
            .find(&end)
            .map(|i| start + i)
            .unwrap_or_else(|| panic!("no {end}:\n{out}"));
        let case = &out[start..stop];
        let status = out[stop + end.len()..].split_whitespace().next();
        assert_eq!(status, Some("0"), "rangevm's exit status, {begin}:\n{case}");
        assert!(case.contains(MARKER), "no marker, {begin}:\n{case}");
        assert!(
            case.contains(&format!("cpus={cpus} mem_kb=")),
            "the guest does not see {cpus} vCPUs, {begin}:\n{case}"
        );
        assert!(
            case.contains(&format!("guest-sees-cpus={cpus}")),
            "the command did not run, {begin}:\n{case}"
        );
        assert!(case.contains("RANGEVM-CMD-EXIT=0"), "{begin}:\n{case}");
        assert!(case.contains("reboot: Power down"), "{begin}:\n{case}");
    }
    let shell = out
        .split_once("SHELL-END status=")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("the shell case did not finish:\n{out}"));
    assert!(shell.starts_with('0'), "rangevm's exit status:\n{shell}");
    assert!(
        shell.contains("from-stdin-42"),
        "stdin did not reach the guest's shell:\n{shell}"
    );
    assert_eq!(console.command_status(), Some(0), "{out}");
}

/// The balloon with a real Linux guest (the scenario is in `common/balloon_linux.rs`).
#[test]
fn balloon_inflate_and_deflate_with_a_linux_guest_inside_the_emulated_host() {
    balloon_linux::balloon_inflate_and_deflate(linux_guest::Setup::x86_64());
}

/// A Linux guest migrates with 1 and 2 vCPUs and its console goes on (the scenario is
/// in `common/migrate_linux.rs`).
#[test]
fn a_linux_guest_migrates_inside_the_emulated_host_and_its_console_goes_on() {
    migrate_linux::console_goes_on(linux_guest::Setup::x86_64());
}

/// The balloon survives a precopy migration (`common/migrate_linux.rs`).
#[test]
fn the_balloon_survives_a_migration_inside_the_emulated_host() {
    migrate_linux::balloon_survives_a_migration(linux_guest::Setup::x86_64());
}
