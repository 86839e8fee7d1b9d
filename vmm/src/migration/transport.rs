//! Where a migration goes: `tcp:HOST:PORT` or `unix:PATH`, and the byte stream between
//! the two rangevm processes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Errors of the migration transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The address is not `tcp:HOST:PORT` or `unix:PATH`.
    #[error("'{0}' is not a migration address (use tcp:HOST:PORT or unix:PATH)")]
    BadAddress(String),
    /// The host name did not resolve.
    #[error("Cannot resolve {0}")]
    Resolve(String, #[source] io::Error),
    /// Connecting failed.
    #[error("Cannot connect to {0}")]
    Connect(String, #[source] io::Error),
    /// Listening failed.
    #[error("Cannot listen on {0}")]
    Listen(String, #[source] io::Error),
    /// Accepting or configuring a connection failed.
    #[error("Cannot set up the migration connection")]
    Socket(#[source] io::Error),
}

/// A migration address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationAddr {
    /// TCP: host (name or address) and port.
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl FromStr for MigrationAddr {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, TransportError> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            let port_ok = rest
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if port_ok {
                return Ok(MigrationAddr::Tcp(rest.to_string()));
            }
        } else if let Some(path) = s.strip_prefix("unix:") {
            if !path.is_empty() {
                return Ok(MigrationAddr::Unix(PathBuf::from(path)));
            }
        }
        Err(TransportError::BadAddress(s.to_string()))
    }
}

impl std::fmt::Display for MigrationAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationAddr::Tcp(hp) => write!(f, "tcp:{hp}"),
            MigrationAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One end of a migration connection.
#[derive(Debug)]
pub enum Stream {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
}

impl Stream {
    /// Connects to `addr`, giving up after `timeout` per address tried.
    pub fn connect(addr: &MigrationAddr, timeout: Duration) -> Result<Self, TransportError> {
        match addr {
            MigrationAddr::Tcp(hp) => {
                let addrs = hp
                    .to_socket_addrs()
                    .map_err(|e| TransportError::Resolve(hp.clone(), e))?;
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for a in addrs {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true).map_err(TransportError::Socket)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(TransportError::Connect(addr.to_string(), last))
            }
            MigrationAddr::Unix(p) => UnixStream::connect(p)
                .map(Stream::Unix)
                .map_err(|e| TransportError::Connect(addr.to_string(), e)),
        }
    }

    /// A second handle on the same connection (one for reading, one for writing).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Sets how long a read or a write may block (`None`: forever).
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }

    /// Closes both directions, which also wakes a thread blocked on the other handle.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// The peer, for log lines.
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Stream::Unix(_) => "a Unix socket peer".into(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// A listening socket for an incoming migration.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix; the path is removed when the listener is dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on `addr`. A Unix socket path that exists and nobody listens on is
    /// replaced; one somebody listens on is refused.
    pub fn bind(addr: &MigrationAddr) -> Result<Self, TransportError> {
        let err = |e| TransportError::Listen(addr.to_string(), e);
        match addr {
            MigrationAddr::Tcp(hp) => TcpListener::bind(hp.as_str())
                .map(Listener::Tcp)
                .map_err(err),
            MigrationAddr::Unix(p) => {
                if p.exists() && UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                UnixListener::bind(p)
                    .map(|l| Listener::Unix(l, p.clone()))
                    .map_err(err)
            }
        }
    }

    /// The address it listens on (with the port the kernel chose for port 0).
    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("tcp:{a}"))
                .unwrap_or_else(|_| "tcp:?".into()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// Waits for one connection.
    pub fn accept(&self) -> Result<Stream, TransportError> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().map_err(TransportError::Socket)?;
                s.set_nodelay(true).map_err(TransportError::Socket)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => l
                .accept()
                .map(|(s, _)| Stream::Unix(s))
                .map_err(TransportError::Socket),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_bad_ones_are_refused() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<MigrationAddr>().unwrap(),
            MigrationAddr::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "tcp:[::1]:4444".parse::<MigrationAddr>().unwrap(),
            MigrationAddr::Tcp("[::1]:4444".into())
        );
        assert_eq!(
            "unix:/tmp/m.sock".parse::<MigrationAddr>().unwrap(),
            MigrationAddr::Unix("/tmp/m.sock".into())
        );
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::4444",
            "tcp:h:99999",
            "unix:",
            "http://x",
        ] {
            let e = bad.parse::<MigrationAddr>().unwrap_err();
            assert!(
                e.to_string().contains("not a migration address"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_unix_listener_accepts_and_cleans_up() {
        let path = std::env::temp_dir().join(format!("rangevm-t-{}.sock", std::process::id()));
        let addr = MigrationAddr::Unix(path.clone());
        let l = Listener::bind(&addr).unwrap();
        let mut c = Stream::connect(&addr, Duration::from_secs(1)).unwrap();
        let mut s = l.accept().unwrap();
        c.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        drop(l);
        assert!(!path.exists());
    }

    #[test]
    fn connecting_to_nobody_says_where() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let addr: MigrationAddr = format!("tcp:127.0.0.1:{port}").parse().unwrap();
        let e = Stream::connect(&addr, Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
    }
}
