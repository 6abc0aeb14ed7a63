//! Arbitrary bytes as task data: decoding never panics, a decoded task
//! survives a round trip through the JSON exec handlers receive on stdin, and
//! `salvage` (used for the webhook of a refused task) agrees with `decode` on
//! every envelope `decode` accepts.

#![no_main]

use libfuzzer_sys::fuzz_target;
use worker::task::{decode, salvage, Encoding};

fuzz_target!(|data: &[u8]| {
    let salvaged = salvage(data);
    let (task, _) = match decode(data) {
        Ok(ok) => ok,
        Err(e) => {
            // Every error renders (and names what is wrong).
            assert!(!e.to_string().is_empty());
            return;
        }
    };

    let json = task.to_json();
    let (again, encoding) = decode(json.as_bytes())
        .unwrap_or_else(|e| panic!("re-encoded task does not decode: {e}\n{json}"));
    assert_eq!(encoding, Encoding::Json);
    assert_eq!(again, task, "round trip changed the task: {json}");

    assert_eq!(salvaged.task_id.as_deref(), Some(task.task_id.as_str()));
    assert_eq!(salvaged.task_type.as_deref(), Some(task.task_type.as_str()));
    assert_eq!(
        salvaged.client.as_deref(),
        task.client.as_deref().filter(|c| !c.is_empty())
    );
    assert_eq!(salvaged.webhook_url, task.webhook_url);
});
