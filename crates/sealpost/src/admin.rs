//! Queue administration: the operations behind `sealpost queue …`, run either in-process against
//! an opened store or, while `serve` runs, through the local admin socket (Unix, mode 0600).

use anyhow::{anyhow, Context, Result};
use sealpost_audit::{AuditLog, Event, Record};
use sealpost_queue::{Queue, QueueId};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// One queue operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// List messages.
    List,
    /// Show one message's metadata.
    Show,
    /// Make a message due now.
    Retry,
    /// Hold a message until released.
    Hold,
    /// Release a held message.
    Release,
    /// Delete a message.
    Delete,
    /// Counts by state.
    Stats,
    /// Re-encrypt every record under the newest key.
    Rekey,
}

/// A request over the admin socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// The message, for operations on one.
    pub id: Option<String>,
    /// JSON output instead of text.
    pub json: bool,
    /// Who asked (the OS user running the CLI), for the audit record.
    pub who: String,
    /// Show progress on stderr (only when run in the CLI process itself).
    #[serde(default)]
    pub progress: bool,
}

/// The answer: printed by the CLI as it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the operation succeeded.
    pub ok: bool,
    /// Text or JSON to print (stdout when ok, stderr otherwise).
    pub output: String,
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

fn parse_id(req: &Request) -> Result<QueueId> {
    let text = req
        .id
        .as_deref()
        .ok_or_else(|| anyhow!("this operation needs a queue id"))?;
    text.parse::<QueueId>()
        .map_err(|e| anyhow!("`{text}` is not a queue id: {e}"))
}

/// Runs one operation and renders its output; every operation is audited.
pub async fn execute(queue: &Queue, audit: &AuditLog, req: &Request) -> Result<String> {
    // Reads are audited too: `show` reveals senders and recipients (HIPAA 164.312(b)).
    if matches!(req.op, Op::List | Op::Show | Op::Stats) {
        let mut rec = Record::new(Event::Admin)
            .detail("action", format!("{:?}", req.op).to_lowercase())
            .detail("by", req.who.clone());
        if let Some(id) = &req.id {
            rec = rec.queue_id(
                id.chars()
                    .filter(|c| c.is_ascii_hexdigit())
                    .take(32)
                    .collect::<String>(),
            );
        }
        audit
            .record(rec)
            .await
            .context("recording the admin action in the audit log")?;
    }
    let out = match req.op {
        Op::List => {
            let list = queue.list().await?;
            if req.json {
                let view = &list;
                serde_json::to_string_pretty(&view)?
            } else if list.is_empty() {
                "queue is empty".to_string()
            } else {
                let mut s = format!(
                    "{:<32}  {:<20}  {:>9}  {:<8}  {:>4} {:>4} {:>4} {:>4}  {}\n",
                    "ID", "ARRIVAL", "SIZE", "POLICY", "PEND", "DEF", "HELD", "DONE", "SENDER"
                );
                for m in &list {
                    let c = &m.recipients;
                    s.push_str(&format!(
                        "{:<32}  {:<20}  {:>9}  {:<8}  {:>4} {:>4} {:>4} {:>4}  <{}>\n",
                        m.id,
                        rfc3339(m.arrival),
                        m.size,
                        m.policy,
                        c.pending + c.in_flight,
                        c.deferred,
                        c.held + c.admin_hold,
                        c.delivered + c.failed,
                        m.sender
                    ));
                }
                s.push_str(&format!("{} message(s)", list.len()));
                s
            }
        }
        Op::Show => {
            let d = queue.show(parse_id(req)?).await?;
            if req.json {
                serde_json::to_string_pretty(&d)?
            } else {
                let mut s = format!(
                    "id:       {}\narrival:  {}\nsize:     {}\nsender:   <{}>\npolicy:   {}\nuser:     {}\n",
                    d.id,
                    rfc3339(d.arrival),
                    d.size,
                    d.envelope.sender,
                    d.envelope.policy,
                    d.envelope.user.as_deref().unwrap_or("-")
                );
                for r in &d.recipients {
                    s.push_str(&format!(
                        "rcpt {:>3}: <{}> {:?} attempts={}{} {}\n",
                        r.index,
                        r.address,
                        r.state,
                        r.attempts,
                        if r.delay_notified {
                            " delay-notice-sent"
                        } else {
                            ""
                        },
                        r.last_error.as_deref().unwrap_or("")
                    ));
                }
                s.trim_end().to_string()
            }
        }
        Op::Stats => {
            let st = queue.stats().await?;
            if req.json {
                serde_json::to_string_pretty(&st)?
            } else {
                let c = &st.recipients;
                format!(
                    "messages: {}\nrecipients: pending {} in-flight {} deferred {} held {} admin-hold {} delivered {} failed {}\nquarantined: {}\nbody bytes: {}\nstore bytes: {}",
                    st.messages, c.pending, c.in_flight, c.deferred, c.held, c.admin_hold, c.delivered, c.failed,
                    st.quarantined, st.body_bytes, st.store_bytes
                )
            }
        }
        Op::Rekey => {
            let q = queue.clone();
            let interactive = req.progress;
            let changed = tokio::task::spawn_blocking(move || {
                q.rekey(&mut |done, total| {
                    if interactive && (done == total || done % 100 == 0) {
                        eprint!("\rre-encrypting: {done}/{total}");
                        if done == total {
                            eprintln!();
                        }
                    }
                })
            })
            .await
            .context("rekey task")??;
            audit
                .record(
                    Record::new(Event::Admin)
                        .detail("action", "rekey")
                        .detail("messages", changed)
                        .detail("by", req.who.clone()),
                )
                .await
                .context("recording the admin action in the audit log")?;
            format!("rekey: {changed} message(s) re-encrypted under the primary key")
        }
        Op::Retry | Op::Hold | Op::Release | Op::Delete => {
            let id = parse_id(req)?;
            match req.op {
                Op::Retry => queue.retry(id).await?,
                Op::Hold => queue.hold(id).await?,
                Op::Release => queue.release(id).await?,
                _ => queue.delete(id).await?,
            }
            let action = format!("{:?}", req.op).to_lowercase();
            audit
                .record(
                    Record::new(Event::Admin)
                        .queue_id(id.to_string())
                        .detail("action", action.clone())
                        .detail("by", req.who.clone()),
                )
                .await
                .context("recording the admin action in the audit log")?;
            format!("{action}: {id}")
        }
    };
    Ok(out)
}

/// Serves admin requests on a Unix socket (mode 0600) until the task is dropped.
pub async fn serve_socket(path: &Path, queue: Queue, audit: AuditLog) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let (queue, audit) = (queue.clone(), audit.clone());
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let resp = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => match execute(&queue, &audit, &req).await {
                        Ok(output) => Response { ok: true, output },
                        Err(e) => Response {
                            ok: false,
                            output: format!("{e:#}"),
                        },
                    },
                    Err(e) => Response {
                        ok: false,
                        output: format!("bad request: {e}"),
                    },
                };
                let Ok(mut bytes) = serde_json::to_vec(&resp) else {
                    return;
                };
                bytes.push(b'\n');
                if write.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Sends one request to a running server; `None` if no server listens on the socket.
pub async fn call(path: &Path, req: &Request) -> Result<Option<Response>> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    let (read, mut write) = stream.into_split();
    let mut bytes = serde_json::to_vec(req)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    let mut lines = BufReader::new(read).lines();
    let line = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow!("the server closed the admin socket without answering"))?;
    Ok(Some(serde_json::from_str(&line)?))
}
