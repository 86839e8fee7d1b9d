//! The control API of a running VM: a small versioned JSON protocol on a Unix socket
//! (`rangevm run --api-socket PATH`), and its client (`rangevm ctl`).
//!
//! One request per connection: the client connects, writes one JSON object and a
//! newline, reads one JSON object and a newline back, and closes.
//!
//! ```text
//! -> {"version":1,"command":"vm.info"}
//! <- {"version":1,"ok":true,"result":{"state":"running","cpus":2,...}}
//! -> {"version":1,"command":"balloon.set","args":{"bytes":268435456}}
//! <- {"version":1,"ok":false,"error":"This VM has no balloon device"}
//! ```
//!
//! Commands: `vm.info`, `vm.pause`, `vm.resume`, `vm.shutdown`, `dirty.start`,
//! `dirty.harvest`, `dirty.stop`, `balloon.set` (`args.bytes`), `balloon.stats`, `balloon.check`,
//! `migrate.send` (`args.url`, optional `downtime_ms`, `max_rounds`, `watch`,
//! `verify`, `postcopy`, `postcopy_after`),
//! `migrate.status`, `migrate.cancel`, `migrate.resume` (`args.url`). With `watch: true`, `migrate.send` keeps the
//! connection open after its answer and writes one JSON status line every ~200 ms
//! until the migration ends (the one exception to one answer per connection). A
//! request that makes no sense (not JSON, another version, an unknown command, bad
//! arguments, longer than [`MAX_REQUEST`]) gets `ok: false` with a sentence, and the VM
//! keeps running.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// The longest request accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Errors of the control API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be created or reached.
    #[error("Cannot use the API socket {path}")]
    Socket {
        /// Its path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed mid-request.
    #[error("The API connection failed")]
    Io(#[source] std::io::Error),
    /// The answer was not a protocol response.
    #[error("The VM's answer is not an API response: {0}")]
    BadResponse(String),
    /// The VM refused the request.
    #[error("The VM refused the request: {0}")]
    Refused(String),
    /// A migration did not complete.
    #[error("{0}")]
    MigrationFailed(String),
}

/// A request as it travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version.
    pub version: u32,
    /// `vm.info`, `balloon.set`, ...
    pub command: String,
    /// Command arguments.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub args: serde_json::Value,
}

/// A response as it travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version.
    pub version: u32,
    /// Whether the command was carried out.
    pub ok: bool,
    /// Its result.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub result: serde_json::Value,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// A success.
    pub fn ok(result: serde_json::Value) -> Self {
        Response {
            version: VERSION,
            ok: true,
            result,
            error: None,
        }
    }

    /// A refusal, with a sentence.
    pub fn err(why: impl Into<String>) -> Self {
        Response {
            version: VERSION,
            ok: false,
            result: serde_json::Value::Null,
            error: Some(why.into()),
        }
    }

    /// The line that goes on the wire.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|_| {
            String::from(r#"{"version":1,"ok":false,"error":"Internal error"}"#)
        });
        line.push('\n');
        line
    }
}

/// The arguments of `migrate.send`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateArgs {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    pub url: String,
    /// The downtime target in ms.
    pub downtime_ms: u64,
    /// The round limit.
    pub max_rounds: u32,
    /// Stream status lines on this connection until the end.
    pub watch: bool,
    /// Have the destination check every page's CRC32C at switch-over.
    pub verify: bool,
    /// Postcopy: switch over at once and send memory while the guest runs there.
    pub postcopy: bool,
    /// Switch to postcopy after this many precopy rounds if precopy has not converged.
    pub postcopy_after: Option<u32>,
}

/// The most rounds `migrate.send` accepts as a limit.
pub const MAX_ROUNDS_LIMIT: u32 = 10_000;

/// What a request asks for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `vm.info`.
    VmInfo,
    /// `vm.pause`.
    VmPause,
    /// `vm.resume`.
    VmResume,
    /// `vm.shutdown`: stop the guest and exit rangevm.
    VmShutdown,
    /// `dirty.start`.
    DirtyStart,
    /// `dirty.harvest`.
    DirtyHarvest,
    /// `dirty.stop`.
    DirtyStop,
    /// `balloon.set` to this many bytes.
    BalloonSet(u64),
    /// `balloon.stats`.
    BalloonStats,
    /// `balloon.check`: the pages the balloon holds, and how many do not read as zero.
    BalloonCheck,
    /// `migrate.send`.
    MigrateSend(MigrateArgs),
    /// `migrate.status`.
    MigrateStatus,
    /// `migrate.cancel`.
    MigrateCancel,
    /// `migrate.resume` with `args.url`: a postcopy paused on a dropped link goes on
    /// (the destination listens there, the source connects there).
    MigrateResume(String),
}

