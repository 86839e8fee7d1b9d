//! The control API of a running VM (`rangevm run --api-socket`, `rangevm ctl`), on this
//! machine's KVM with a tiny guest that hangs: info, pause/resume, dirty tracking,
//! shutdown, and requests that make no sense, after which the VM keeps running.

#![cfg(target_arch = "x86_64")]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rangevm_tests::tiny::{Exit, Mode, TinyGuest};

const RANGEVM: &str = env!("CARGO_BIN_EXE_rangevm");

struct Vm {
    child: Child,
    socket: PathBuf,
    _dir: PathBuf,
}

impl Vm {
    fn start(name: &str) -> Vm {
        let dir = std::env::temp_dir().join(format!("rangevm-api-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("hang.elf");
        TinyGuest::new(Mode::Long)
            .print("up\n")
            .exit(Exit::Hang)
            .write_to(&kernel)
            .unwrap();
        let socket = dir.join("api.sock");
        let child = Command::new(RANGEVM)
            .args([
                "run", "--memory", "64M", "--cpus", "2", "--serial", "null", "--kernel",
            ])
            .arg(&kernel)
            .arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "no API socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Vm {
            child,
            socket,
            _dir: dir,
        }
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(RANGEVM)
            .arg("ctl")
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ctl(args);
        assert!(out.status.success(), "ctl {args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn raw(&self, bytes: &[u8]) -> serde_json::Value {
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // A client may send more than the VMM reads; the VMM answers regardless.
        let _ = stream.write_all(bytes);
        // Done sending (a request without a newline ends here).
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        serde_json::from_str(answer.trim()).unwrap()
    }

    fn wait(mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                panic!("rangevm did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn socket_gone(path: &Path) -> bool {
    !path.exists()
}

#[test]
fn info_pause_resume_dirty_and_shutdown() {
    let vm = Vm::start("basic");
    let info = vm.ok(&["vm", "info"]);
    assert_eq!(info["state"], "running");
    assert_eq!(info["cpus"], 2);
    assert_eq!(info["memory_bytes"], 64 << 20);
    assert_eq!(info["mem_lock"], "range");
    assert_eq!(info["dirty_logging"], false);
    assert_eq!(vm.ok(&["vm", "pause"])["state"], "paused");
    assert_eq!(vm.ok(&["vm", "info"])["state"], "paused");
    assert_eq!(vm.ok(&["vm", "resume"])["state"], "running");
    assert_eq!(vm.ok(&["dirty", "start"])["dirty_logging"], true);
    // The guest hangs in cli; hlt: nothing is written after logging starts.
    let harvest = vm.ok(&["dirty", "harvest"]);
    assert_eq!(harvest["pages"], 0, "{harvest}");
    assert_eq!(harvest["chunks"], 32, "64 MiB in 2 MiB chunks: {harvest}");
    assert_eq!(vm.ok(&["dirty", "stop"])["dirty_logging"], false);
    assert_eq!(vm.ok(&["vm", "shutdown"])["state"], "shutting down");
    let socket = vm.socket.clone();
    let status = vm.wait();
    assert_eq!(status.code(), Some(0));
    assert!(socket_gone(&socket), "the socket file is removed on exit");
}

#[test]
fn requests_that_make_no_sense_are_refused_and_the_vm_keeps_running() {
    let vm = Vm::start("bad");
    for (bytes, says) in [
        (&b"\x00\xff\xfe garbage\n"[..], "not a JSON API request"),
        (
            br#"{"version":7,"command":"vm.info"}"#.as_slice(),
            "version 7",
        ),
        (
            b"{\"version\":1,\"command\":\"vm.fly\"}\n",
            "Unknown command",
        ),
        (
            b"{\"version\":1,\"command\":\"balloon.set\"}\n",
            "args.bytes",
        ),
    ] {
        let answer = vm.raw(bytes);
        assert_eq!(answer["ok"], false, "{answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{error}");
    }
    let huge = vec![b'x'; 200_000];
    let answer = vm.raw(&huge);
    assert!(
        answer["error"].as_str().unwrap().contains("longer than"),
        "{answer}"
    );
    // A client that connects and leaves without a word changes nothing.
    drop(UnixStream::connect(&vm.socket).unwrap());
    // ctl reports a refusal with exit 1 and the VM's sentence.
    let out = vm.ctl(&["balloon", "set", "1G"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("rangevm: ") && stderr.contains("larger than the guest's"),
        "{stderr}"
    );
    // A sensible target is taken even before a driver runs (this guest has none).
    let set = vm.ok(&["balloon", "set", "16M"]);
    assert_eq!(set["target_bytes"], 16 << 20, "{set}");
    assert_eq!(set["driver_active"], false, "{set}");
    let stats = vm.ok(&["balloon", "stats"]);
    assert_eq!(stats["target_bytes"], 16 << 20, "{stats}");
    assert_eq!(stats["actual_bytes"], 0, "{stats}");
    assert_eq!(vm.ok(&["balloon", "set", "0"])["target_bytes"], 0);
    // Still running and answering.
    assert_eq!(vm.ok(&["vm", "info"])["state"], "running");
    let out = vm.ctl(&["vm", "fly"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses unknown actions");
}

#[test]
fn ctl_without_a_vm_says_so() {
    let out = Command::new(RANGEVM)
        .args(["ctl", "--api-socket", "/nonexistent/api.sock", "vm", "info"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("rangevm: Cannot use the API socket /nonexistent/api.sock"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
