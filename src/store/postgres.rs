//! The shared store: PostgreSQL, for several replicas behind one load
//! balancer (Amazon RDS in production).
//!
//! Every write is one transaction on a pooled connection, committed before
//! it is answered. What SQLite gets from having one writer, this store gets
//! from the database:
//! - the audit chain: every append locks the `audit_head` row, reads the
//!   head under the lock and moves it, so appends from all replicas form one
//!   chain. The lock is taken last in each transaction, to hold it briefly.
//! - one escalation per patient: a `CreateUnlessOpen` write first upserts
//!   the patient's row in `patient_locks` (its primary key is the
//!   constraint), which locks it until commit; a second writer for the same
//!   patient waits there, then finds the first one's escalation and
//!   attaches to it.
//! - pages: a pager claims due rows with `FOR UPDATE SKIP LOCKED` and a
//!   lease (`claimed_by`, `claimed_until_ms`); other replicas skip them
//!   until delivered, failed, or the lease runs out.
//! - re-paging: escalations due for another round are locked with `FOR
//!   UPDATE SKIP LOCKED` and moved on in the same transaction, so two
//!   replicas re-paging at once queue each round once.
//!
//! Locks are taken in one order: a message id's row, a patient's lock
//! row, escalation rows, outbox rows, and the audit head last. (A new
//! outbox row's foreign key takes a key-share lock on its escalation,
//! which no update here conflicts with.) No transaction takes a lock after
//! the audit head, and the pager's claims lock outbox rows only, skipping
//! any held, so writers wait for each other but never in a cycle. READ COMMITTED is enough: each check that matters is made on
//! the locked row itself (`WHERE state = 'open'`, `AND NOT backup_queued`,
//! the lease), which PostgreSQL re-evaluates after the wait.
//!
//! Migrations are versioned like SQLite's (the same numbers mean the same
//! schema) and run at start under an advisory lock, so replicas starting
//! together migrate once.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use tokio::sync::Notify;

use super::{
    APPOINTMENT_DEDUP_MS, AppointmentAnswer, AppointmentRecord, CALLS_PER_PATIENT, CallContact,
    Dedup, Delivery, Escalated, EscalationQuery, EscalationWrite, MessageVerdict, Page, PageTarget,
    QueuedDirective, Recorded, RepagePolicy, Store, StoreError, retarget,
};
use crate::audit::{AuditEvent, AuditRow, GENESIS};
use crate::config::StoreConfig;
use crate::domain::{Disposition, EscalationState, Severity, Tier};
use crate::escalation::{Directive, Escalation, Handling, Open, Origin, now_ms};
use crate::ids::{
    AppointmentEventId, AppointmentId, EscalationId, MessageId, PatientId, PracticeId,
};
use crate::tier3;

const SCHEMA_VERSION: i64 = 6;

/// Each step takes the schema from its index to the next version; the
/// versions mean what SQLite's do.
const MIGRATIONS: &[&str] = &[SCHEMA, SCHEMA_2, SCHEMA_3, SCHEMA_4, SCHEMA_5, SCHEMA_6];

const SCHEMA: &str = r#"
CREATE TABLE escalations (
    id              TEXT PRIMARY KEY,
    practice_id     TEXT NOT NULL,
    patient_id      TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    channel         TEXT NOT NULL CHECK (channel IN ('voice', 'sms')),
    tier            BIGINT NOT NULL,
    rule_id         TEXT NOT NULL,
    reason_code     TEXT NOT NULL,
    severity        BIGINT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
    utterance_id    TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    updated_at_ms   BIGINT NOT NULL
);
CREATE INDEX escalations_by_practice ON escalations (practice_id, created_at_ms DESC, id DESC);
CREATE INDEX escalations_by_time ON escalations (created_at_ms DESC, id DESC);

CREATE TABLE outbox (
    id                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    escalation_id      TEXT NOT NULL REFERENCES escalations (id),
    severity           BIGINT NOT NULL,
    practice_id        TEXT NOT NULL,
    created_at_ms      BIGINT NOT NULL,
    attempts           BIGINT NOT NULL DEFAULT 0,
    next_attempt_at_ms BIGINT NOT NULL,
    delivered_at_ms    BIGINT
);
CREATE INDEX outbox_due ON outbox (next_attempt_at_ms) WHERE delivered_at_ms IS NULL;

