//! Patience at start-up with a managed identity.
//!
//! Azure Container Instances can start a container before the group's
//! managed-identity endpoint answers (MicrosoftDocs/azure-docs#61891 and
//! #71206: the token endpoint refuses, times out or says the identity is not
//! there for the first seconds of a group). The worker's first queue call
//! (the take-over of the handed-over message, the receive of a job
//! execution, the first poll) then fails although nothing is wrong, and a
//! worker that gave up after the SDK's few quick retries would end its
//! attempt without running anything.
//!
//! [`StartupPatience`] sits in front of the storage pipeline (a per-call
//! policy, so it wraps the SDK's retries and the bearer-token policy) and,
//! until the first request has had an answer from the service, retries a
//! request whose token could not be acquired or whose connection failed,
//! with a growing pause, until `WORKER_IDENTITY_WAIT` has passed since the
//! client was built. Any answer from the service, an error status included,
//! ends the patience for good: a lost lease (`404`/`400` on the pop receipt)
//! or a refused role (`403`) is the caller's to handle as before, and later
//! failures get only the usual short retries. Requests made with a
//! connection string never go through it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use azure_core::error::ErrorKind;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{Context, Request};
use tokio::time::Instant;

use super::error::describe_azure_error;

/// Env var for how long the start-up retries may go on.
pub const IDENTITY_WAIT_VAR: &str = "WORKER_IDENTITY_WAIT";
/// First pause between two tries; doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Retries token and connection failures until the service has answered
/// once, for at most `wait` from construction.
#[derive(Debug)]
pub(super) struct StartupPatience {
    until: Instant,
    wait: Duration,
    /// Set by the first answer of the service; from then on the policy
    /// only passes requests through.
    answered: AtomicBool,
}

impl StartupPatience {
    pub(super) fn new(wait: Duration) -> Arc<Self> {
        Arc::new(Self {
            until: Instant::now() + wait,
            wait,
            answered: AtomicBool::new(wait.is_zero()),
        })
    }

    /// What the start-up may wait out: the token endpoint failing or not
    /// answering (`Credential`), and the connection itself (`Connection`,
    /// `Io`: refused, reset, timed out). An HTTP status from the service
    /// is an answer, never waited out.
    fn waits_out(e: &azure_core::Error) -> bool {
        matches!(
            e.kind(),
            ErrorKind::Credential | ErrorKind::Connection | ErrorKind::Io
        )
    }
}

#[async_trait::async_trait]
impl Policy for StartupPatience {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let mut pause = FIRST_PAUSE;
        let mut tries = 1u32;
        loop {
            let result = next[0].send(ctx, request, &next[1..]).await;
            let error = match &result {
                Ok(_) => {
                    self.answered.store(true, Ordering::Relaxed);
                    return result;
                }
                Err(e) => e,
            };
            if self.answered.load(Ordering::Relaxed) || !Self::waits_out(error) {
                return result;
            }
            let left = self.until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::error!(tries, error = %describe_azure_error(error),
                    "the managed identity or the queue endpoint still fails {}s after start-up ({IDENTITY_WAIT_VAR}); giving up",
                    self.wait.as_secs());
                return result;
            }
            let sleep = pause.min(left);
            tracing::warn!(tries, retry_in_ms = sleep.as_millis() as u64, error = %describe_azure_error(error),
                "managed identity token or queue connection not available yet at start-up; retrying");
            tokio::time::sleep(sleep).await;
            request.body_mut().reset().await?;
            pause = (pause * 2).min(MAX_PAUSE);
            tries += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::{AsyncRawResponse, Method, StatusCode, Url};
    use std::sync::atomic::AtomicU32;
    use std::sync::Mutex;

    /// A pipeline end that fails with the queued errors, then answers 200.
    #[derive(Debug)]
    struct Script {
        errors: Mutex<Vec<ErrorKind>>,
        calls: AtomicU32,
        status: StatusCode,
    }

    #[async_trait::async_trait]
    impl Policy for Script {
        async fn send(&self, _: &Context, _: &mut Request, _: &[Arc<dyn Policy>]) -> PolicyResult {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let next = self.errors.lock().unwrap().pop();
            match next {
                Some(kind) => Err(azure_core::Error::with_message(kind, "scripted")),
                None => Ok(AsyncRawResponse::from_bytes(
                    self.status,
                    Default::default(),
                    Vec::new(),
                )),
            }
        }
    }

    fn script(errors: Vec<ErrorKind>, status: StatusCode) -> Arc<Script> {
        Arc::new(Script {
            errors: Mutex::new(errors),
            calls: AtomicU32::new(0),
            status,
        })
    }

    async fn send(p: &StartupPatience, end: &Arc<Script>) -> PolicyResult {
        let mut req = Request::new(Url::parse("https://q.example.net/").unwrap(), Method::Get);
        let next: Vec<Arc<dyn Policy>> = vec![end.clone()];
        p.send(&Context::default(), &mut req, &next).await
    }

    #[tokio::test(start_paused = true)]
    async fn token_and_connection_errors_are_waited_out_until_the_first_answer() {
        let p = StartupPatience::new(Duration::from_secs(120));
        let end = script(
            vec![
                ErrorKind::Io,
                ErrorKind::Connection,
                ErrorKind::Credential,
                ErrorKind::Credential,
            ],
            StatusCode::Ok,
        );
        assert!(send(&p, &end).await.is_ok());
        assert_eq!(end.calls.load(Ordering::Relaxed), 5);
        // After an answer, a failure is the caller's at once.
        let later = script(vec![ErrorKind::Credential], StatusCode::Ok);
        assert!(send(&p, &later).await.is_err());
        assert_eq!(later.calls.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_is_bounded() {
        let p = StartupPatience::new(Duration::from_secs(10));
        let end = script(vec![ErrorKind::Credential; 1000], StatusCode::Ok);
        let started = Instant::now();
        let e = send(&p, &end).await.unwrap_err();
        assert_eq!(*e.kind(), ErrorKind::Credential);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "{waited:?}"
        );
        let calls = end.calls.load(Ordering::Relaxed);
        assert!((3..20).contains(&calls), "{calls} tries in 10 s");
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_status_or_another_error_is_never_retried() {
        // A lost lease or a refused role is an answer: it ends the patience.
        let p = StartupPatience::new(Duration::from_secs(120));
        let end = script(Vec::new(), StatusCode::NotFound);
        assert!(send(&p, &end).await.is_ok());
        let after = script(vec![ErrorKind::Connection], StatusCode::Ok);
        assert!(send(&p, &after).await.is_err());
        // Before any answer, other kinds are not waited out either.
        let p = StartupPatience::new(Duration::from_secs(120));
        let end = script(vec![ErrorKind::Other], StatusCode::Ok);
        assert!(send(&p, &end).await.is_err());
        assert_eq!(end.calls.load(Ordering::Relaxed), 1);
        // Zero disables it.
        let p = StartupPatience::new(Duration::ZERO);
        let end = script(vec![ErrorKind::Connection], StatusCode::Ok);
        assert!(send(&p, &end).await.is_err());
    }
}
