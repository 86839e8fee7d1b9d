//! Precopy migration scenarios of a real Linux guest between two rangevm processes
//! inside one emulated host, shared by the x86_64 and the PowerPC64 emulated hosts.

use std::time::Duration;

use crate::linux_guest::{
    assert_avail_ticks_go_on, assert_booted_once, assert_handed_over, assert_shut_down, section,
    ticks, Report, Setup,
};

/// A real Linux guest that prints `tick-N` every half second migrates from one rangevm
/// to another, both inside the same emulated host, with 1 and then 2 vCPUs: the
/// destination's console goes on with the source's sequence (no gap, no restart, no
/// second boot), `migrate send` reports `completed`, and both VMMs exit with status 0.
pub fn console_goes_on(setup: Setup) {
    let kernel = setup.guest.kernel_name();
    let memory = setup.memory;
    let cmdline =
        setup.cmdline_running("i=0; while true; do echo tick-$i; i=$((i+1)); sleep 0.5; done");
    let cases = [1u32, 2];
    // waitfor FILE PATTERN [COUNT]: at most 180 s until FILE has COUNT lines matching.
    // stop PID: at most 60 s for PID to exit, then SIGKILL; prints nothing, sets $st.
    let mut script = String::from(
        r#"waitfor() { i=0; until [ "$(grep -c "$2" "$1" 2>/dev/null)" -ge "${3:-1}" ] || [ $i -gt 900 ]; do sleep 0.2; i=$((i+1)); done; }
stop() { i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; kill -0 "$1" 2>/dev/null && { echo "KILLED $1"; kill -9 "$1"; }; wait "$1"; st=$?; }
show() { echo "$1-BEGIN"; cat "$2"; echo; echo "$1-END"; }
"#,
    );
    for cpus in cases {
        script.push_str(&format!(
            r#"echo CASE-BEGIN cpus={cpus}
rm -f /tmp/m.sock /tmp/src.out /tmp/dst.out /tmp/src.api /tmp/dst.api /tmp/src.err /tmp/dst.err
rangevm run --log-level info --incoming unix:/tmp/m.sock --serial file:/tmp/dst.out \
  --api-socket /tmp/dst.api </dev/null >/dev/null 2>/tmp/dst.err & dpid=$!
rangevm run --log-level info --kernel {kernel} --initrd initramfs.cpio.gz --memory {memory} \
  --cpus {cpus} --serial file:/tmp/src.out --api-socket /tmp/src.api \
  --cmdline '{cmdline}' </dev/null >/dev/null 2>/tmp/src.err & spid=$!
waitfor /tmp/src.out '^tick-' 4
waitfor /tmp/dst.err 'waiting for an incoming migration'
echo "SRC-TICKS-BEFORE=$(grep -c '^tick-' /tmp/src.out)"
rangevm ctl --api-socket /tmp/src.api migrate send unix:/tmp/m.sock >/tmp/mig.out 2>/tmp/mig.err
echo "MIGRATE-STATUS=$?"
stop $spid; echo "SRC-STATUS=$st"
n=$(grep -c '^tick-' /tmp/dst.out); waitfor /tmp/dst.out '^tick-' $((n + 4))
rangevm ctl --api-socket /tmp/dst.api vm shutdown >/dev/null; echo "DST-SHUTDOWN=$?"
stop $dpid; echo "DST-STATUS=$st"
show MIG-OUT /tmp/mig.out; show MIG-ERR /tmp/mig.err
show SRC-ERR /tmp/src.err; show DST-ERR /tmp/dst.err
show SRC-OUT /tmp/src.out; show DST-OUT /tmp/dst.out
echo CASE-END cpus={cpus}
"#
        ));
    }
    let console = setup.run(&script, Duration::from_secs(480));
    let out = console.output.replace('\r', "");
    for cpus in cases {
        let case = section(&out, &format!("CASE-BEGIN cpus={cpus}"), "CASE-END");
        let status = |key: &str| {
            case.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
                .unwrap_or_else(|| panic!("no {key}, cpus={cpus}:\n{case}"))
        };
        let (mig_out, mig_err) = (
            section(case, "MIG-OUT-BEGIN", "MIG-OUT-END"),
            section(case, "MIG-ERR-BEGIN", "MIG-ERR-END"),
        );
        let (src_err, dst_err) = (
            section(case, "SRC-ERR-BEGIN", "SRC-ERR-END"),
            section(case, "DST-ERR-BEGIN", "DST-ERR-END"),
        );
        let (src_out, dst_out) = (
            section(case, "SRC-OUT-BEGIN", "SRC-OUT-END"),
            section(case, "DST-OUT-BEGIN", "DST-OUT-END"),
        );
        let logs = format!(
            "cpus={cpus}\n--- migrate send stdout:\n{mig_out}\n--- migrate send stderr:\n{mig_err}\n\
             --- source stderr:\n{src_err}\n--- destination stderr:\n{dst_err}\n\
             --- source console:\n{src_out}\n--- destination console:\n{dst_out}"
        );
        assert_eq!(status("MIGRATE-STATUS="), "0", "migrate send\n{logs}");
        let json: serde_json::Value = serde_json::from_str(mig_out)
            .unwrap_or_else(|e| panic!("migrate send's JSON: {e}\n{logs}"));
        assert_eq!(json["phase"], "completed", "{logs}");
        eprintln!(
            "cpus={cpus}: downtime_ms={} total_ms={} bytes_sent={} rounds={} pages_sent={} zero_pages={} converged={}",
            json["downtime_ms"],
            json["total_ms"],
            json["bytes_sent"],
            json["round"],
            json["pages_sent"],
            json["zero_pages"],
            json["converged"]
        );
        assert_handed_over(status("SRC-STATUS="), src_err, dst_err, &logs);
        assert_shut_down(status("DST-SHUTDOWN="), status("DST-STATUS="), &logs);
        assert_booted_once(src_out, dst_out, &logs);
        // The source's console may end in the middle of a line that the destination
        // completes: the two together are one unbroken sequence from tick-0. (A line
        // cut by the shutdown at the destination's end does not count.)
        let src_whole = src_out.ends_with('\n');
        let all = ticks(&format!("{src_out}{dst_out}"));
        let expected: Vec<u64> = (0..all.len() as u64).collect();
        assert_eq!(all, expected, "the ticks are not one sequence\n{logs}");
        let on_src = ticks(src_out);
        let dst_whole_lines = if src_whole {
            dst_out
        } else {
            dst_out.split_once('\n').map_or("", |(_, rest)| rest)
        };
        let on_dst = ticks(dst_whole_lines);
        assert!(on_src.len() >= 4, "too few ticks on the source\n{logs}");
        assert!(
            on_dst.len() >= 3,
            "too few ticks on the destination\n{logs}"
        );
        let split = all.len() - on_src.len() - on_dst.len();
        eprintln!(
            "cpus={cpus}: source ticks 0..={}, destination ticks {}..={}{}",
            on_src.last().unwrap(),
            on_dst[0],
            on_dst.last().unwrap(),
            if split > 0 {
                " (one line begun on the source and completed on the destination)"
            } else {
                ""
            }
        );
    }
}

