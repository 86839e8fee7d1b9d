//! The postcopy-with-balloon scenario, shared by the x86_64 and the PowerPC64
//! emulated hosts: a real Linux guest migrates in postcopy between two rangevm
//! processes inside the emulated host (QEMU software emulation with real nested KVM),
//! with the virtio balloon used on the destination while its memory is still arriving.

use std::time::Duration;

use crate::linux_guest::{
    assert_avail_ticks_go_on, assert_booted_once, assert_handed_over, assert_shut_down, Report,
    Setup,
};

/// MiB of random data the guest writes to a tmpfs file before the migration (0: none),
/// so that the background push has real pages to send.
const FILL_MIB: u64 = 0;
/// The balloon's size on the destination.
const INFLATE_BYTES: u64 = 128 << 20;

/// A Linux guest that prints a tick and its MemAvailable every half second migrates in
/// postcopy (`--postcopy --verify --detach`); while the destination still fetches its
/// memory, the destination's balloon inflates by 128 MiB; once every page is in (none
/// missing, all verified against the source's CRC32C), no page the balloon holds came
/// back with old contents (`balloon check`), the balloon deflates, the ticks go on as
/// one sequence, and both VMMs end with status 0.
pub fn postcopy_with_balloon(setup: Setup) {
    let kernel = setup.guest.kernel_name();
    let guest_memory = setup.memory;
    let fill = if FILL_MIB != 0 {
        format!(
            "mkdir -p /tmp; mount -t tmpfs tmpfs /tmp; \
             dd if=/dev/urandom of=/tmp/fill bs=1M count={FILL_MIB} 2>/dev/null; echo FILLED; "
        )
    } else {
        String::new()
    };
    let cmdline = setup.cmdline_running(&format!(
            "{fill}i=0; while true; do \
             echo tick-$i avail=$(sed -n 's/^MemAvailable: *\\([0-9]*\\).*/\\1/p' /proc/meminfo) end; \
             i=$((i+1)); sleep 0.5; done"
    ));
    // waitfor FILE PATTERN [COUNT]: at most 180 s until FILE has COUNT lines matching.
    // stop PID: at most 60 s for PID to exit, then SIGKILL; prints nothing, sets $st.
    // lastavail FILE: the MemAvailable of FILE's last whole tick line.
    // actual API: the balloon's actual_bytes; until_actual API BYTES: at most 60 s.
    // phase FILE: the top-level phase of a `migrate status` answer; dphase: the
    // destination's phase now (its answer kept in /tmp/dst.st).
    let script = format!(
        r#"waitfor() {{ i=0; until [ "$(grep -c "$2" "$1" 2>/dev/null)" -ge "${{3:-1}}" ] 2>/dev/null || [ $i -gt 900 ]; do sleep 0.2; i=$((i+1)); done; }}
stop() {{ i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; kill -0 "$1" 2>/dev/null && {{ echo "KILLED $1"; kill -9 "$1"; }}; wait "$1"; st=$?; }}
show() {{ echo "$1-BEGIN"; cat "$2"; echo; echo "$1-END"; }}
lastavail() {{ sed -n 's/^tick-[0-9]* avail=\([0-9]*\) end.*/\1/p' "$1" | tail -n 1; }}
actual() {{ rangevm ctl --api-socket "$1" balloon stats 2>/dev/null | sed -n 's/.*"actual_bytes": *\([0-9]*\).*/\1/p'; }}
until_actual() {{ t0=$(date +%s); until [ "$(actual "$1")" = "$2" ] || [ $(($(date +%s) - t0)) -gt 240 ]; do sleep 0.5; done; }}
phase() {{ sed -n 's/^  "phase": *"\([a-z-]*\)".*/\1/p' "$1"; }}
dphase() {{ rangevm ctl --api-socket /tmp/dst.api migrate status >/tmp/dst.st 2>&1; phase /tmp/dst.st; }}
ms() {{ read u _ </proc/uptime; echo "${{u%.*}}${{u#*.}}0"; }}
showall() {{ show MIG-OUT /tmp/mig.out; show MIG-ERR /tmp/mig.err
  show SET1 /tmp/set1.out; show SET2 /tmp/set2.out
  show DST-ST-SET /tmp/dst.st.set; show DST-FINAL /tmp/dst.final; show SRC-ST /tmp/src.st
  show CHECK /tmp/check.out; show DST-STATS /tmp/dst.stats
  show SRC-ERR /tmp/src.err; show DST-ERR /tmp/dst.err
  show SRC-OUT /tmp/src.out; show DST-OUT /tmp/dst.out; }}
# A watchdog: what the files hold if the script has not ended in 560 s.
( sleep 560; echo "WATCHDOG at $(ms) ms"; echo "DST-ST-NOW:"; cat /tmp/dst.st; showall; poweroff -f ) & wpid=$!
rm -f /tmp/m.sock /tmp/src.out /tmp/dst.out /tmp/src.api /tmp/dst.api /tmp/src.err /tmp/dst.err
touch /tmp/mig.out /tmp/mig.err /tmp/set1.out /tmp/set2.out /tmp/src.st /tmp/dst.st /tmp/dst.st.set /tmp/dst.final /tmp/check.out /tmp/dst.stats
rangevm run --log-level info --incoming unix:/tmp/m.sock --serial file:/tmp/dst.out \
  --api-socket /tmp/dst.api </dev/null >/dev/null 2>/tmp/dst.err & dpid=$!
rangevm run --log-level info --kernel {kernel} --initrd initramfs.cpio.gz --memory {guest_memory} \
  --cpus 1 --serial file:/tmp/src.out --api-socket /tmp/src.api \
  --cmdline '{cmdline}' </dev/null >/dev/null 2>/tmp/src.err & spid=$!
waitfor /tmp/src.out '^tick-' 4
waitfor /tmp/dst.err 'waiting for an incoming migration'
echo "AVAIL-BEFORE=$(lastavail /tmp/src.out)"; echo "T=$(ms) ms"
t_send=$(ms)
rangevm ctl --api-socket /tmp/src.api migrate send --postcopy --verify --detach unix:/tmp/m.sock >/tmp/mig.out 2>/tmp/mig.err
echo "MIGRATE-STATUS=$?"; echo "T=$(ms) ms"
# The source's status until it exits: the last answer it gave is kept.
( while kill -0 $spid 2>/dev/null; do
    rangevm ctl --api-socket /tmp/src.api migrate status >/tmp/src.st.tmp 2>/dev/null && mv /tmp/src.st.tmp /tmp/src.st
    sleep 0.1
  done ) & ppid=$!
t=$(date +%s)
until p=$(dphase); [ "$p" = postcopy ] || [ "$p" = completed ] || [ "$p" = failed ] || [ $(($(date +%s) - t)) -gt 60 ]; do :; done
echo "DST-PHASE-SEEN=$p after $(($(ms) - t_send)) ms"
cp /tmp/dst.st /tmp/dst.st.set
rangevm ctl --api-socket /tmp/dst.api balloon set 128M >/tmp/set1.out 2>&1; echo "DST-SET1-STATUS=$?"
echo "DST-PHASE-AFTER-SET=$(dphase)"; echo "T=$(ms) ms"
t=$(date +%s); until_actual /tmp/dst.api {INFLATE_BYTES}
echo "DST-ACTUAL-INFLATED=$(actual /tmp/dst.api) after $(($(date +%s) - t)) s"
echo "DST-PHASE-AT-INFLATED=$(dphase)"; echo "T=$(ms) ms"
n=$(grep -c '^tick-' /tmp/dst.out); waitfor /tmp/dst.out '^tick-' $((n + 3))
echo "AVAIL-INFLATED=$(lastavail /tmp/dst.out)"
echo "DST-PHASE-AT-AVAIL-INFLATED=$(dphase)"
t=$(date +%s)
until p=$(dphase); [ "$p" = completed ] || [ "$p" = failed ] || [ $(($(date +%s) - t)) -gt 240 ]; do sleep 0.2; done
cp /tmp/dst.st /tmp/dst.final
echo "DST-PHASE-FINAL=$p after $(($(ms) - t_send)) ms"
waitfor /tmp/dst.err 'postcopy complete'
rangevm ctl --api-socket /tmp/dst.api balloon check >/tmp/check.out 2>&1; echo "DST-CHECK-STATUS=$?"; echo "T=$(ms) ms"
rangevm ctl --api-socket /tmp/dst.api balloon stats >/tmp/dst.stats 2>&1
stop $spid; echo "SRC-STATUS=$st"; echo "T=$(ms) ms"
wait $ppid
a=$(lastavail /tmp/dst.out)
rangevm ctl --api-socket /tmp/dst.api balloon set 0 >/tmp/set2.out 2>&1; echo "DST-SET2-STATUS=$?"
t=$(date +%s)
until [ "$(lastavail /tmp/dst.out)" -gt $((${{a:-0}} + 102400)) ] 2>/dev/null || [ $(($(date +%s) - t)) -gt 45 ]; do sleep 0.2; done
echo "DEFLATE-SECONDS=$(($(date +%s) - t))"
echo "AVAIL-DEFLATED=$(lastavail /tmp/dst.out)"
until_actual /tmp/dst.api 0; echo "DST-ACTUAL-DEFLATED=$(actual /tmp/dst.api)"
n=$(grep -c '^tick-' /tmp/dst.out); waitfor /tmp/dst.out '^tick-' $((n + 2))
rangevm ctl --api-socket /tmp/dst.api vm shutdown >/dev/null; echo "DST-SHUTDOWN=$?"; echo "T=$(ms) ms"
stop $dpid; echo "DST-STATUS=$st"
kill $wpid
showall
echo CASE-END
"#
    );
    let console = setup.run(&script, Duration::from_secs(640));
    let r = Report::new(
        &console,
        &[
            "MIG-OUT",
            "MIG-ERR",
            "SET1",
            "SET2",
            "DST-ST-SET",
            "DST-FINAL",
            "SRC-ST",
            "CHECK",
            "DST-STATS",
            "SRC-ERR",
            "DST-ERR",
            "SRC-OUT",
            "DST-OUT",
        ],
    );
    let logs = &r.logs;
    let (src_err, dst_err) = (r.part("SRC-ERR"), r.part("DST-ERR"));
    let (src_out, dst_out) = (r.part("SRC-OUT"), r.part("DST-OUT"));

    // The migration started and the source ended as a migrated source.
    assert_eq!(r.status("MIGRATE-STATUS="), "0", "migrate send\n{logs}");
    let src_st = r.json("SRC-ST");
    assert!(
        src_st["phase"] == "postcopy" || src_st["phase"] == "completed",
        "the source's last status\n{logs}"
    );
    assert_handed_over(r.status("SRC-STATUS="), src_err, dst_err, logs);
    assert!(
        src_err.contains("Postcopy migration completed"),
        "the source did not complete the postcopy\n{logs}"
    );
    assert!(dst_err.contains("postcopy complete"), "{logs}");

    // Every page arrived, each checked against the source's digest.
    let fin = r.json("DST-FINAL");
    let pc = &fin["postcopy"];
    assert_eq!(fin["phase"], "completed", "{logs}");
    assert_eq!(pc["phase"], "completed", "{logs}");
    assert_eq!(pc["missing_pages"], 0, "{logs}");
    assert_eq!(pc["digest_mismatches"], 0, "{logs}");
    assert!(pc["verified_pages"].as_u64().unwrap_or(0) > 0, "{logs}");
    assert!(pc["error"].is_null(), "{logs}");

    // The inflate on the destination, and when it happened.
    let phase_seen = r.status("DST-PHASE-SEEN=");
    let at_set = r.json("DST-ST-SET");
    let phase_after_set = r.status("DST-PHASE-AFTER-SET=");
    let phase_at_inflated = r.status("DST-PHASE-AT-INFLATED=");
    assert_eq!(
        r.status("DST-SET1-STATUS="),
        "0",
        "balloon set 128M\n{logs}"
    );
    assert_eq!(
        r.number("DST-ACTUAL-INFLATED="),
        INFLATE_BYTES,
        "the destination's balloon did not reach 128M\n{logs}"
    );
    let (avail_before, avail_inflated) = (r.number("AVAIL-BEFORE="), r.number("AVAIL-INFLATED="));
    assert!(
        avail_inflated + 100 * 1024 < avail_before,
        "inflate by 128M: MemAvailable {avail_before} -> {avail_inflated} KiB\n{logs}"
    );
    let during = at_set["phase"] == "postcopy" && phase_after_set == "postcopy";

    // The balloon's pages read as zero once every page is in.
    assert_eq!(r.status("DST-CHECK-STATUS="), "0", "balloon check\n{logs}");
    let check = r.json("CHECK");
    let ballooned = check["ballooned_pages"].as_u64().unwrap_or(0);
    assert!(ballooned > 0, "the balloon holds no page\n{logs}");
    assert_eq!(check["nonzero_pages"], 0, "{logs}");

    // Deflating gives the guest its memory back.
    assert_eq!(r.status("DST-SET2-STATUS="), "0", "balloon set 0\n{logs}");
    let avail_deflated = r.number("AVAIL-DEFLATED=");
    let deflate_seconds = r.number("DEFLATE-SECONDS=");
    assert!(
        avail_deflated > avail_inflated + 100 * 1024,
        "deflate on the destination: MemAvailable {avail_inflated} -> {avail_deflated} KiB\n{logs}"
    );
    assert_eq!(
        r.number("DST-ACTUAL-DEFLATED="),
        0,
        "the destination's balloon did not deflate\n{logs}"
    );

    // The ticks go on on the destination, one sequence, booted once.
    assert_booted_once(src_out, dst_out, logs);
    let (seq, on_src) = assert_avail_ticks_go_on(src_out, dst_out, logs);

    // The destination shuts down cleanly.
    assert_shut_down(r.status("DST-SHUTDOWN="), r.status("DST-STATUS="), logs);

    eprintln!(
        "guest {guest_memory}, {FILL_MIB} MiB filled from urandom before the migration; \
         destination phase first seen {phase_seen}"
    );
    eprintln!(
        "postcopy: demand_pages={} background_pages={} background_skipped={} \
         demand_p50_us={} demand_p99_us={} demand_max_us={} vcpu_blocked_ms={} \
         verified_pages={} missing_pages={} digest_mismatches={} total_ms={}",
        pc["demand_pages"],
        pc["background_pages"],
        pc["background_skipped"],
        pc["demand_p50_us"],
        pc["demand_p99_us"],
        pc["demand_max_us"],
        pc["vcpu_blocked_ms"],
        pc["verified_pages"],
        pc["missing_pages"],
        pc["digest_mismatches"],
        pc["total_ms"]
    );
    eprintln!(
        "source's last status: phase={} downtime_ms={} total_ms={} bytes_sent={}; {}",
        src_st["phase"],
        src_st["downtime_ms"],
        src_st["total_ms"],
        src_st["bytes_sent"],
        r.status("DST-PHASE-FINAL=")
    );
    eprintln!(
        "balloon set 128M: destination phase {} before, {phase_after_set} after, \
         {phase_at_inflated} when actual reached 128 MiB (missing_pages at the set: {}): \
         inflate {} postcopy",
        at_set["phase"],
        at_set["postcopy"]["missing_pages"],
        if during { "during" } else { "NOT during" }
    );
    eprintln!(
        "balloon check after postcopy, inflated: ballooned_pages={ballooned} nonzero_pages={}",
        check["nonzero_pages"]
    );
    eprintln!(
        "guest MemAvailable: {avail_before} KiB before, {avail_inflated} inflated on the \
         destination, {avail_deflated} after deflating ({deflate_seconds} s); ticks 0..={} \
         ({on_src} on the source)",
        seq.last().copied().unwrap_or(0)
    );
    assert!(
        during,
        "the inflate did not happen during postcopy (phase {} before the set, \
         {phase_after_set} after)\n{logs}",
        at_set["phase"]
    );
}
