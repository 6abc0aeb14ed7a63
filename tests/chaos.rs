//! Chaos: a few hundred tasks through several polling workers on one queue,
//! while workers are killed (SIGKILL) and stopped (SIGTERM) at random and
//! replaced, Azurite restarts once, and the webhook backend answers 200,
//! answers 503, hangs past the webhook timeout or is away, by turns; its name
//! (`backend.invalid`, pinned in a hosts file the workers read) also stops
//! resolving for a while. A second client's backend, on another host, is
//! black-holed (it accepts and never answers) until the first client is
//! through. Then every backend answers 200 until everything is through, and:
//!
//! - every task's `task.succeeded` was accepted by its backend at least once;
//! - every request for one task carried one and the same `webhook-id`;
//! - the first client was through while the second's backend was still
//!   black-holed (one black hole never holds up another client);
//! - the tasks queues, the outboxes and all poison queues are empty.
//!
//! The plan is seeded. The seed is printed first (`--nocapture` shows it on
//! success too); `CHAOS_SEED=<n> cargo test --test chaos` replays the same
//! plan (the machine's timing still varies). A failed run keeps every worker's
//! log and the backend's request log in `target/tmp/chaos-<seed>/`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use nix::sys::signal::Signal;
use serde_json::json;

use common::azurite::Azurite;
use common::backend::{Backend, Hit, Mode};
use common::consume::{task, Client};
use common::worker::Running;
use worker::queue::{Queue, QueueError};

/// Tasks in all: the first wave is queued before the workers start, the rest
/// over the first part of the chaos.
const TASKS: usize = 240;
const FIRST_WAVE: usize = 120;
/// Workers kept running; a worker stopped by SIGTERM finishes its work beside
/// its replacement.
const LIVE: usize = 3;
const CONCURRENCY: &str = "8";
/// Renewed at half-life: 4 s of slack on a loaded machine, and a killed
/// worker's messages come back within 8 s.
const VISIBILITY_TIMEOUT: &str = "8";
/// Two in-process attempts, 0.2 s apart, 2 s each at most.
const WEBHOOK_MAX_ATTEMPTS: &str = "2";
const WEBHOOK_INITIAL_BACKOFF: &str = "0.2";
const WEBHOOK_TIMEOUT: &str = "2";
/// How long the hanging backend keeps a request: past the webhook timeout.
const HANG: Duration = Duration::from_secs(4);
/// 214 s in all, longer than the chaos and the black hole: every outbox
/// entry gets an attempt after its backend is back for good, so none may
/// reach the poison queue.
const OUTBOX_SCHEDULE: &str = "1s,1s,2s,2s,3s,5s,5s,10s,15s,20s,30s,30s,30s,30s,30s";
/// The second client's tasks (quick echo tasks, queued before the workers
/// start), all reporting to the black-holed backend.
const HOLE_TASKS: usize = 40;
/// The black hole opens at the latest this long after the chaos.
const HOLE_MAX_AFTER_CHAOS: Duration = Duration::from_secs(60);
/// The name the first backend is reached by (a hosts file maps it).
const BACKEND_NAME: &str = "backend.invalid";
/// Every this many jobs one is a `large` task: an exec child (Python) that
/// sleeps like the others, then returns `{"blob": "x" * bytes}`, near or
/// above a queue message's size, so outbox entries are written inline and as
/// blobs under the same faults.
const LARGE_EVERY: usize = 6;
const LARGE_HANDLER: &str = r#"[handlers.large]
command = ["python3", "-c", """
import json, sys, time
p = json.load(sys.stdin)["payload"]
time.sleep(p["seconds"])
sys.stdout.write(json.dumps({"blob": "x" * p["bytes"]}))
"""]
"#;
/// Crashes must never poison a task.
const MAX_DEQUEUE_COUNT: &str = "20";
/// SIGTERM grace per worker, picked at random: short ones cancel and release
/// tasks, long ones let them finish and leave pending webhooks to the outbox.
const GRACES: [&str; 3] = ["1", "3", "10"];
/// After the chaos: how long delivering and settling the rest may take.
const DRAIN_BOUND: Duration = Duration::from_secs(180);
/// How long a worker may take to exit after SIGTERM (its grace is at most 10 s).
const STOP_BOUND: Duration = Duration::from_secs(60);
/// How long one queue call from the test may take.
const CALL_BOUND: Duration = Duration::from_secs(10);
/// How long a queue call from the test may keep failing.
const QUEUE_BOUND: Duration = Duration::from_secs(30);

