//! Operator commands that talk to the queues: `worker enqueue`, `worker check`
//! and `worker poison list|replay`.
//!
//! They share the worker's configuration (the same env vars and flags) so
//! that what they check or fix is exactly what the worker would use. Output is
//! one line per item on stdout, meant for people and for `grep`; the return
//! value says whether everything went well (the exit code).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::Duration;

use base64::Engine;
use serde_json::{Map, Value};

use crate::config::{Command, EnqueueArgs, Options, PoisonCommand, QueueNames, ReplayArgs};
use crate::queue::{poison_queue, Queue, QueueError, QueueService, MAX_BATCH};
use crate::registry::Registry;
use crate::task;

/// Largest message text Azure accepts (64 KiB).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// How long `poison replay` keeps messages it looks at invisible to others.
const REPLAY_HOLD: Duration = Duration::from_secs(30);

/// Characters of message text shown by `poison list`.
const SNIPPET_CHARS: usize = 60;

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

fn single_target(opts: &Options, command: &str) -> Result<QueueNames, OpsError> {
    let mut all = opts.queues().map_err(OpsError::Usage)?;
    if all.len() != 1 {
        return Err(OpsError::Usage(format!(
            "`worker {command}` works on one client, but WORKER_CLIENT (--client) lists {}; pass exactly one --client",
            all.len()
        )));
    }
    Ok(all.remove(0))
}

fn service(opts: &Options) -> Result<QueueService, OpsError> {
    Ok(QueueService::new(&opts.storage())?)
}

/// Runs one of the queue commands; `Ok(false)` means "exit 1".
pub async fn run(command: &Command, opts: &Options, out: &mut dyn Write) -> Result<bool, OpsError> {
    match command {
        Command::Enqueue(args) => enqueue(opts, args, out).await.map(|()| true),
        Command::Check => check(opts, out).await,
        Command::Poison(PoisonCommand::List(args)) => {
            poison_list(opts, args.webhooks, out).await.map(|()| true)
        }
        Command::Poison(PoisonCommand::Replay(args)) => poison_replay(opts, args, out).await,
        _ => Err(OpsError::Usage(
            "not a queue command (expected enqueue, check or poison)".into(),
        )),
    }
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
    let mut all_ok = true;
    let mut line = |out: &mut dyn Write, item: &str, result: Result<String, String>| {
        let r = match result {
            Ok(note) if note.is_empty() => writeln!(out, "ok   {item}"),
            Ok(note) => writeln!(out, "ok   {item}: {note}"),
            Err(reason) => {
                all_ok = false;
                writeln!(out, "FAIL {item}: {reason}")
            }
        };
        r.map_err(OpsError::from)
    };

    let handlers_item = match &opts.handlers_file {
        Some(p) => format!("handlers file {}", p.display()),
        None => "handlers".to_owned(),
    };
    let registry = Registry::standard(&opts.egress(), opts.handlers_file.as_deref());
    line(
        out,
        &handlers_item,
        registry
            .map(|r| format!("{} task types", r.names().len()))
            .map_err(|e| e.to_string()),
    )?;

    let settings = opts.storage();
    let service = match QueueService::new(&settings) {
        Ok(s) => {
            line(out, "storage", Ok(s.describe()))?;
            Some(s)
        }
        Err(e) => {
            line(out, "storage", Err(e.to_string()))?;
            None
        }
    };

    let targets = match opts.queues() {
        Ok(t) => t,
        Err(e) => {
            line(out, "queues", Err(e))?;
            return Ok(false);
        }
    };
    let Some(service) = service else {
        line(
            out,
            "queues",
            Err("not checked: the storage settings above must be fixed first".into()),
        )?;
        return Ok(false);
    };
    for t in targets {
        let poison = poison_queue(&t.queue);
        let outbox = match t.outbox() {
            Ok(o) => o,
            Err(e) => {
                line(out, "outbox", Err(e))?;
                continue;
            }
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
            let item = format!("queue {name}");
            let result = match service.queue(name) {
                Err(e) => Err(e.to_string()),
                Ok(q) => match q.approximate_count().await {
                    Ok(n) => Ok(format!("about {n} messages")),
                    // Poison queues and outboxes are created on first use.
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
                },
            };
            line(out, &item, result)?;
        }
    }
    Ok(all_ok)
}

