//! The local API: a Unix stream socket where applications hand messages to the agent.
//!
//! # Protocol (newline-delimited JSON)
//!
//! Each request is one line of JSON (at most [`MAX_LINE`] bytes including the `\n`); each
//! gets exactly one response line, in request order. Requests may be pipelined (up to
//! [`MAX_PIPELINE`] unanswered per connection).
//!
//! ```text
//! → {"op":"publish","topic":"telemetry/temp","payload":"MjEuNQ==","id":1}
//! ← {"ok":true,"id":1,"seq":42,"msg_id":"9f2c…002a"}
//! → {"op":"status"}
//! ← {"ok":true,"status":{…}}
//! ← {"ok":false,"id":1,"code":"bad_topic","error":"topic must start with telemetry/ or events/ …"}
//! ```
//!
//! * `payload` is standard base64 (RFC 4648 with padding) of at most
//!   [`crate::outbox::OutboxConfig::max_payload`] bytes; `id` is optional and echoed back.
//! * `"ok":true` for a publish means the message is written and flushed to the durable
//!   outbox: it will reach the server even if the agent is killed right after.
//! * Error codes: `bad_request` (not JSON, unknown field or op, bad base64), `bad_topic`,
//!   `too_large`, `line_too_long` (the connection is closed after it), `outbox_full`,
//!   `forbidden` (peer not allowed; the connection is closed), `disk_full` (the device's disk
//!   is full: not stored, retry once space returns), `unavailable` (outbox I/O
//!   error or agent stopping).
//!
//! # Who may connect
//!
//! The socket file is created with mode 0660 (configurable) and the configured group. On
//! every connection the peer's credentials (`SO_PEERCRED`) are checked again: root, the
//! agent's own uid, and members of the configured group (primary group, or supplementary
//! group as listed in `/proc/<pid>/status`) are served; anyone else gets `forbidden`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::outbox::{Accepted, Outbox, OutboxError};

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/devid/agent.sock";
/// Longest request line, in bytes (a 64 KiB payload in base64 plus room for the rest).
pub const MAX_LINE: usize = 96 * 1024;
/// Most unanswered requests per connection.
pub const MAX_PIPELINE: usize = 256;
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Who may use the socket besides root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerPolicy {
    /// The agent's own uid.
    pub agent_uid: u32,
    /// Members of this group may publish.
    pub group: Option<u32>,
}

impl PeerPolicy {
    /// Whether a peer with these credentials (uid and gid from `SO_PEERCRED`, supplementary
    /// groups from `SO_PEERGROUPS`) may use the socket.
    pub fn allows(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        if uid == 0 || uid == self.agent_uid {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        gid == group || groups.contains(&group)
    }
}

/// Errors setting up the socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// Another agent answers on this socket.
    #[error("another agent is already listening on {0}; stop it first or use --socket")]
    InUse(String),
    /// The socket could not be created.
    #[error("cannot create the agent socket {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Create the listening socket at `path` with `mode` and group `gid`. A stale socket file
/// (nobody listening) is replaced; a live one is an error.
pub fn bind(path: &Path, mode: u32, gid: Option<u32>) -> Result<UnixListener, SocketError> {
    use std::os::unix::fs::PermissionsExt;
    let ioe = |source| SocketError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::create_dir_all(parent).map_err(ioe)?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(SocketError::Io {
                path: path.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way; not touching it",
                ),
            });
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(ioe)?;
    }
    let listener = UnixListener::bind(path).map_err(ioe)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o777)).map_err(ioe)?;
    if let Some(g) = gid {
        std::os::unix::fs::chown(path, None, Some(g)).map_err(ioe)?;
    }
    Ok(listener)
}

/// A request as it arrives on the wire.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestWire {
    op: String,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    id: Option<Value>,
}

/// One response line.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The request's `id`, echoed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    /// Publish: the message's sequence number in the outbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Publish: the message's idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    /// Status: the agent status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
    /// Error code (see the module docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Error sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn err(id: Option<Value>, code: &str, error: impl Into<String>) -> Self {
        Response {
            ok: false,
            id,
            code: Some(code.into()),
            error: Some(error.into()),
            ..Response::default()
        }
    }
}

fn outbox_error(id: Option<Value>, e: &OutboxError) -> Response {
    let code = match e {
        OutboxError::Full { .. } => "outbox_full",
        OutboxError::TooLarge { .. } => "too_large",
        OutboxError::Topic(_) => "bad_topic",
        OutboxError::DiskFull => "disk_full",
        _ => "unavailable",
    };
    Response::err(id, code, e.to_string())
}

/// What the socket server needs.
pub struct LocalApi {
    /// The outbox messages go to.
    pub outbox: Arc<Outbox>,
    /// Who may connect.
    pub policy: PeerPolicy,
    /// Produces the status JSON for `{"op":"status"}`.
    pub status: Box<dyn Fn() -> Value + Send + Sync>,
}

enum Reply {
    Ready(Response),
    Wait(
        Option<Value>,
        oneshot::Receiver<Result<Accepted, OutboxError>>,
    ),
}