CREATE TABLE messages (
    message_id    TEXT PRIMARY KEY,
    escalation_id TEXT,
    directive     TEXT,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE audit (
    seq        BIGINT PRIMARY KEY,
    at_ms      BIGINT NOT NULL,
    actor      TEXT NOT NULL,
    request_id TEXT NOT NULL,
    action     TEXT NOT NULL,
    subject    TEXT NOT NULL,
    detail     TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE FUNCTION crisisd_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER audit_no_update_or_delete BEFORE UPDATE OR DELETE ON audit
FOR EACH ROW EXECUTE FUNCTION crisisd_audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
FOR EACH STATEMENT EXECUTE FUNCTION crisisd_audit_append_only();

-- The chain's head, kept beside it so that rows cut from the end show.
CREATE TABLE audit_head (
    one  INTEGER PRIMARY KEY CHECK (one = 1),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (one, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
CREATE FUNCTION crisisd_audit_head_kept() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit head cannot be removed'; END $$;
CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
FOR EACH ROW EXECUTE FUNCTION crisisd_audit_head_kept();
CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head
FOR EACH STATEMENT EXECUTE FUNCTION crisisd_audit_head_kept();
"#;

const SCHEMA_2: &str = r#"
ALTER TABLE outbox ADD COLUMN clinician_id TEXT, ADD COLUMN provider_message_id TEXT;
"#;

const SCHEMA_3: &str = r#"
ALTER TABLE escalations
    ADD COLUMN acknowledged_by TEXT,
    ADD COLUMN acknowledged_at_ms BIGINT,
    ADD COLUMN resolved_by TEXT,
    ADD COLUMN resolved_at_ms BIGINT,
    ADD COLUMN disposition TEXT,
    ADD COLUMN page_rounds BIGINT NOT NULL DEFAULT 1,
    ADD COLUMN next_repage_at_ms BIGINT;
CREATE INDEX escalations_open ON escalations (state) WHERE state = 'open';
ALTER TABLE outbox
    ADD COLUMN target TEXT NOT NULL DEFAULT 'primary' CHECK (target IN ('primary', 'backup')),
    ADD COLUMN backup_queued BOOLEAN NOT NULL DEFAULT false;
"#;

const SCHEMA_4: &str = r#"
CREATE INDEX escalations_by_patient ON escalations (practice_id, patient_id, created_at_ms DESC);
"#;

/// Version 5: Tier 3, as in SQLite (escalations from an appointment; the
/// patient's appointment events, answers, firings and calls; directives
/// waiting for a gateway), and the readiness probe's row.
const SCHEMA_5: &str = r#"
ALTER TABLE escalations DROP CONSTRAINT escalations_channel_check;
ALTER TABLE escalations ADD CONSTRAINT escalations_channel_check
    CHECK (channel IN ('voice', 'sms', 'schedule'));
CREATE TABLE appointment_events (
    practice_id      TEXT NOT NULL,
    patient_id       TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    appointment_id   TEXT NOT NULL,
    kind             TEXT NOT NULL CHECK (kind IN ('booked', 'cancelled', 'rescheduled', 'no_show', 'attended')),
    initiator        TEXT CHECK (initiator IN ('patient', 'practice')),
    occurred_at_ms   BIGINT NOT NULL,
    scheduled_for_ms BIGINT NOT NULL,
    PRIMARY KEY (practice_id, event_id)
);
CREATE INDEX appointment_events_by_patient ON appointment_events (practice_id, patient_id, occurred_at_ms);
CREATE TABLE appointment_answers (
    practice_id    TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    answer         TEXT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    PRIMARY KEY (practice_id, event_id)
);
CREATE INDEX appointment_answers_by_age ON appointment_answers (received_at_ms);
CREATE TABLE behavior_firings (
    practice_id  TEXT NOT NULL,
    patient_id   TEXT NOT NULL,
    rule_id      TEXT NOT NULL,
    anchor_event TEXT NOT NULL,
    anchor_at_ms BIGINT NOT NULL,
    PRIMARY KEY (practice_id, patient_id, rule_id, anchor_event)
);
CREATE TABLE calls (
    practice_id   TEXT NOT NULL,
    call_id       TEXT NOT NULL,
    patient_id    TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    language      TEXT NOT NULL,
    review        BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (practice_id, call_id)
);
CREATE INDEX calls_by_patient ON calls (practice_id, patient_id, started_at_ms DESC);
CREATE TABLE directive_outbox (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    directive_id       TEXT NOT NULL UNIQUE,
    practice_id        TEXT NOT NULL,
    patient_id         TEXT NOT NULL,
    escalation_id      TEXT NOT NULL REFERENCES escalations (id),
    directive          TEXT NOT NULL,
    created_at_ms      BIGINT NOT NULL,
    acknowledged_at_ms BIGINT,
    acknowledged_by    TEXT
);
CREATE INDEX directive_outbox_pending ON directive_outbox (practice_id, seq) WHERE acknowledged_at_ms IS NULL;
CREATE TABLE probe (
    one   INTEGER PRIMARY KEY CHECK (one = 1),
    at_ms BIGINT NOT NULL
);
"#;

/// Version 6: page claims with a lease, and one lock row per patient that
/// serializes the decision "new escalation or attach" across replicas.
const SCHEMA_6: &str = r#"
ALTER TABLE outbox ADD COLUMN claimed_by TEXT, ADD COLUMN claimed_until_ms BIGINT;
CREATE TABLE patient_locks (
    practice_id   TEXT NOT NULL,
    patient_id    TEXT NOT NULL,
    locked_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (practice_id, patient_id)
);
"#;

pub struct PgStore {
    pool: PgPool,
    pages: Arc<Notify>,
    /// Moved after a commit here that queued a directive; subscriptions
    /// also poll, for directives queued by other replicas.
    directives: Arc<tokio::sync::watch::Sender<u64>>,
    /// This process's name on the pages it claims.
    claimant: String,
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

impl PgStore {
    /// Connects to `config.url` (its TLS as the URL's `sslmode` and
    /// `sslrootcert` say), and migrates the schema to this build's version.
    pub async fn open(config: &StoreConfig) -> Result<PgStore, StoreError> {
        // sqlx's rustls uses ring itself; the process default is set too,
        // as everywhere else in crisisd (two providers are linked: ring,
        // and aws-lc-rs through the AWS SDK), so that nothing TLS in this
        // process depends on which side installs it first.
        crate::server::install_crypto_provider();
        // The parse error could quote the URL, password and all.
        let options = PgConnectOptions::from_str(&config.url)
            .map_err(|_| corrupt("reading store.url", "not a valid postgres:// URL"))?
            .application_name("crisisd")
            .options([(
                "statement_timeout",
                format!("{}ms", config.statement_timeout_ms),
            )]);
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .min_connections(config.min_connections)
            .acquire_timeout(Duration::from_millis(config.acquire_timeout_ms))
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Connect { source })?;
        migrate(&pool).await?;
        Ok(PgStore {
            pool,
            pages: Arc::new(Notify::new()),
            directives: Arc::new(tokio::sync::watch::Sender::new(0)),
            claimant: uuid::Uuid::now_v7().to_string(),
        })
    }

    /// The name this process claims pages under.
    pub fn claimant(&self) -> &str {
        &self.claimant
    }

    async fn begin(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.pool.begin().await.map_err(db("begin"))
    }
}

async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    const OP: &str = "migrate";
    let mut tx = pool.begin().await.map_err(db(OP))?;
    // One replica migrates; the others wait here, then find nothing to do.
    // Keyed by schema, so that databases shared by schema do not wait on
    // each other.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.crisisd_migrate'))")
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS crisisd_schema (
             one     INTEGER PRIMARY KEY CHECK (one = 1),
             version BIGINT NOT NULL
         );
         INSERT INTO crisisd_schema (one, version) VALUES (1, 0) ON CONFLICT DO NOTHING;",
    )
    .execute(&mut *tx)
    .await
    .map_err(db(OP))?;
    let version: i64 = sqlx::query_scalar("SELECT version FROM crisisd_schema WHERE one = 1")
        .fetch_one(&mut *tx)
        .await
        .map_err(db(OP))?;
    if !(0..=SCHEMA_VERSION).contains(&version) {
        return Err(corrupt(
            OP,
            format!("schema version {version} is newer than this build knows ({SCHEMA_VERSION})"),
        ));
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        sqlx::raw_sql(*step)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        sqlx::query("UPDATE crisisd_schema SET version = $1 WHERE one = 1")
            .bind(i as i64 + 1)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
    }
    tx.commit().await.map_err(db(OP))
}

/// Appends audit rows inside `tx`, reading the head under its row lock:
/// concurrent appenders from any replica wait for each other here, so the
/// chain stays one. Call it last in a transaction; the lock is held until
/// commit.
async fn append_audit(
    tx: &mut Transaction<'_, Postgres>,
    events: &[AuditEvent],
) -> Result<(), StoreError> {
    const OP: &str = "appending to the audit log";
    if events.is_empty() {
        return Ok(());
    }
    let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE one = 1 FOR UPDATE")
        .fetch_one(&mut **tx)
        .await
        .map_err(db("locking the audit head"))?;
    let mut seq: i64 = head.try_get("seq").map_err(db(OP))?;
    let mut hash: String = head.try_get("hash").map_err(db(OP))?;
    for e in events {
        seq += 1;
        let row = AuditRow::chain(&hash, seq, now_ms(), e);
        sqlx::query(
            "INSERT INTO audit (seq, at_ms, actor, request_id, action, subject, detail, prev_hash, hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
        .map_err(db(OP))?;
        hash = row.hash;
    }
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE one = 1")
        .bind(seq)
        .bind(&hash)
        .execute(&mut **tx)
        .await
        .map_err(db("moving the audit head"))?;
    Ok(())
}

const OPEN_FOR_PATIENT: &str = "SELECT id, severity FROM escalations
     WHERE practice_id = $1 AND patient_id = $2 AND state IN ('open', 'acknowledged')
       AND created_at_ms >= $3
     ORDER BY created_at_ms DESC LIMIT 1";

fn open_from_row(r: &PgRow, op: &'static str) -> Result<Open, StoreError> {
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
    tx: &mut Transaction<'_, Postgres>,
    write: &EscalationWrite,
    audit: &mut Vec<AuditEvent>,
    verdict: Option<&mut MessageVerdict>,
) -> Result<Escalated, StoreError> {
    match write {
        EscalationWrite::Create(e) => create(tx, e).await,
        EscalationWrite::Raise { id, severity } => raise(tx, *id, *severity).await,
        EscalationWrite::CreateUnlessOpen {
            escalation: e,
            since_ms,
        } => {
            const OP: &str = "finding the patient's open escalation";
            // The patient's lock row: made by the first writer ever, then
            // locked by each until its commit. A second writer for the
            // patient waits here and then sees the first one's escalation.
            sqlx::query(
                "INSERT INTO patient_locks (practice_id, patient_id, locked_at_ms)
                 VALUES ($1, $2, $3)
                 ON CONFLICT (practice_id, patient_id)
                 DO UPDATE SET locked_at_ms = EXCLUDED.locked_at_ms",
            )
            .bind(e.practice.as_str())
            .bind(e.patient.expose())
            .bind(now_ms())
            .execute(&mut **tx)
            .await
            .map_err(db("locking the patient's escalations"))?;
            let open = sqlx::query(OPEN_FOR_PATIENT)
                .bind(e.practice.as_str())
                .bind(e.patient.expose())
                .bind(*since_ms)
                .fetch_optional(&mut **tx)
                .await
                .map_err(db(OP))?
                .map(|r| open_from_row(&r, OP))
                .transpose()?;
            let dedup = Dedup::decide(open, e.severity);
            retarget(audit, verdict, e.id, &dedup);
            match dedup {
                Dedup::Create => create(tx, e).await,
                Dedup::Attach(o) => Ok(Escalated::Attached(o)),
                Dedup::Raise(o) => raise(tx, o.id, e.severity).await,
            }
        }
    }
}

async fn create(
    tx: &mut Transaction<'_, Postgres>,
    e: &Escalation,
) -> Result<Escalated, StoreError> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO escalations (id, practice_id, patient_id, conversation_id, channel, tier,
             rule_id, reason_code, severity, state, utterance_id, created_at_ms, updated_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
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
         VALUES ($1, $2, $3, $4, $4)",
    )
    .bind(e.id.to_string())
    .bind(e.severity.code())
    .bind(e.practice.as_str())
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
    tx: &mut Transaction<'_, Postgres>,
    id: EscalationId,
    severity: Severity,
) -> Result<Escalated, StoreError> {
    let now = now_ms();
    let practice: Option<String> = sqlx::query_scalar(
        "UPDATE escalations SET severity = $1, updated_at_ms = $2
         WHERE id = $3 AND severity < $1 RETURNING practice_id",
    )
    .bind(severity.code())
    .bind(now)
    .bind(id.to_string())
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
         VALUES ($1, $2, $3, $4, $4)",
    )
    .bind(id.to_string())
    .bind(severity.code())
    .bind(practice)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(db("queueing a page"))?;
    Ok(Escalated::Raised(open))
}

fn page_from_row(r: &PgRow, op: &'static str) -> Result<Page, StoreError> {
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
        backup_queued: r.try_get("backup_queued").map_err(db(op))?,
    })
}

