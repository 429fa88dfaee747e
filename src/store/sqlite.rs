//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`,
//! so a committed escalation survives a crash or a power cut.
//!
//! SQLite has one writer at a time; so does this store. One task owns the
//! write connection and the audit chain's head (so appending to the chain
//! never reads it back). It runs on a thread and runtime of its own: each
//! of a group's statements is a round trip to SQLite's connection thread,
//! and on the service's runtime the writer waited its turn behind every
//! stream's task at each of them (with 1,000 calls, the writer was busy
//! 100% of the time at 20,000 utterances a second, groups took 14 ms, and
//! directives waited up to 0.7 s). It commits in groups: whatever writes are waiting
//! when it is free go into one transaction, each inside its own savepoint,
//! so one fsync covers them all and one failing write undoes only itself.
//! No write is answered before its group is durable. Reads use a small pool
//! of their own and never wait for a write.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};
use std::sync::Arc;

use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use super::{
    APPOINTMENT_DEDUP_MS, AppointmentAnswer, AppointmentRecord, CALLS_PER_PATIENT, CallContact,
    Dedup, Delivery, Escalated, EscalationQuery, EscalationWrite, MessageVerdict, Page, PageTarget,
    QueuedDirective, Recorded, RepagePolicy, Store, StoreError, retarget,
};
use crate::audit::{AuditEvent, AuditRow, GENESIS};
use crate::domain::{Disposition, EscalationState, Severity, Tier};
use crate::escalation::{Directive, Escalation, Handling, Open, Origin, now_ms};
use crate::ids::{
    AppointmentEventId, AppointmentId, EscalationId, MessageId, PatientId, PracticeId,
};
use crate::tier3;

const SCHEMA_VERSION: i64 = 6;

/// Each step takes the schema from its index to the next version. The
/// PostgreSQL store has the same versions with the same meaning.
const MIGRATIONS: &[&str] = &[SCHEMA, SCHEMA_2, SCHEMA_3, SCHEMA_4, SCHEMA_5, SCHEMA_6];

/// Version 6 is PostgreSQL's page claims and per-patient lock rows. A
/// SQLite file has one serving process and one writer, which need neither:
/// claims live in that process's memory (see `SqliteStore::claims`) and
/// the writer serializes every patient's escalations. The step keeps the
/// two backends' version numbers in step.
const SCHEMA_6: &str = "SELECT 1;";

/// Version 5: Tier 3. Escalations may arise from an appointment (channel
/// `schedule`), which the channel's CHECK refused: SQLite cannot alter a
/// CHECK, so the table is rebuilt (with foreign keys off, checked after).
/// Then the patient's appointment events, the answers to event ids, the
/// firings kept for cooldowns, the calls Tier 3 reads, and the directives
/// waiting for a practice's gateway.
const SCHEMA_5: &str = r#"
CREATE TABLE escalations_v5 (
    id                 TEXT PRIMARY KEY,
    practice_id        TEXT NOT NULL,
    patient_id         TEXT NOT NULL,
    conversation_id    TEXT NOT NULL,
    channel            TEXT NOT NULL CHECK (channel IN ('voice', 'sms', 'schedule')),
    tier               INTEGER NOT NULL,
    rule_id            TEXT NOT NULL,
    reason_code        TEXT NOT NULL,
    severity           INTEGER NOT NULL,
    state              TEXT NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
    utterance_id       TEXT NOT NULL,
    created_at_ms      INTEGER NOT NULL,
    updated_at_ms      INTEGER NOT NULL,
    acknowledged_by    TEXT,
    acknowledged_at_ms INTEGER,
    resolved_by        TEXT,
    resolved_at_ms     INTEGER,
    disposition        TEXT,
    page_rounds        INTEGER NOT NULL DEFAULT 1,
    next_repage_at_ms  INTEGER
);
INSERT INTO escalations_v5 (id, practice_id, patient_id, conversation_id, channel, tier, rule_id,
    reason_code, severity, state, utterance_id, created_at_ms, updated_at_ms, acknowledged_by,
    acknowledged_at_ms, resolved_by, resolved_at_ms, disposition, page_rounds, next_repage_at_ms)
SELECT id, practice_id, patient_id, conversation_id, channel, tier, rule_id,
    reason_code, severity, state, utterance_id, created_at_ms, updated_at_ms, acknowledged_by,
    acknowledged_at_ms, resolved_by, resolved_at_ms, disposition, page_rounds, next_repage_at_ms
FROM escalations;
DROP TABLE escalations;
ALTER TABLE escalations_v5 RENAME TO escalations;
CREATE INDEX escalations_by_practice ON escalations (practice_id, created_at_ms DESC, id DESC);
CREATE INDEX escalations_by_time ON escalations (created_at_ms DESC, id DESC);
CREATE INDEX escalations_open ON escalations (state) WHERE state = 'open';
CREATE INDEX escalations_by_patient ON escalations (practice_id, patient_id, created_at_ms DESC);

CREATE TABLE appointment_events (
    practice_id      TEXT NOT NULL,
    patient_id       TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    appointment_id   TEXT NOT NULL,
    kind             TEXT NOT NULL CHECK (kind IN ('booked', 'cancelled', 'rescheduled', 'no_show', 'attended')),
    initiator        TEXT CHECK (initiator IN ('patient', 'practice')),
    occurred_at_ms   INTEGER NOT NULL,
    scheduled_for_ms INTEGER NOT NULL,
    PRIMARY KEY (practice_id, event_id)
);
CREATE INDEX appointment_events_by_patient ON appointment_events (practice_id, patient_id, occurred_at_ms);

CREATE TABLE appointment_answers (
    practice_id    TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    answer         TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL,
    PRIMARY KEY (practice_id, event_id)
);
CREATE INDEX appointment_answers_by_age ON appointment_answers (received_at_ms);

CREATE TABLE behavior_firings (
    practice_id    TEXT NOT NULL,
    patient_id     TEXT NOT NULL,
    rule_id        TEXT NOT NULL,
    anchor_event   TEXT NOT NULL,
    anchor_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (practice_id, patient_id, rule_id, anchor_event)
);

CREATE TABLE calls (
    practice_id   TEXT NOT NULL,
    call_id       TEXT NOT NULL,
    patient_id    TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    language      TEXT NOT NULL,
    review        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (practice_id, call_id)
);
CREATE INDEX calls_by_patient ON calls (practice_id, patient_id, started_at_ms DESC);

CREATE TABLE directive_outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    directive_id    TEXT NOT NULL UNIQUE,
    practice_id     TEXT NOT NULL,
    patient_id      TEXT NOT NULL,
    escalation_id   TEXT NOT NULL REFERENCES escalations (id),
    directive       TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    acknowledged_at_ms INTEGER,
    acknowledged_by TEXT
);
CREATE INDEX directive_outbox_pending ON directive_outbox (practice_id, seq) WHERE acknowledged_at_ms IS NULL;
"#;

/// Version 4: a patient's open escalation is looked up before every new
/// one (one page per patient); without this it scanned the practice.
const SCHEMA_4: &str = r#"
CREATE INDEX escalations_by_patient ON escalations (practice_id, patient_id, created_at_ms DESC);
"#;

/// Version 3: acknowledgement, resolution, re-paging rounds, backup pages.
const SCHEMA_3: &str = r#"
ALTER TABLE escalations ADD COLUMN acknowledged_by TEXT;
ALTER TABLE escalations ADD COLUMN acknowledged_at_ms INTEGER;
ALTER TABLE escalations ADD COLUMN resolved_by TEXT;
ALTER TABLE escalations ADD COLUMN resolved_at_ms INTEGER;
ALTER TABLE escalations ADD COLUMN disposition TEXT;
ALTER TABLE escalations ADD COLUMN page_rounds INTEGER NOT NULL DEFAULT 1;
ALTER TABLE escalations ADD COLUMN next_repage_at_ms INTEGER;
CREATE INDEX escalations_open ON escalations (state) WHERE state = 'open';
ALTER TABLE outbox ADD COLUMN target TEXT NOT NULL DEFAULT 'primary' CHECK (target IN ('primary', 'backup'));
ALTER TABLE outbox ADD COLUMN backup_queued INTEGER NOT NULL DEFAULT 0;
"#;

/// Version 2: who a page went to and the provider's message id.
const SCHEMA_2: &str = r#"
ALTER TABLE outbox ADD COLUMN clinician_id TEXT;
ALTER TABLE outbox ADD COLUMN provider_message_id TEXT;
"#;

const SCHEMA: &str = r#"
CREATE TABLE escalations (
    id              TEXT PRIMARY KEY,
    practice_id     TEXT NOT NULL,
    patient_id      TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    channel         TEXT NOT NULL CHECK (channel IN ('voice', 'sms')),
    tier            INTEGER NOT NULL,
    rule_id         TEXT NOT NULL,
    reason_code     TEXT NOT NULL,
    severity        INTEGER NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
    utterance_id    TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    updated_at_ms   INTEGER NOT NULL
);
CREATE INDEX escalations_by_practice ON escalations (practice_id, created_at_ms DESC, id DESC);
CREATE INDEX escalations_by_time ON escalations (created_at_ms DESC, id DESC);

CREATE TABLE outbox (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    escalation_id      TEXT NOT NULL REFERENCES escalations (id),
    severity           INTEGER NOT NULL,
    practice_id        TEXT NOT NULL,
    created_at_ms      INTEGER NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms INTEGER NOT NULL,
    delivered_at_ms    INTEGER
);
CREATE INDEX outbox_due ON outbox (next_attempt_at_ms) WHERE delivered_at_ms IS NULL;

CREATE TABLE messages (
    message_id    TEXT PRIMARY KEY,
    escalation_id TEXT,
    directive     TEXT,
    created_at_ms INTEGER NOT NULL
);

CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY,
    at_ms      INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    request_id TEXT NOT NULL,
    action     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    detail     TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;