/// The balloon survives a migration: a Linux guest that prints a tick and its
/// MemAvailable every half second gets its balloon inflated by 128 MiB on the source and
/// migrates; the balloon's pages travel as zero runs without contents, the ticks go on
/// on the destination, whose `balloon stats` shows the inflated balloon and refreshes
/// the guest's statistics, and whose `balloon set 0` gives the guest its memory back.
pub fn balloon_survives_a_migration(setup: Setup) {
    const INFLATE_BYTES: u64 = 128 << 20;
    let kernel = setup.guest.kernel_name();
    let memory = setup.memory;
    let host_page = setup.host_page;
    let cmdline = setup.cmdline_running(
        "i=0; while true; do \
         echo tick-$i avail=$(sed -n 's/^MemAvailable: *\\([0-9]*\\).*/\\1/p' /proc/meminfo) end; \
         i=$((i+1)); sleep 0.5; done",
    );
    // waitfor FILE PATTERN [COUNT]: at most 180 s until FILE has COUNT lines matching.
    // stop PID: at most 60 s for PID to exit, then SIGKILL; prints nothing, sets $st.
    // lastavail FILE: the MemAvailable of FILE's last whole tick line.
    // until_actual API BYTES: at most 60 s until the balloon holds BYTES.
    // updates FILE: the `updates` count of a `balloon stats` answer.
    let script = format!(
        r#"waitfor() {{ i=0; until [ "$(grep -c "$2" "$1" 2>/dev/null)" -ge "${{3:-1}}" ] 2>/dev/null || [ $i -gt 900 ]; do sleep 0.2; i=$((i+1)); done; }}
stop() {{ i=0; while kill -0 "$1" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done; kill -0 "$1" 2>/dev/null && {{ echo "KILLED $1"; kill -9 "$1"; }}; wait "$1"; st=$?; }}
show() {{ echo "$1-BEGIN"; cat "$2"; echo; echo "$1-END"; }}
lastavail() {{ sed -n 's/^tick-[0-9]* avail=\([0-9]*\) end.*/\1/p' "$1" | tail -n 1; }}
actual() {{ rangevm ctl --api-socket "$1" balloon stats 2>/dev/null | sed -n 's/.*"actual_bytes": *\([0-9]*\).*/\1/p'; }}
until_actual() {{ t0=$(date +%s); until [ "$(actual "$1")" = "$2" ] || [ $(($(date +%s) - t0)) -gt 60 ]; do sleep 0.5; done; }}
updates() {{ sed -n 's/.*"updates": *\([0-9]*\).*/\1/p' "$1"; }}
rm -f /tmp/m.sock /tmp/src.out /tmp/dst.out /tmp/src.api /tmp/dst.api /tmp/src.err /tmp/dst.err
touch /tmp/set1.out /tmp/set2.out /tmp/src.stats /tmp/dst.stats1 /tmp/dst.stats2 /tmp/mig.out /tmp/mig.err
rangevm run --log-level info --incoming unix:/tmp/m.sock --serial file:/tmp/dst.out \
  --api-socket /tmp/dst.api </dev/null >/dev/null 2>/tmp/dst.err & dpid=$!
rangevm run --log-level info --kernel {kernel} --initrd initramfs.cpio.gz --memory {memory} \
  --cpus 1 --serial file:/tmp/src.out --api-socket /tmp/src.api \
  --cmdline '{cmdline}' </dev/null >/dev/null 2>/tmp/src.err & spid=$!
waitfor /tmp/src.out '^tick-' 4
waitfor /tmp/dst.err 'waiting for an incoming migration'
echo "AVAIL-BEFORE=$(lastavail /tmp/src.out)"
rangevm ctl --api-socket /tmp/src.api balloon set 128M >/tmp/set1.out 2>&1; echo "SRC-SET-STATUS=$?"
t=$(date +%s); until_actual /tmp/src.api {INFLATE_BYTES}
echo "SRC-ACTUAL=$(actual /tmp/src.api) after $(($(date +%s) - t)) s"
n=$(grep -c '^tick-' /tmp/src.out); waitfor /tmp/src.out '^tick-' $((n + 3))
echo "AVAIL-INFLATED=$(lastavail /tmp/src.out)"
rangevm ctl --api-socket /tmp/src.api balloon stats >/tmp/src.stats 2>&1
rangevm ctl --api-socket /tmp/src.api migrate send unix:/tmp/m.sock >/tmp/mig.out 2>/tmp/mig.err
echo "MIGRATE-STATUS=$?"
stop $spid; echo "SRC-STATUS=$st"
n=$(grep -c '^tick-' /tmp/dst.out); waitfor /tmp/dst.out '^tick-' $((n + 3))
echo "AVAIL-DST-INFLATED=$(lastavail /tmp/dst.out)"
rangevm ctl --api-socket /tmp/dst.api balloon stats >/tmp/dst.stats1 2>&1; echo "DST-STATS-STATUS=$?"
u=$(updates /tmp/dst.stats1); t=$(date +%s)
until rangevm ctl --api-socket /tmp/dst.api balloon stats >/tmp/dst.stats2 2>&1; [ "$(updates /tmp/dst.stats2)" -gt "${{u:-0}}" ] 2>/dev/null || [ $(($(date +%s) - t)) -gt 30 ]; do sleep 0.5; done
a=$(lastavail /tmp/dst.out)
rangevm ctl --api-socket /tmp/dst.api balloon set 0 >/tmp/set2.out 2>&1; echo "DST-SET-STATUS=$?"
t=$(date +%s)
until [ "$(lastavail /tmp/dst.out)" -gt $((${{a:-0}} + 102400)) ] 2>/dev/null || [ $(($(date +%s) - t)) -gt 45 ]; do sleep 0.2; done
echo "DEFLATE-SECONDS=$(($(date +%s) - t))"
echo "AVAIL-DEFLATED=$(lastavail /tmp/dst.out)"
until_actual /tmp/dst.api 0; echo "DST-ACTUAL=$(actual /tmp/dst.api)"
n=$(grep -c '^tick-' /tmp/dst.out); waitfor /tmp/dst.out '^tick-' $((n + 2))
rangevm ctl --api-socket /tmp/dst.api vm shutdown >/dev/null; echo "DST-SHUTDOWN=$?"
stop $dpid; echo "DST-STATUS=$st"
show MIG-OUT /tmp/mig.out; show MIG-ERR /tmp/mig.err
show SET1 /tmp/set1.out; show SET2 /tmp/set2.out
show SRC-STATS /tmp/src.stats; show DST-STATS1 /tmp/dst.stats1; show DST-STATS2 /tmp/dst.stats2
show SRC-ERR /tmp/src.err; show DST-ERR /tmp/dst.err
show SRC-OUT /tmp/src.out; show DST-OUT /tmp/dst.out
echo CASE-END
"#
    );
    let console = setup.run(&script, Duration::from_secs(420));
    let r = Report::new(
        &console,
        &[
            "MIG-OUT",
            "MIG-ERR",
            "SET1",
            "SET2",
            "SRC-STATS",
            "DST-STATS1",
            "DST-STATS2",
            "SRC-ERR",
            "DST-ERR",
            "SRC-OUT",
            "DST-OUT",
        ],
    );
    let logs = &r.logs;
    let (src_err, dst_err) = (r.part("SRC-ERR"), r.part("DST-ERR"));
    let (src_out, dst_out) = (r.part("SRC-OUT"), r.part("DST-OUT"));

    // The inflation took effect on the source.
    assert_eq!(r.status("SRC-SET-STATUS="), "0", "balloon set 128M\n{logs}");
    assert_eq!(
        r.number("SRC-ACTUAL="),
        INFLATE_BYTES,
        "the source's balloon did not reach 128M\n{logs}"
    );
    let (avail_before, avail_inflated) = (r.number("AVAIL-BEFORE="), r.number("AVAIL-INFLATED="));
    assert!(
        avail_inflated + 100 * 1024 < avail_before,
        "inflate by 128M: MemAvailable {avail_before} -> {avail_inflated} KiB\n{logs}"
    );

    // The migration, with the balloon's pages sent without contents.
    assert_eq!(r.status("MIGRATE-STATUS="), "0", "migrate send\n{logs}");
    let mig = r.json("MIG-OUT");
    assert_eq!(mig["phase"], "completed", "{logs}");
    let ballooned = mig["ballooned_pages"].as_u64().unwrap_or(0);
    let balloon_pages = INFLATE_BYTES / host_page;
    eprintln!(
        "migration: ballooned_pages={ballooned} (balloon {balloon_pages} pages) pages_sent={} \
         zero_pages={} bytes_sent={} downtime_ms={} total_ms={} rounds={}",
        mig["pages_sent"],
        mig["zero_pages"],
        mig["bytes_sent"],
        mig["downtime_ms"],
        mig["total_ms"],
        mig["round"]
    );
    assert!(
        ballooned * 10 >= balloon_pages * 9,
        "only {ballooned} of the balloon's {balloon_pages} pages went as ballooned zero runs\n{logs}"
    );
    assert_handed_over(r.status("SRC-STATUS="), src_err, dst_err, logs);

    // The ticks go on on the destination, one sequence, booted once.
    assert_booted_once(src_out, dst_out, logs);
    assert_avail_ticks_go_on(src_out, dst_out, logs);

    // The destination's balloon: the inflated state arrived, the guest's statistics
    // refresh, and deflating gives the guest its memory back.
    assert_eq!(r.status("DST-STATS-STATUS="), "0", "balloon stats\n{logs}");
    let (stats1, stats2) = (r.json("DST-STATS1"), r.json("DST-STATS2"));
    eprintln!(
        "destination balloon stats: actual_bytes={} target_bytes={} updates {} -> {} \
         available_memory {} -> {}",
        stats1["actual_bytes"],
        stats1["target_bytes"],
        stats1["updates"],
        stats2["updates"],
        stats1["stats"]["available_memory"],
        stats2["stats"]["available_memory"]
    );
    assert_eq!(stats1["driver_active"], true, "{logs}");
    assert_eq!(stats1["actual_bytes"], INFLATE_BYTES, "{logs}");
    assert_eq!(stats1["target_bytes"], INFLATE_BYTES, "{logs}");
    assert!(
        stats1["stats"]["available_memory"].as_u64().is_some(),
        "the guest's statistics did not migrate\n{logs}"
    );
    assert!(
        stats2["updates"].as_u64() > stats1["updates"].as_u64(),
        "the guest did not refresh its statistics on the destination\n{logs}"
    );
    assert!(
        stats2["stats"]["available_memory"].as_u64().is_some(),
        "{logs}"
    );
    assert_eq!(r.status("DST-SET-STATUS="), "0", "balloon set 0\n{logs}");
    let avail_dst_inflated = r.number("AVAIL-DST-INFLATED=");
    let avail_deflated = r.number("AVAIL-DEFLATED=");
    let deflate_seconds = r.number("DEFLATE-SECONDS=");
    eprintln!(
        "guest MemAvailable: {avail_before} KiB before, {avail_inflated} inflated on the source, \
         {avail_dst_inflated} on the destination, {avail_deflated} after deflating there \
         ({deflate_seconds} s)"
    );
    assert!(
        avail_deflated > avail_dst_inflated + 100 * 1024,
        "deflate on the destination: MemAvailable {avail_dst_inflated} -> {avail_deflated} KiB\n{logs}"
    );
    assert!(
        deflate_seconds <= 40,
        "deflate took {deflate_seconds} s\n{logs}"
    );
    assert_eq!(
        r.number("DST-ACTUAL="),
        0,
        "the destination's balloon did not deflate\n{logs}"
    );
    assert_shut_down(r.status("DST-SHUTDOWN="), r.status("DST-STATUS="), logs);
}