fn escalation_from_row(r: &PgRow) -> Result<Escalation, StoreError> {
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

impl PgStore {
    /// Acknowledge (disposition None) or resolve; whether the escalation
    /// exists.
    async fn handle(
        &self,
        id: EscalationId,
        responder: &str,
        disposition: Option<Disposition>,
        audit: AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let now = now_ms();
        let id = id.to_string();
        // The row's own lock orders two replicas handling one escalation:
        // the second sees the first's state and changes nothing.
        let changed = match disposition {
            None => sqlx::query(
                "UPDATE escalations SET state = 'acknowledged', acknowledged_by = $1,
                     acknowledged_at_ms = $2, updated_at_ms = $2
                 WHERE id = $3 AND state = 'open'",
            )
            .bind(responder)
            .bind(now)
            .bind(&id),
            Some(d) => sqlx::query(
                "UPDATE escalations SET state = 'resolved', resolved_by = $1,
                     resolved_at_ms = $2, disposition = $4, updated_at_ms = $2
                 WHERE id = $3 AND state <> 'resolved'",
            )
            .bind(responder)
            .bind(now)
            .bind(&id)
            .bind(d.as_str()),
        }
        .execute(&mut *tx)
        .await
        .map_err(db("updating an escalation"))?
        .rows_affected();
        let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM escalations WHERE id = $1")
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("reading an escalation"))?;
        if changed > 0 {
            // Pages not yet sent have nobody left to reach.
            sqlx::query(
                "UPDATE outbox SET delivered_at_ms = $1, provider_message_id = 'cancelled',
                     claimed_by = NULL, claimed_until_ms = NULL
                 WHERE escalation_id = $2 AND delivered_at_ms IS NULL",
            )
            .bind(now)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(db("cancelling pages"))?;
            append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        }
        tx.commit().await.map_err(db("commit"))?;
        Ok(exists.is_some())
    }
}

