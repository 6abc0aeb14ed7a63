//! How one attempt at one task ended.
//!
//! A leaf module: [`crate::execute`] produces outcomes, [`crate::webhook`]
//! turns them into events, and the consumer and single-task mode settle by
//! them, without any of those importing another for it. Each variant carries
//! exactly what it means: only a success has a result, only a failure says
//! whether another attempt could help.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::handler::Retry;

/// The kind of ending, without its details.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Succeeded,
    Failed,
    TimedOut,
    /// Shutdown or a signal stopped the task before it finished. Single-task
    /// mode reports it as `failed` with error `cancelled`; the consumer
    /// releases the message for another worker instead of reporting anything.
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::TimedOut => "timed_out",
            Status::Cancelled => "cancelled",
        }
    }
}

/// The result of one attempt at one task.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Succeeded {
        result: Value,
        duration: Duration,
    },
    Failed {
        error: String,
        /// Whether another attempt could succeed.
        retry: Retry,
        duration: Duration,
    },
    /// Stopped by the task timeout; always worth another attempt.
    TimedOut {
        timeout: Duration,
    },
    Cancelled {
        duration: Duration,
    },
}

impl Outcome {
    pub fn failed(error: impl Into<String>, retry: Retry, duration: Duration) -> Self {
        Outcome::Failed {
            error: error.into(),
            retry,
            duration,
        }
    }

    pub fn status(&self) -> Status {
        match self {
            Outcome::Succeeded { .. } => Status::Succeeded,
            Outcome::Failed { .. } => Status::Failed,
            Outcome::TimedOut { .. } => Status::TimedOut,
            Outcome::Cancelled { .. } => Status::Cancelled,
        }
    }

    /// How long the handler ran.
    pub fn duration(&self) -> Duration {
        match self {
            Outcome::Succeeded { duration, .. }
            | Outcome::Failed { duration, .. }
            | Outcome::Cancelled { duration } => *duration,
            Outcome::TimedOut { timeout } => *timeout,
        }
    }

    pub fn result(&self) -> Option<&Value> {
        match self {
            Outcome::Succeeded { result, .. } => Some(result),
            _ => None,
        }
    }

    /// What went wrong, for logs and the webhook; `None` for a success.
    pub fn error(&self) -> Option<String> {
        match self {
            Outcome::Succeeded { .. } => None,
            Outcome::Failed { error, .. } => Some(error.clone()),
            Outcome::TimedOut { timeout } => {
                Some(format!("timed out after {}s", timeout.as_secs_f64()))
            }
            Outcome::Cancelled { .. } => Some("cancelled".into()),
        }
    }

    /// A failure no retry can fix.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Outcome::Failed {
                retry: Retry::Permanent,
                ..
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_says_what_it_means() {
        let ok = Outcome::Succeeded {
            result: Value::Bool(true),
            duration: Duration::from_millis(3),
        };
        assert_eq!(
            (ok.status(), ok.error(), ok.result()),
            (Status::Succeeded, None, Some(&Value::Bool(true)))
        );
        let t = Outcome::TimedOut {
            timeout: Duration::from_secs(2),
        };
        assert_eq!(t.error().as_deref(), Some("timed out after 2s"));
        assert!(!t.is_permanent());
        let f = Outcome::failed("no", Retry::Permanent, Duration::ZERO);
        assert!(f.is_permanent() && f.result().is_none());
        let c = Outcome::Cancelled {
            duration: Duration::ZERO,
        };
        assert_eq!(c.error().as_deref(), Some("cancelled"));
    }
}