fn migrate_args(args: &serde_json::Value) -> Result<MigrateArgs, String> {
    let url = args
        .get("url")
        .and_then(serde_json::Value::as_str)
        .ok_or("migrate.send needs args.url, as in tcp:HOST:PORT or unix:PATH")?;
    url.parse::<crate::migration::transport::MigrationAddr>()
        .map_err(|e| e.to_string())?;
    let number = |key: &str, default: u64| -> Result<u64, String> {
        match args.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| format!("migrate.send: args.{key} must be a whole number")),
        }
    };
    let downtime_ms = number("downtime_ms", crate::migration::DEFAULT_DOWNTIME_MS)?;
    if downtime_ms == 0 || downtime_ms > 3_600_000 {
        return Err("migrate.send: args.downtime_ms must be 1 to 3600000 ms".into());
    }
    let max_rounds = u32::try_from(number(
        "max_rounds",
        u64::from(crate::migration::DEFAULT_MAX_ROUNDS),
    )?)
    .ok()
    .filter(|&r| r <= MAX_ROUNDS_LIMIT)
    .ok_or_else(|| format!("migrate.send: args.max_rounds must be 0 to {MAX_ROUNDS_LIMIT}"))?;
    let watch = args
        .get("watch")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let verify = args
        .get("verify")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let postcopy = args
        .get("postcopy")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let postcopy_after = match args.get("postcopy_after") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| (1..=MAX_ROUNDS_LIMIT).contains(n))
                .ok_or_else(|| {
                    format!("migrate.send: args.postcopy_after must be 1 to {MAX_ROUNDS_LIMIT}")
                })?,
        ),
    };
    if postcopy && postcopy_after.is_some() {
        return Err(
            "migrate.send: args.postcopy and args.postcopy_after exclude each other".into(),
        );
    }
    Ok(MigrateArgs {
        url: url.to_string(),
        downtime_ms,
        max_rounds,
        watch,
        verify,
        postcopy,
        postcopy_after,
    })
}

/// Parses one request line; the error is the sentence the client gets back.
pub fn parse_request(line: &[u8]) -> Result<Command, String> {
    let request: Request = serde_json::from_slice(line)
        .map_err(|e| format!("The request is not a JSON API request ({e})"))?;
    if request.version != VERSION {
        return Err(format!(
            "Protocol version {} is not spoken here (this VM speaks {VERSION})",
            request.version
        ));
    }
    Ok(match request.command.as_str() {
        "vm.info" => Command::VmInfo,
        "vm.pause" => Command::VmPause,
        "vm.resume" => Command::VmResume,
        "vm.shutdown" => Command::VmShutdown,
        "dirty.start" => Command::DirtyStart,
        "dirty.harvest" => Command::DirtyHarvest,
        "dirty.stop" => Command::DirtyStop,
        "balloon.stats" => Command::BalloonStats,
        "balloon.check" => Command::BalloonCheck,
        "balloon.set" => Command::BalloonSet(
            request
                .args
                .get("bytes")
                .and_then(serde_json::Value::as_u64)
                .ok_or("balloon.set needs args.bytes, a number of bytes")?,
        ),
        "migrate.send" => Command::MigrateSend(migrate_args(&request.args)?),
        "migrate.status" => Command::MigrateStatus,
        "migrate.cancel" => Command::MigrateCancel,
        "migrate.resume" => {
            let url = request
                .args
                .get("url")
                .and_then(serde_json::Value::as_str)
                .ok_or("migrate.resume needs args.url, as in tcp:HOST:PORT or unix:PATH")?;
            url.parse::<crate::migration::transport::MigrationAddr>()
                .map_err(|e| e.to_string())?;
            Command::MigrateResume(url.to_string())
        }
        other => return Err(format!("Unknown command '{other}'")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_get_a_sentence() {
        assert_eq!(
            parse_request(br#"{"version":1,"command":"vm.info"}"#),
            Ok(Command::VmInfo)
        );
        assert_eq!(
            parse_request(br#"{"version":1,"command":"balloon.set","args":{"bytes":4096}}"#),
            Ok(Command::BalloonSet(4096))
        );
        assert_eq!(
            parse_request(
                br#"{"version":1,"command":"migrate.send","args":{"url":"tcp:127.0.0.1:4444"}}"#
            ),
            Ok(Command::MigrateSend(MigrateArgs {
                url: "tcp:127.0.0.1:4444".into(),
                downtime_ms: 300,
                max_rounds: 30,
                watch: false,
                verify: false,
                postcopy: false,
                postcopy_after: None,
            }))
        );
        for (bad, says) in [
            (&b"\x00\xffgarbage"[..], "not a JSON"),
            (br#"{"version":2,"command":"vm.info"}"#, "version 2"),
            (
                br#"{"version":1,"command":"vm.fly"}"#,
                "Unknown command 'vm.fly'",
            ),
            (br#"{"version":1,"command":"balloon.set"}"#, "args.bytes"),
            (
                br#"{"version":1,"command":"balloon.set","args":{"bytes":-1}}"#,
                "args.bytes",
            ),
            (br#"[1,2,3]"#, "not a JSON"),
            (br#"{"version":1,"command":"migrate.send"}"#, "args.url"),
            (
                br#"{"version":1,"command":"migrate.send","args":{"url":"ftp:x"}}"#,
                "not a migration address",
            ),
            (
                br#"{"version":1,"command":"migrate.send","args":{"url":"tcp:h:1","downtime_ms":0}}"#,
                "downtime_ms",
            ),
            (
                br#"{"version":1,"command":"migrate.send","args":{"url":"tcp:h:1","max_rounds":-3}}"#,
                "max_rounds",
            ),
        ] {
            let err = parse_request(bad).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn responses_round_trip() {
        let ok = Response::ok(serde_json::json!({"cpus": 2}));
        let back: Response = serde_json::from_str(ok.to_line().trim()).unwrap();
        assert_eq!(back, ok);
        let err = Response::err("No");
        assert_eq!(
            err.to_line(),
            "{\"version\":1,\"ok\":false,\"error\":\"No\"}\n"
        );
    }
}