#[async_trait]
impl Store for PgStore {
    async fn escalate(
        &self,
        write: EscalationWrite,
        audit: AuditEvent,
    ) -> Result<Escalated, StoreError> {
        let mut tx = self.begin().await?;
        let mut audit = vec![audit];
        let done = write_escalation(&mut tx, &write, &mut audit, None).await?;
        append_audit(&mut tx, &audit).await?;
        tx.commit().await.map_err(db("commit"))?;
        if !matches!(done, Escalated::Attached(_)) {
            self.pages.notify_one();
        }
        Ok(done)
    }

    async fn record_message(
        &self,
        message: &MessageId,
        verdict: &MessageVerdict,
        write: Option<EscalationWrite>,
        mut audit: Vec<AuditEvent>,
    ) -> Result<(Recorded, Option<Escalated>), StoreError> {
        const OP: &str = "recording a message";
        let mut tx = self.begin().await?;
        // The id first: a second request with it (on any replica) waits on
        // this row until the first commits, then writes nothing.
        let inserted = sqlx::query(
            "INSERT INTO messages (message_id, created_at_ms) VALUES ($1, $2)
             ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(message.as_str())
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?
        .rows_affected();
        if inserted == 0 {
            return Ok((Recorded::Duplicate, None));
        }
        let mut verdict = verdict.clone();
        let done = match &write {
            Some(w) => Some(write_escalation(&mut tx, w, &mut audit, Some(&mut verdict)).await?),
            None => None,
        };
        let directive = verdict.directive_json(OP)?;
        sqlx::query("UPDATE messages SET escalation_id = $1, directive = $2 WHERE message_id = $3")
            .bind(verdict.escalation_id.map(|e| e.to_string()))
            .bind(directive)
            .bind(message.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        append_audit(&mut tx, &audit).await?;
        tx.commit().await.map_err(db("commit"))?;
        if matches!(done, Some(Escalated::Created(_) | Escalated::Raised(_))) {
            self.pages.notify_one();
        }
        Ok((Recorded::New, done))
    }

    async fn message_verdict(
        &self,
        message: &MessageId,
    ) -> Result<Option<MessageVerdict>, StoreError> {
        const OP: &str = "reading a message verdict";
        let Some(r) =
            sqlx::query("SELECT escalation_id, directive FROM messages WHERE message_id = $1")
                .bind(message.as_str())
                .fetch_optional(&self.pool)
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
        let mut tx = self.begin().await?;
        append_audit(&mut tx, std::slice::from_ref(&event)).await?;
        tx.commit().await.map_err(db("commit"))
    }

    async fn get_escalation(&self, id: EscalationId) -> Result<Option<Escalation>, StoreError> {
        sqlx::query("SELECT * FROM escalations WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading an escalation"))?
            .as_ref()
            .map(escalation_from_row)
            .transpose()
    }

    async fn list_escalations(&self, q: &EscalationQuery) -> Result<Vec<Escalation>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM escalations
             WHERE ($1::text IS NULL OR practice_id = $1)
               AND ($2::text IS NULL OR state = $2)
               AND ($3::bigint IS NULL OR created_at_ms >= $3)
               AND ($4::bigint IS NULL OR created_at_ms < $4)
               AND ($5::bigint IS NULL OR created_at_ms < $5 OR (created_at_ms = $5 AND id < $6))
             ORDER BY created_at_ms DESC, id DESC
             LIMIT $7",
        )
        .bind(q.practice.as_ref().map(|p| p.as_str().to_string()))
        .bind(q.state.map(|s| s.as_str()))
        .bind(q.since_ms)
        .bind(q.until_ms)
        .bind(q.after.as_ref().map(|a| a.0))
        .bind(q.after.as_ref().map(|a| a.1.clone()))
        .bind(i64::from(q.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing escalations"))?;
        rows.iter().map(escalation_from_row).collect()
    }

    async fn audit_rows(&self, since_ms: i64) -> Result<Vec<AuditRow>, StoreError> {
        const OP: &str = "reading the audit log";
        let rows = sqlx::query("SELECT * FROM audit WHERE at_ms >= $1 ORDER BY seq")
            .bind(since_ms)
            .fetch_all(&self.pool)
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
        const OP: &str = "reading the audit head";
        let r = sqlx::query("SELECT seq, hash FROM audit_head WHERE one = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(db(OP))?;
        match r {
            Some(r) => Ok((
                r.try_get("seq").map_err(db(OP))?,
                r.try_get("hash").map_err(db(OP))?,
            )),
            None => Ok((0, GENESIS.to_string())),
        }
    }

    async fn due_pages(&self, now_ms: i64, limit: u32) -> Result<Vec<Page>, StoreError> {
        const OP: &str = "reading due pages";
        let rows = sqlx::query(
            "SELECT o.id, o.escalation_id, o.severity, o.practice_id, o.attempts, o.created_at_ms,
                    o.target, o.backup_queued, e.tier, e.patient_id
             FROM outbox o JOIN escalations e ON e.id = o.escalation_id
             WHERE o.delivered_at_ms IS NULL AND o.next_attempt_at_ms <= $1
             ORDER BY o.next_attempt_at_ms, o.id LIMIT $2",
        )
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
        const OP: &str = "claiming due pages";
        // Rows another replica is claiming right now are skipped, not
        // waited for; a row claimed and committed meanwhile is re-checked
        // under its lock and no longer matches.
        let rows = sqlx::query(
            "WITH claimed AS (
                 UPDATE outbox SET claimed_by = $1, claimed_until_ms = $2
                 WHERE id IN (
                     SELECT id FROM outbox
                     WHERE delivered_at_ms IS NULL AND next_attempt_at_ms <= $3
                       AND (claimed_until_ms IS NULL OR claimed_until_ms <= $3)
                     ORDER BY next_attempt_at_ms, id LIMIT $4
                     FOR UPDATE SKIP LOCKED)
                 RETURNING *)
             SELECT c.id, c.escalation_id, c.severity, c.practice_id, c.attempts,
                    c.created_at_ms, c.target, c.backup_queued, e.tier, e.patient_id
             FROM claimed c JOIN escalations e ON e.id = c.escalation_id
             ORDER BY c.next_attempt_at_ms, c.id",
        )
        .bind(&self.claimant)
        .bind(now_ms.saturating_add(lease_ms))
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db(OP))?;
        rows.iter().map(|r| page_from_row(r, OP)).collect()
    }

