//! rangevm inside the emulated host (QEMU software emulation with real nested KVM):
//! the path every real-guest test of the boot issue takes on machines whose own KVM
//! cannot run stock guests.

use std::time::Duration;

use rangevm_tests::{Console, DefaultGuest, EmuHost, MARKER};

/// Boots the emulated host with rangevm and the default guest in `/payload` and runs
/// `script` there.
fn run_with_default_guest(guest: &DefaultGuest, script: &str) -> Console {
    let console = EmuHost::new()
        .with_file(env!("CARGO_BIN_EXE_rangevm"))
        .with_file(&guest.kernel)
        .with_file(&guest.initrd)
        .run(script, Duration::from_secs(300))
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

/// The virtio balloon with a real Linux guest: after the guest has touched most of its
/// memory and freed it, inflating the balloon by half lowers the guest's available
/// memory and rangevm's resident memory; deflating gives the guest its memory back;
/// the guest's statistics arrive through `balloon stats`.
#[test]
fn balloon_inflate_and_deflate_with_a_linux_guest_inside_the_emulated_host() {
    let guest = DefaultGuest::build().expect("build the default guest");
    // A shell on the guest console reads commands from a FIFO; `say` sends one and
    // waits for the line it prints last. rss reads rangevm's resident set in KiB;
    // until_actual polls the balloon until the driver reached the target.
    let script = format!(
        r#"mkfifo /tmp/in; exec 3<>/tmp/in
rangevm run --kernel vmlinuz --initrd initramfs.cpio.gz --memory 256M --api-socket /tmp/api.sock \
  --cmdline '{cmdline} pci=off rangevm.shell=1' <&3 >/tmp/out 2>&1 & pid=$!
waitfor() {{ i=0; until grep -q "$1" /tmp/out || [ $i -gt 900 ]; do sleep 0.2; i=$((i+1)); done; }}
say() {{ echo "$1" >&3; waitfor "$2"; }}
rss() {{ sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\).*/\1/p' /proc/$pid/status; }}
actual() {{ rangevm ctl --api-socket /tmp/api.sock balloon stats | sed -n 's/.*"actual_bytes": *\([0-9]*\).*/\1/p'; }}
until_actual() {{ i=0; until [ "$(actual)" = "$1" ] || [ $i -gt 300 ]; do sleep 0.2; i=$((i+1)); done; echo "BALLOON-ACTUAL $(actual)"; }}
waitfor RANGEVM-GUEST-UP; sleep 2
say 'dd if=/dev/zero of=/big bs=1M count=150 2>/dev/null; rm /big; echo FILLED-$((1+1))' FILLED-2
say 'echo AVAIL-BEFORE $(sed -n "s/^MemAvailable: *\([0-9]*\).*/\1/p" /proc/meminfo) END' 'AVAIL-BEFORE.*END'
echo "RSS-BEFORE $(rss)"
rangevm ctl --api-socket /tmp/api.sock balloon set 128M
until_actual 134217728
echo "RSS-INFLATED $(rss)"
say 'echo AVAIL-INFLATED $(sed -n "s/^MemAvailable: *\([0-9]*\).*/\1/p" /proc/meminfo) END' 'AVAIL-INFLATED.*END'
rangevm ctl --api-socket /tmp/api.sock balloon stats >/dev/null; sleep 2
echo "STATS-BEGIN"; rangevm ctl --api-socket /tmp/api.sock balloon stats; echo "STATS-END"
rangevm ctl --api-socket /tmp/api.sock balloon set 0
until_actual 0
say 'echo AVAIL-DEFLATED $(sed -n "s/^MemAvailable: *\([0-9]*\).*/\1/p" /proc/meminfo) END' 'AVAIL-DEFLATED.*END'
echo 'poweroff -f' >&3
wait $pid; echo "BALLOON-VM-END status=$?"
cat /tmp/out | grep -E 'AVAIL-|FILLED'
"#,
        cmdline = guest.cmdline
    );
    let console = run_with_default_guest(&guest, &script);
    let out = &console.output;
    let value = |key: &str| -> u64 {
        out.lines()
            .rev()
            .filter_map(|l| l.trim().strip_prefix(key))
            .find_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
    };
    assert!(out.contains("BALLOON-VM-END status=0"), "{out}");
    let (avail0, avail1, avail2) = (
        value("AVAIL-BEFORE "),
        value("AVAIL-INFLATED "),
        value("AVAIL-DEFLATED "),
    );
    let (rss0, rss1) = (value("RSS-BEFORE "), value("RSS-INFLATED "));
    eprintln!(
        "guest MemAvailable {avail0} -> {avail1} -> {avail2} KiB; rangevm RSS {rss0} -> {rss1} KiB"
    );
    assert!(
        out.contains("BALLOON-ACTUAL 134217728"),
        "inflate not reached:\n{out}"
    );
    assert!(
        out.contains("BALLOON-ACTUAL 0"),
        "deflate not reached:\n{out}"
    );
    assert!(
        avail1 + 100 * 1024 < avail0,
        "inflate by 128M: {avail0} -> {avail1} KiB"
    );
    assert!(
        avail2 > avail1 + 100 * 1024,
        "deflate: {avail1} -> {avail2} KiB"
    );
    assert!(
        rss1 + 64 * 1024 < rss0,
        "host RSS after inflate: {rss0} -> {rss1} KiB"
    );
    let stats = out
        .split_once("STATS-BEGIN")
        .and_then(|(_, rest)| rest.split_once("STATS-END"))
        .map(|(s, _)| s)
        .unwrap_or_else(|| panic!("no stats:\n{out}"));
    assert!(stats.contains("\"available_memory\""), "{stats}");
    assert!(stats.contains("\"driver_active\": true"), "{stats}");
}