-- The chain's head, kept beside it so that rows cut from the end show.
CREATE TABLE audit_head (
    one  INTEGER PRIMARY KEY CHECK (one = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (one, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
BEGIN SELECT RAISE(ABORT, 'the audit head cannot be removed'); END;
"#;

/// The chain's head: the last row's sequence number and hash, and the
/// rows chained in the group being written but not yet inserted. They are
/// inserted together just before the group commits: one statement for a
/// group's audit rows instead of one round trip to SQLite each.
#[derive(Clone)]
struct Head {
    seq: i64,
    hash: String,
    pending: Vec<AuditRow>,
}

/// Where the head was before a job, to undo the job's rows.
struct Mark {
    seq: i64,
    hash: String,
    rows: usize,
}

impl Head {
    /// Chains `events` after the head. An attach to the patient's open
    /// escalation has none: nothing to record.
    fn append(&mut self, events: &[AuditEvent]) {
        for e in events {
            self.seq += 1;
            let row = AuditRow::chain(&self.hash, self.seq, now_ms(), e);
            self.hash.clone_from(&row.hash);
            self.pending.push(row);
        }
    }

    fn mark(&self) -> Mark {
        Mark {
            seq: self.seq,
            hash: self.hash.clone(),
            rows: self.pending.len(),
        }
    }

    fn reset(&mut self, mark: Mark) {
        self.seq = mark.seq;
        self.hash = mark.hash;
        self.pending.truncate(mark.rows);
    }
}

/// Audit rows per INSERT: 9 bound values each, well under SQLite's limit.
const AUDIT_ROWS_PER_INSERT: usize = 64;

/// Writes waiting for the writer. A full queue makes callers wait:
/// back-pressure, never a dropped write.
const WRITE_QUEUE: usize = 1024;
/// Most writes committed together.
const GROUP: usize = 128;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Job {
    Escalate {
        write: EscalationWrite,
        audit: AuditEvent,
        reply: Reply<Escalated>,
    },
    Message {
        message: String,
        verdict: MessageVerdict,
        write: Option<EscalationWrite>,
        audit: Vec<AuditEvent>,
        reply: Reply<(Recorded, Option<Escalated>)>,
    },

    Audit {
        event: AuditEvent,
        reply: Reply<()>,
    },
    PageDelivered {
        delivery: Delivery,
        audit: AuditEvent,
        reply: Reply<()>,
    },
    PageFailed {
        page: i64,
        retry_at_ms: i64,
        reply: Reply<()>,
    },
    /// Acknowledge (disposition None) or resolve.
    Handle {
        id: String,
        responder: String,
        disposition: Option<Disposition>,
        audit: AuditEvent,
        reply: Reply<u64>,
    },
    Repage {
        now_ms: i64,
        policy: RepagePolicy,
        reply: Reply<u64>,
    },
    PageBackup {
        page: i64,
        escalation_id: String,
        severity: i64,
        practice: String,
        audit: AuditEvent,
        reply: Reply<()>,
    },
    Appointment {
        record: Box<AppointmentRecord>,
        reply: Reply<(Recorded, AppointmentAnswer)>,
    },
    Call {
        call: CallContact,
        reply: Reply<()>,
    },
    AckDirective {
        id: String,
        by: String,
        audit: AuditEvent,
        reply: Reply<u64>,
    },
    Probe {
        reply: Reply<()>,
    },
}

/// Where a job's answer goes.
enum JobReply {
    Unit(Reply<()>),
    Value(Reply<u64>),
    Escalated(Reply<Escalated>),
    Message(Reply<(Recorded, Option<Escalated>)>),
    Appointment(Reply<(Recorded, AppointmentAnswer)>),
}

/// What a job produced.
enum Out {
    Unit,
    Value(u64),
    Escalated(Escalated),
    Message(Recorded, Option<Escalated>),
    Appointment(Recorded, AppointmentAnswer),
}

/// A job's outcome, sent once its group has committed.
struct Done(JobReply, Result<Out, StoreError>);

impl Done {
    fn fail(self, op: &'static str, message: &str) {
        Done(self.0, Err(corrupt(op, message.to_string()))).send();
    }

    fn send(self) {
        let mismatch = || corrupt("write", "internal: a job's answer of the wrong kind");
        // A receiver gone (the caller gave up) is not an error here.
        match (self.0, self.1) {
            (JobReply::Unit(r), v) => {
                let _ = r.send(v.map(|_| ()));
            }
            (JobReply::Value(r), v) => {
                let _ = r.send(v.and_then(|o| match o {
                    Out::Value(n) => Ok(n),
                    _ => Err(mismatch()),
                }));
            }
            (JobReply::Escalated(r), v) => {
                let _ = r.send(v.and_then(|o| match o {
                    Out::Escalated(e) => Ok(e),
                    _ => Err(mismatch()),
                }));
            }
            (JobReply::Message(r), v) => {
                let _ = r.send(v.and_then(|o| match o {
                    Out::Message(rec, e) => Ok((rec, e)),
                    _ => Err(mismatch()),
                }));
            }
            (JobReply::Appointment(r), v) => {
                let _ = r.send(v.and_then(|o| match o {
                    Out::Appointment(rec, a) => Ok((rec, a)),
                    _ => Err(mismatch()),
                }));
            }
        }
    }
}

pub struct SqliteStore {
    pages: Arc<Notify>,
    directives: Arc<tokio::sync::watch::Sender<u64>>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// Answers when the writer's thread has committed what was queued and
    /// closed its connection.
    writer: Mutex<Option<oneshot::Receiver<()>>>,
    checkpoints: Mutex<
        Option<(
            tokio::sync::watch::Sender<bool>,
            tokio::task::JoinHandle<()>,
        )>,
    >,
    reader: SqlitePool,
    /// The database's folder, whose free space the probe checks.
    dir: std::path::PathBuf,
    /// Pages this process's pager holds: page id → claimed until (ms).
    /// One process serves a SQLite file, so a claim need not outlive it
    /// (after a crash every undelivered page is due at once) and need not
    /// cost the writer a commit. A delivered page keeps its entry until it
    /// expires, so that a read begun before the delivery committed cannot
    /// hand the page out again.
    claims: std::sync::Mutex<std::collections::HashMap<i64, i64>>,
}

/// Below this much free space on the database's disk the store reports
/// itself unable to take escalations: a write that only updates pages in
/// place still succeeds on a full disk, one that adds a row may not.
pub const MIN_FREE_BYTES: u64 = 1024 * 1024;

/// How often the WAL is copied into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Passive checkpoints: they never wait for, or block, the writer. A last
/// full one at close leaves the database file complete.
async fn checkpoint_loop(pool: SqlitePool, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
            _ = stop.changed() => {}
        }
        let last = *stop.borrow();
        let mode = if last {
            "PRAGMA wal_checkpoint(TRUNCATE)"
        } else {
            "PRAGMA wal_checkpoint(PASSIVE)"
        };
        if let Err(e) = sqlx::raw_sql(mode).execute(&pool).await {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
        if last {
            pool.close().await;
            return;
        }
    }
}

fn db(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Db { op, source }
}

fn corrupt(op: &'static str, message: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        op,
        message: message.into(),
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| open_err(e.to_string()))?;
        }
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(|e| open_err(e.to_string()))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let pages = Arc::new(Notify::new());
        let directives = Arc::new(tokio::sync::watch::Sender::new(0));
        let (opened, ready) = oneshot::channel();
        let (finished, done) = oneshot::channel();
        let writer_options = options.clone().pragma("wal_autocheckpoint", "0");
        let (signal, directed) = (pages.clone(), directives.clone());
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("crisisd-store-writer".to_string())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = opened.send(Err(StoreError::Open {
                            path: shown,
                            message: format!("the writer's runtime: {e}"),
                        }));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match open_writer(writer_options, shown).await {
                        Ok((pool, head)) => {
                            let _ = opened.send(Ok(()));
                            write_loop(pool, head, rx, signal, directed).await;
                        }
                        Err(e) => {
                            let _ = opened.send(Err(e));
                        }
                    }
                });
                let _ = finished.send(());
            })
            .map_err(|e| open_err(format!("starting the writer's thread: {e}")))?;
        ready
            .await
            .map_err(|_| open_err("the writer's thread stopped".to_string()))??;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone().read_only(true))
            .await
            .map_err(|e| open_err(e.to_string()))?;
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await
            .map_err(|e| open_err(e.to_string()))?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let checkpoints = tokio::spawn(checkpoint_loop(checkpointer, stopped));
        Ok(SqliteStore {
            dir: path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            pages,
            directives,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(done)),
            checkpoints: Mutex::new(Some((stop, checkpoints))),
            reader,
            claims: Default::default(),
        })
    }

    async fn submit<T>(&self, make: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        let tx = self.jobs.lock().await.clone();
        let closed = || corrupt("write", "the store is closed");
        tx.ok_or_else(closed)?
            .send(make(reply))
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

/// The write connection, migrated, and the audit chain's head.
async fn open_writer(
    options: SqliteConnectOptions,
    path: String,
) -> Result<(SqlitePool, Head), StoreError> {
    // The writer never checkpoints (`wal_autocheckpoint` is 0): copying the
    // WAL into the database (and its fsync) would stall whichever commit
    // crossed the threshold, an escalation among them. A connection of its
    // own does it in the background.
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .connect_with(options)
        .await
        .map_err(|e| StoreError::Open {
            path,
            message: e.to_string(),
        })?;
    migrate(&pool).await?;
    let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE one = 1")
        .fetch_one(&pool)
        .await
        .map_err(db("reading the audit head"))?;
    let head = Head {
        seq: row.try_get("seq").map_err(db("reading the audit head"))?,
        hash: row.try_get("hash").map_err(db("reading the audit head"))?,
        pending: Vec::new(),
    };
    Ok((pool, head))
}

/// The writer: takes what is queued, commits it as one group, answers.
async fn write_loop(
    pool: SqlitePool,
    mut head: Head,
    mut rx: mpsc::Receiver<Job>,
    pages: Arc<Notify>,
    directives: Arc<tokio::sync::watch::Sender<u64>>,
) {
    let mut batch = Vec::with_capacity(GROUP);
    let mut rest = Vec::with_capacity(GROUP);
    while rx.recv_many(&mut batch, GROUP).await > 0 {
        // What a patient's referral or a text's verdict waits for commits
        // first, in a group of its own: under load a group also holds calls'
        // audit rows, Tier 3 records and page deliveries, and each of their
        // statements is a round trip the escalation would wait out.
        if batch.iter().any(Job::urgent) {
            rest.extend(batch.extract_if(.., |j| !j.urgent()));
        }
        commit_batch(&pool, &mut head, &mut batch, &pages, &directives).await;
        if !rest.is_empty() {
            commit_batch(&pool, &mut head, &mut rest, &pages, &directives).await;
        }
    }
    pool.close().await;
}

/// Commits `batch` (leaving it empty) as one group and answers each write.
async fn commit_batch(
    pool: &SqlitePool,
    head: &mut Head,
    batch: &mut Vec<Job>,
    pages: &Notify,
    directives: &tokio::sync::watch::Sender<u64>,
) {
    let paged = batch.iter().any(|j| match j {
        Job::Escalate { .. } | Job::Message { write: Some(_), .. } => true,
        Job::Appointment { record, .. } => record.write.is_some(),
        _ => false,
    });
    let directed = batch
        .iter()
        .any(|j| matches!(j, Job::Appointment { record, .. } if record.directive.is_some()));
    let mut done = Vec::with_capacity(batch.len());
    metrics::histogram!("crisisd_store_group_writes").record(batch.len() as f64);
    let started = std::time::Instant::now();
    let result = commit_group(pool, head, batch.drain(..), &mut done).await;
    // From BEGIN to a durable COMMIT: what every write in the group waited
    // for, the fsync included.
    metrics::histogram!("crisisd_store_commit_seconds").record(started.elapsed().as_secs_f64());
    match result {
        Ok(new_head) => {
            *head = new_head;
            for d in done {
                d.send();
            }
            if paged {
                pages.notify_one();
            }
            if directed {
                directives.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, writes = done.len(), "committing a group of writes failed");
            let message = e.to_string();
            for d in done {
                d.fail("commit", &message);
            }
            // After a failed COMMIT (a full disk), SQLite may have rolled the
            // transaction back while sqlx still counts it open: the next
            // group would then run in a savepoint of a transaction nobody
            // commits, answered as written and lost. A new connection starts
            // with no transaction at all.
            if let Ok(conn) = pool.acquire().await {
                let _ = conn.close().await;
            }
        }
    }
}

async fn commit_group(
    pool: &SqlitePool,
    head: &mut Head,
    jobs: impl Iterator<Item = Job>,
    done: &mut Vec<Done>,
) -> Result<Head, StoreError> {
    // IMMEDIATE: the write lock from the start. A group may now begin with
    // a read (the patient's open escalation); under a deferred BEGIN that
    // read's snapshot then had to be upgraded to a write, and the bench's
    // p99 went from 4 ms to 17-28 ms.
    let mut tx = match pool.begin_with("BEGIN IMMEDIATE").await {
        Ok(tx) => tx,
        Err(e) => {
            // Answer every job of the group; nothing was written.
            let message = e.to_string();
            for job in jobs {
                job_reply(job).fail("begin", &message);
            }
            return Err(StoreError::Db {
                op: "begin",
                source: e,
            });
        }
    };
    let mut h = head.clone();
    let mut jobs = jobs;
    while let Some(job) = jobs.next() {
        // A job that can fail on its own runs in a savepoint, so that its
        // failure undoes only itself. The others (an audit row, a call, a
        // page's delivery, the probe) can fail only with the database, and
        // then the whole group goes: they need no savepoint, and skip its
        // two round trips to SQLite.
        let isolated = job.isolated();
        if isolated && let Err(e) = savepoint(&mut tx, "SAVEPOINT job").await {
            done.push(job_reply(job));
            return Err(abandon(done, jobs, e));
        }
        let before = h.mark();
        let (reply, outcome) = run_job(&mut tx, &mut h, job).await;
        let step = match (&outcome, isolated) {
            (Ok(_), true) => savepoint(&mut tx, "RELEASE job").await,
            (Ok(_), false) => Ok(()),
            (Err(_), true) => {
                h.reset(before);
                sqlx::raw_sql("ROLLBACK TO job; RELEASE job")
                    .execute(&mut *tx)
                    .await
                    .map(|_| ())
                    .map_err(db("savepoint"))
            }
            (Err(e), false) => Err(corrupt("write", e.to_string())),
        };
        done.push(Done(reply, outcome));
        if let Err(e) = step {
            return Err(abandon(done, jobs, e));
        }
    }
    insert_audit(&mut tx, &h).await?;
    tx.commit().await.map_err(db("commit"))?;
    h.pending.clear();
    Ok(h)
}

/// Prepared once per connection (sqlx caches it), not parsed per job.
async fn savepoint(tx: &mut Transaction<'_, Sqlite>, sql: &'static str) -> Result<(), StoreError> {
    sqlx::query(sql)
        .execute(&mut **tx)
        .await
        .map(|_| ())
        .map_err(db("savepoint"))
}

/// The group is given up: the jobs not yet run join those done, and all of
/// them are answered with the error (nothing of the group commits).
fn abandon(done: &mut Vec<Done>, rest: impl Iterator<Item = Job>, e: StoreError) -> StoreError {
    done.extend(rest.map(job_reply));
    e
}

impl Job {
    /// Whether someone waits on this write to reach a patient or a
    /// gateway: an escalation (its referral), a text (its verdict), an
    /// appointment event (its acknowledgement, perhaps a referral).
    fn urgent(&self) -> bool {
        matches!(
            self,
            Job::Escalate { .. } | Job::Message { .. } | Job::Appointment { .. }
        )
    }

    /// Whether this job can fail while the database is well (a constraint,
    /// a corrupt row, a decision it refuses): such a job runs in a
    /// savepoint of its own.
    fn isolated(&self) -> bool {
        !matches!(
            self,
            Job::Audit { .. } | Job::Call { .. } | Job::PageDelivered { .. } | Job::Probe { .. }
        )
    }
}

fn job_reply(job: Job) -> Done {
    let reply = match job {
        Job::Audit { reply, .. }
        | Job::PageDelivered { reply, .. }
        | Job::PageFailed { reply, .. }
        | Job::PageBackup { reply, .. }
        | Job::Call { reply, .. }
        | Job::Probe { reply } => JobReply::Unit(reply),
        Job::Escalate { reply, .. } => JobReply::Escalated(reply),
        Job::Message { reply, .. } => JobReply::Message(reply),
        Job::Appointment { reply, .. } => JobReply::Appointment(reply),
        Job::Handle { reply, .. } | Job::Repage { reply, .. } | Job::AckDirective { reply, .. } => {
            JobReply::Value(reply)
        }
    };
    Done(reply, Ok(Out::Unit))
}

/// Runs one job inside the group's transaction.
async fn run_job(
    tx: &mut Transaction<'_, Sqlite>,
    head: &mut Head,
    job: Job,
) -> (JobReply, Result<Out, StoreError>) {
    match job {
        Job::Escalate {
            write,
            audit,
            reply,
        } => {
            let r = async {
                let mut audit = vec![audit];
                let done = write_escalation(tx, &write, &mut audit, None).await?;
                head.append(&audit);
                Ok(Out::Escalated(done))
            }
            .await;
            (JobReply::Escalated(reply), r)
        }
        Job::Audit { event, reply } => {
            let r = async {
                head.append(std::slice::from_ref(&event));
                Ok(Out::Unit)
            }
            .await;
            (JobReply::Unit(reply), r)
        }
        Job::Message {
            message,
            mut verdict,
            write,
            mut audit,
            reply,
        } => {
            let r = async {
                // The only writer: nothing can record this id between this
                // check and the insert below.
                let seen: Option<i64> =
                    sqlx::query_scalar("SELECT 1 FROM messages WHERE message_id = ?")
                        .bind(&message)
                        .fetch_optional(&mut **tx)
                        .await
                        .map_err(db("recording a message"))?;
                if seen.is_some() {
                    // Seen before: the first verdict stands, nothing changes.
                    return Ok(Out::Message(Recorded::Duplicate, None));
                }
                // The escalation before the verdict: a dedup retargets it.
                let done = match &write {
                    Some(write) => {
                        Some(write_escalation(tx, write, &mut audit, Some(&mut verdict)).await?)
                    }
                    None => None,
                };
                let directive = verdict
                    .directive
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(|e| corrupt("recording a message", e.to_string()))?;
                sqlx::query(
                    "INSERT INTO messages (message_id, escalation_id, directive, created_at_ms)
                     VALUES (?, ?, ?, ?)",
                )
                .bind(&message)
                .bind(verdict.escalation_id.map(|e| e.to_string()))
                .bind(directive)
                .bind(now_ms())
                .execute(&mut **tx)
                .await
                .map_err(db("recording a message"))?;
                head.append(&audit);
                Ok(Out::Message(Recorded::New, done))
            }
            .await;
            (JobReply::Message(reply), r)
        }
        Job::PageDelivered {
            delivery,
            audit,
            reply,
        } => {
            let r = async {
                sqlx::query(
                    "UPDATE outbox SET delivered_at_ms = ?, attempts = attempts + 1,
                         clinician_id = ?, provider_message_id = ?
                     WHERE id = ?",
                )
                .bind(delivery.at_ms)
                .bind(&delivery.clinician_id)
                .bind(&delivery.provider_message_id)
                .bind(delivery.page)
                .execute(&mut **tx)
                .await
                .map_err(db("marking a page delivered"))?;
                head.append(std::slice::from_ref(&audit));
                Ok(Out::Unit)
            }
            .await;
            (JobReply::Unit(reply), r)
        }
        Job::PageFailed {
            page,
            retry_at_ms,
            reply,
        } => {
            let r = sqlx::query(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at_ms = ? WHERE id = ?",
            )
            .bind(retry_at_ms)
            .bind(page)
            .execute(&mut **tx)
            .await
            .map(|_| Out::Unit)
            .map_err(db("marking a page failed"));
            (JobReply::Unit(reply), r)
        }
        Job::Handle {
            id,
            responder,
            disposition,
            audit,
            reply,
        } => {
            let r = async {
                let now = now_ms();
                let changed = match disposition {
                    None => sqlx::query(
                        "UPDATE escalations SET state = 'acknowledged', acknowledged_by = ?,
                             acknowledged_at_ms = ?, updated_at_ms = ?
                         WHERE id = ? AND state = 'open'",
                    )
                    .bind(&responder)
                    .bind(now)
                    .bind(now)
                    .bind(&id),
                    Some(d) => sqlx::query(
                        "UPDATE escalations SET state = 'resolved', resolved_by = ?,
                             resolved_at_ms = ?, disposition = ?, updated_at_ms = ?
                         WHERE id = ? AND state <> 'resolved'",
                    )
                    .bind(&responder)
                    .bind(now)
                    .bind(d.as_str())
                    .bind(now)
                    .bind(&id),
                }
                .execute(&mut **tx)
                .await
                .map_err(db("updating an escalation"))?
                .rows_affected();
                let exists: Option<i64> =
                    sqlx::query_scalar("SELECT 1 FROM escalations WHERE id = ?")
                        .bind(&id)
                        .fetch_optional(&mut **tx)
                        .await
                        .map_err(db("reading an escalation"))?;
                if changed > 0 {
                    // Pages not yet sent have nobody left to reach.
                    sqlx::query(
                        "UPDATE outbox SET delivered_at_ms = ?, provider_message_id = 'cancelled'
                         WHERE escalation_id = ? AND delivered_at_ms IS NULL",
                    )
                    .bind(now)
                    .bind(&id)
                    .execute(&mut **tx)
                    .await
                    .map_err(db("cancelling pages"))?;
                    head.append(std::slice::from_ref(&audit));
                }
                Ok(Out::Value(u64::from(exists.is_some())))
            }
            .await;
            (JobReply::Value(reply), r)
        }
        Job::Repage {
            now_ms: now,
            policy,
            reply,
        } => {
            let r = async {
                let due = sqlx::query(
                    "SELECT id, severity, practice_id, page_rounds FROM escalations
                     WHERE state = 'open' AND page_rounds < ?
                       AND COALESCE(next_repage_at_ms, created_at_ms + ?) <= ?",
                )
                .bind(i64::from(policy.max_rounds))
                .bind(policy.ack_timeout_ms)
                .bind(now)
                .fetch_all(&mut **tx)
                .await
                .map_err(db("finding escalations to re-page"))?;
                for row in &due {
                    let id: String = row.try_get("id").map_err(db("re-paging"))?;
                    let severity: i64 = row.try_get("severity").map_err(db("re-paging"))?;
                    let practice: String = row.try_get("practice_id").map_err(db("re-paging"))?;
                    let rounds: i64 = row.try_get("page_rounds").map_err(db("re-paging"))?;
                    for target in ["primary", "backup"] {
                        sqlx::query(
                            "INSERT INTO outbox (escalation_id, severity, practice_id, created_at_ms,
                                 next_attempt_at_ms, target, backup_queued)
                             VALUES (?, ?, ?, ?, ?, ?, 1)",
                        )
                        .bind(&id)
                        .bind(severity)
                        .bind(&practice)
                        .bind(now)
                        .bind(now)
                        .bind(target)
                        .execute(&mut **tx)
                        .await
                        .map_err(db("queueing a re-page"))?;
                    }
                    sqlx::query(
                        "UPDATE escalations SET page_rounds = page_rounds + 1, next_repage_at_ms = ?
                         WHERE id = ?",
                    )
                    .bind(now + policy.ack_timeout_ms)
                    .bind(&id)
                    .execute(&mut **tx)
                    .await
                    .map_err(db("re-paging"))?;
                    let audit = AuditEvent {
                        actor: "crisisd".to_string(),
                        request_id: uuid::Uuid::now_v7().to_string(),
                        action: "escalation.repage".to_string(),
                        subject: format!("escalation:{id}"),
                        detail: serde_json::json!({ "round": rounds + 1, "reason": "not acknowledged" }),
                    };
                    head.append(std::slice::from_ref(&audit));
                }
                Ok(Out::Value(due.len() as u64))
            }
            .await;
            (JobReply::Value(reply), r)
        }
        Job::Appointment { record, reply } => {
            let r = record_appointment(tx, head, *record)
                .await
                .map(|(rec, a)| Out::Appointment(rec, a));
            (JobReply::Appointment(reply), r)
        }
        Job::Call { call, reply } => {
            let r = record_call(tx, &call).await.map(|()| Out::Unit);
            (JobReply::Unit(reply), r)
        }
        Job::Probe { reply } => {
            let r = async {
                // A table of its own, made on first use: the probe needs no
                // schema version and touches nothing else.
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS probe (one INTEGER PRIMARY KEY CHECK (one = 1), at_ms INTEGER NOT NULL)",
                )
                .execute(&mut **tx)
                .await
                .map_err(db("probing"))?;
                sqlx::query(
                    "INSERT INTO probe (one, at_ms) VALUES (1, ?)
                     ON CONFLICT (one) DO UPDATE SET at_ms = excluded.at_ms",
                )
                .bind(now_ms())
                .execute(&mut **tx)
                .await
                .map_err(db("probing"))?;
                Ok(Out::Unit)
            }
            .await;
            (JobReply::Unit(reply), r)
        }
        Job::AckDirective {
            id,
            by,
            audit,
            reply,
        } => {
            let r = async {
                let changed = sqlx::query(
                    "UPDATE directive_outbox SET acknowledged_at_ms = ?, acknowledged_by = ?
                     WHERE directive_id = ? AND acknowledged_at_ms IS NULL",
                )
                .bind(now_ms())
                .bind(&by)
                .bind(&id)
                .execute(&mut **tx)
                .await
                .map_err(db("acknowledging a directive"))?
                .rows_affected();
                let exists: Option<i64> =
                    sqlx::query_scalar("SELECT 1 FROM directive_outbox WHERE directive_id = ?")
                        .bind(&id)
                        .fetch_optional(&mut **tx)
                        .await
                        .map_err(db("acknowledging a directive"))?;
                if changed > 0 {
                    head.append(std::slice::from_ref(&audit));
                }
                Ok(Out::Value(u64::from(exists.is_some())))
            }
            .await;
            (JobReply::Value(reply), r)
        }
        Job::PageBackup {
            page,
            escalation_id,
            severity,
            practice,
            audit,
            reply,
        } => {
            let r = async {
                let marked = sqlx::query(
                    "UPDATE outbox SET backup_queued = 1 WHERE id = ? AND backup_queued = 0",
                )
                .bind(page)
                .execute(&mut **tx)
                .await
                .map_err(db("queueing a backup page"))?
                .rows_affected();
                if marked > 0 {
                    let now = now_ms();
                    sqlx::query(
                        "INSERT INTO outbox (escalation_id, severity, practice_id, created_at_ms,
                             next_attempt_at_ms, target, backup_queued)
                         VALUES (?, ?, ?, ?, ?, 'backup', 1)",
                    )
                    .bind(&escalation_id)
                    .bind(severity)
                    .bind(&practice)
                    .bind(now)
                    .bind(now)
                    .execute(&mut **tx)
                    .await
                    .map_err(db("queueing a backup page"))?;
                    head.append(std::slice::from_ref(&audit));
                }
                Ok(Out::Unit)
            }
            .await;
            (JobReply::Unit(reply), r)
        }
    }
}

