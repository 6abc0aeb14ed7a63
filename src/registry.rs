//! `task_type` → handler. Built once at start-up and shared by every mode, so
//! single-task, polling and job mode can never disagree on what a type means.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::egress::EgressPolicy;
use crate::handler::Handler;
use crate::handlers;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("task type `{0}` is registered twice; each task type needs exactly one handler")]
    Duplicate(String),
    #[error(transparent)]
    HandlersFile(#[from] handlers::file::HandlersFileError),
}

/// The registered handlers, in name order (stable output for `worker handlers`).
#[derive(Default)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.handlers.keys()).finish()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in handlers plus, when given, the operator's exec and
    /// long-lived handlers.
    pub fn standard(
        egress: &EgressPolicy,
        handlers_file: Option<&Path>,
    ) -> Result<Self, RegistryError> {
        let mut registry = Self::new();
        for (name, handler) in handlers::builtins(egress) {
            registry.register(name, handler)?;
        }
        if let Some(path) = handlers_file {
            for (name, handler) in handlers::file::load(path)? {
                registry.register(name, handler)?;
            }
        }
        Ok(registry)
    }

    /// Adds a handler; a type can be registered only once.
    pub fn register(
        &mut self,
        task_type: impl Into<String>,
        handler: Arc<dyn Handler>,
    ) -> Result<(), RegistryError> {
        let task_type = task_type.into();
        if self.handlers.contains_key(&task_type) {
            return Err(RegistryError::Duplicate(task_type));
        }
        self.handlers.insert(task_type, handler);
        Ok(())
    }

    pub fn get(&self, task_type: &str) -> Option<&Arc<dyn Handler>> {
        self.handlers.get(task_type)
    }

    /// `(task_type, description)` for every handler, sorted by type.
    pub fn describe(&self) -> Vec<(String, String)> {
        self.handlers
            .iter()
            .map(|(k, h)| (k.clone(), h.description()))
            .collect()
    }

    /// Registered type names, for "unknown task type" errors.
    pub fn names(&self) -> Vec<&str> {
        self.handlers.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::echo::Echo;

    #[test]
    fn duplicate_registration_is_an_error() {
        let mut r = Registry::new();
        r.register("echo", Arc::new(Echo)).unwrap();
        let e = r.register("echo", Arc::new(Echo)).unwrap_err();
        assert!(e.to_string().contains("`echo` is registered twice"));
    }

    #[test]
    fn standard_registry_has_builtins() {
        let r = Registry::standard(&EgressPolicy::default(), None).unwrap();
        assert_eq!(r.names(), vec!["echo", "fail", "http", "sleep"]);
    }
}