impl LocalApi {
    /// Accept connections until the listener fails (the task is aborted on shutdown).
    pub async fn serve(self: Arc<Self>, listener: UnixListener) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "local socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!("too many local connections; refusing one");
                tokio::spawn(async move {
                    let mut s = stream;
                    let r = Response::err(None, "unavailable", "too many connections; retry");
                    let _ = write_line(&mut s, &r).await;
                });
                continue;
            };
            let api = self.clone();
            tokio::spawn(async move {
                api.handle(stream).await;
                drop(permit);
            });
        }
    }

    async fn handle(&self, mut stream: UnixStream) {
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read local peer credentials; closing");
                return;
            }
        };
        // Supplementary groups come from the socket (SO_PEERGROUPS), not /proc: /proc is
        // invisible under the unit's ProtectProc=invisible and races with PID reuse.
        let groups = match devid_secmem::socket_peer_groups(std::os::fd::AsFd::as_fd(&stream)) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot read the local peer's supplementary groups (SO_PEERGROUPS needs \
                     Linux 4.13); only its primary group counts"
                );
                Vec::new()
            }
        };
        if !self.policy.allows(cred.uid(), cred.gid(), &groups) {
            tracing::warn!(
                uid = cred.uid(),
                gid = cred.gid(),
                pid = cred.pid(),
                "local peer refused: not root, not the agent's user, not in the allowed group"
            );
            let r = Response::err(
                None,
                "forbidden",
                format!(
                    "uid {} / gid {} may not use the devid agent: run as the agent's user or a \
                     member of its socket group",
                    cred.uid(),
                    cred.gid()
                ),
            );
            let _ = write_line(&mut stream, &r).await;
            return;
        }
        let (rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Reply>(MAX_PIPELINE);
        let writer = tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                let resp = match r {
                    Reply::Ready(resp) => resp,
                    Reply::Wait(id, wait) => match wait.await {
                        Ok(Ok(a)) => Response {
                            ok: true,
                            id,
                            seq: Some(a.seq),
                            msg_id: Some(a.msg_id),
                            ..Response::default()
                        },
                        Ok(Err(e)) => outbox_error(id, &e),
                        Err(_) => outbox_error(id, &OutboxError::Closed),
                    },
                };
                if write_line(&mut wr, &resp).await.is_err() {
                    return;
                }
            }
        });
        let mut reader = BufReader::new(rd);
        loop {
            let mut line = Vec::new();
            let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
            let read = limited.read_until(b'\n', &mut line);
            let n = match tokio::time::timeout(IDLE_TIMEOUT, read).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) | Err(_) => break,
            };
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') && line.len() > MAX_LINE {
                let r = Response::err(
                    None,
                    "line_too_long",
                    format!("request line longer than {MAX_LINE} bytes; closing the connection"),
                );
                let _ = tx.send(Reply::Ready(r)).await;
                break;
            }
            let reply = self.dispatch(&line);
            if tx.send(reply).await.is_err() {
                break;
            }
        }
        drop(tx);
        let _ = writer.await;
    }

    fn dispatch(&self, line: &[u8]) -> Reply {
        match parse_request(line) {
            Err(r) => Reply::Ready(*r),
            Ok(Request::Publish { id, topic, payload }) => {
                match self.outbox.submit(&topic, payload) {
                    Ok(wait) => Reply::Wait(id, wait),
                    Err(e) => Reply::Ready(outbox_error(id, &e)),
                }
            }
            Ok(Request::Status { id }) => Reply::Ready(Response {
                ok: true,
                id,
                status: Some((self.status)()),
                ..Response::default()
            }),
        }
    }
}

/// One application request, parsed (the outbox still checks the topic and the size).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Request {
    /// `{"op":"publish","topic":...,"payload":"<base64>"}`
    Publish {
        /// The request's `id`, echoed.
        id: Option<Value>,
        /// Topic suffix.
        topic: String,
        /// Decoded payload.
        payload: Vec<u8>,
    },
    /// `{"op":"status"}`
    Status {
        /// The request's `id`, echoed.
        id: Option<Value>,
    },
}

/// Parse one request line from an application (input from outside the agent: fuzzed by
/// `fuzz/fuzz_targets/local_requests.rs`). A request that is not valid gives the error
/// response to send back.
pub fn parse_request(line: &[u8]) -> Result<Request, Box<Response>> {
    let bad = |id: Option<Value>, why: String| Box::new(Response::err(id, "bad_request", why));
    let req: RequestWire = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            return Err(bad(
                None,
                format!(
                    "not a valid request ({}): send one JSON object per line, e.g. \
                     {{\"op\":\"publish\",\"topic\":\"telemetry/temp\",\"payload\":\"<base64>\"}}",
                    e.classify_name()
                ),
            ))
        }
    };
    let id = req.id;
    match req.op.as_str() {
        "publish" => {
            let Some(topic) = req.topic else {
                return Err(bad(id, "publish needs topic".into()));
            };
            let Some(b64) = req.payload else {
                return Err(bad(id, "publish needs payload (base64)".into()));
            };
            match base64::engine::general_purpose::STANDARD.decode(b64) {
                Ok(payload) => Ok(Request::Publish { id, topic, payload }),
                Err(_) => Err(bad(id, "payload is not valid standard base64".into())),
            }
        }
        "status" => Ok(Request::Status { id }),
        _ => Err(bad(id, "unknown op: use publish or status".into())),
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "i/o error",
            serde_json::error::Category::Syntax => "invalid JSON",
            serde_json::error::Category::Data => "unknown field or wrong type",
            serde_json::error::Category::Eof => "incomplete JSON",
        }
    }
}

