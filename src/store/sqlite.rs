//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`,
//! so a committed escalation survives a crash or a power cut.
//!
//! SQLite has one writer at a time; so does this store. One task owns the
//! write connection and the audit chain's head (so appending to the chain
//! never reads it back). It commits in groups: whatever writes are waiting
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
    Dedup, Delivery, Escalated, EscalationQuery, EscalationWrite, MessageVerdict, Page, PageTarget,
    Recorded, RepagePolicy, Store, StoreError, retarget,
};
use crate::audit::{AuditEvent, AuditRow, GENESIS};
use crate::domain::{Disposition, EscalationState, Severity, Tier};
use crate::escalation::{Directive, Escalation, Handling, Open, Origin, now_ms};
use crate::ids::{EscalationId, MessageId, PatientId, PracticeId};

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

/// Version 5 is reserved for Tier 3 (issue 6, on main), which fills it in;
/// until then it changes nothing, so that version 6 keeps its number.
const SCHEMA_5: &str = "SELECT 1;";

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

/// The chain's head: the last row's sequence number and hash.
#[derive(Clone)]
struct Head {
    seq: i64,
    hash: String,
}

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
}

/// Where a job's answer goes.
enum JobReply {
    Unit(Reply<()>),
    Value(Reply<u64>),
    Escalated(Reply<Escalated>),
    Message(Reply<(Recorded, Option<Escalated>)>),
}

/// What a job produced.
enum Out {
    Unit,
    Value(u64),
    Escalated(Escalated),
    Message(Recorded, Option<Escalated>),
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
        }
    }
}

pub struct SqliteStore {
    pages: Arc<Notify>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    checkpoints: Mutex<
        Option<(
            tokio::sync::watch::Sender<bool>,
            tokio::task::JoinHandle<()>,
        )>,
    >,
    reader: SqlitePool,
    /// Pages this process's pager holds: page id → claimed until (ms).
    /// One process serves a SQLite file, so a claim need not outlive it
    /// (after a crash every undelivered page is due at once) and need not
    /// cost the writer a commit. A delivered page keeps its entry until it
    /// expires, so that a read begun before the delivery committed cannot
    /// hand the page out again.
    claims: std::sync::Mutex<std::collections::HashMap<i64, i64>>,
}

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
        // The writer never checkpoints: copying the WAL into the database
        // (and its fsync) would stall whichever commit crossed the
        // threshold, an escalation among them. A connection of its own does
        // it in the background.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await
            .map_err(|e| open_err(e.to_string()))?;
        migrate(&writer).await?;
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE one = 1")
            .fetch_one(&writer)
            .await
            .map_err(db("reading the audit head"))?;
        let head = Head {
            seq: head.try_get("seq").map_err(db("reading the audit head"))?,
            hash: head.try_get("hash").map_err(db("reading the audit head"))?,
        };
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
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let pages = Arc::new(Notify::new());
        let task = tokio::spawn(write_loop(writer, head, rx, pages.clone()));
        Ok(SqliteStore {
            pages,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(task)),
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

/// The writer: takes what is queued, commits it as one group, answers.
async fn write_loop(
    pool: SqlitePool,
    mut head: Head,
    mut rx: mpsc::Receiver<Job>,
    pages: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(GROUP);
    while rx.recv_many(&mut batch, GROUP).await > 0 {
        let paged = batch.iter().any(|j| {
            matches!(
                j,
                Job::Escalate { .. } | Job::Message { write: Some(_), .. }
            )
        });
        let mut done = Vec::with_capacity(batch.len());
        let result = commit_group(&pool, &mut head, batch.drain(..), &mut done).await;
        match result {
            Ok(new_head) => {
                head = new_head;
                for d in done {
                    d.send();
                }
                if paged {
                    pages.notify_one();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = done.len(), "committing a group of writes failed");
                let message = e.to_string();
                for d in done {
                    d.fail("commit", &message);
                }
            }
        }
    }
    pool.close().await;
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
    for job in jobs {
        sqlx::raw_sql("SAVEPOINT job")
            .execute(&mut *tx)
            .await
            .map_err(db("savepoint"))?;
        let before = h.clone();
        let (reply, outcome) = run_job(&mut tx, &mut h, job).await;
        let ok = outcome.is_ok();
        if ok {
            sqlx::raw_sql("RELEASE job")
                .execute(&mut *tx)
                .await
                .map_err(db("savepoint"))?;
        } else {
            h = before;
            sqlx::raw_sql("ROLLBACK TO job; RELEASE job")
                .execute(&mut *tx)
                .await
                .map_err(db("savepoint"))?;
        }
        done.push(Done(reply, outcome));
    }
    tx.commit().await.map_err(db("commit"))?;
    Ok(h)
}

fn job_reply(job: Job) -> Done {
    let reply = match job {
        Job::Audit { reply, .. }
        | Job::PageDelivered { reply, .. }
        | Job::PageFailed { reply, .. }
        | Job::PageBackup { reply, .. } => JobReply::Unit(reply),
        Job::Escalate { reply, .. } => JobReply::Escalated(reply),
        Job::Message { reply, .. } => JobReply::Message(reply),
        Job::Handle { reply, .. } | Job::Repage { reply, .. } => JobReply::Value(reply),
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
                *head = append_audit(tx, head, &audit).await?;
                Ok(Out::Escalated(done))
            }
            .await;
            (JobReply::Escalated(reply), r)
        }
        Job::Audit { event, reply } => {
            let r = async {
                *head = append_audit(tx, head, std::slice::from_ref(&event)).await?;
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
                *head = append_audit(tx, head, &audit).await?;
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
                *head = append_audit(tx, head, std::slice::from_ref(&audit)).await?;
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
                    *head = append_audit(tx, head, std::slice::from_ref(&audit)).await?;
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
                    *head = append_audit(tx, head, std::slice::from_ref(&audit)).await?;
                }
                Ok(Out::Value(due.len() as u64))
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
                    *head = append_audit(tx, head, std::slice::from_ref(&audit)).await?;
                }
                Ok(Out::Unit)
            }
            .await;
            (JobReply::Unit(reply), r)
        }
    }
}