#[test]
fn no_outcome_is_lost_through_crashes_restarts_and_a_flaky_backend() {
    let seed = seed();
    println!("chaos seed {seed}; CHAOS_SEED={seed} cargo test --test chaos replays this plan");
    let plan = Plan::new(&mut Rng(seed));
    println!("{}", plan.describe());
    let started = Instant::now();

    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut az = Azurite::start_persistent();
    let c = rt
        .block_on(async { tokio::time::timeout(QUEUE_BOUND, Client::new(&az, "chaos")).await })
        .expect("create the client's queues on Azurite");
    let cb = rt
        .block_on(async { tokio::time::timeout(QUEUE_BOUND, Client::new(&az, "chaos-b")).await })
        .expect("create the second client's queues on Azurite");
    let svc = az.service();
    let outbox = svc.queue(&format!("{}-webhooks", c.name)).unwrap();
    let outbox_poison = svc.queue(&format!("{}-webhooks-poison", c.name)).unwrap();
    let b_outbox = svc.queue(&format!("{}-webhooks", cb.name)).unwrap();
    let b_outbox_poison = svc.queue(&format!("{}-webhooks-poison", cb.name)).unwrap();
    let backend = Backend::start(HANG);
    let hole = Backend::start(Duration::from_secs(600));
    hole.set_mode(Mode::Hang);
    let hosts_dir = tempfile::tempdir().expect("a temp dir for the hosts file");
    let hosts = hosts_dir.path().join("hosts");
    set_resolvable(&hosts, true);
    let handlers = hosts_dir.path().join("handlers.toml");
    std::fs::write(&handlers, LARGE_HANDLER).expect("write the handlers file");
    let hook = format!("http://{BACKEND_NAME}:{}/hooks/task", backend.port());
    // Plain JSON and base64 of it, the two ways backends enqueue.
    let texts: Vec<String> = plan
        .jobs
        .iter()
        .map(|j| {
            let text = match j.large {
                Some(bytes) => task(
                    &j.id,
                    "large",
                    json!({"seconds": j.seconds, "bytes": bytes}),
                    Some(&hook),
                ),
                None => task(&j.id, "sleep", json!({"seconds": j.seconds}), Some(&hook)),
            }
            .to_string();
            if j.base64 {
                base64::engine::general_purpose::STANDARD.encode(text)
            } else {
                text
            }
        })
        .collect();
    let hole_ids: Vec<String> = (0..HOLE_TASKS).map(|i| format!("hole-{i:03}")).collect();
    for id in &hole_ids {
        let text = task(id, "echo", json!({}), Some(&hole.url("/hooks/task"))).to_string();
        send(&rt, &cb.tasks, &text, seed);
    }

    let mut next_job = 0;
    while next_job < FIRST_WAVE {
        send(&rt, &c.tasks, &texts[next_job], seed);
        next_job += 1;
    }
    let env = vec![
        (
            "WORKER_CLIENT".to_owned(),
            format!("{},{}", c.name, cb.name),
        ),
        (
            "WORKER_WEBHOOK_ALLOWED_HOSTS".to_owned(),
            format!(
                "{BACKEND_NAME}:{},127.0.0.1:{}",
                backend.port(),
                hole.port()
            ),
        ),
        ("WORKER_HOSTS_FILE".to_owned(), hosts.display().to_string()),
        (
            "WORKER_HANDLERS_FILE".to_owned(),
            handlers.display().to_string(),
        ),
    ];
    let mut fleet = Fleet::new(&c, env, Rng(seed ^ 0x5eed_f1ee));
    for _ in 0..LIVE {
        fleet.spawn();
    }

    let t0 = Instant::now();
    let mut timeline: Vec<String> = Vec::new();
    let (mut next_mode, mut next_fault) = (0, 0);
    let mut restart_took = None;
    let mut last_check = Instant::now();
    let mut drained_at = None;
    let mut next_dns = 0;
    // When the first client was through, and when the black hole opened.
    let (mut a_done_at, mut hole_open_at) = (None, None);
    loop {
        let now = t0.elapsed();
        while next_dns < plan.dns.len() && plan.dns[next_dns].0 <= now {
            let resolvable = plan.dns[next_dns].1;
            set_resolvable(&hosts, resolvable);
            let what = if resolvable {
                "resolves"
            } else {
                "stops resolving"
            };
            timeline.push(format!("{:6.1}s {BACKEND_NAME} {what}", secs(now)));
            next_dns += 1;
        }
        while next_mode < plan.backend.len() && plan.backend[next_mode].0 <= now {
            let mode = plan.backend[next_mode].1;
            backend.set_mode(mode);
            timeline.push(format!("{:6.1}s backend {mode:?}", secs(now)));
            next_mode += 1;
        }
        while next_job < plan.jobs.len() && plan.jobs[next_job].at <= now {
            send(&rt, &c.tasks, &texts[next_job], seed);
            next_job += 1;
        }
        while next_fault < plan.faults.len() && plan.faults[next_fault].0 <= now {
            let what = match plan.faults[next_fault].1 {
                Fault::Kill => format!("SIGKILL {}", fleet.stop_one(Signal::SIGKILL)),
                Fault::Term => format!("SIGTERM {}", fleet.stop_one(Signal::SIGTERM)),
                Fault::RestartAzurite => {
                    let s = Instant::now();
                    az.restart();
                    restart_took = Some(s.elapsed());
                    format!("Azurite restarted in {:.1}s", secs(s.elapsed()))
                }
            };
            timeline.push(format!("{:6.1}s {what}", secs(t0.elapsed())));
            next_fault += 1;
        }
        fleet.reap();

        let chaos_over = now >= plan.chaos_end
            && next_job == plan.jobs.len()
            && next_fault == plan.faults.len()
            && next_mode == plan.backend.len()
            && next_dns == plan.dns.len();
        if chaos_over && last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            // Accepted, and nothing left to run or to deliver again.
            if a_done_at.is_none()
                && backend.succeeded_count() == TASKS
                && count(&rt, &c.tasks) == Ok(0)
                && count(&rt, &outbox) == Ok(0)
            {
                a_done_at = Some(now);
                timeline.push(format!(
                    "{:6.1}s first client delivered, queues empty",
                    secs(now)
                ));
            }
            if hole_open_at.is_none()
                && (a_done_at.is_some() || now > plan.chaos_end + HOLE_MAX_AFTER_CHAOS)
            {
                hole.set_mode(Mode::Ok);
                hole_open_at = Some(now);
                timeline.push(format!("{:6.1}s black hole opens", secs(now)));
            }
            if a_done_at.is_some()
                && hole_open_at.is_some()
                && hole.succeeded_count() == HOLE_TASKS
                && count(&rt, &cb.tasks) == Ok(0)
                && count(&rt, &b_outbox) == Ok(0)
            {
                drained_at = Some(t0.elapsed());
                timeline.push(format!("{:6.1}s all delivered, queues empty", secs(now)));
                break;
            }
        }
        let bound = plan.chaos_end + HOLE_MAX_AFTER_CHAOS + DRAIN_BOUND;
        if chaos_over && now > bound {
            fleet.problems.push(format!(
                "not drained {bound:?} after the start: {} of {TASKS} tasks accepted, \
                 tasks queue {:?}, outbox {:?} messages; {} of {HOLE_TASKS} black-hole tasks \
                 accepted, their queue {:?}, outbox {:?}",
                backend.succeeded_count(),
                count(&rt, &c.tasks),
                count(&rt, &outbox),
                hole.succeeded_count(),
                count(&rt, &cb.tasks),
                count(&rt, &b_outbox),
            ));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    fleet.stop_all();
    timeline.push(format!("{:6.1}s all workers stopped", secs(t0.elapsed())));

    let mut problems = std::mem::take(&mut fleet.problems);
    if a_done_at.is_none() || a_done_at > hole_open_at {
        problems.push(format!(
            "the first client was not through while the second's backend was black-holed \
             (through at {a_done_at:?}, black hole opened at {hole_open_at:?})"
        ));
    }
    for (q, what) in [
        (&c.tasks, "tasks queue"),
        (&outbox, "outbox"),
        (&c.poison, "tasks poison queue"),
        (&outbox_poison, "outbox poison queue"),
        (&cb.tasks, "second client's tasks queue"),
        (&b_outbox, "second client's outbox"),
        (&cb.poison, "second client's tasks poison queue"),
        (&b_outbox_poison, "second client's outbox poison queue"),
    ] {
        let n = count_settled(&rt, q, seed);
        if n != 0 {
            let texts: Vec<String> = call(&rt, q.peek(32))
                .map(|ms| ms.into_iter().map(|m| m.text).collect())
                .unwrap_or_default();
            problems.push(format!(
                "{what} `{}` holds {n} messages at the end ({} visible, the rest leased or \
                 not due yet); visible ones: {texts:#?}",
                q.name(),
                texts.len()
            ));
        }
    }

    let hits = backend.hits();
    let known: BTreeSet<&str> = plan.jobs.iter().map(|j| j.id.as_str()).collect();
    let check = Check::new(&known, &hits);
    problems.extend(check.problems.iter().cloned());
    let hole_hits = hole.hits();
    let hole_check = Check::new(&hole_ids.iter().map(String::as_str).collect(), &hole_hits);
    problems.extend(
        hole_check
            .problems
            .iter()
            .map(|p| format!("black hole: {p}")),
    );
    if !hole_check.missing.is_empty() {
        problems.push(format!(
            "{} of {HOLE_TASKS} black-hole tasks never had task.succeeded accepted: {:?}",
            hole_check.missing.len(),
            hole_check.missing
        ));
    }
    problems.extend(large_results_cut(&plan.jobs, &hits));
    let missing = check.missing.clone();
    if !missing.is_empty() {
        problems.push(format!(
            "{} of {TASKS} tasks never had task.succeeded accepted by the end: {missing:?}",
            missing.len()
        ));
    }

    let summary = format!(
        "chaos seed {seed}: {TASKS} tasks, {} worker processes ({} SIGKILL, {} SIGTERM), \
         Azurite restart {:.1}s; backend: {} requests ({} accepted, {} answered 503, {} hung, \
         {} dropped after reading), {} connections dropped on accept; {} tasks delivered, \
         {} duplicate deliveries ({} tasks more than once, at most {} times); black hole: \
         {} requests, {} tasks delivered after it opened; first client through at {}; chaos {:.1}s, \
         drained {}, whole test {:.1}s",
        fleet.spawned,
        fleet.kills,
        fleet.terms,
        restart_took.map_or(0.0, secs),
        hits.len(),
        hits.iter().filter(|h| h.answer == Mode::Ok).count(),
        hits.iter()
            .filter(|h| h.answer == Mode::Unavailable)
            .count(),
        hits.iter().filter(|h| h.answer == Mode::Hang).count(),
        hits.iter().filter(|h| h.answer == Mode::Away).count(),
        backend.dropped(),
        check.delivered,
        check.duplicates,
        check.repeated_tasks,
        check.max_per_task,
        hole_hits.len(),
        hole_check.delivered,
        a_done_at.map_or_else(|| "never".to_owned(), |d| format!("{:.1}s", secs(d))),
        secs(plan.chaos_end),
        drained_at.map_or_else(|| "never".to_owned(), |d| format!("at {:.1}s", secs(d))),
        secs(started.elapsed()),
    );
    println!("{}", timeline.join("\n"));
    println!("{summary}");
    println!("{}", paths_taken(&fleet.logs));
    if problems.is_empty() {
        return;
    }

    // Keep the evidence: every worker's log, the backend's requests, the plan.
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-{seed}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the chaos log directory");
    for (name, log) in &fleet.logs {
        std::fs::write(dir.join(format!("{name}.log")), log).expect("write a worker log");
    }
    std::fs::write(dir.join("backend.log"), backend_log(&hits)).expect("write backend.log");
    std::fs::write(
        dir.join("plan.txt"),
        format!("{}\n\n{}\n", plan.describe(), timeline.join("\n")),
    )
    .expect("write plan.txt");
    let mut evidence = String::new();
    for id in missing.iter().take(5) {
        // The task's lines, and those of the outbox entries it was handed
        // over as (a deliverer logs the entry's message id, not the task's).
        let mut needles = vec![id.clone()];
        for (_, log) in &fleet.logs {
            needles.extend(
                log.lines()
                    .filter(|l| l.contains(id.as_str()))
                    .filter_map(|l| l.split("outbox_message_id=").nth(1))
                    .filter_map(|rest| rest.split_whitespace().next())
                    .map(str::to_owned),
            );
        }
        let _ = writeln!(evidence, "--- worker log lines for {needles:?}:");
        for (name, log) in &fleet.logs {
            let lines = log
                .lines()
                .filter(|l| needles.iter().any(|n| l.contains(n.as_str())));
            for line in lines.take(30) {
                let _ = writeln!(evidence, "{name}: {line}");
            }
        }
        for h in hits.iter().filter(|h| h.task_id.as_deref() == Some(id)) {
            let _ = writeln!(evidence, "backend: {}", describe_hit(h));
        }
    }
    panic!(
        "chaos seed {seed} (CHAOS_SEED={seed} replays it) found {} problems:\n- {}\n\n{summary}\n\
         {evidence}\nlogs of every worker and every request: {}",
        problems.len(),
        problems.join("\n- "),
        dir.display()
    );
}

/// `CHAOS_SEED`, or one from the clock.
fn seed() -> u64 {
    match std::env::var("CHAOS_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CHAOS_SEED must be an unsigned integer, got {s:?}")),
        Err(_) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock after 1970");
            u64::from(now.subsec_nanos()) ^ (now.as_secs() % 1_000_000)
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// SplitMix64: small, seedable, the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    /// Uniform in `[lo, hi)` seconds, to a tenth of a second.
    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(((lo + unit * (hi - lo)) * 10.0).round() / 10.0)
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

struct Job {
    id: String,
    seconds: f64,
    /// `Some(n)`: a `large` task whose result holds `n` bytes.
    large: Option<usize>,
    base64: bool,
    /// When it is queued, from the start of the chaos.
    at: Duration,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Kill,
    Term,
    RestartAzurite,
}

/// Everything the seed decides up front (which worker a fault hits is drawn
/// from the seed as it happens).
struct Plan {
    jobs: Vec<Job>,
    /// The backend's mode from each instant on; [`Mode::Ok`] after the last.
    backend: Vec<(Duration, Mode)>,
    faults: Vec<(Duration, Fault)>,
    /// Whether the backend's name resolves from each instant on.
    dns: Vec<(Duration, bool)>,
    /// After this: no more faults, the backend answers 200.
    chaos_end: Duration,
}

impl Plan {
    fn new(rng: &mut Rng) -> Self {
        // Each bad spell once or twice, in random order, with 200s between.
        // The long absence outlasts the in-process attempts (0.2 s when
        // refused, about 4 s when hanging) so that outcomes go to the outbox.
        let long_away = (Mode::Away, 8.0, 12.0);
        let mut spells = vec![
            (Mode::Unavailable, 2.0, 5.0),
            (Mode::Hang, 3.0, 5.0),
            long_away,
            (Mode::Unavailable, 2.0, 5.0),
            (Mode::Hang, 3.0, 5.0),
            (Mode::Away, 2.0, 4.0),
        ];
        rng.shuffle(&mut spells);
        let mut backend = vec![(Duration::ZERO, Mode::Ok)];
        let mut t = rng.secs(2.0, 4.0);
        let mut away = (Duration::ZERO, Duration::ZERO);
        for spell in spells {
            let (mode, lo, hi) = spell;
            let d = rng.secs(lo, hi);
            backend.push((t, mode));
            if spell == long_away {
                away = (t, t + d);
            }
            t += d;
            backend.push((t, Mode::Ok));
            t += rng.secs(1.5, 4.0);
        }
        let chaos_end = t;

        let mut faults = Vec::new();
        let mut at = rng.secs(3.0, 5.0);
        while at + Duration::from_secs(2) < chaos_end {
            faults.push((at, if rng.coin() { Fault::Kill } else { Fault::Term }));
            at += rng.secs(3.0, 6.0);
        }
        // One for sure while the backend is away for long.
        let kind = if rng.coin() { Fault::Kill } else { Fault::Term };
        faults.push((away.0 + (away.1 - away.0) / 2, kind));
        let restart = chaos_end.mul_f64(0.3) + rng.secs(0.0, 0.3 * secs(chaos_end));
        faults.push((restart, Fault::RestartAzurite));
        faults.sort_by_key(|f| f.0);

        let last_wave = secs(chaos_end) * 0.6;
        let mut jobs: Vec<Job> = (0..TASKS)
            .map(|i| Job {
                // Same length for all: no id is a prefix of another.
                id: format!("job-{i:03}"),
                seconds: secs(rng.secs(1.0, 3.0)),
                large: (i % LARGE_EVERY == LARGE_EVERY - 1).then(|| {
                    // Near a queue message's 64 KiB (an outbox entry that
                    // still fits, or just does not), or well above it.
                    if rng.coin() {
                        40_000 + rng.below(24_000)
                    } else {
                        70_000 + rng.below(900_000)
                    }
                }),
                base64: rng.coin(),
                at: if i < FIRST_WAVE {
                    Duration::ZERO
                } else {
                    rng.secs(1.0, last_wave)
                },
            })
            .collect();
        jobs.sort_by_key(|j| j.at);
        // The name stops resolving once or twice, 3 to 6 s each.
        let mut dns = Vec::new();
        let mut at = rng.secs(2.0, 0.4 * secs(chaos_end));
        for _ in 0..1 + usize::from(rng.coin()) {
            let back = at + rng.secs(3.0, 6.0);
            if back + Duration::from_secs(1) >= chaos_end {
                break;
            }
            dns.push((at, false));
            dns.push((back, true));
            at = back + rng.secs(3.0, 8.0);
        }
        Self {
            jobs,
            backend,
            faults,
            dns,
            chaos_end,
        }
    }

    fn describe(&self) -> String {
        let total: f64 = self.jobs.iter().map(|j| j.seconds).sum();
        let b64 = self.jobs.iter().filter(|j| j.base64).count();
        let large = self.jobs.iter().filter_map(|j| j.large);
        let (large_min, large_max) = (large.clone().min().unwrap_or(0), large.max().unwrap_or(0));
        let backend: Vec<String> = self
            .backend
            .iter()
            .map(|(t, m)| format!("{:.1}s {m:?}", secs(*t)))
            .collect();
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(t, f)| format!("{:.1}s {f:?}", secs(*t)))
            .collect();
        let dns: Vec<String> = self
            .dns
            .iter()
            .map(|(t, ok)| {
                format!(
                    "{:.1}s {}",
                    secs(*t),
                    if *ok { "resolves" } else { "unresolvable" }
                )
            })
            .collect();
        format!(
            "plan: {TASKS} tasks ({FIRST_WAVE} before the workers start; every {LARGE_EVERY}th an exec \
             task with a result of {large_min}..{large_max} bytes), {total:.0} task-seconds, {b64} base64-encoded; {HOLE_TASKS} echo tasks of a second client to a black hole; \
             {LIVE} workers x {CONCURRENCY}; chaos {:.1}s\n  backend: {}\n  faults: {}\n  {BACKEND_NAME}: {}",
            secs(self.chaos_end),
            backend.join(", "),
            faults.join(", "),
            dns.join(", ")
        )
    }
}

