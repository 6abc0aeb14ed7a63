//! Operator commands that talk to the queues: `worker enqueue` and `worker
//! check` (`worker poison list|replay` is in [`crate::poison`]).
//!
//! They share the worker's configuration (the same env vars and flags) so
//! that what they check or fix is exactly what the worker would use. Output is
//! one line per item on stdout, meant for people and for `grep`; the return
//! value says whether everything went well (the exit code).

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use serde_json::{Map, Value};

use crate::config::{EnqueueArgs, Options, QueueNames};
use crate::queue::{poison_queue, QueueError, QueueService};
use crate::registry::Registry;
use crate::task;

/// Largest message text Azure accepts (64 KiB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("{0}")]
    Usage(String),
    #[error("the task is invalid: {0}")]
    InvalidTask(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

pub(crate) fn single_target(opts: &Options, command: &str) -> Result<QueueNames, OpsError> {
    let mut all = opts.queues().map_err(OpsError::Usage)?;
    if all.len() != 1 {
        return Err(OpsError::Usage(format!(
            "`worker {command}` works on one client, but WORKER_CLIENT (--client) lists {}; pass exactly one --client",
            all.len()
        )));
    }
    Ok(all.remove(0))
}

pub(crate) fn service(opts: &Options) -> Result<QueueService, OpsError> {
    Ok(QueueService::new(&opts.storage())?)
}

/// The envelope `worker enqueue` sends, as JSON text.
pub fn envelope(
    args: &EnqueueArgs,
    task_id: &str,
    client: Option<&str>,
) -> Result<String, OpsError> {
    let mut env = Map::new();
    env.insert("task_id".into(), task_id.into());
    env.insert("task_type".into(), args.task_type.clone().into());
    if let Some(p) = &args.payload {
        let payload: Value = serde_json::from_str(p)
            .map_err(|e| OpsError::InvalidTask(format!("--payload is not valid JSON: {e}")))?;
        env.insert("payload".into(), payload);
    }
    if let Some(u) = &args.webhook_url {
        env.insert("webhook_url".into(), u.clone().into());
    }
    if let Some(c) = client {
        env.insert("client".into(), c.into());
    }
    let json = Value::Object(env).to_string();
    // Refuse here what the worker would refuse later.
    task::decode(json.as_bytes()).map_err(|e| OpsError::InvalidTask(e.to_string()))?;
    Ok(json)
}

/// `worker enqueue`: puts one task on the client's queue, creating the queue
/// if needed, and prints `task_id=… message_id=…`.
pub async fn enqueue(
    opts: &Options,
    args: &EnqueueArgs,
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    let target = single_target(opts, "enqueue")?;
    let task_id = args
        .task_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let json = envelope(args, &task_id, target.client.as_deref())?;
    let text = if args.base64 {
        base64::engine::general_purpose::STANDARD.encode(json.as_bytes())
    } else {
        json
    };
    if text.len() > MAX_MESSAGE_BYTES {
        return Err(OpsError::InvalidTask(format!(
            "the message is {} bytes; Azure queue messages hold at most {MAX_MESSAGE_BYTES} bytes{}",
            text.len(),
            if args.base64 { " (base64 adds a third)" } else { "" }
        )));
    }
    let queue = service(opts)?.queue(&target.queue)?;
    queue.create_if_missing().await?;
    let sent = queue
        .send(&text, args.delay.map(Duration::from_secs), args.ttl)
        .await?;
    writeln!(out, "task_id={task_id} message_id={}", sent.message_id)?;
    Ok(())
}

/// `worker check`: one `ok`/`FAIL` line per item; `Ok(true)` when all are ok.
pub async fn check(opts: &Options, out: &mut dyn Write) -> Result<bool, OpsError> {
    let mut report = Report { out, all_ok: true };

    let handlers_item = match &opts.handlers_file {
        Some(p) => format!("handlers file {}", p.display()),
        None => "handlers".to_owned(),
    };
    let registry = Registry::standard(&opts.egress(), opts.handlers_file.as_deref());
    report.line(
        &handlers_item,
        registry
            .map(|r| format!("{} task types", r.names().len()))
            .map_err(|e| e.to_string()),
    )?;

    let settings = opts.storage();
    let service = match QueueService::new(&settings) {
        Ok(s) => {
            report.line("storage", Ok(s.describe()))?;
            Some(s)
        }
        Err(e) => {
            report.line("storage", Err(e.to_string()))?;
            None
        }
    };

    let targets = match opts.queues() {
        Ok(t) => t,
        Err(e) => {
            report.line("queues", Err(e))?;
            return Ok(false);
        }
    };
    let Some(service) = service else {
        report.line(
            "queues",
            Err("not checked: the storage settings above must be fixed first".into()),
        )?;
        return Ok(false);
    };
    for t in targets {
        check_queues(&mut report, &service, &t).await?;
    }
    Ok(report.all_ok)
}

/// The lines of `worker check`, and whether any of them failed.
struct Report<'a> {
    out: &'a mut dyn Write,
    all_ok: bool,
}

