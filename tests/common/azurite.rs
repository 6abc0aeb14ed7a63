//! Azurite (the Azure Storage emulator) for integration tests.
//!
//! The queue and blob services (the outbox keeps outcomes too large for a
//! queue message as blobs) run as one child process, `azurite`, on free
//! loopback ports (`--queuePort 0 --blobPort 0`; each port is read from its
//! service's "successfully listening at" line). The table service comes
//! with that binary and is left on a free port, unused.
//! Azurite is installed from the lock file in `tests/` with `npm ci` the first
//! time a test needs it, so `cargo test` needs nothing else than Node.js and npm.
//!
//! The process is started through a small `sh` wrapper that stops Azurite when
//! its stdin closes. The test process holds the write end, so Azurite goes away
//! when the harness drops it, and also when the test process dies without
//! running destructors (a panic in a static, SIGKILL): the kernel closes the
//! pipe either way, and no emulator outlives the tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Azurite's fixed account.
pub const ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known account key (public; it only opens the emulator).
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Start-up normally takes 2-6 s; this only guards against a hang.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const MIN_NODE_MAJOR: u32 = 20;

const INSTALL_HELP: &str = "The queue tests run Azurite, the Azure Storage emulator, which needs \
Node.js 20 or newer and npm on PATH. Install them (e.g. `apt-get install nodejs npm` on a recent \
Debian/Ubuntu, or a Node.js 20+ build from the Node.js project or nvm), then run `cargo test` again; \
the harness installs Azurite itself with `npm ci` in tests/.";

/// Stops Azurite when stdin reaches EOF, whoever closes it.
const WRAPPER: &str = r#"exec 2>&1
"$0" "$@" &
pid=$!
echo "harness: azurite pid $pid"
read _ignored
kill -TERM "$pid" 2>/dev/null
wait "$pid""#;

fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests")
}