async fn write_line<W: AsyncWriteExt + Unpin>(w: &mut W, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

/// Errors of the client side ([`publish`], [`status`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket could not be reached.
    #[error(
        "cannot connect to the devid agent at {path}: {source} (is `devid agent` running? is \
         this user in the agent's socket group? set --socket or DEVID_AGENT_SOCKET)"
    )]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The agent answered with an error.
    #[error("the agent refused ({code}): {message}")]
    Refused {
        /// Error code.
        code: String,
        /// The agent's sentence.
        message: String,
    },
    /// Reading or writing the socket failed, or the answer is not the protocol.
    #[error("talking to the devid agent failed: {0}")]
    Protocol(String),
}

fn round_trip(socket: &Path, request: &Value, timeout: Duration) -> Result<Response, ClientError> {
    use std::io::{BufRead, Read, Write};
    let stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let perr = |e: std::io::Error| ClientError::Protocol(e.to_string());
    stream.set_read_timeout(Some(timeout)).map_err(perr)?;
    stream.set_write_timeout(Some(timeout)).map_err(perr)?;
    let mut line = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    let mut w = &stream;
    // A refused peer is answered and closed before it writes: read that answer first.
    let write_result = w.write_all(&line);
    let mut answer = String::new();
    let mut r = std::io::BufReader::new(&stream).take(MAX_LINE as u64 * 4);
    let read = r.read_line(&mut answer);
    if answer.is_empty() {
        write_result.map_err(perr)?;
        read.map_err(perr)?;
        return Err(ClientError::Protocol(
            "the agent closed the connection without answering".into(),
        ));
    }
    let resp: Response = serde_json::from_str(&answer)
        .map_err(|e| ClientError::Protocol(format!("unreadable answer: {e}")))?;
    if !resp.ok {
        return Err(ClientError::Refused {
            code: resp.code.unwrap_or_default(),
            message: resp.error.unwrap_or_default(),
        });
    }
    Ok(resp)
}

/// Publish one message through the agent at `socket`; returns once the agent has it in its
/// durable outbox.
pub fn publish(
    socket: &Path,
    topic: &str,
    payload: &[u8],
    timeout: Duration,
) -> Result<Accepted, ClientError> {
    let req = serde_json::json!({
        "op": "publish",
        "topic": topic,
        "payload": base64::engine::general_purpose::STANDARD.encode(payload),
    });
    let resp = round_trip(socket, &req, timeout)?;
    match (resp.seq, resp.msg_id) {
        (Some(seq), Some(msg_id)) => Ok(Accepted { seq, msg_id }),
        _ => Err(ClientError::Protocol(
            "the answer lacks seq or msg_id".into(),
        )),
    }
}

/// Ask the agent at `socket` for its status.
pub fn status(socket: &Path, timeout: Duration) -> Result<Value, ClientError> {
    let resp = round_trip(socket, &serde_json::json!({"op": "status"}), timeout)?;
    resp.status
        .ok_or_else(|| ClientError::Protocol("the answer lacks status".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_replaces_only_stale_sockets() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = d.path().join("file");
        std::fs::write(&p, b"precious").unwrap_or_else(|e| panic!("{e}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async {
            assert!(bind(&p, 0o660, None).is_err());
            assert_eq!(std::fs::read(&p).ok().as_deref(), Some(&b"precious"[..]));
            let s = d.path().join("agent.sock");
            let l = bind(&s, 0o660, None).unwrap_or_else(|e| panic!("{e}"));
            assert!(matches!(bind(&s, 0o660, None), Err(SocketError::InUse(_))));
            drop(l);
            // stale socket file: replaced
            assert!(bind(&s, 0o660, None).is_ok());
        });
    }

    #[test]
    fn peer_policy() {
        let p = PeerPolicy {
            agent_uid: 500,
            group: Some(600),
        };
        assert!(p.allows(0, 0, &[]));
        assert!(p.allows(500, 1, &[]));
        assert!(p.allows(700, 600, &[]));
        assert!(!p.allows(700, 700, &[]));
        assert!(p.allows(700, 700, &[5, 600]));
        assert!(!p.allows(700, 700, &[5, 601]));
        let p = PeerPolicy {
            agent_uid: 500,
            group: None,
        };
        assert!(!p.allows(700, 600, &[600]));
    }

    #[test]
    fn peer_groups_come_from_the_socket() {
        // Our own end of a socket pair: the kernel reports this process's groups.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut from_socket =
            devid_secmem::socket_peer_groups(std::os::fd::AsFd::as_fd(&a)).unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let mut from_proc: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .unwrap()
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        from_socket.sort_unstable();
        from_proc.sort_unstable();
        assert_eq!(from_socket, from_proc);
    }
}
