//! The balloon-with-a-Linux-guest scenario, shared by the x86_64 and the PowerPC64
//! emulated hosts.

use std::time::Duration;

use crate::linux_guest::Setup;

/// The virtio balloon with a real Linux guest: after the guest has touched most of its
/// memory and freed it, inflating the balloon by half lowers the guest's available
/// memory and rangevm's resident memory; deflating gives the guest its memory back;
/// the guest's statistics arrive through `balloon stats`.
pub fn balloon_inflate_and_deflate(setup: Setup) {
    let kernel = setup.guest.kernel_name();
    let memory = setup.memory;
    let cmdline = setup.cmdline_running_shell();
    // A shell on the guest console reads commands from a FIFO; `say` sends one and
    // waits for the line it prints last. rss reads rangevm's resident set in KiB;
    // until_actual polls the balloon until the driver reached the target.
    let script = format!(
        r#"mkfifo /tmp/in; exec 3<>/tmp/in
rangevm run --kernel {kernel} --initrd initramfs.cpio.gz --memory {memory} --api-socket /tmp/api.sock \
  --cmdline '{cmdline}' <&3 >/tmp/out 2>&1 & pid=$!
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
    );
    let console = setup.run(&script, Duration::from_secs(300));
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