fn one_line(text: &str, max: usize) -> String {
    let mut s: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        s.push('…');
    }
    s
}

fn format_time(t: Option<time::OffsetDateTime>) -> String {
    t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_else(|| "-".into())
}

/// `task_id=… task_type=…` when the text is (or partly is) an envelope.
fn task_fields(text: &str) -> String {
    let s = task::salvage(text.as_bytes());
    match (s.task_id, s.task_type) {
        (None, None) => "task=undecodable".into(),
        (id, ty) => format!(
            "task_id={} task_type={}",
            id.as_deref().unwrap_or("-"),
            ty.as_deref().unwrap_or("-")
        ),
    }
}

/// The queue poisoned messages come back to, and the poison queue itself:
/// the tasks queue, or with `webhooks` the outbox.
fn replay_pair(target: &QueueNames, webhooks: bool) -> Result<(String, String), OpsError> {
    let home = if webhooks {
        target.outbox().map_err(OpsError::Usage)?
    } else {
        target.queue.clone()
    };
    let poison = poison_queue(&home);
    Ok((home, poison))
}

/// `worker poison list`: a header, then one line per poisoned message.
pub async fn poison_list(
    opts: &Options,
    webhooks: bool,
    out: &mut dyn Write,
) -> Result<(), OpsError> {
    let target = single_target(opts, "poison list")?;
    let (_, name) = replay_pair(&target, webhooks)?;
    let queue = service(opts)?.queue(&name)?;
    let count = match queue.approximate_count().await {
        Ok(n) => n,
        Err(QueueError::QueueNotFound { .. }) => {
            writeln!(out, "# {name} does not exist: nothing has been poisoned")?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let messages = queue.peek(MAX_BATCH).await?;
    writeln!(
        out,
        "# {name}: about {count} messages; showing {} (peek shows at most {MAX_BATCH})",
        messages.len()
    )?;
    for m in messages {
        writeln!(
            out,
            "{}  {}  {}  {}",
            m.id,
            format_time(m.insertion_time),
            task_fields(&m.text),
            one_line(&m.text, SNIPPET_CHARS)
        )?;
    }
    Ok(())
}

enum Selector<'a> {
    All,
    TaskId(&'a str),
    MessageId(&'a str),
}

impl Selector<'_> {
    fn matches(&self, m: &crate::queue::Message) -> bool {
        match self {
            Selector::All => true,
            Selector::MessageId(id) => m.id == *id,
            Selector::TaskId(id) => {
                task::salvage(m.text.as_bytes()).task_id.as_deref() == Some(*id)
            }
        }
    }
}

/// `worker poison replay`: sends matching poisoned messages back to the
/// tasks queue as new messages (fresh dequeue count), then deletes them from
/// the poison queue. A message is never deleted before its copy was sent.
///
/// Peeking gives no pop receipt, so messages are received with a short
/// visibility timeout; the ones not selected stay hidden while the scan goes
/// on (so each receive sees new ones) and are released at the end.
pub async fn poison_replay(
    opts: &Options,
    args: &ReplayArgs,
    out: &mut dyn Write,
) -> Result<bool, OpsError> {
    let selector = match (&args.task_id, &args.message_id) {
        (Some(t), _) => Selector::TaskId(t),
        (None, Some(m)) => Selector::MessageId(m),
        (None, None) if args.all => Selector::All,
        (None, None) => {
            return Err(OpsError::Usage(
                "pass --task-id, --message-id or --all".into(),
            ))
        }
    };
    let target = single_target(opts, "poison replay")?;
    let service = service(opts)?;
    let (home, poison) = replay_pair(&target, args.webhooks)?;
    let tasks = service.queue(&home)?;
    let poison = service.queue(&poison)?;
    match poison.approximate_count().await {
        Err(QueueError::QueueNotFound { .. }) => {
            writeln!(out, "# {} does not exist: nothing to replay", poison.name())?;
            return Ok(matches!(selector, Selector::All));
        }
        Err(e) => return Err(e.into()),
        Ok(_) => {}
    }
    tasks.create_if_missing().await?;

    let mut held: HashMap<String, String> = HashMap::new();
    // Outbox entries come back due at once, with a fresh schedule.
    let revive: fn(&str) -> String = if args.webhooks {
        |text| match crate::outbox::Entry::parse(text) {
            Ok(mut e) => {
                e.outbox_attempts = 0;
                e.to_text()
            }
            Err(_) => text.to_owned(),
        }
    } else {
        str::to_owned
    };
    let result = replay_scan(&tasks, &poison, &selector, revive, &mut held, out).await;
    // Whatever happened, let the others go now rather than in REPLAY_HOLD.
    for (id, receipt) in held {
        if let Err(e) = poison
            .update_visibility(&id, &receipt, Duration::ZERO)
            .await
        {
            tracing::warn!(message_id = %id, error = %e, "could not release a poisoned message; it reappears within 30 s");
        }
    }
    let (moved, failed) = result?;
    if moved == 0 {
        let what = match selector {
            Selector::All => format!("# {} is empty: nothing to replay", poison.name()),
            Selector::TaskId(t) => format!("# no message in {} has task_id {t}", poison.name()),
            Selector::MessageId(m) => {
                format!("# no message in {} has message id {m}", poison.name())
            }
        };
        writeln!(out, "{what}")?;
        return Ok(matches!(selector, Selector::All) && failed == 0);
    }
    Ok(failed == 0)
}

/// Returns (moved, failed to delete after sending).
async fn replay_scan(
    tasks: &Queue,
    poison: &Queue,
    selector: &Selector<'_>,
    revive: fn(&str) -> String,
    held: &mut HashMap<String, String>,
    out: &mut dyn Write,
) -> Result<(usize, usize), OpsError> {
    let mut seen: HashSet<String> = HashSet::new();
    let (mut moved, mut failed) = (0, 0);
    loop {
        let batch = poison.receive(MAX_BATCH, REPLAY_HOLD).await?;
        if batch.is_empty() {
            break;
        }
        let mut anything_new = false;
        let mut done = false;
        for m in batch {
            anything_new |= seen.insert(m.id.clone());
            if done || !selector.matches(&m) {
                held.insert(m.id, m.pop_receipt);
                continue;
            }
            held.remove(&m.id);
            let task_id = task::salvage(m.text.as_bytes())
                .task_id
                .unwrap_or_else(|| "-".into());
            let sent = tasks.send(&revive(&m.text), None, Some(-1)).await?;
            match poison.delete(&m.id, &m.pop_receipt).await {
                Ok(()) => {
                    moved += 1;
                    writeln!(
                        out,
                        "replayed {} task_id={task_id} -> {} message_id={}",
                        m.id,
                        tasks.name(),
                        sent.message_id
                    )?;
                }
                Err(e) => {
                    failed += 1;
                    writeln!(
                        out,
                        "FAIL {} task_id={task_id}: sent to {} as {} but not deleted from {} ({e}); \
                         delete it by hand or the task runs twice",
                        m.id,
                        tasks.name(),
                        sent.message_id,
                        poison.name()
                    )?;
                }
            }
            // Message ids are unique: the rest of the batch is only held.
            if matches!(selector, Selector::MessageId(_)) {
                done = true;
            }
        }
        if done || !anything_new {
            break;
        }
    }
    Ok((moved, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn list_formatting() {
        assert_eq!(one_line("a\nb", 60), "a b");
        assert_eq!(
            one_line(&"x".repeat(61), 60),
            format!("{}…", "x".repeat(60))
        );
        assert_eq!(
            task_fields(r#"{"task_id":"t1","task_type":"echo"}"#),
            "task_id=t1 task_type=echo"
        );
        assert_eq!(task_fields("garbage"), "task=undecodable");
        assert_eq!(task_fields(r#"{"task_id":"t1"}"#), "task_id=t1 task_type=-");
    }
}