async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await.map_err(db("migrate"))?;
    let version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut *conn)
        .await
        .map_err(db("reading the schema version"))?;
    if !(0..=SCHEMA_VERSION).contains(&version) {
        return Err(corrupt(
            "migrate",
            format!("schema version {version} is newer than this build knows ({SCHEMA_VERSION})"),
        ));
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    // A step may rebuild a table others refer to; SQLite's way is foreign
    // keys off (a no-op inside a transaction, so before it), then a check
    // of every reference before the step commits.
    sqlx::raw_sql("PRAGMA foreign_keys = OFF")
        .execute(&mut *conn)
        .await
        .map_err(db("migrate"))?;
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let mut tx = sqlx::Connection::begin(&mut *conn)
            .await
            .map_err(db("migrate"))?;
        sqlx::raw_sql(*step)
            .execute(&mut *tx)
            .await
            .map_err(db("migrate"))?;
        let broken = sqlx::query("PRAGMA foreign_key_check")
            .fetch_all(&mut *tx)
            .await
            .map_err(db("migrate"))?;
        if !broken.is_empty() {
            return Err(corrupt(
                "migrate",
                format!("step {} leaves {} broken references", i + 1, broken.len()),
            ));
        }
        // PRAGMA takes no bound parameters; the version is our own number.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "PRAGMA user_version = {}",
            i + 1
        )))
        .execute(&mut *tx)
        .await
        .map_err(db("migrate"))?;
        tx.commit().await.map_err(db("migrate"))?;
    }
    sqlx::raw_sql("PRAGMA foreign_keys = ON")
        .execute(&mut *conn)
        .await
        .map_err(db("migrate"))?;
    Ok(())
}

