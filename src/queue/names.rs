//! Queue names: Azure's naming rules, and the `<client>-tasks` /
//! `<queue>-poison` convention every mode and operation shares.
//!
//! Names are checked locally because the service's answer to a bad name is a
//! bare `400 InvalidResourceName` (or `OutOfRangeInput`) that does not say
//! which rule was broken.

/// Suffix of the queue a client's backend writes tasks to.
pub const TASKS_SUFFIX: &str = "-tasks";
/// Suffix of the queue that holds messages which failed too often.
pub const POISON_SUFFIX: &str = "-poison";
/// Suffix of a client's webhook outbox: outcomes whose delivery is pending.
pub const WEBHOOKS_SUFFIX: &str = "-webhooks";

const MIN_LEN: usize = 3;
const MAX_LEN: usize = 63;

/// Checks a queue name against the Azure Storage rules: 3 to 63 characters,
/// lowercase letters, digits and single hyphens, starting and ending with a
/// letter or digit. The error says which rule the name breaks.
pub fn validate_queue_name(name: &str) -> Result<(), String> {
    let len = name.chars().count();
    if !(MIN_LEN..=MAX_LEN).contains(&len) {
        return Err(format!(
            "queue name `{name}` is {len} characters long; Azure requires {MIN_LEN} to {MAX_LEN}"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        let hint = if c.is_ascii_uppercase() {
            " (queue names must be lowercase)"
        } else {
            ""
        };
        return Err(format!(
            "queue name `{name}` contains `{c}`; only lowercase letters, digits and hyphens are allowed{hint}"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!(
            "queue name `{name}` must start and end with a letter or digit"
        ));
    }
    if name.contains("--") {
        return Err(format!(
            "queue name `{name}` contains consecutive hyphens, which Azure does not allow"
        ));
    }
    Ok(())
}

/// The tasks queue of `client`: `<client>-tasks`. The outbox's poison queue
/// `<client>-webhooks-poison` must be valid too, so a client name is at most
/// 47 characters long.
pub fn tasks_queue(client: &str) -> Result<String, String> {
    if client.is_empty() {
        return Err("client name is empty (set WORKER_CLIENT or --client)".into());
    }
    let queue = format!("{client}{TASKS_SUFFIX}");
    let max_client = MAX_LEN - WEBHOOKS_SUFFIX.len() - POISON_SUFFIX.len();
    if client.chars().count() > max_client {
        return Err(format!(
            "client name `{client}` is too long: at most {max_client} characters, so that \
             `<client>{WEBHOOKS_SUFFIX}{POISON_SUFFIX}` stays within Azure's {MAX_LEN}-character limit"
        ));
    }
    validate_queue_name(&queue)
        .map_err(|e| format!("client name `{client}` is not usable: {e}"))?;
    validate_queue_name(&poison_queue(&queue))
        .map_err(|e| format!("client name `{client}` is not usable: {e}"))?;
    Ok(queue)
}

/// The webhook outbox of a client (or, with `WORKER_QUEUE_NAME` and no
/// client, of that queue): `<owner>-webhooks`, checked with its poison queue.
pub fn webhooks_queue(owner: &str) -> Result<String, String> {
    let outbox = format!("{owner}{WEBHOOKS_SUFFIX}");
    validate_queue_name(&poison_queue(&outbox)).map_err(|e| {
        format!("the webhook outbox `{outbox}` (and its poison queue) is not a usable name: {e}")
    })?;
    Ok(outbox)
}

/// The poison queue that goes with `queue`: `<queue>-poison`.
pub fn poison_queue(queue: &str) -> String {
    format!("{queue}{POISON_SUFFIX}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names() {
        for name in ["abc", "acme-tasks", "a1-b2-c3", "123", &"a".repeat(63)] {
            assert_eq!(validate_queue_name(name), Ok(()), "{name}");
        }
    }

    #[test]
    fn each_rule_is_named() {
        let e = validate_queue_name("ab").unwrap_err();
        assert!(e.contains("2 characters") && e.contains("3 to 63"), "{e}");
        let e = validate_queue_name(&"a".repeat(64)).unwrap_err();
        assert!(e.contains("64 characters"), "{e}");
        let e = validate_queue_name("Acme").unwrap_err();
        assert!(e.contains("`A`") && e.contains("lowercase"), "{e}");
        let e = validate_queue_name("acme_tasks").unwrap_err();
        assert!(e.contains("`_`"), "{e}");
        let e = validate_queue_name("-acme").unwrap_err();
        assert!(e.contains("start and end"), "{e}");
        let e = validate_queue_name("acme-").unwrap_err();
        assert!(e.contains("start and end"), "{e}");
        let e = validate_queue_name("ac--me").unwrap_err();
        assert!(e.contains("consecutive hyphens"), "{e}");
        let e = validate_queue_name("acmé").unwrap_err();
        assert!(e.contains("`é`"), "{e}");
    }

    #[test]
    fn tasks_and_poison_names() {
        assert_eq!(tasks_queue("acme").unwrap(), "acme-tasks");
        assert_eq!(poison_queue("acme-tasks"), "acme-tasks-poison");
        // A one-letter client still makes a valid (>= 3 characters) queue name.
        assert_eq!(tasks_queue("a").unwrap(), "a-tasks");
        assert_eq!(webhooks_queue("acme").unwrap(), "acme-webhooks");
        let e = webhooks_queue(&"q".repeat(50)).unwrap_err();
        assert!(e.contains("outbox"), "{e}");
    }

    #[test]
    fn client_name_limits() {
        let longest = "c".repeat(47);
        tasks_queue(&longest).unwrap();
        assert_eq!(poison_queue(&webhooks_queue(&longest).unwrap()).len(), 63);
        let e = tasks_queue(&"c".repeat(48)).unwrap_err();
        assert!(e.contains("at most 47"), "{e}");
        let e = tasks_queue("Acme").unwrap_err();
        assert!(e.contains("lowercase"), "{e}");
        let e = tasks_queue("acme-").unwrap_err();
        assert!(e.contains("consecutive hyphens"), "{e}");
        assert!(tasks_queue("").unwrap_err().contains("WORKER_CLIENT"));
    }
}