struct Member {
    name: String,
    run: Running,
}

/// The workers: [`LIVE`] running, plus those finishing after SIGTERM.
struct Fleet<'a> {
    client: &'a Client,
    /// Settings every worker gets besides the client's own.
    env: Vec<(String, String)>,
    rng: Rng,
    live: Vec<Member>,
    stopping: Vec<(Member, Instant)>,
    /// (name, stderr) of every worker that is gone.
    logs: Vec<(String, String)>,
    spawned: usize,
    kills: usize,
    terms: usize,
    problems: Vec<String>,
}

impl<'a> Fleet<'a> {
    fn new(client: &'a Client, env: Vec<(String, String)>, rng: Rng) -> Self {
        Self {
            client,
            env,
            rng,
            live: Vec::new(),
            stopping: Vec::new(),
            logs: Vec::new(),
            spawned: 0,
            kills: 0,
            terms: 0,
            problems: Vec::new(),
        }
    }

    fn spawn(&mut self) {
        self.spawned += 1;
        let grace = GRACES[self.rng.below(GRACES.len())];
        let mut worker = self.client.worker();
        for (k, v) in &self.env {
            worker = worker.env(k, v);
        }
        let run = worker
            .arg("poll")
            .env("WORKER_CONCURRENCY", CONCURRENCY)
            .env("WORKER_VISIBILITY_TIMEOUT", VISIBILITY_TIMEOUT)
            .env("WORKER_WEBHOOK_MAX_ATTEMPTS", WEBHOOK_MAX_ATTEMPTS)
            .env("WORKER_WEBHOOK_INITIAL_BACKOFF", WEBHOOK_INITIAL_BACKOFF)
            .env("WORKER_WEBHOOK_TIMEOUT", WEBHOOK_TIMEOUT)
            .env("WORKER_WEBHOOK_OUTBOX_SCHEDULE", OUTBOX_SCHEDULE)
            .env("WORKER_MAX_DEQUEUE_COUNT", MAX_DEQUEUE_COUNT)
            .env("WORKER_RETRY_DELAY", "1")
            .env("WORKER_MAX_POLL_INTERVAL", "0.5")
            .env("WORKER_SHUTDOWN_GRACE", grace)
            .spawn();
        let name = format!("w{:02}-pid{}-grace{grace}", self.spawned, run.pid());
        self.live.push(Member { name, run });
    }