async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    let version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(pool)
        .await
        .map_err(db("reading the schema version"))?;
    if !(0..=SCHEMA_VERSION).contains(&version) {
        return Err(corrupt(
            "migrate",
            format!("schema version {version} is newer than this build knows ({SCHEMA_VERSION})"),
        ));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let mut tx = pool.begin().await.map_err(db("migrate"))?;
        sqlx::raw_sql(*step)
            .execute(&mut *tx)
            .await
            .map_err(db("migrate"))?;
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
    Ok(())
}

/// Appends audit rows inside `tx`; returns the new head, to be kept only if
/// the transaction commits.
async fn append_audit(
    tx: &mut Transaction<'_, Sqlite>,
    head: &Head,
    events: &[AuditEvent],
) -> Result<Head, StoreError> {
    if events.is_empty() {
        // An attach to the patient's open escalation: nothing to record.
        return Ok(head.clone());
    }
    let (mut seq, mut hash) = (head.seq, head.hash.clone());
    for e in events {
        seq += 1;
        let row = AuditRow::chain(&hash, seq, now_ms(), e);
        sqlx::query(
            "INSERT INTO audit (seq, at_ms, actor, request_id, action, subject, detail, prev_hash, hash)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(row.seq)
        .bind(row.at_ms)
        .bind(&row.actor)
        .bind(&row.request_id)
        .bind(&row.action)
        .bind(&row.subject)
        .bind(&row.detail)
        .bind(&row.prev_hash)
        .bind(&row.hash)
        .execute(&mut **tx)
        .await
        .map_err(db("appending to the audit log"))?;
        hash = row.hash;
    }
    sqlx::query("UPDATE audit_head SET seq = ?, hash = ? WHERE one = 1")
        .bind(seq)
        .bind(&hash)
        .execute(&mut **tx)
        .await
        .map_err(db("moving the audit head"))?;
    Ok(Head { seq, hash })
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
    sqlx::query(
        "INSERT INTO escalations (id, practice_id, patient_id, conversation_id, channel, tier,
             rule_id, reason_code, severity, state, utterance_id, created_at_ms, updated_at_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    .execute(&mut **tx)
    .await
    .map_err(db("recording an escalation"))?;
    sqlx::query(
        "INSERT INTO outbox (escalation_id, severity, practice_id, created_at_ms, next_attempt_at_ms)
         VALUES (?, ?, ?, ?, ?)",
    )
    .bind(e.id.to_string())
    .bind(e.severity.code())
    .bind(e.practice.as_str())
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(db("queueing a page"))?;
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
        if let Some(task) = self.writer.lock().await.take() {
            let _ = task.await;
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