/// Path of `azurite`, installing Azurite with `npm ci` once per process.
pub fn azurite_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(install)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn install() -> Result<PathBuf, String> {
    let dir = tests_dir();
    let bin = dir.join("node_modules").join(".bin").join("azurite");
    check_node()?;
    if bin.exists() {
        return Ok(bin);
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .output()
        .map_err(|e| {
            format!(
                "cannot run `npm ci` in {}: {e}\n{INSTALL_HELP}",
                dir.display()
            )
        })?;
    if !out.status.success() || !bin.exists() {
        return Err(format!(
            "`npm ci` in {} failed ({}); it installs Azurite from tests/package-lock.json.\n\
             stdout:\n{}\nstderr:\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(bin)
}

fn check_node() -> Result<(), String> {
    let out = Command::new("node")
        .arg("--version")
        .output()
        .map_err(|e| format!("`node` not found ({e}).\n{INSTALL_HELP}"))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < MIN_NODE_MAJOR {
        return Err(format!(
            "Node.js {version} is too old; Azurite needs {MIN_NODE_MAJOR} or newer.\n{INSTALL_HELP}"
        ));
    }
    Command::new("npm")
        .arg("--version")
        .output()
        .map_err(|e| format!("`npm` not found ({e}).\n{INSTALL_HELP}"))?;
    Ok(())
}

enum Event {
    Pid(i32),
    Queue(u16),
    Blob(u16),
}

/// A running Azurite: queue and blob services of one account.
pub struct Azurite {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    azurite_pid: Option<i32>,
    /// The queue service's port.
    port: u16,
    blob_port: u16,
    /// `Some` for the persistent variant: where Azurite keeps its data.
    location: Option<tempfile::TempDir>,
    /// `Some((cert, key))`: HTTPS with that certificate, and bearer tokens
    /// accepted (`--oauth basic`, which Azurite allows over HTTPS only).
    tls: Option<(PathBuf, PathBuf)>,
    output: Arc<Mutex<String>>,
}

impl Azurite {
    /// An in-memory instance on a free port.
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// An instance that keeps its data in a temporary directory, so that
    /// [`Azurite::restart`] brings the queues and messages back.
    pub fn start_persistent() -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory for Azurite");
        Self::launch(Some(dir))
    }

    /// An in-memory instance serving HTTPS with `cert`/`key` (PEM) and
    /// accepting Entra ID bearer tokens (`--oauth basic`: lifetime, issuer
    /// and audience are checked, the signature is not).
    pub fn start_tls_oauth(cert: &Path, key: &Path) -> Self {
        let mut me = Azurite {
            child: None,
            stdin: None,
            azurite_pid: None,
            port: 0,
            blob_port: 0,
            location: None,
            tls: Some((cert.to_owned(), key.to_owned())),
            output: Arc::default(),
        };
        if let Err(e) = me.spawn((0, 0)) {
            panic!("{e}");
        }
        me
    }

    /// One instance shared by every test in the calling test binary; tests
    /// use [`unique_name`] queues so they cannot see each other's messages.
    pub fn shared() -> &'static Azurite {
        static SHARED: OnceLock<Azurite> = OnceLock::new();
        SHARED.get_or_init(Azurite::start)
    }

    fn launch(location: Option<tempfile::TempDir>) -> Self {
        let mut me = Azurite {
            child: None,
            stdin: None,
            azurite_pid: None,
            port: 0,
            blob_port: 0,
            location,
            tls: None,
            output: Arc::default(),
        };
        if let Err(e) = me.spawn((0, 0)) {
            panic!("{e}");
        }
        me
    }

    /// Starts the wrapper on the (queue, blob) `ports` (0: any free one) and
    /// waits for both listening lines; on failure the error carries what
    /// Azurite printed during this attempt.
    fn spawn(&mut self, ports: (u16, u16)) -> Result<(), String> {
        let start_of_output = self.output().len();
        let bin = azurite_bin();
        let (queue_port, blob_port) = (ports.0.to_string(), ports.1.to_string());
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--queueHost".as_ref(),
            "127.0.0.1".as_ref(),
            "--queuePort".as_ref(),
            queue_port.as_ref(),
            "--blobHost".as_ref(),
            "127.0.0.1".as_ref(),
            "--blobPort".as_ref(),
            blob_port.as_ref(),
            "--tableHost".as_ref(),
            "127.0.0.1".as_ref(),
            "--tablePort".as_ref(),
            "0".as_ref(),
            "--silent".as_ref(),
            "--disableTelemetry".as_ref(),
        ];
        // --location and --inMemoryPersistence exclude each other.
        match &self.location {
            Some(dir) => {
                args.push("--location".as_ref());
                args.push(dir.path().as_os_str());
            }
            None => args.push("--inMemoryPersistence".as_ref()),
        }
        if let Some((cert, key)) = &self.tls {
            args.extend([
                "--cert".as_ref(),
                cert.as_os_str(),
                "--key".as_ref(),
                key.as_os_str(),
                "--oauth".as_ref(),
                "basic".as_ref(),
            ]);
        }
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WRAPPER)
            .arg(&bin)
            .args(&args)
            .current_dir(
                self.location
                    .as_ref()
                    .map_or_else(std::env::temp_dir, |d| d.path().to_owned()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {} through sh: {e}", bin.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let output = self.output.clone();
        std::thread::spawn(move || read_output(stdout, output, tx));
        self.stdin = child.stdin.take();
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        let (mut queue, mut blob) = (None, None);
        loop {
            if let (Some(q), Some(b)) = (queue, blob) {
                (self.port, self.blob_port) = (q, b);
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Event::Pid(pid)) => self.azurite_pid = Some(pid),
                Ok(Event::Queue(p)) => queue = Some(p),
                Ok(Event::Blob(p)) => blob = Some(p),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.kill_now();
                    return Err(format!(
                        "Azurite did not report a listening port within {START_TIMEOUT:?}; output:\n{}",
                        self.output_since(start_of_output)
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.kill_now();
                    return Err(format!(
                        "Azurite exited before listening (ports {ports:?}); output:\n{}",
                        self.output_since(start_of_output)
                    ));
                }
            }
        }
    }

    /// The Azurite process itself (not the shell that started it), to stop
    /// it with SIGSTOP in a test.
    #[allow(dead_code)]
    pub fn pid(&self) -> i32 {
        self.azurite_pid.expect("Azurite is running")
    }

    /// The queue service's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path-style queue endpoint: `http://127.0.0.1:PORT/devstoreaccount1`
    /// (`https` for the TLS variant).
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}/{ACCOUNT}", self.scheme(), self.port)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The path-style blob endpoint of the same account.
    pub fn blob_endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}/{ACCOUNT}", self.scheme(), self.blob_port)
    }

    /// Shared Key, both services.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol={};AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};QueueEndpoint={};BlobEndpoint={}",
            self.scheme(),
            self.endpoint(),
            self.blob_endpoint()
        )
    }

    /// The library's queue client for this instance, with Shared Key auth.
    pub fn service(&self) -> worker::queue::QueueService {
        worker::queue::QueueService::new(&worker::queue::StorageSettings {
            connection_string: Some(worker::config::Secret::new(self.connection_string())),
            ..Default::default()
        })
        .expect("a queue client for Azurite")
    }

    /// The library's blob container `container` of this instance (where the
    /// outbox keeps deliveries too large for a queue message).
    pub fn claims(&self, container: &str) -> worker::queue::ClaimStore {
        worker::queue::ClaimStore::new(
            &worker::queue::StorageSettings {
                connection_string: Some(worker::config::Secret::new(self.connection_string())),
                ..Default::default()
            },
            container,
        )
        .expect("a blob client for Azurite")
    }

    /// Everything Azurite printed so far (for assertion messages).
    pub fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    fn output_since(&self, start: usize) -> String {
        self.output().get(start..).unwrap_or_default().to_owned()
    }

    /// Where the persistent variant keeps its data.
    pub fn location(&self) -> Option<&Path> {
        self.location.as_ref().map(|d| d.path())
    }

    /// Stops Azurite gracefully (it flushes its data), waiting for it to exit.
    pub fn stop(&mut self) {
        // Closing stdin makes the wrapper send SIGTERM and wait.
        drop(self.stdin.take());
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.azurite_pid = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
        self.kill_now();
    }

    /// Stops and starts again on the same ports, with the same data when
    /// persistent. Retries briefly if the ports are not free yet.
    pub fn restart(&mut self) {
        self.stop();
        let ports = (self.port, self.blob_port);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn(ports) {
                Ok(()) => return,
                // The old listener can take a moment to release the port.
                Err(e) if e.contains("EADDRINUSE") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("restarting Azurite on ports {ports:?}: {e}"),
            }
        }
    }

    fn kill_now(&mut self) {
        drop(self.stdin.take());
        if let Some(pid) = self.azurite_pid.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        if self.location.is_some() {
            self.stop();
        } else {
            self.kill_now();
        }
    }
}

