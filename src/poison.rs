//! `worker poison list|replay`: what could not succeed, and sending it back.
//!
//! Works on `<client>-tasks-poison` (back to `<client>-tasks`) or, with
//! `--webhooks`, on `<client>-webhooks-poison` (back to the outbox, due at
//! once with a fresh schedule). A poisoned message is deleted only after its
//! copy was sent, so a replay never loses one.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::Duration;

use crate::config::{Options, QueueNames, ReplayArgs};
use crate::ops::{service, single_target, OpsError};
use crate::queue::{poison_queue, Queue, QueueError, MAX_BATCH};
use crate::task;

/// How long `poison replay` keeps messages it looks at invisible to others.
const REPLAY_HOLD: Duration = Duration::from_secs(30);

/// Characters of message text shown by `poison list`.
const SNIPPET_CHARS: usize = 60;

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

/// An outbox entry's id, task, attempts, where its delivery is (`inline`,
/// or the blob of a claimed one) and last error; the text itself when it is
/// not an entry.
fn entry_fields(text: &str) -> String {
    match crate::outbox::Entry::parse(text) {
        Ok(e) => format!(
            "webhook_id={} task_id={} attempts={} delivery={}  {}",
            e.webhook_id,
            one_line(&e.task_shown(), SNIPPET_CHARS),
            e.attempts,
            e.claim()
                .map_or_else(|| "inline".into(), |c| format!("blob:{c}")),
            one_line(&e.last_error, SNIPPET_CHARS * 2)
        ),
        Err(_) => format!("entry=unreadable  {}", one_line(text, SNIPPET_CHARS)),
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
pub async fn list(opts: &Options, webhooks: bool, out: &mut dyn Write) -> Result<(), OpsError> {
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
        let fields = match webhooks {
            true => entry_fields(&m.text),
            false => format!(
                "{}  {}",
                task_fields(&m.text),
                one_line(&m.text, SNIPPET_CHARS)
            ),
        };
        writeln!(out, "{}  {}  {fields}", m.id, format_time(m.insertion_time))?;
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
pub async fn replay(
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