/// Inserts the group's chained rows and moves the head row to the last.
async fn insert_audit(tx: &mut Transaction<'_, Sqlite>, head: &Head) -> Result<(), StoreError> {
    let Some(last) = head.pending.last() else {
        return Ok(());
    };
    let chunks = head.pending.chunks(AUDIT_ROWS_PER_INSERT);
    let n = chunks.len();
    for (i, rows) in chunks.enumerate() {
        let mut insert = sqlx::QueryBuilder::<Sqlite>::new(
            "INSERT INTO audit (seq, at_ms, actor, request_id, action, subject, detail, prev_hash, hash) ",
        );
        insert.push_values(rows, |mut b, row| {
            b.push_bind(row.seq)
                .push_bind(row.at_ms)
                .push_bind(&row.actor)
                .push_bind(&row.request_id)
                .push_bind(&row.action)
                .push_bind(&row.subject)
                .push_bind(&row.detail)
                .push_bind(&row.prev_hash)
                .push_bind(&row.hash);
        });
        if i + 1 == n {
            // The head row with the last rows, in the same round trip.
            insert.push("; UPDATE audit_head SET seq = ");
            insert.push_bind(last.seq);
            insert.push(", hash = ");
            insert.push_bind(&last.hash);
            insert.push(" WHERE one = 1");
        }
        // Not cached: its text varies with the number of rows, and a
        // cached statement per count would push out the ones that repeat.
        insert
            .build()
            .persistent(false)
            .execute(&mut **tx)
            .await
            .map_err(db("appending to the audit log"))?;
    }
    Ok(())
}