    /// Kills or stops a random running worker and starts its replacement;
    /// returns the victim's name.
    fn stop_one(&mut self, sig: Signal) -> String {
        let m = self.live.remove(self.rng.below(self.live.len()));
        let name = m.name.clone();
        if sig == Signal::SIGKILL {
            self.kills += 1;
            let out = m.run.kill();
            self.logs.push((m.name, out.stderr));
        } else {
            self.terms += 1;
            m.run.signal(sig);
            self.stopping.push((m, Instant::now()));
        }
        self.spawn();
        name
    }

    /// Collects workers that exited after SIGTERM, and notes any that hang
    /// on to life, fail, or exit unasked (replacing those).
    fn reap(&mut self) {
        let mut i = 0;
        while i < self.stopping.len() {
            let (m, since) = &mut self.stopping[i];
            let running = m.run.is_running();
            if running && since.elapsed() <= STOP_BOUND {
                i += 1;
                continue;
            }
            let (m, _) = self.stopping.remove(i);
            let out = if running {
                self.problems.push(format!(
                    "{} still running {STOP_BOUND:?} after SIGTERM; killed",
                    m.name
                ));
                m.run.kill()
            } else {
                let out = m.run.finish_within(Duration::from_secs(5));
                if out.code != Some(0) {
                    self.problems.push(format!(
                        "{} exited with {:?} after SIGTERM",
                        m.name, out.code
                    ));
                }
                out
            };
            self.logs.push((m.name, out.stderr));
        }
        let mut i = 0;
        while i < self.live.len() {
            if self.live[i].run.is_running() {
                i += 1;
                continue;
            }
            let m = self.live.remove(i);
            let out = m.run.finish_within(Duration::from_secs(5));
            let tail: Vec<&str> = out.stderr.lines().rev().take(30).collect();
            self.problems.push(format!(
                "{} exited unasked with {:?}; last lines:\n{}",
                m.name,
                out.code,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
            self.logs.push((m.name, out.stderr));
            self.spawn();
        }
    }

    /// SIGTERM to every worker; waits until all are gone.
    fn stop_all(&mut self) {
        for m in std::mem::take(&mut self.live) {
            m.run.signal(Signal::SIGTERM);
            self.stopping.push((m, Instant::now()));
        }
        while !self.stopping.is_empty() {
            self.reap();
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What the backend saw, against the plan.
struct Check {
    problems: Vec<String>,
    missing: Vec<String>,
    /// Tasks with an accepted `task.succeeded`.
    delivered: usize,
    /// Accepted `task.succeeded` requests beyond the first per task.
    duplicates: usize,
    repeated_tasks: usize,
    max_per_task: usize,
}

impl Check {
    /// What `hits` say about the tasks `known`.
    fn new<'h>(known: &BTreeSet<&'h str>, hits: &'h [Hit]) -> Self {
        let mut problems = Vec::new();
        let mut ids: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let mut accepted: BTreeMap<&str, usize> = BTreeMap::new();
        let mut owners: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        let mut odd = Vec::new();
        for h in hits {
            let (Some(task), Some(kind)) = (h.task_id.as_deref(), h.event_type.as_deref()) else {
                odd.push(describe_hit(h));
                continue;
            };
            if !known.contains(task) || kind != "task.succeeded" {
                odd.push(describe_hit(h));
            }
            let id = h.webhook_id.as_deref().unwrap_or("<no webhook-id>");
            ids.entry(task).or_default().insert(id);
            owners.entry(id).or_default().insert(task);
            if h.accepted() && kind == "task.succeeded" {
                *accepted.entry(task).or_default() += 1;
            }
        }
        if !odd.is_empty() {
            problems.push(format!(
                "{} requests that are not a task.succeeded of a queued task, e.g.:\n{}",
                odd.len(),
                odd.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
            ));
        }
        let split: Vec<String> = ids
            .iter()
            .filter(|(_, set)| set.len() > 1)
            .map(|(task, set)| format!("{task}: {set:?}"))
            .collect();
        if !split.is_empty() {
            problems.push(format!(
                "{} tasks were sent under more than one webhook-id:\n{}",
                split.len(),
                split.join("\n")
            ));
        }
        let shared: Vec<String> = owners
            .iter()
            .filter(|(_, set)| set.len() > 1)
            .map(|(id, set)| format!("{id}: {set:?}"))
            .collect();
        if !shared.is_empty() {
            problems.push(format!(
                "webhook-ids shared by several tasks:\n{}",
                shared.join("\n")
            ));
        }
        let missing = known
            .iter()
            .filter(|t| !accepted.contains_key(*t))
            .map(|t| (*t).to_owned())
            .collect();
        Self {
            problems,
            missing,
            delivered: accepted.len(),
            duplicates: accepted.values().map(|n| n - 1).sum(),
            repeated_tasks: accepted.values().filter(|n| **n > 1).count(),
            max_per_task: accepted.values().copied().max().unwrap_or(0),
        }
    }
}

/// Accepted `task.succeeded` bodies of `large` tasks whose result is not
/// whole (every copy must carry all the bytes).
fn large_results_cut(jobs: &[Job], hits: &[Hit]) -> Vec<String> {
    let sizes: BTreeMap<&str, usize> = jobs
        .iter()
        .filter_map(|j| Some((j.id.as_str(), j.large?)))
        .collect();
    hits.iter()
        .filter(|h| h.accepted() && h.event_type.as_deref() == Some("task.succeeded"))
        .filter_map(|h| {
            let want = *sizes.get(h.task_id.as_deref()?)?;
            let body: serde_json::Value = serde_json::from_slice(&h.body).ok()?;
            let got = body["data"]["result"]["blob"].as_str().map_or(0, str::len);
            (got != want).then(|| {
                format!(
                    "{}: a delivered result holds {got} of {want} bytes",
                    h.task_id.as_deref().unwrap_or("?")
                )
            })
        })
        .collect()
}

/// Maps the backend's name to 127.0.0.1 in the workers' hosts file, or not.
fn set_resolvable(hosts: &std::path::Path, resolvable: bool) {
    let text = if resolvable {
        format!("127.0.0.1 {BACKEND_NAME}\n")
    } else {
        format!("# {BACKEND_NAME} is away\n")
    };
    // Write and rename, so a worker never reads half a file.
    let tmp = hosts.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write the hosts file");
    std::fs::rename(&tmp, hosts).expect("replace the hosts file");
}

/// How often the workers logged the lines that show which paths the chaos
/// took (runs, outbox hand-overs and deliveries, cancellations, lost leases).
fn paths_taken(logs: &[(String, String)]) -> String {
    let counts: Vec<String> = [
        "task started",
        "webhook delivered",
        "webhook handed to the outbox",
        "webhook delivered from the outbox",
        "stored as a blob",
        "outbox entry not delivered; rescheduled",
        "the outbox cannot be written",
        "did not resolve",
        "deferred",
        "grace period over",
        "lease lost",
        "could not",
        "receive failed; retrying",
    ]
    .iter()
    .map(|needle| {
        let n: usize = logs
            .iter()
            .map(|(_, log)| log.lines().filter(|l| l.contains(needle)).count())
            .sum();
        format!("{n} \"{needle}\"")
    })
    .collect();
    format!("worker log lines: {}", counts.join(", "))
}

fn describe_hit(h: &Hit) -> String {
    format!(
        "{:7.2}s {:?} webhook-id={} type={} task={} body={}",
        secs(h.at),
        h.answer,
        h.webhook_id.as_deref().unwrap_or("-"),
        h.event_type.as_deref().unwrap_or("-"),
        h.task_id.as_deref().unwrap_or("-"),
        String::from_utf8_lossy(&h.body)
    )
}

fn backend_log(hits: &[Hit]) -> String {
    hits.iter().map(|h| describe_hit(h) + "\n").collect()
}

/// One queue call from the test, bounded by [`CALL_BOUND`].
fn call<T>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = Result<T, QueueError>>,
) -> Result<T, QueueError> {
    rt.block_on(async { tokio::time::timeout(CALL_BOUND, fut).await })
        .unwrap_or_else(|_| {
            Err(QueueError::Transient {
                detail: format!("no answer within {CALL_BOUND:?}"),
            })
        })
}

/// Sends a task, retrying while storage is unreachable.
fn send(rt: &tokio::runtime::Runtime, q: &Queue, text: &str, seed: u64) {
    let deadline = Instant::now() + QUEUE_BOUND;
    loop {
        match call(rt, q.send(text, None, None)) {
            Ok(_) => return,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("chaos seed {seed}: cannot queue a task for {QUEUE_BOUND:?}: {e}"),
        }
    }
}

/// Messages in `q`, visible or not; a queue never created holds none.
fn count(rt: &tokio::runtime::Runtime, q: &Queue) -> Result<u64, String> {
    match call(rt, q.approximate_count()) {
        Ok(n) => Ok(n),
        Err(QueueError::QueueNotFound { .. }) => Ok(0),
        Err(e) => Err(e.to_string()),
    }
}

/// [`count`], retrying while storage is unreachable.
fn count_settled(rt: &tokio::runtime::Runtime, q: &Queue, seed: u64) -> u64 {
    let deadline = Instant::now() + QUEUE_BOUND;
    loop {
        match count(rt, q) {
            Ok(n) => return n,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!(
                "chaos seed {seed}: cannot count `{}` for {QUEUE_BOUND:?}: {e}",
                q.name()
            ),
        }
    }
}