    async fn page_delivered(
        &self,
        delivery: Delivery,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE outbox SET delivered_at_ms = $1, attempts = attempts + 1,
                 clinician_id = $2, provider_message_id = $3,
                 claimed_by = NULL, claimed_until_ms = NULL
             WHERE id = $4",
        )
        .bind(delivery.at_ms)
        .bind(&delivery.clinician_id)
        .bind(&delivery.provider_message_id)
        .bind(delivery.page)
        .execute(&mut *tx)
        .await
        .map_err(db("marking a page delivered"))?;
        append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await.map_err(db("commit"))
    }

    async fn page_failed(&self, page: i64, retry_at_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, next_attempt_at_ms = $1,
                 claimed_by = NULL, claimed_until_ms = NULL
             WHERE id = $2",
        )
        .bind(retry_at_ms)
        .bind(page)
        .execute(&self.pool)
        .await
        .map_err(db("marking a page failed"))?;
        Ok(())
    }

    async fn acknowledge(
        &self,
        id: EscalationId,
        responder: &str,
        audit: AuditEvent,
    ) -> Result<Option<Escalation>, StoreError> {
        if !self.handle(id, responder, None, audit).await? {
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
        if !self.handle(id, responder, Some(disposition), audit).await? {
            return Ok(None);
        }
        self.get_escalation(id).await
    }

    async fn repage(&self, now: i64, policy: RepagePolicy) -> Result<usize, StoreError> {
        let mut tx = self.begin().await?;
        // Locked and moved on in this transaction: a replica re-paging at
        // the same moment skips these rows, and one that comes after sees
        // them no longer due.
        let due = sqlx::query(
            "SELECT id, severity, practice_id, page_rounds FROM escalations
             WHERE state = 'open' AND page_rounds < $1
               AND COALESCE(next_repage_at_ms, created_at_ms + $2) <= $3
             FOR UPDATE SKIP LOCKED",
        )
        .bind(i64::from(policy.max_rounds))
        .bind(policy.ack_timeout_ms)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("finding escalations to re-page"))?;
        if due.is_empty() {
            tx.rollback().await.map_err(db("re-paging"))?;
            return Ok(0);
        }
        let mut audit = Vec::with_capacity(due.len());
        for row in &due {
            let id: String = row.try_get("id").map_err(db("re-paging"))?;
            let severity: i64 = row.try_get("severity").map_err(db("re-paging"))?;
            let practice: String = row.try_get("practice_id").map_err(db("re-paging"))?;
            let rounds: i64 = row.try_get("page_rounds").map_err(db("re-paging"))?;
            sqlx::query(
                "INSERT INTO outbox (escalation_id, severity, practice_id, created_at_ms,
                     next_attempt_at_ms, target, backup_queued)
                 VALUES ($1, $2, $3, $4, $4, 'primary', true), ($1, $2, $3, $4, $4, 'backup', true)",
            )
            .bind(&id)
            .bind(severity)
            .bind(&practice)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db("queueing a re-page"))?;
            sqlx::query(
                "UPDATE escalations SET page_rounds = page_rounds + 1, next_repage_at_ms = $1
                 WHERE id = $2",
            )
            .bind(now + policy.ack_timeout_ms)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(db("re-paging"))?;
            audit.push(AuditEvent {
                actor: "crisisd".to_string(),
                request_id: uuid::Uuid::now_v7().to_string(),
                action: "escalation.repage".to_string(),
                subject: format!("escalation:{id}"),
                detail: serde_json::json!({ "round": rounds + 1, "reason": "not acknowledged" }),
            });
        }
        append_audit(&mut tx, &audit).await?;
        tx.commit().await.map_err(db("commit"))?;
        self.pages.notify_one();
        Ok(due.len())
    }

    async fn page_backup(&self, page: &Page, audit: AuditEvent) -> Result<(), StoreError> {
        const OP: &str = "queueing a backup page";
        let mut tx = self.begin().await?;
        let marked = sqlx::query(
            "UPDATE outbox SET backup_queued = true WHERE id = $1 AND NOT backup_queued",
        )
        .bind(page.id)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?
        .rows_affected();
        if marked > 0 {
            let now = now_ms();
            sqlx::query(
                "INSERT INTO outbox (escalation_id, severity, practice_id, created_at_ms,
                     next_attempt_at_ms, target, backup_queued)
                 VALUES ($1, $2, $3, $4, $4, 'backup', true)",
            )
            .bind(page.escalation_id.to_string())
            .bind(page.severity.code())
            .bind(&page.practice)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
            append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        }
        tx.commit().await.map_err(db("commit"))?;
        if marked > 0 {
            self.pages.notify_one();
        }
        Ok(())
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
            .fetch_optional(&self.pool)
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
        .fetch_one(&self.pool)
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

    async fn appointment_answer(
        &self,
        practice: &PracticeId,
        event: &AppointmentEventId,
    ) -> Result<Option<AppointmentAnswer>, StoreError> {
        const OP: &str = "reading an appointment answer";
        let a: Option<String> = sqlx::query_scalar(
            "SELECT answer FROM appointment_answers WHERE practice_id = $1 AND event_id = $2",
        )
        .bind(practice.as_str())
        .bind(event.as_str())
        .fetch_optional(&self.pool)
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
             FROM appointment_events
             WHERE practice_id = $1 AND patient_id = $2 AND occurred_at_ms >= $3",
        )
        .bind(practice)
        .bind(patient)
        .bind(events_since_ms)
        .fetch_all(&self.pool)
        .await
        .map_err(db(OP))?
        .iter()
        .map(event_from_row)
        .collect::<Result<Vec<_>, _>>()?;
        let mut escalations = Vec::new();
        for r in sqlx::query(
            "SELECT created_at_ms, tier FROM escalations
             WHERE practice_id = $1 AND patient_id = $2 AND created_at_ms >= $3",
        )
        .bind(practice)
        .bind(patient)
        .bind(escalations_since_ms)
        .fetch_all(&self.pool)
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
             WHERE practice_id = $1 AND patient_id = $2 ORDER BY started_at_ms DESC LIMIT $3",
        )
        .bind(practice)
        .bind(patient)
        .bind(CALLS_PER_PATIENT)
        .fetch_all(&self.pool)
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
            "SELECT rule_id, anchor_at_ms FROM behavior_firings
             WHERE practice_id = $1 AND patient_id = $2",
        )
        .bind(practice)
        .bind(patient)
        .fetch_all(&self.pool)
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
        mut rec: AppointmentRecord,
    ) -> Result<(Recorded, AppointmentAnswer), StoreError> {
        const OP: &str = "recording an appointment event";
        let now = now_ms();
        let mut tx = self.begin().await?;
        let (practice, patient) = (
            rec.practice.as_str().to_string(),
            rec.patient.expose().to_string(),
        );
        // The event id first: the same event on another replica waits on
        // this row until the first commits, then takes its answer.
        let inserted = sqlx::query(
            "INSERT INTO appointment_answers (practice_id, event_id, answer, received_at_ms)
             VALUES ($1, $2, '', $3) ON CONFLICT (practice_id, event_id) DO NOTHING",
        )
        .bind(&practice)
        .bind(rec.event.id.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?
        .rows_affected();
        if inserted == 0 {
            drop(tx);
            let first = self
                .appointment_answer(&rec.practice, &rec.event.id)
                .await?
                .ok_or_else(|| corrupt(OP, "a repeated event without its answer"))?;
            return Ok((Recorded::Duplicate, first));
        }
        let mut outcome = None;
        if let Some(write) = &rec.write {
            let e = write_escalation(&mut tx, write, &mut rec.audit, None).await?;
            rec.answer.escalation_id = Some(e.open().id.to_string());
            outcome = Some(e);
        }
        let answer = serde_json::to_string(&rec.answer).map_err(|e| corrupt(OP, e.to_string()))?;
        sqlx::query(
            "UPDATE appointment_answers SET answer = $1 WHERE practice_id = $2 AND event_id = $3",
        )
        .bind(&answer)
        .bind(&practice)
        .bind(rec.event.id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        let e = &rec.event;
        sqlx::query(
            "INSERT INTO appointment_events (practice_id, patient_id, event_id, appointment_id, kind,
                 initiator, occurred_at_ms, scheduled_for_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (practice_id, event_id) DO NOTHING",
        )
        .bind(&practice)
        .bind(&patient)
        .bind(e.id.as_str())
        .bind(e.appointment.as_str())
        .bind(e.kind.as_str())
        .bind(e.initiator.map(tier3::Initiator::as_str))
        .bind(e.occurred_at_ms)
        .bind(e.scheduled_for_ms)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        for f in &rec.firings {
            sqlx::query(
                "INSERT INTO behavior_firings (practice_id, patient_id, rule_id, anchor_event, anchor_at_ms)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(&practice)
            .bind(&patient)
            .bind(&f.rule_id)
            .bind(&f.anchor_event)
            .bind(f.anchor_at_ms)
            .execute(&mut *tx)
            .await
            .map_err(db(OP))?;
        }
        let directs = matches!(outcome, Some(Escalated::Created(_) | Escalated::Raised(_)));
        let mut queued = false;
        if let Some(d) = rec.directive.as_mut().filter(|_| directs) {
            if let Some(o) = outcome {
                d.directive.escalation_id = o.open().id.to_string();
            }
            let body =
                serde_json::to_string(&d.directive).map_err(|e| corrupt(OP, e.to_string()))?;
            sqlx::query(
                "INSERT INTO directive_outbox (directive_id, practice_id, patient_id, escalation_id,
                     directive, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&d.directive_id)
            .bind(d.practice.as_str())
            .bind(d.patient.expose())
            .bind(&d.directive.escalation_id)
            .bind(body)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db("queueing a directive"))?;
            queued = true;
        }
        sqlx::query(
            "DELETE FROM appointment_events WHERE practice_id = $1 AND patient_id = $2
               AND (occurred_at_ms < $3 OR event_id NOT IN (
                   SELECT event_id FROM appointment_events WHERE practice_id = $1 AND patient_id = $2
                   ORDER BY occurred_at_ms DESC, event_id DESC LIMIT $4))",
        )
        .bind(&practice)
        .bind(&patient)
        .bind(rec.prune_events_before_ms)
        .bind(i64::from(rec.max_events))
        .execute(&mut *tx)
        .await
        .map_err(db("pruning appointment events"))?;
        sqlx::query(
            "DELETE FROM behavior_firings WHERE practice_id = $1 AND patient_id = $2 AND anchor_at_ms < $3",
        )
        .bind(&practice)
        .bind(&patient)
        .bind(rec.prune_firings_before_ms)
        .execute(&mut *tx)
        .await
        .map_err(db("pruning firings"))?;
        sqlx::query("DELETE FROM appointment_answers WHERE received_at_ms < $1")
            .bind(now - APPOINTMENT_DEDUP_MS)
            .execute(&mut *tx)
            .await
            .map_err(db("pruning appointment answers"))?;
        append_audit(&mut tx, &rec.audit).await?;
        tx.commit().await.map_err(db("commit"))?;
        if directs {
            self.pages.notify_one();
        }
        if queued {
            self.directives.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok((Recorded::New, rec.answer))
    }

    async fn record_call(&self, c: CallContact) -> Result<(), StoreError> {
        const OP: &str = "recording a call";
        let mut tx = self.begin().await?;
        let (practice, patient) = (c.practice.as_str(), c.patient.expose());
        sqlx::query(
            "INSERT INTO calls (practice_id, call_id, patient_id, started_at_ms, language, review)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (practice_id, call_id) DO UPDATE SET review = GREATEST(calls.review, excluded.review)",
        )
        .bind(practice)
        .bind(c.call.as_str())
        .bind(patient)
        .bind(c.started_at_ms)
        .bind(&c.language)
        .bind(i64::from(c.review))
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        sqlx::query(
            "DELETE FROM calls WHERE practice_id = $1 AND patient_id = $2 AND call_id NOT IN (
                 SELECT call_id FROM calls WHERE practice_id = $1 AND patient_id = $2
                 ORDER BY started_at_ms DESC LIMIT $3)",
        )
        .bind(practice)
        .bind(patient)
        .bind(CALLS_PER_PATIENT)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?;
        tx.commit().await.map_err(db("commit"))
    }

    async fn pending_directives(
        &self,
        practice: &PracticeId,
        limit: u32,
    ) -> Result<Vec<QueuedDirective>, StoreError> {
        sqlx::query(
            "SELECT seq, directive_id, practice_id, patient_id, directive FROM directive_outbox
             WHERE practice_id = $1 AND acknowledged_at_ms IS NULL ORDER BY seq LIMIT $2",
        )
        .bind(practice.as_str())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
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
             WHERE directive_id = $1",
        )
        .bind(directive_id)
        .fetch_optional(&self.pool)
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
        const OP: &str = "acknowledging a directive";
        let mut tx = self.begin().await?;
        let changed = sqlx::query(
            "UPDATE directive_outbox SET acknowledged_at_ms = $1, acknowledged_by = $2
             WHERE directive_id = $3 AND acknowledged_at_ms IS NULL",
        )
        .bind(now_ms())
        .bind(by)
        .bind(directive_id)
        .execute(&mut *tx)
        .await
        .map_err(db(OP))?
        .rows_affected();
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM directive_outbox WHERE directive_id = $1")
                .bind(directive_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db(OP))?;
        if changed > 0 {
            append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        }
        tx.commit().await.map_err(db("commit"))?;
        Ok(exists.is_some())
    }

    fn directives_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.directives.subscribe()
    }

    async fn probe(&self) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO probe (one, at_ms) VALUES (1, $1)
             ON CONFLICT (one) DO UPDATE SET at_ms = excluded.at_ms",
        )
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(db("probing"))?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

fn queued_from_row(r: &PgRow) -> Result<QueuedDirective, StoreError> {
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

fn event_from_row(r: &PgRow) -> Result<tier3::Event, StoreError> {
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