async fn record_appointment(
    tx: &mut Transaction<'_, Sqlite>,
    head: &mut Head,
    mut rec: AppointmentRecord,
) -> Result<(Recorded, AppointmentAnswer), StoreError> {
    const OP: &str = "recording an appointment event";
    let now = now_ms();
    let (practice, patient) = (
        rec.practice.as_str().to_string(),
        rec.patient.expose().to_string(),
    );
    let (practice, patient) = (practice.as_str(), patient.as_str());
    // Seen before: the first answer stands, nothing changes. (The single
    // writer makes this read and the writes below one step.)
    let first: Option<String> = sqlx::query_scalar(
        "SELECT answer FROM appointment_answers WHERE practice_id = ? AND event_id = ?",
    )
    .bind(practice)
    .bind(rec.event.id.as_str())
    .fetch_optional(&mut **tx)
    .await
    .map_err(db(OP))?;
    if let Some(first) = first {
        let a = serde_json::from_str(&first).map_err(|_| corrupt(OP, "bad answer"))?;
        return Ok((Recorded::Duplicate, a));
    }
    // The escalation first: whether it opens, raises or attaches (decided
    // here, under the writer) sets the answer and whether a directive goes.
    let mut outcome = None;
    if let Some(write) = &rec.write {
        let e = write_escalation(tx, write, &mut rec.audit, None).await?;
        rec.answer.escalation_id = Some(e.open().id.to_string());
        outcome = Some(e);
    }
    let answer = serde_json::to_string(&rec.answer).map_err(|e| corrupt(OP, e.to_string()))?;
    let inserted = sqlx::query(
        "INSERT INTO appointment_answers (practice_id, event_id, answer, received_at_ms)
         VALUES (?, ?, ?, ?) ON CONFLICT (practice_id, event_id) DO NOTHING",
    )
    .bind(practice)
    .bind(rec.event.id.as_str())
    .bind(&answer)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(db(OP))?
    .rows_affected();
    if inserted == 0 {
        return Err(corrupt(OP, "an answer appeared under the writer"));
    }
    let e = &rec.event;
    sqlx::query(
        "INSERT INTO appointment_events (practice_id, patient_id, event_id, appointment_id, kind,
             initiator, occurred_at_ms, scheduled_for_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (practice_id, event_id) DO NOTHING",
    )
    .bind(practice)
    .bind(patient)
    .bind(e.id.as_str())
    .bind(e.appointment.as_str())
    .bind(e.kind.as_str())
    .bind(e.initiator.map(tier3::Initiator::as_str))
    .bind(e.occurred_at_ms)
    .bind(e.scheduled_for_ms)
    .execute(&mut **tx)
    .await
    .map_err(db(OP))?;
    for f in &rec.firings {
        sqlx::query(
            "INSERT INTO behavior_firings (practice_id, patient_id, rule_id, anchor_event, anchor_at_ms)
             VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(practice)
        .bind(patient)
        .bind(&f.rule_id)
        .bind(&f.anchor_event)
        .bind(f.anchor_at_ms)
        .execute(&mut **tx)
        .await
        .map_err(db(OP))?;
    }
    // A referral goes with a new escalation or a rise, never an attach.
    let directs = matches!(
        outcome,
        Some(Escalated::Created(_)) | Some(Escalated::Raised(_))
    );
    if let Some(d) = rec.directive.as_mut().filter(|_| directs) {
        if let Some(e) = outcome {
            d.directive.escalation_id = e.open().id.to_string();
        }
        let body = serde_json::to_string(&d.directive).map_err(|e| corrupt(OP, e.to_string()))?;
        sqlx::query(
            "INSERT INTO directive_outbox (directive_id, practice_id, patient_id, escalation_id,
                 directive, created_at_ms)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&d.directive_id)
        .bind(d.practice.as_str())
        .bind(d.patient.expose())
        .bind(&d.directive.escalation_id)
        .bind(body)
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(db("queueing a directive"))?;
    }
    // Bounded per patient: nothing older than the longest window is read,
    // and never more events than that window could need.
    sqlx::query(
        "DELETE FROM appointment_events WHERE practice_id = ? AND patient_id = ?
           AND (occurred_at_ms < ? OR event_id NOT IN (
               SELECT event_id FROM appointment_events WHERE practice_id = ? AND patient_id = ?
               ORDER BY occurred_at_ms DESC, event_id DESC LIMIT ?))",
    )
    .bind(practice)
    .bind(patient)
    .bind(rec.prune_events_before_ms)
    .bind(practice)
    .bind(patient)
    .bind(i64::from(rec.max_events))
    .execute(&mut **tx)
    .await
    .map_err(db("pruning appointment events"))?;
    sqlx::query(
        "DELETE FROM behavior_firings WHERE practice_id = ? AND patient_id = ? AND anchor_at_ms < ?",
    )
    .bind(practice)
    .bind(patient)
    .bind(rec.prune_firings_before_ms)
    .execute(&mut **tx)
    .await
    .map_err(db("pruning firings"))?;
    sqlx::query("DELETE FROM appointment_answers WHERE received_at_ms < ?")
        .bind(now - APPOINTMENT_DEDUP_MS)
        .execute(&mut **tx)
        .await
        .map_err(db("pruning appointment answers"))?;
    head.append(&rec.audit);
    Ok((Recorded::New, rec.answer))
}

async fn record_call(tx: &mut Transaction<'_, Sqlite>, c: &CallContact) -> Result<(), StoreError> {
    const OP: &str = "recording a call";
    let (practice, patient) = (c.practice.as_str(), c.patient.expose());
    // The call and the pruning in one statement text: one round trip.
    sqlx::query(
        "INSERT INTO calls (practice_id, call_id, patient_id, started_at_ms, language, review)
         VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (practice_id, call_id) DO UPDATE SET review = MAX(review, excluded.review);
         DELETE FROM calls WHERE practice_id = ? AND patient_id = ? AND call_id NOT IN (
             SELECT call_id FROM calls WHERE practice_id = ? AND patient_id = ?
             ORDER BY started_at_ms DESC LIMIT ?)",
    )
    .bind(practice)
    .bind(c.call.as_str())
    .bind(patient)
    .bind(c.started_at_ms)
    .bind(&c.language)
    .bind(i64::from(c.review))
    .bind(practice)
    .bind(patient)
    .bind(practice)
    .bind(patient)
    .bind(CALLS_PER_PATIENT)
    .execute(&mut **tx)
    .await
    .map_err(db(OP))?;
    Ok(())
}

fn queued_from_row(r: &SqliteRow) -> Result<QueuedDirective, StoreError> {
    const OP: &str = "reading a queued directive";
    let get = |c: &str| -> Result<String, StoreError> { r.try_get(c).map_err(db(OP)) };
    Ok(QueuedDirective {
        seq: r.try_get("seq").map_err(db(OP))?,
        directive_id: get("directive_id")?,
        practice: PracticeId::parse(&get("practice_id")?)
            .map_err(|_| corrupt(OP, "bad practice id"))?,
        patient: PatientId::parse(&get("patient_id")?)
            .map_err(|_| corrupt(OP, "bad patient id"))?,
        directive: serde_json::from_str(&get("directive")?)
            .map_err(|_| corrupt(OP, "bad directive"))?,
    })
}

fn event_from_row(r: &SqliteRow) -> Result<tier3::Event, StoreError> {
    const OP: &str = "reading an appointment event";
    let get = |c: &str| -> Result<String, StoreError> { r.try_get(c).map_err(db(OP)) };
    let initiator: Option<String> = r.try_get("initiator").map_err(db(OP))?;
    Ok(tier3::Event {
        id: AppointmentEventId::parse(&get("event_id")?)
            .map_err(|_| corrupt(OP, "bad event id"))?,
        appointment: AppointmentId::parse(&get("appointment_id")?)
            .map_err(|_| corrupt(OP, "bad appointment id"))?,
        kind: tier3::Kind::parse(&get("kind")?).ok_or_else(|| corrupt(OP, "bad kind"))?,
        initiator: match initiator {
            None => None,
            Some(i) => {
                Some(tier3::Initiator::parse(&i).ok_or_else(|| corrupt(OP, "bad initiator"))?)
            }
        },
        occurred_at_ms: r.try_get("occurred_at_ms").map_err(db(OP))?,
        scheduled_for_ms: r.try_get("scheduled_for_ms").map_err(db(OP))?,
    })
}

/// The patient's most recent escalation still open or acknowledged and
/// created since `since_ms`; read inside the writer's transaction, so
/// nothing can open another for the patient before this write commits.
async fn open_in_tx(
    tx: &mut Transaction<'_, Sqlite>,
    e: &Escalation,
    since_ms: i64,
) -> Result<Option<Open>, StoreError> {
    const OP: &str = "finding the patient's open escalation";
    let Some(r) = sqlx::query(OPEN_FOR_PATIENT)
        .bind(e.practice.as_str())
        .bind(e.patient.expose())
        .bind(since_ms)
        .fetch_optional(&mut **tx)
        .await
        .map_err(db(OP))?
    else {
        return Ok(None);
    };
    open_from_row(&r, OP).map(Some)
}

