//! The handlers file (`WORKER_HANDLERS_FILE`): the operator's exec and
//! long-lived handlers, by task type.
//!
//! Each `[handlers.NAME]` table is one handler; `mode` picks the kind (exec,
//! one child per task, when absent; `persistent`, a pool of long-lived
//! processes, also implied by `function`). A table is read as a whole before
//! its kind's own settings are checked, so that a setting of the other kind
//! is refused by name. Commands only ever come from this file, never from a
//! task.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{exec, persistent};

#[derive(Debug, thiserror::Error)]
pub enum HandlersFileError {
    #[error("cannot read handlers file {path} (WORKER_HANDLERS_FILE): {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("handlers file {path} (WORKER_HANDLERS_FILE) is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    handlers: BTreeMap<String, toml::Table>,
}

pub use crate::handler::NamedHandler;

/// Reads and validates a handlers file.
pub fn load(path: &Path) -> Result<Vec<NamedHandler>, HandlersFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| HandlersFileError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text).map_err(|message| HandlersFileError::Invalid {
        path: path.into(),
        message,
    })
}

/// Parses handlers-file text; the error says which handler and field is wrong.
pub fn parse(text: &str) -> Result<Vec<NamedHandler>, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, mut table) in file.handlers {
        let mode = match table.remove("mode") {
            None if table.contains_key("function") => "persistent".to_owned(),
            None => "exec".to_owned(),
            Some(toml::Value::String(m)) => m,
            Some(other) => {
                return Err(format!(
                    "[handlers.{name}]: `mode` = {other} is not a string: use \"exec\" or \"persistent\""
                ))
            }
        };
        let invalid = |e: toml::de::Error| format!("[handlers.{name}]: {}", e.message().trim());
        let handler = match mode.as_str() {
            "exec" => exec::build(name.clone(), table.try_into().map_err(invalid)?)?,
            "persistent" => persistent::build(name.clone(), table.try_into().map_err(invalid)?)?,
            other => {
                return Err(format!(
                "[handlers.{name}]: unknown `mode` = {other:?}: use \"exec\" (a process per task, \
                     the default) or \"persistent\" (long-lived processes)"
            ))
            }
        };
        out.push(handler);
    }
    Ok(out)
}
