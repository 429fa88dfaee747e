//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`,
//! so a committed escalation survives a crash or a power cut.
//!
//! SQLite has one writer at a time; so does this store. One thread owns
//! the write connection and the audit chain's head (so appending to the
//! chain never reads it back), and commits in groups: whatever writes are
//! waiting when it is free go into one transaction, so one fsync covers
//! them all (see [`writer`]). No write is answered before its group is
//! durable. Reads go through sqlx, a small pool of their own, and never
//! wait for a write.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use std::sync::Arc;

use tokio::sync::{Mutex, Notify, mpsc, oneshot};

mod writer;
use writer::{Job, Reply};

use super::{
    AppointmentAnswer, AppointmentRecord, CALLS_PER_PATIENT, CallContact, Delivery, Escalated,
    EscalationQuery, EscalationWrite, MessageVerdict, Page, PageTarget, QueuedDirective, Recorded,
    RepagePolicy, Store, StoreError,
};
use crate::audit::{AuditEvent, AuditRow, GENESIS};
use crate::domain::{Disposition, EscalationState, Severity, Tier};
use crate::escalation::{Directive, Escalation, Handling, Open, Origin};
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
        // Migrated over sqlx, which then lets the file go: the writer opens
        // a connection of its own.
        let migrator = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(|e| open_err(e.to_string()))?;
        let migrated = migrate(&migrator).await;
        migrator.close().await;
        migrated?;
        let (tx, rx) = mpsc::channel(writer::WRITE_QUEUE);
        let pages = Arc::new(Notify::new());
        let directives = Arc::new(tokio::sync::watch::Sender::new(0));
        let (opened, ready) = oneshot::channel();
        let (finished, done) = oneshot::channel();
        let signals = writer::Signals {
            pages: pages.clone(),
            directives: directives.clone(),
        };
        let file = path.to_path_buf();
        std::thread::Builder::new()
            .name("crisisd-store-writer".to_string())
            .spawn(move || {
                match writer::open(&file) {
                    Ok(w) => {
                        let _ = opened.send(Ok(()));
                        w.run(rx, &signals);
                    }
                    Err(e) => {
                        let _ = opened.send(Err(e));
                    }
                }
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
    use crate::escalation::now_ms;

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