const OPEN_FOR_PATIENT: &str = "SELECT id, severity FROM escalations
     WHERE practice_id = ? AND patient_id = ? AND state IN ('open', 'acknowledged')
       AND created_at_ms >= ?
     ORDER BY created_at_ms DESC LIMIT 1";

fn open_from_row(r: &SqliteRow, op: &'static str) -> Result<Open, StoreError> {
    let id: String = r.try_get("id").map_err(db(op))?;
    let sev: i64 = r.try_get("severity").map_err(db(op))?;
    Ok(Open {
        id: EscalationId::parse(&id).map_err(|_| corrupt(op, "bad escalation id"))?,
        severity: Severity::from_code(sev).ok_or_else(|| corrupt(op, "bad severity"))?,
    })
}

/// Writes an escalation (or attaches it to the patient's open one, see
/// [`EscalationWrite::CreateUnlessOpen`]); `audit` and `verdict` are
/// retargeted to match.
async fn write_escalation(
    tx: &mut Transaction<'_, Sqlite>,
    write: &EscalationWrite,
    audit: &mut Vec<AuditEvent>,
    verdict: Option<&mut MessageVerdict>,
) -> Result<Escalated, StoreError> {
    match write {
        EscalationWrite::Create(e) => create(tx, e).await,
        EscalationWrite::Raise { id, severity } => raise(tx, *id, *severity).await,
        EscalationWrite::CreateUnlessOpen {
            escalation,
            since_ms,
        } => {
            let open = open_in_tx(tx, escalation, *since_ms).await?;
            let dedup = Dedup::decide(open, escalation.severity);
            retarget(audit, verdict, escalation.id, &dedup);
            match dedup {
                Dedup::Create => create(tx, escalation).await,
                Dedup::Attach(o) => Ok(Escalated::Attached(o)),
                Dedup::Raise(o) => raise(tx, o.id, escalation.severity).await,
            }
        }
    }
}

async fn create(tx: &mut Transaction<'_, Sqlite>, e: &Escalation) -> Result<Escalated, StoreError> {
    let now = now_ms();
    // Both rows in one statement text: one round trip to SQLite's thread
    // (sqlx runs a text's statements there in turn, the values in order).
    sqlx::query(
        "INSERT INTO escalations (id, practice_id, patient_id, conversation_id, channel, tier,
             rule_id, reason_code, severity, state, utterance_id, created_at_ms, updated_at_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?);
         INSERT INTO outbox (escalation_id, severity, practice_id, created_at_ms, next_attempt_at_ms)
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(e.id.to_string())
    .bind(e.practice.as_str())
    .bind(e.patient.expose())
    .bind(e.origin.id())
    .bind(e.origin.channel())
    .bind(e.tier.code())
    .bind(&e.rule_id)
    .bind(&e.reason_code)
    .bind(e.severity.code())
    .bind(e.state.as_str())
    .bind(&e.utterance_id)
    .bind(e.created_at_ms)
    .bind(now)
    .bind(e.id.to_string())
    .bind(e.severity.code())
    .bind(e.practice.as_str())
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(db("recording an escalation and its page"))?;
    Ok(Escalated::Created(Open {
        id: e.id,
        severity: e.severity,
    }))
}