impl Report<'_> {
    fn line(&mut self, item: &str, result: Result<String, String>) -> Result<(), OpsError> {
        match result {
            Ok(note) if note.is_empty() => writeln!(self.out, "ok   {item}"),
            Ok(note) => writeln!(self.out, "ok   {item}: {note}"),
            Err(reason) => {
                self.all_ok = false;
                writeln!(self.out, "FAIL {item}: {reason}")
            }
        }
        .map_err(OpsError::from)
    }
}

/// One client's tasks queue, its poison queue, its outbox and the outbox's
/// poison queue.
async fn check_queues(
    report: &mut Report<'_>,
    service: &QueueService,
    t: &QueueNames,
) -> Result<(), OpsError> {
    let poison = poison_queue(&t.queue);
    let outbox = match t.outbox() {
        Ok(o) => o,
        Err(e) => return report.line("outbox", Err(e)),
    };
    let outbox_poison = poison_queue(&outbox);
    for (name, optional) in [
        (t.queue.as_str(), None),
        (poison.as_str(), Some("nothing poisoned so far")),
        (outbox.as_str(), Some("no webhook had to wait so far")),
        (
            outbox_poison.as_str(),
            Some("no webhook given up on so far"),
        ),
    ] {
        let result = match service.queue(name) {
            Err(e) => Err(e.to_string()),
            Ok(q) => queue_status(q.approximate_count().await, optional),
        };
        report.line(&format!("queue {name}"), result)?;
    }
    Ok(())
}

/// `optional` is set for the queues created on first use (poison queues and
/// outboxes), so their absence is fine and says why.
fn queue_status(count: Result<u64, QueueError>, optional: Option<&str>) -> Result<String, String> {
    match count {
        Ok(n) => Ok(format!("about {n} messages")),
        Err(QueueError::QueueNotFound { .. }) if optional.is_some() => Ok(format!(
            "not created yet ({})",
            optional.unwrap_or_default()
        )),
        Err(QueueError::QueueNotFound { .. }) => Err(
            "does not exist; create it (`worker enqueue` does) or check \
             WORKER_CLIENT / WORKER_QUEUE_NAME for a typo"
                .into(),
        ),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_queues_created_on_first_use_may_be_missing() {
        let missing = || {
            Err(QueueError::QueueNotFound {
                queue: "acme-tasks".into(),
            })
        };
        assert_eq!(
            queue_status(missing(), Some("nothing poisoned so far")),
            Ok("not created yet (nothing poisoned so far)".into())
        );
        let e = queue_status(missing(), None).unwrap_err();
        assert!(e.contains("WORKER_CLIENT"), "{e}");
        assert_eq!(queue_status(Ok(3), None), Ok("about 3 messages".into()));
        let auth = Err(QueueError::Auth { detail: "x".into() });
        assert!(queue_status(auth, Some("optional")).is_err());
    }

    #[test]
    fn a_failed_line_fails_the_report() {
        let mut buf = Vec::new();
        let mut report = Report {
            out: &mut buf,
            all_ok: true,
        };
        report.line("storage", Ok(String::new())).unwrap();
        report.line("handlers", Ok("5 task types".into())).unwrap();
        assert!(report.all_ok);
        report.line("queue q", Err("gone".into())).unwrap();
        assert!(!report.all_ok);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "ok   storage\nok   handlers: 5 task types\nFAIL queue q: gone\n"
        );
    }

    #[test]
    fn envelope_is_validated() {
        let mut args = EnqueueArgs {
            task_type: "echo".into(),
            payload: Some(r#"{"a":1}"#.into()),
            webhook_url: Some("https://example.com/hook".into()),
            task_id: None,
            base64: false,
            delay: None,
            ttl: None,
        };
        let json = envelope(&args, "t1", Some("acme")).unwrap();
        let (t, _) = task::decode(json.as_bytes()).unwrap();
        assert_eq!(t.task_id, "t1");
        assert_eq!(t.client.as_deref(), Some("acme"));
        assert_eq!(t.payload, serde_json::json!({"a":1}));
        args.payload = Some("{not json".into());
        assert!(matches!(
            envelope(&args, "t1", None),
            Err(OpsError::InvalidTask(_))
        ));
        args.payload = None;
        args.webhook_url = Some("ftp://x".into());
        let e = envelope(&args, "t1", None).unwrap_err().to_string();
        assert!(e.contains("webhook_url"), "{e}");
        args.webhook_url = None;
        args.task_type = " ".into();
        assert!(envelope(&args, "t1", None).is_err());
    }
}