fn read_output(
    stdout: std::process::ChildStdout,
    output: Arc<Mutex<String>>,
    tx: mpsc::Sender<Event>,
) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if let Ok(mut o) = output.lock() {
            o.push_str(&line);
            o.push('\n');
        }
        if let Some(pid) = line.strip_prefix("harness: azurite pid ") {
            if let Ok(pid) = pid.trim().parse() {
                let _ = tx.send(Event::Pid(pid));
            }
        } else if let Some(rest) = line
            .split("successfully listening at http://127.0.0.1:")
            .nth(1)
            .or_else(|| {
                line.split("successfully listening at https://127.0.0.1:")
                    .nth(1)
            })
        {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let Ok(port) = digits.parse() else { continue };
            if line.contains("Queue service") {
                let _ = tx.send(Event::Queue(port));
            } else if line.contains("Blob service") {
                let _ = tx.send(Event::Blob(port));
            }
        }
    }
}

/// A queue (or client) name unique to this test run: `<prefix>-<pid>-<n>`,
/// at most 40 characters so that `<name>-tasks-poison` is still valid.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let clean: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let clean = clean
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let suffix = format!("-{}-{n}", std::process::id());
    let room = 40 - suffix.len();
    let mut head: String = clean.chars().take(room).collect();
    while head.ends_with('-') {
        head.pop();
    }
    if head.is_empty() {
        head.push('q');
    }
    format!("{head}{suffix}")
}