async fn raise(
    tx: &mut Transaction<'_, Sqlite>,
    id: EscalationId,
    severity: Severity,
) -> Result<Escalated, StoreError> {
    let now = now_ms();
    let practice: Option<String> = sqlx::query_scalar(
        "UPDATE escalations SET severity = ?, updated_at_ms = ?
         WHERE id = ? AND severity < ? RETURNING practice_id",
    )
    .bind(severity.code())
    .bind(now)
    .bind(id.to_string())
    .bind(severity.code())
    .fetch_optional(&mut **tx)
    .await
    .map_err(db("raising an escalation"))?;
    let open = Open { id, severity };
    // Already at or above this severity: nothing to page again.
    let Some(practice) = practice else {
        return Ok(Escalated::Attached(open));
    };
    sqlx::query(
        "INSERT INTO outbox (escalation_id, severity, practice_id, created_at_ms, next_attempt_at_ms)
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(id.to_string())
    .bind(severity.code())
    .bind(practice)
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(db("queueing a page"))?;
    Ok(Escalated::Raised(open))
}

const PAGE_COLUMNS: &str = "o.id, o.escalation_id, o.severity, o.practice_id, o.attempts,
     o.created_at_ms, o.target, o.backup_queued, e.tier, e.patient_id";

fn page_from_row(r: &SqliteRow, op: &'static str) -> Result<Page, StoreError> {
    let esc: String = r.try_get("escalation_id").map_err(db(op))?;
    let sev: i64 = r.try_get("severity").map_err(db(op))?;
    let tier: i64 = r.try_get("tier").map_err(db(op))?;
    let patient: String = r.try_get("patient_id").map_err(db(op))?;
    Ok(Page {
        id: r.try_get("id").map_err(db(op))?,
        escalation_id: EscalationId::parse(&esc).map_err(|_| corrupt(op, "bad escalation id"))?,
        severity: Severity::from_code(sev).ok_or_else(|| corrupt(op, "bad severity"))?,
        tier: Tier::from_code(tier).ok_or_else(|| corrupt(op, "bad tier"))?,
        practice: r.try_get("practice_id").map_err(db(op))?,
        patient: PatientId::parse(&patient).map_err(|_| corrupt(op, "bad patient id"))?,
        attempts: r.try_get("attempts").map_err(db(op))?,
        created_at_ms: r.try_get("created_at_ms").map_err(db(op))?,
        target: match r.try_get::<String, _>("target").map_err(db(op))?.as_str() {
            "backup" => PageTarget::Backup,
            _ => PageTarget::Primary,
        },
        backup_queued: r.try_get::<i64, _>("backup_queued").map_err(db(op))? != 0,
    })
}

fn escalation_from_row(r: &SqliteRow) -> Result<Escalation, StoreError> {
    const OP: &str = "reading an escalation";
    let get = |c: &str| -> Result<String, StoreError> { r.try_get(c).map_err(db(OP)) };
    let id = EscalationId::parse(&get("id")?).map_err(|_| corrupt(OP, "bad escalation id"))?;
    let conversation = get("conversation_id")?;
    let origin = match get("channel")?.as_str() {
        "voice" => Origin::Call(conversation),
        "sms" => Origin::Thread(conversation),
        "schedule" => Origin::Appointment(conversation),
        _ => return Err(corrupt(OP, "bad channel")),
    };
    let tier: i64 = r.try_get("tier").map_err(db(OP))?;
    let severity: i64 = r.try_get("severity").map_err(db(OP))?;
    Ok(Escalation {
        id,
        practice: PracticeId::parse(&get("practice_id")?)
            .map_err(|_| corrupt(OP, "bad practice id"))?,
        patient: PatientId::parse(&get("patient_id")?)
            .map_err(|_| corrupt(OP, "bad patient id"))?,
        origin,
        tier: Tier::from_code(tier).ok_or_else(|| corrupt(OP, "bad tier"))?,
        rule_id: get("rule_id")?,
        reason_code: get("reason_code")?,
        severity: Severity::from_code(severity).ok_or_else(|| corrupt(OP, "bad severity"))?,
        state: EscalationState::parse(&get("state")?).ok_or_else(|| corrupt(OP, "bad state"))?,
        utterance_id: get("utterance_id")?,
        created_at_ms: r.try_get("created_at_ms").map_err(db(OP))?,
        handling: Handling {
            acknowledged_by: r.try_get("acknowledged_by").map_err(db(OP))?,
            acknowledged_at_ms: r.try_get("acknowledged_at_ms").map_err(db(OP))?,
            resolved_by: r.try_get("resolved_by").map_err(db(OP))?,
            resolved_at_ms: r.try_get("resolved_at_ms").map_err(db(OP))?,
            disposition: r
                .try_get::<Option<String>, _>("disposition")
                .map_err(db(OP))?
                .map(|d| Disposition::parse(&d).ok_or_else(|| corrupt(OP, "bad disposition")))
                .transpose()?,
            page_rounds: u32::try_from(r.try_get::<i64, _>("page_rounds").map_err(db(OP))?)
                .map_err(|_| corrupt(OP, "bad page rounds"))?,
        },
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn escalate(
        &self,
        write: EscalationWrite,
        audit: AuditEvent,
    ) -> Result<Escalated, StoreError> {
        self.submit(|reply| Job::Escalate {
            write,
            audit,
            reply,
        })
        .await
    }

    async fn record_message(
        &self,
        message: &MessageId,
        verdict: &MessageVerdict,
        write: Option<EscalationWrite>,
        audit: Vec<AuditEvent>,
    ) -> Result<(Recorded, Option<Escalated>), StoreError> {
        self.submit(|reply| Job::Message {
            message: message.as_str().to_string(),
            verdict: verdict.clone(),
            write,
            audit,
            reply,
        })
        .await
    }

    async fn message_verdict(
        &self,
        message: &MessageId,
    ) -> Result<Option<MessageVerdict>, StoreError> {
        const OP: &str = "reading a message verdict";
        let Some(r) =
            sqlx::query("SELECT escalation_id, directive FROM messages WHERE message_id = ?")
                .bind(message.as_str())
                .fetch_optional(&self.reader)
                .await
                .map_err(db(OP))?
        else {
            return Ok(None);
        };
        let esc: Option<String> = r.try_get("escalation_id").map_err(db(OP))?;
        let directive: Option<String> = r.try_get("directive").map_err(db(OP))?;
        Ok(Some(MessageVerdict {
            escalation_id: esc
                .map(|e| EscalationId::parse(&e).map_err(|_| corrupt(OP, "bad escalation id")))
                .transpose()?,
            directive: directive
                .map(|d| {
                    serde_json::from_str::<Directive>(&d).map_err(|e| corrupt(OP, e.to_string()))
                })
                .transpose()?,
        }))
    }

    async fn audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.submit(|reply| Job::Audit { event, reply }).await
    }

    async fn get_escalation(&self, id: EscalationId) -> Result<Option<Escalation>, StoreError> {
        sqlx::query("SELECT * FROM escalations WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(db("reading an escalation"))?
            .as_ref()
            .map(escalation_from_row)
            .transpose()
    }

    async fn list_escalations(&self, q: &EscalationQuery) -> Result<Vec<Escalation>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM escalations
             WHERE (?1 IS NULL OR practice_id = ?1)
               AND (?2 IS NULL OR state = ?2)
               AND (?3 IS NULL OR created_at_ms >= ?3)
               AND (?4 IS NULL OR created_at_ms < ?4)
               AND (?5 IS NULL OR created_at_ms < ?5 OR (created_at_ms = ?5 AND id < ?6))
             ORDER BY created_at_ms DESC, id DESC
             LIMIT ?7",
        )
        .bind(q.practice.as_ref().map(|p| p.as_str().to_string()))
        .bind(q.state.map(|s| s.as_str()))
        .bind(q.since_ms)
        .bind(q.until_ms)
        .bind(q.after.as_ref().map(|a| a.0))
        .bind(q.after.as_ref().map(|a| a.1.clone()))
        .bind(i64::from(q.limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db("listing escalations"))?;
        rows.iter().map(escalation_from_row).collect()
    }

    async fn audit_rows(&self, since_ms: i64) -> Result<Vec<AuditRow>, StoreError> {
        const OP: &str = "reading the audit log";
        let rows = sqlx::query("SELECT * FROM audit WHERE at_ms >= ? ORDER BY seq")
            .bind(since_ms)
            .fetch_all(&self.reader)
            .await
            .map_err(db(OP))?;
        rows.iter()
            .map(|r| {
                Ok(AuditRow {
                    seq: r.try_get("seq").map_err(db(OP))?,
                    at_ms: r.try_get("at_ms").map_err(db(OP))?,
                    actor: r.try_get("actor").map_err(db(OP))?,
                    request_id: r.try_get("request_id").map_err(db(OP))?,
                    action: r.try_get("action").map_err(db(OP))?,
                    subject: r.try_get("subject").map_err(db(OP))?,
                    detail: r.try_get("detail").map_err(db(OP))?,
                    prev_hash: r.try_get("prev_hash").map_err(db(OP))?,
                    hash: r.try_get("hash").map_err(db(OP))?,
                })
            })
            .collect()
    }

    async fn audit_head(&self) -> Result<(i64, String), StoreError> {
        let r = sqlx::query("SELECT seq, hash FROM audit_head WHERE one = 1")
            .fetch_optional(&self.reader)
            .await
            .map_err(db("reading the audit head"))?;
        match r {
            Some(r) => Ok((
                r.try_get("seq").map_err(db("reading the audit head"))?,
                r.try_get("hash").map_err(db("reading the audit head"))?,
            )),
            None => Ok((0, GENESIS.to_string())),
        }
    }

    async fn due_pages(&self, now_ms: i64, limit: u32) -> Result<Vec<Page>, StoreError> {
        const OP: &str = "reading due pages";
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {PAGE_COLUMNS} FROM outbox o JOIN escalations e ON e.id = o.escalation_id
             WHERE o.delivered_at_ms IS NULL AND o.next_attempt_at_ms <= ?
             ORDER BY o.next_attempt_at_ms, o.id LIMIT ?"
        )))
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db(OP))?;
        rows.iter().map(|r| page_from_row(r, OP)).collect()
    }

    async fn claim_pages(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<Page>, StoreError> {
        let held = {
            let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
            claims.retain(|_, until| *until > now_ms);
            claims.len()
        };
        // Enough to find `limit` free ones behind those held.
        let want = u32::try_from(held)
            .unwrap_or(u32::MAX)
            .saturating_add(limit);
        let due = self.due_pages(now_ms, want).await?;
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for page in due {
            if out.len() >= limit as usize {
                break;
            }
            if claims.get(&page.id).is_some_and(|until| *until > now_ms) {
                continue;
            }
            claims.insert(page.id, now_ms.saturating_add(lease_ms));
            out.push(page);
        }
        Ok(out)
    }

    async fn page_delivered(
        &self,
        delivery: Delivery,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        self.submit(|reply| Job::PageDelivered {
            delivery,
            audit,
            reply,
        })
        .await
    }

    async fn page_failed(&self, page: i64, retry_at_ms: i64) -> Result<(), StoreError> {
        self.submit(|reply| Job::PageFailed {
            page,
            retry_at_ms,
            reply,
        })
        .await?;
        // Free again at its retry, not before: a read begun before this
        // commit still shows it due now.
        self.claims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(page, retry_at_ms);
        Ok(())
    }

    async fn acknowledge(
        &self,
        id: EscalationId,
        responder: &str,
        audit: AuditEvent,
    ) -> Result<Option<Escalation>, StoreError> {
        let found = self
            .submit(|reply| Job::Handle {
                id: id.to_string(),
                responder: responder.to_string(),
                disposition: None,
                audit,
                reply,
            })
            .await?;
        if found == 0 {
            return Ok(None);
        }
        self.get_escalation(id).await
    }

    async fn resolve(
        &self,
        id: EscalationId,
        responder: &str,
        disposition: Disposition,
        audit: AuditEvent,
    ) -> Result<Option<Escalation>, StoreError> {
        let found = self
            .submit(|reply| Job::Handle {
                id: id.to_string(),
                responder: responder.to_string(),
                disposition: Some(disposition),
                audit,
                reply,
            })
            .await?;
        if found == 0 {
            return Ok(None);
        }
        self.get_escalation(id).await
    }

    async fn repage(&self, now_ms: i64, policy: RepagePolicy) -> Result<usize, StoreError> {
        let n = self
            .submit(|reply| Job::Repage {
                now_ms,
                policy,
                reply,
            })
            .await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn page_backup(&self, page: &Page, audit: AuditEvent) -> Result<(), StoreError> {
        self.submit(|reply| Job::PageBackup {
            page: page.id,
            escalation_id: page.escalation_id.to_string(),
            severity: page.severity.code(),
            practice: page.practice.clone(),
            audit,
            reply,
        })
        .await
    }

    async fn open_for_patient(
        &self,
        practice: &PracticeId,
        patient: &PatientId,
        since_ms: i64,
    ) -> Result<Option<(EscalationId, Severity)>, StoreError> {
        const OP: &str = "finding the patient's open escalation";
        let Some(r) = sqlx::query(OPEN_FOR_PATIENT)
            .bind(practice.as_str())
            .bind(patient.expose())
            .bind(since_ms)
            .fetch_optional(&self.reader)
            .await
            .map_err(db(OP))?
        else {
            return Ok(None);
        };
        let o = open_from_row(&r, OP)?;
        Ok(Some((o.id, o.severity)))
    }

    async fn appointment_answer(
        &self,
        practice: &PracticeId,
        event: &AppointmentEventId,
    ) -> Result<Option<AppointmentAnswer>, StoreError> {
        const OP: &str = "reading an appointment answer";
        let a: Option<String> = sqlx::query_scalar(
            "SELECT answer FROM appointment_answers WHERE practice_id = ? AND event_id = ?",
        )
        .bind(practice.as_str())
        .bind(event.as_str())
        .fetch_optional(&self.reader)
        .await
        .map_err(db(OP))?;
        a.map(|a| serde_json::from_str(&a).map_err(|_| corrupt(OP, "bad answer")))
            .transpose()
    }

    async fn behavior_history(
        &self,
        practice: &PracticeId,
        patient: &PatientId,
        events_since_ms: i64,
        escalations_since_ms: i64,
    ) -> Result<(tier3::History, Option<String>), StoreError> {
        const OP: &str = "reading a patient's behavior history";
        let (practice, patient) = (practice.as_str(), patient.expose());
        let events = sqlx::query(
            "SELECT event_id, appointment_id, kind, initiator, occurred_at_ms, scheduled_for_ms
             FROM appointment_events WHERE practice_id = ? AND patient_id = ? AND occurred_at_ms >= ?",
        )
        .bind(practice)
        .bind(patient)
        .bind(events_since_ms)
        .fetch_all(&self.reader)
        .await
        .map_err(db(OP))?
        .iter()
        .map(event_from_row)
        .collect::<Result<Vec<_>, _>>()?;
        let mut escalations = Vec::new();
        for r in sqlx::query(
            "SELECT created_at_ms, tier FROM escalations
             WHERE practice_id = ? AND patient_id = ? AND created_at_ms >= ?",
        )
        .bind(practice)
        .bind(patient)
        .bind(escalations_since_ms)
        .fetch_all(&self.reader)
        .await
        .map_err(db(OP))?
        {
            let at: i64 = r.try_get("created_at_ms").map_err(db(OP))?;
            let tier: i64 = r.try_get("tier").map_err(db(OP))?;
            escalations.push((
                at,
                Tier::from_code(tier).ok_or_else(|| corrupt(OP, "bad tier"))?,
            ));
        }
        let mut calls = Vec::new();
        let mut language = None;
        for r in sqlx::query(
            "SELECT started_at_ms, review, language FROM calls
             WHERE practice_id = ? AND patient_id = ? ORDER BY started_at_ms DESC LIMIT ?",
        )
        .bind(practice)
        .bind(patient)
        .bind(CALLS_PER_PATIENT)
        .fetch_all(&self.reader)
        .await
        .map_err(db(OP))?
        {
            let review: i64 = r.try_get("review").map_err(db(OP))?;
            calls.push(tier3::CallRecord {
                started_at_ms: r.try_get("started_at_ms").map_err(db(OP))?,
                review: review != 0,
            });
            if language.is_none() {
                language = Some(r.try_get("language").map_err(db(OP))?);
            }
        }
        let mut firings = Vec::new();
        for r in sqlx::query(
            "SELECT rule_id, anchor_at_ms FROM behavior_firings WHERE practice_id = ? AND patient_id = ?",
        )
        .bind(practice)
        .bind(patient)
        .fetch_all(&self.reader)
        .await
        .map_err(db(OP))?
        {
            firings.push(tier3::PastFiring {
                rule_id: r.try_get("rule_id").map_err(db(OP))?,
                anchor_at_ms: r.try_get("anchor_at_ms").map_err(db(OP))?,
            });
        }
        Ok((
            tier3::History {
                events,
                escalations,
                calls,
                firings,
            },
            language,
        ))
    }

    async fn record_appointment(
        &self,
        record: AppointmentRecord,
    ) -> Result<(Recorded, AppointmentAnswer), StoreError> {
        self.submit(|reply| Job::Appointment {
            record: Box::new(record),
            reply,
        })
        .await
    }

    async fn record_call(&self, call: CallContact) -> Result<(), StoreError> {
        self.submit(|reply| Job::Call { call, reply }).await
    }

    async fn pending_directives(
        &self,
        practice: &PracticeId,
        limit: u32,
    ) -> Result<Vec<QueuedDirective>, StoreError> {
        sqlx::query(
            "SELECT seq, directive_id, practice_id, patient_id, directive FROM directive_outbox
             WHERE practice_id = ? AND acknowledged_at_ms IS NULL ORDER BY seq LIMIT ?",
        )
        .bind(practice.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db("reading queued directives"))?
        .iter()
        .map(queued_from_row)
        .collect()
    }

    async fn queued_directive(
        &self,
        directive_id: &str,
    ) -> Result<Option<QueuedDirective>, StoreError> {
        sqlx::query(
            "SELECT seq, directive_id, practice_id, patient_id, directive FROM directive_outbox
             WHERE directive_id = ?",
        )
        .bind(directive_id)
        .fetch_optional(&self.reader)
        .await
        .map_err(db("reading a queued directive"))?
        .as_ref()
        .map(queued_from_row)
        .transpose()
    }

    async fn acknowledge_directive(
        &self,
        directive_id: &str,
        by: &str,
        audit: AuditEvent,
    ) -> Result<bool, StoreError> {
        let (id, by) = (directive_id.to_string(), by.to_string());
        let found = self
            .submit(|reply| Job::AckDirective {
                id,
                by,
                audit,
                reply,
            })
            .await?;
        Ok(found > 0)
    }

    async fn probe(&self) -> Result<(), StoreError> {
        self.submit(|reply| Job::Probe { reply }).await?;
        let dir = self.dir.clone();
        let free = tokio::task::spawn_blocking(move || {
            rustix::fs::statvfs(&dir).map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        })
        .await
        .map_err(|e| corrupt("probing", e.to_string()))?
        .map_err(|e| corrupt("probing", format!("free space: {e}")))?;
        if free < MIN_FREE_BYTES {
            return Err(corrupt(
                "probing",
                format!("{free} bytes free on the database's disk, less than {MIN_FREE_BYTES}"),
            ));
        }
        Ok(())
    }

    fn directives_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.directives.subscribe()
    }

    async fn outbox_depth(&self) -> Result<(i64, Option<i64>), StoreError> {
        const OP: &str = "reading the outbox depth";
        let r = sqlx::query(
            "SELECT COUNT(*) AS n, MIN(created_at_ms) AS oldest FROM outbox WHERE delivered_at_ms IS NULL",
        )
        .fetch_one(&self.reader)
        .await
        .map_err(db(OP))?;
        Ok((
            r.try_get("n").map_err(db(OP))?,
            r.try_get("oldest").map_err(db(OP))?,
        ))
    }

    fn pages_signal(&self) -> Arc<Notify> {
        self.pages.clone()
    }

    async fn close(&self) {
        // Closing the queue lets the writer finish what is queued, then stop.
        self.jobs.lock().await.take();
        if let Some(done) = self.writer.lock().await.take() {
            let _ = done.await;
        }
        if let Some((stop, task)) = self.checkpoints.lock().await.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
        self.reader.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database left at version 4 with an escalation, its page and an
    /// audit row: version 5 rebuilds the escalations table under the
    /// outbox's references, and nothing is lost.
    #[tokio::test]
    async fn version_4_data_survives_the_tier3_migration() {
        let dir = std::env::temp_dir().join(format!("crisisd-migrate-{}", uuid::Uuid::now_v7()));
        let path = dir.join("crisisd.db");
        std::fs::create_dir_all(&dir).expect("dir");
        {
            let options = SqliteConnectOptions::from_str("sqlite:")
                .expect("options")
                .filename(&path)
                .create_if_missing(true)
                .foreign_keys(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .expect("connect");
            for step in &MIGRATIONS[..4] {
                sqlx::raw_sql(*step).execute(&pool).await.expect("old step");
            }
            sqlx::raw_sql(
                "PRAGMA user_version = 4;
                 INSERT INTO escalations (id, practice_id, patient_id, conversation_id, channel, tier,
                     rule_id, reason_code, severity, state, utterance_id, created_at_ms, updated_at_ms,
                     acknowledged_by, page_rounds)
                 VALUES ('0190b5e0-0000-7000-8000-000000000001', 'p1', 'pat', 'call-1', 'voice', 1,
                     'r', 'r', 3, 'acknowledged', 'u1', 1, 2, 'dr', 2);
                 INSERT INTO outbox (escalation_id, severity, practice_id, created_at_ms, next_attempt_at_ms)
                 VALUES ('0190b5e0-0000-7000-8000-000000000001', 3, 'p1', 1, 1);",
            )
            .execute(&pool)
            .await
            .expect("v4 rows");
            pool.close().await;
        }
        let store = SqliteStore::open(&path).await.expect("migrates");
        let id = EscalationId::parse("0190b5e0-0000-7000-8000-000000000001").expect("id");
        let e = store.get_escalation(id).await.expect("read").expect("kept");
        assert_eq!(e.state, EscalationState::Acknowledged);
        assert_eq!(e.handling.acknowledged_by.as_deref(), Some("dr"));
        assert_eq!(e.handling.page_rounds, 2);
        assert_eq!(store.outbox_depth().await.expect("outbox").0, 1);
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&store.reader)
            .await
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
        // A Tier 3 escalation, refused by version 4's CHECK, is taken now.
        let mut e3 = e.clone();
        e3.id = EscalationId::new();
        e3.origin = Origin::Appointment("appt-1".into());
        e3.tier = Tier::Behavior;
        let audit = AuditEvent {
            actor: "test".into(),
            request_id: "r".into(),
            action: "escalation.create".into(),
            subject: "s".into(),
            detail: serde_json::json!({}),
        };
        store
            .escalate(EscalationWrite::Create(Box::new(e3.clone())), audit.clone())
            .await
            .expect("schedule channel");
        let back = store
            .get_escalation(e3.id)
            .await
            .expect("read")
            .expect("kept");
        assert_eq!(back.origin, Origin::Appointment("appt-1".into()));
        // The writer's foreign keys are on again: a backup page for an
        // escalation that does not exist is refused.
        let orphan = crate::store::Page {
            id: 1,
            escalation_id: EscalationId::new(),
            severity: Severity::High,
            tier: Tier::Phrase,
            practice: "p1".into(),
            patient: e.patient.clone(),
            attempts: 3,
            created_at_ms: 1,
            target: PageTarget::Primary,
            backup_queued: false,
        };
        assert!(store.page_backup(&orphan, audit).await.is_err());
        store.close().await;
    }

    /// A database left by a build before claims (schema version 4), with a
    /// page still to send: the upgrade keeps it, and it is claimed once.
    #[tokio::test]
    async fn a_version_4_database_upgrades_and_its_pending_page_is_claimed() {
        let dir =
            std::env::temp_dir().join(format!("crisisd-upgrade-{}", uuid::Uuid::now_v7().simple()));
        let path = dir.join("crisisd.db");
        std::fs::create_dir_all(&dir).expect("dir");
        {
            let options = SqliteConnectOptions::from_str("sqlite:")
                .expect("options")
                .filename(&path)
                .create_if_missing(true);
            let pool = SqlitePool::connect_with(options).await.expect("connect");
            for step in &MIGRATIONS[..4] {
                sqlx::raw_sql(*step)
                    .execute(&pool)
                    .await
                    .expect("old schema");
            }
            sqlx::raw_sql(
                "PRAGMA user_version = 4;
                 INSERT INTO escalations (id, practice_id, patient_id, conversation_id, channel,
                     tier, rule_id, reason_code, severity, state, utterance_id, created_at_ms,
                     updated_at_ms)
                 VALUES ('01a209c3-0000-7000-8000-000000000001', 'p1', 'patient-1', 'c1',
                     'voice', 1, 'r', 'r', 3, 'open', 'u1', 1, 1);
                 INSERT INTO outbox (escalation_id, severity, practice_id, created_at_ms,
                     next_attempt_at_ms)
                 VALUES ('01a209c3-0000-7000-8000-000000000001', 3, 'p1', 1, 1);",
            )
            .execute(&pool)
            .await
            .expect("old rows");
            pool.close().await;
        }
        let store = SqliteStore::open(&path).await.expect("upgrade");
        let pages = store
            .claim_pages(now_ms(), 60_000, 10)
            .await
            .expect("claim");
        assert_eq!(pages.len(), 1);
        // Claimed: not again until the lease runs out.
        assert!(
            store
                .claim_pages(now_ms(), 60_000, 10)
                .await
                .expect("claim")
                .is_empty()
        );
        // A new process (after a crash) sends it at once.
        store.close().await;
        let store = SqliteStore::open(&path).await.expect("reopen");
        assert_eq!(
            store
                .claim_pages(now_ms(), 60_000, 10)
                .await
                .expect("claim")
                .len(),
            1
        );
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
