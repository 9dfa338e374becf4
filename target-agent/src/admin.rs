//! The admin socket: while `serve` holds the store, store commands (points, inspect, verify,
//! retention, gc, failover) reach it through `<dir>/admin.sock`, a Unix socket only the agent's
//! owner may open (mode 0600), and so do requests only a running server can answer (a writer's
//! ticket, whose grant the server holds). One JSON line in (the request, paths already
//! absolute), one JSON line out (its output and exit code). Retention and GC wait until no
//! session is running.

use crate::commands::{Reply, StoreCommand};
use crate::session::SessionContext;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// Largest request accepted, in bytes.
const MAX_REQUEST: usize = 1 << 20;

/// Path of the admin socket of an agent directory.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("admin.sock")
}

/// What the admin socket is asked.
#[derive(Debug, Serialize, Deserialize)]
pub enum AdminRequest {
    /// A store command.
    Store(StoreCommand),
    /// A writer's ticket: its output is the ticket (JSON).
    Ticket(crate::ticket::TicketArgs),
}

#[derive(Serialize, Deserialize)]
enum Response {
    Done(Reply),
    Failed(String),
}

/// Deletes the socket file when the admin server stops.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The bound admin socket. Binding happens with the server's own binding, before `serve`
/// reports ready, so a store command sent right after start-up is queued, never refused.
pub struct AdminSocket {
    listener: tokio::net::UnixListener,
    _remove: RemoveOnDrop,
}

impl AdminSocket {
    /// Creates `<dir>/admin.sock` (replacing a stale one left by a killed process), mode 0600.
    pub fn bind(dir: &Path) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let path = socket_path(dir);
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)
            .with_context(|| format!("cannot create admin socket {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(AdminSocket {
            listener,
            _remove: RemoveOnDrop(path),
        })
    }

    /// Serves requests until this future is dropped.
    pub async fn serve(self, ctx: Arc<SessionContext>) -> Result<()> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            let ctx = ctx.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, ctx).await {
                    tracing::warn!(error = %format!("{e:#}"), "admin request failed");
                }
            });
        }
    }
}

async fn handle(stream: tokio::net::UnixStream, ctx: Arc<SessionContext>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(read.take(MAX_REQUEST as u64))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(AdminRequest::Store(cmd)) => run(cmd, &ctx).await,
        Ok(AdminRequest::Ticket(a)) => ticket(&a, &ctx),
        Err(e) => Response::Failed(format!("malformed admin request: {e}")),
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

async fn run(cmd: StoreCommand, ctx: &Arc<SessionContext>) -> Response {
    tracing::info!(command = ?cmd, "admin request");
    // Commands that delete data run alone; every other one holds the gate shared, so retention's
    // garbage collection never deletes a pack a `verify` or a failover is reading.
    let (_alone, _shared) = if cmd.needs_store_alone() {
        (Some(ctx.gc_gate.write().await), None)
    } else {
        (None, Some(ctx.gc_gate.read().await))
    };
    let store = ctx.store.clone();
    match tokio::task::spawn_blocking(move || cmd.run(&store, false)).await {
        Ok(Ok(reply)) => Response::Done(reply),
        Ok(Err(e)) => Response::Failed(format!("{e:#}")),
        Err(e) => Response::Failed(format!("the command crashed: {e}")),
    }
}

fn ticket(a: &crate::ticket::TicketArgs, ctx: &SessionContext) -> Response {
    tracing::info!(group = %a.group, volume = %a.volume, point = %a.point, "admin request: a writer's ticket");
    let issued = crate::ticket::issue(ctx, a, understudy_common::now_ms())
        .and_then(|t| Ok(serde_json::to_string(&t)?));
    match issued {
        Ok(output) => Response::Done(Reply { output, code: 0 }),
        Err(e) => Response::Failed(format!("{e:#}")),
    }
}

/// Connects to the admin socket of the running `serve` of `dir`.
pub fn connect(dir: &Path) -> Result<std::os::unix::net::UnixStream> {
    let path = socket_path(dir);
    std::os::unix::net::UnixStream::connect(&path)
        .with_context(|| format!("cannot reach the running target-agent through {}: stop it, or check it is this directory's `serve`", path.display()))
}

/// Sends a request to the running `serve` on `s` (from [`connect`]) and waits for its reply.
pub fn request(mut s: std::os::unix::net::UnixStream, cmd: &AdminRequest) -> Result<Reply> {
    let mut req = serde_json::to_vec(cmd)?;
    req.push(b'\n');
    s.write_all(&req)?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .context("the running target-agent closed the admin connection")?;
    match serde_json::from_str(&line).context("unreadable reply from the running target-agent")? {
        Response::Done(r) => Ok(r),
        Response::Failed(e) => anyhow::bail!("{e}"),
    }
}
