//! The SQLite store's writer: one thread that owns the write connection
//! and the audit chain's head, and commits whatever is queued as one group.
//!
//! It calls SQLite directly (rusqlite, over the same bundled library sqlx
//! links), so a statement is a function call on this thread. Through sqlx
//! each statement was a round trip to the connection's own worker thread:
//! at 20,000 utterances a second, a perf profile put 55% of the server's
//! samples in those two threads, most of it context switches.
//!
//! A group is one transaction and one fsync. A write that can fail on its
//! own runs in a savepoint, so that its failure undoes only itself. No
//! write is answered before its group is durable.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::corrupt;
use crate::audit::{AuditEvent, AuditRow};
use crate::domain::Severity;
use crate::escalation::{Escalation, Open, now_ms};
use crate::ids::EscalationId;
use crate::store::{
    APPOINTMENT_DEDUP_MS, AppointmentAnswer, AppointmentRecord, CALLS_PER_PATIENT, CallContact,
    Dedup, Delivery, Escalated, EscalationWrite, MessageVerdict, Recorded, RepagePolicy,
    StoreError, retarget,
};
use crate::tier3;

/// Writes waiting for the writer. A full queue makes callers wait:
/// back-pressure, never a dropped write.
pub(super) const WRITE_QUEUE: usize = 1024;
/// Most writes committed together.
const GROUP: usize = 128;
/// Prepared statements kept: every statement the writer runs, with room.
const STATEMENTS: usize = 64;

pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { op, source }
}

/// A write, with where its answer goes.
pub(super) enum Job {
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
        disposition: Option<crate::domain::Disposition>,
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

impl Job {
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

/// The chain's head: the last row's sequence number and hash, and the
/// rows chained in the group being written but not yet inserted. They are
/// inserted together just before the group commits.
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

/// The writer, ready to run: its connection and the chain's head.
pub(super) struct Writer {
    conn: Connection,
    head: Head,
}

/// Opens the write connection on a migrated database and reads the head.
pub(super) fn open(path: &Path) -> Result<Writer, StoreError> {
    const OP: &str = "opening the writer";
    let conn = Connection::open(path).map_err(db(OP))?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(db(OP))?;
    // `synchronous` and `foreign_keys` belong to the connection, not the
    // file. The writer never checkpoints (`wal_autocheckpoint` 0): copying
    // the WAL into the database (and its fsync) would stall whichever
    // commit crossed the threshold, an escalation among them; a connection
    // of its own does it in the background.
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;
         PRAGMA wal_autocheckpoint = 0;",
    )
    .map_err(db(OP))?;
    conn.set_prepared_statement_cache_capacity(STATEMENTS);
    let (seq, hash) = conn
        .query_row("SELECT seq, hash FROM audit_head WHERE one = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .map_err(db("reading the audit head"))?;
    Ok(Writer {
        conn,
        head: Head {
            seq,
            hash,
            pending: Vec::new(),
        },
    })
}

/// What the writer tells the rest of the store after a commit.
pub(super) struct Signals {
    pub pages: Arc<Notify>,
    pub directives: Arc<watch::Sender<u64>>,
}

impl Writer {
    /// Takes what is queued, commits it, answers; until the queue closes
    /// and is empty. Blocks: it runs on a thread of its own.
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Job>, signals: &Signals) {
        let mut batch = Vec::with_capacity(GROUP);
        while let Some(job) = rx.blocking_recv() {
            batch.push(job);
            while batch.len() < GROUP {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.commit_batch(&mut batch, signals);
        }
        if let Err((_, e)) = self.conn.close() {
            tracing::warn!(error = %e, "closing the store's write connection failed");
        }
    }

    /// Commits `batch` (leaving it empty) as one group and answers each
    /// write.
    fn commit_batch(&mut self, batch: &mut Vec<Job>, signals: &Signals) {
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
        let started = Instant::now();
        let result = commit_group(&self.conn, &self.head, batch.drain(..), &mut done);
        // From BEGIN to a durable COMMIT: what every write in the group
        // waited for, the fsync included.
        metrics::histogram!("crisisd_store_commit_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(head) => {
                self.head = head;
                for d in done {
                    d.send();
                }
                if paged {
                    signals.pages.notify_one();
                }
                if directed {
                    signals.directives.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = done.len(), "committing a group of writes failed");
                let message = e.to_string();
                for d in done {
                    d.fail("commit", &message);
                }
                // A group given up, or a COMMIT that failed (a full disk),
                // may leave its transaction open: the next group would then
                // run inside it, be answered as written, and be lost.
                if !self.conn.is_autocommit()
                    && let Err(e) = self.conn.execute_batch("ROLLBACK")
                {
                    tracing::error!(error = %e, "rolling back a failed group failed");
                }
            }
        }
    }
}

/// Runs a cached statement with no parameters.
fn exec(conn: &Connection, sql: &str, op: &'static str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map(|_| ())
        .map_err(db(op))
}

fn commit_group(
    conn: &Connection,
    head: &Head,
    jobs: impl Iterator<Item = Job>,
    done: &mut Vec<Done>,
) -> Result<Head, StoreError> {
    // IMMEDIATE: the write lock from the start. A group may begin with a
    // read (the patient's open escalation); under a deferred BEGIN that
    // read's snapshot then had to be upgraded to a write, and the service
    // bench's p99 went from 4 ms to 17-28 ms.
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE", "begin") {
        // Answer every job of the group; nothing was written.
        let message = e.to_string();
        for job in jobs {
            job_reply(job).fail("begin", &message);
        }
        return Err(e);
    }
    let mut h = head.clone();
    let mut jobs = jobs;
    while let Some(job) = jobs.next() {
        // The jobs that can fail only with the database (an audit row, a
        // call, a page's delivery, the probe) need no savepoint: if they
        // fail, the whole group goes.
        let isolated = job.isolated();
        if isolated && let Err(e) = exec(conn, "SAVEPOINT job", "savepoint") {
            done.push(job_reply(job));
            return Err(abandon(done, jobs, e));
        }
        let before = h.mark();
        let (reply, outcome) = run_job(conn, &mut h, job);
        let step = match (&outcome, isolated) {
            (Ok(_), true) => exec(conn, "RELEASE job", "savepoint"),
            (Ok(_), false) => Ok(()),
            (Err(_), true) => {
                h.reset(before);
                exec(conn, "ROLLBACK TO job", "savepoint")
                    .and_then(|()| exec(conn, "RELEASE job", "savepoint"))
            }
            (Err(e), false) => Err(corrupt("write", e.to_string())),
        };
        done.push(Done(reply, outcome));
        if let Err(e) = step {
            return Err(abandon(done, jobs, e));
        }
    }
    insert_audit(conn, &h)?;
    exec(conn, "COMMIT", "commit")?;
    h.pending.clear();
    Ok(h)
}

/// The group is given up: the jobs not yet run join those done, and all of
/// them are answered with the error (nothing of the group commits).
fn abandon(done: &mut Vec<Done>, rest: impl Iterator<Item = Job>, e: StoreError) -> StoreError {
    done.extend(rest.map(job_reply));
    e
}

/// Runs one job inside the group's transaction.
fn run_job(conn: &Connection, head: &mut Head, job: Job) -> (JobReply, Result<Out, StoreError>) {
    match job {
        Job::Escalate {
            write,
            audit,
            reply,
        } => {
            let mut audit = vec![audit];
            let r = write_escalation(conn, &write, &mut audit, None).map(|done| {
                head.append(&audit);
                Out::Escalated(done)
            });
            (JobReply::Escalated(reply), r)
        }
        Job::Audit { event, reply } => {
            head.append(std::slice::from_ref(&event));
            (JobReply::Unit(reply), Ok(Out::Unit))
        }
        Job::Message {
            message,
            mut verdict,
            write,
            mut audit,
            reply,
        } => {
            let r = record_message(conn, &message, &mut verdict, write.as_ref(), &mut audit).map(
                |(recorded, done)| {
                    if recorded == Recorded::New {
                        head.append(&audit);
                    }
                    Out::Message(recorded, done)
                },
            );
            (JobReply::Message(reply), r)
        }
        Job::PageDelivered {
            delivery,
            audit,
            reply,
        } => {
            let r = conn
                .prepare_cached(
                    "UPDATE outbox SET delivered_at_ms = ?, attempts = attempts + 1,
                         clinician_id = ?, provider_message_id = ?
                     WHERE id = ?",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        delivery.at_ms,
                        delivery.clinician_id,
                        delivery.provider_message_id,
                        delivery.page
                    ])
                })
                .map_err(db("marking a page delivered"))
                .map(|_| {
                    head.append(std::slice::from_ref(&audit));
                    Out::Unit
                });
            (JobReply::Unit(reply), r)
        }
        Job::PageFailed {
            page,
            retry_at_ms,
            reply,
        } => {
            let r = conn
                .prepare_cached(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at_ms = ? WHERE id = ?",
                )
                .and_then(|mut s| s.execute(params![retry_at_ms, page]))
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
            let r = handle(conn, &id, &responder, disposition).map(|(changed, exists)| {
                if changed {
                    head.append(std::slice::from_ref(&audit));
                }
                Out::Value(u64::from(exists))
            });
            (JobReply::Value(reply), r)
        }
        Job::Repage {
            now_ms: now,
            policy,
            reply,
        } => {
            let r = repage(conn, head, now, policy).map(Out::Value);
            (JobReply::Value(reply), r)
        }
        Job::Appointment { record, reply } => {
            let r =
                record_appointment(conn, head, *record).map(|(rec, a)| Out::Appointment(rec, a));
            (JobReply::Appointment(reply), r)
        }
        Job::Call { call, reply } => {
            let r = record_call(conn, &call).map(|()| Out::Unit);
            (JobReply::Unit(reply), r)
        }
        Job::Probe { reply } => {
            // A table of its own, made on first use: the probe needs no
            // schema version and touches nothing else.
            let r = conn
                .execute_batch(
                    "CREATE TABLE IF NOT EXISTS probe (one INTEGER PRIMARY KEY CHECK (one = 1), at_ms INTEGER NOT NULL)",
                )
                .and_then(|()| {
                    conn.prepare_cached(
                        "INSERT INTO probe (one, at_ms) VALUES (1, ?)
                         ON CONFLICT (one) DO UPDATE SET at_ms = excluded.at_ms",
                    )?
                    .execute([now_ms()])
                })
                .map(|_| Out::Unit)
                .map_err(db("probing"));
            (JobReply::Unit(reply), r)
        }
        Job::AckDirective {
            id,
            by,
            audit,
            reply,
        } => {
            let r = ack_directive(conn, &id, &by).map(|(changed, exists)| {
                if changed {
                    head.append(std::slice::from_ref(&audit));
                }
                Out::Value(u64::from(exists))
            });
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
            let r = page_backup(conn, page, &escalation_id, severity, &practice).map(|queued| {
                if queued {
                    head.append(std::slice::from_ref(&audit));
                }
                Out::Unit
            });
            (JobReply::Unit(reply), r)
        }
    }
}

/// Whether a cached query with these parameters returns a row.
fn exists(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    op: &'static str,
) -> Result<bool, StoreError> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.exists(params))
        .map_err(db(op))
}

fn record_message(
    conn: &Connection,
    message: &str,
    verdict: &mut MessageVerdict,
    write: Option<&EscalationWrite>,
    audit: &mut Vec<AuditEvent>,
) -> Result<(Recorded, Option<Escalated>), StoreError> {
    const OP: &str = "recording a message";
    // The only writer: nothing can record this id between this check and
    // the insert below.
    if exists(
        conn,
        "SELECT 1 FROM messages WHERE message_id = ?",
        [message],
        OP,
    )? {
        // Seen before: the first verdict stands, nothing changes.
        return Ok((Recorded::Duplicate, None));
    }
    // The escalation before the verdict: a dedup retargets it.
    let done = match write {
        Some(write) => Some(write_escalation(conn, write, audit, Some(verdict))?),
        None => None,
    };
    let directive = verdict.directive_json(OP)?;
    conn.prepare_cached(
        "INSERT INTO messages (message_id, escalation_id, directive, created_at_ms)
         VALUES (?, ?, ?, ?)",
    )
    .and_then(|mut s| {
        s.execute(params![
            message,
            verdict.escalation_id.map(|e| e.to_string()),
            directive,
            now_ms()
        ])
    })
    .map_err(db(OP))?;
    Ok((Recorded::New, done))
}

/// Acknowledges (no disposition) or resolves; whether it changed anything,
/// and whether the escalation exists.
fn handle(
    conn: &Connection,
    id: &str,
    responder: &str,
    disposition: Option<crate::domain::Disposition>,
) -> Result<(bool, bool), StoreError> {
    let now = now_ms();
    let changed = match disposition {
        None => conn
            .prepare_cached(
                "UPDATE escalations SET state = 'acknowledged', acknowledged_by = ?,
                     acknowledged_at_ms = ?, updated_at_ms = ?
                 WHERE id = ? AND state = 'open'",
            )
            .and_then(|mut s| s.execute(params![responder, now, now, id])),
        Some(d) => conn
            .prepare_cached(
                "UPDATE escalations SET state = 'resolved', resolved_by = ?,
                     resolved_at_ms = ?, disposition = ?, updated_at_ms = ?
                 WHERE id = ? AND state <> 'resolved'",
            )
            .and_then(|mut s| s.execute(params![responder, now, d.as_str(), now, id])),
    }
    .map_err(db("updating an escalation"))?
        > 0;
    let found = exists(
        conn,
        "SELECT 1 FROM escalations WHERE id = ?",
        [id],
        "reading an escalation",
    )?;
    if changed {
        // Pages not yet sent have nobody left to reach.
        conn.prepare_cached(
            "UPDATE outbox SET delivered_at_ms = ?, provider_message_id = 'cancelled'
             WHERE escalation_id = ? AND delivered_at_ms IS NULL",
        )
        .and_then(|mut s| s.execute(params![now, id]))
        .map_err(db("cancelling pages"))?;
    }
    Ok((changed, found))
}

/// Queues the next round of pages for escalations nobody acknowledged in
/// time; how many.
fn repage(
    conn: &Connection,
    head: &mut Head,
    now: i64,
    policy: RepagePolicy,
) -> Result<u64, StoreError> {
    const OP: &str = "re-paging";
    let due: Vec<(String, i64, String, i64)> = conn
        .prepare_cached(
            "SELECT id, severity, practice_id, page_rounds FROM escalations
             WHERE state = 'open' AND page_rounds < ?
               AND COALESCE(next_repage_at_ms, created_at_ms + ?) <= ?",
        )
        .and_then(|mut s| {
            s.query_map(
                params![i64::from(policy.max_rounds), policy.ack_timeout_ms, now],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?
            .collect()
        })
        .map_err(db("finding escalations to re-page"))?;
    for (id, severity, practice, rounds) in &due {
        for target in ["primary", "backup"] {
            conn.prepare_cached(
                "INSERT INTO outbox (escalation_id, severity, practice_id, created_at_ms,
                     next_attempt_at_ms, target, backup_queued)
                 VALUES (?, ?, ?, ?, ?, ?, 1)",
            )
            .and_then(|mut s| s.execute(params![id, severity, practice, now, now, target]))
            .map_err(db("queueing a re-page"))?;
        }
        conn.prepare_cached(
            "UPDATE escalations SET page_rounds = page_rounds + 1, next_repage_at_ms = ?
             WHERE id = ?",
        )
        .and_then(|mut s| s.execute(params![now + policy.ack_timeout_ms, id]))
        .map_err(db(OP))?;
        let audit = AuditEvent {
            actor: "crisisd".to_string(),
            request_id: uuid::Uuid::now_v7().to_string(),
            action: "escalation.repage".to_string(),
            subject: format!("escalation:{id}"),
            detail: serde_json::json!({ "round": rounds + 1, "reason": "not acknowledged" }),
        };
        head.append(std::slice::from_ref(&audit));
    }
    Ok(due.len() as u64)
}

/// Marks a directive received by a gateway; whether it changed anything,
/// and whether the directive exists.
fn ack_directive(conn: &Connection, id: &str, by: &str) -> Result<(bool, bool), StoreError> {
    const OP: &str = "acknowledging a directive";
    let changed = conn
        .prepare_cached(
            "UPDATE directive_outbox SET acknowledged_at_ms = ?, acknowledged_by = ?
             WHERE directive_id = ? AND acknowledged_at_ms IS NULL",
        )
        .and_then(|mut s| s.execute(params![now_ms(), by, id]))
        .map_err(db(OP))?
        > 0;
    let found = exists(
        conn,
        "SELECT 1 FROM directive_outbox WHERE directive_id = ?",
        [id],
        OP,
    )?;
    Ok((changed, found))
}

/// Queues a page to the backup, once per page; whether it queued one.
fn page_backup(
    conn: &Connection,
    page: i64,
    escalation_id: &str,
    severity: i64,
    practice: &str,
) -> Result<bool, StoreError> {
    const OP: &str = "queueing a backup page";
    let marked = conn
        .prepare_cached("UPDATE outbox SET backup_queued = 1 WHERE id = ? AND backup_queued = 0")
        .and_then(|mut s| s.execute([page]))
        .map_err(db(OP))?;
    if marked == 0 {
        return Ok(false);
    }
    let now = now_ms();
    conn.prepare_cached(
        "INSERT INTO outbox (escalation_id, severity, practice_id, created_at_ms,
             next_attempt_at_ms, target, backup_queued)
         VALUES (?, ?, ?, ?, ?, 'backup', 1)",
    )
    .and_then(|mut s| s.execute(params![escalation_id, severity, practice, now, now]))
    .map_err(db(OP))?;
    Ok(true)
}

/// Inserts the group's chained rows and moves the head row to the last.
fn insert_audit(conn: &Connection, head: &Head) -> Result<(), StoreError> {
    const OP: &str = "appending to the audit log";
    let Some(last) = head.pending.last() else {
        return Ok(());
    };
    // One cached statement, run per row: a call here, not a round trip.
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO audit (seq, at_ms, actor, request_id, action, subject, detail, prev_hash, hash)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .map_err(db(OP))?;
    for row in &head.pending {
        insert
            .execute(params![
                row.seq,
                row.at_ms,
                row.actor,
                row.request_id,
                row.action,
                row.subject,
                row.detail,
                row.prev_hash,
                row.hash
            ])
            .map_err(db(OP))?;
    }
    conn.prepare_cached("UPDATE audit_head SET seq = ?, hash = ? WHERE one = 1")
        .and_then(|mut s| s.execute(params![last.seq, last.hash]))
        .map_err(db("moving the audit head"))?;
    Ok(())
}

fn record_appointment(
    conn: &Connection,
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
    let first: Option<String> = conn
        .prepare_cached(
            "SELECT answer FROM appointment_answers WHERE practice_id = ? AND event_id = ?",
        )
        .and_then(|mut s| {
            s.query_row(params![practice, rec.event.id.as_str()], |r| r.get(0))
                .optional()
        })
        .map_err(db(OP))?;
    if let Some(first) = first {
        let a = serde_json::from_str(&first).map_err(|_| corrupt(OP, "bad answer"))?;
        return Ok((Recorded::Duplicate, a));
    }
    // The escalation first: whether it opens, raises or attaches (decided
    // here, under the writer) sets the answer and whether a directive goes.
    let mut outcome = None;
    if let Some(write) = &rec.write {
        let e = write_escalation(conn, write, &mut rec.audit, None)?;
        rec.answer.escalation_id = Some(e.open().id.to_string());
        outcome = Some(e);
    }
    let answer = serde_json::to_string(&rec.answer).map_err(|e| corrupt(OP, e.to_string()))?;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO appointment_answers (practice_id, event_id, answer, received_at_ms)
             VALUES (?, ?, ?, ?) ON CONFLICT (practice_id, event_id) DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![practice, rec.event.id.as_str(), answer, now]))
        .map_err(db(OP))?;
    if inserted == 0 {
        return Err(corrupt(OP, "an answer appeared under the writer"));
    }
    let e = &rec.event;
    conn.prepare_cached(
        "INSERT INTO appointment_events (practice_id, patient_id, event_id, appointment_id, kind,
             initiator, occurred_at_ms, scheduled_for_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (practice_id, event_id) DO NOTHING",
    )
    .and_then(|mut s| {
        s.execute(params![
            practice,
            patient,
            e.id.as_str(),
            e.appointment.as_str(),
            e.kind.as_str(),
            e.initiator.map(tier3::Initiator::as_str),
            e.occurred_at_ms,
            e.scheduled_for_ms
        ])
    })
    .map_err(db(OP))?;
    for f in &rec.firings {
        conn.prepare_cached(
            "INSERT INTO behavior_firings (practice_id, patient_id, rule_id, anchor_event, anchor_at_ms)
             VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .and_then(|mut s| {
            s.execute(params![
                practice,
                patient,
                f.rule_id,
                f.anchor_event,
                f.anchor_at_ms
            ])
        })
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
        conn.prepare_cached(
            "INSERT INTO directive_outbox (directive_id, practice_id, patient_id, escalation_id,
                 directive, created_at_ms)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .and_then(|mut s| {
            s.execute(params![
                d.directive_id,
                d.practice.as_str(),
                d.patient.expose(),
                d.directive.escalation_id,
                body,
                now
            ])
        })
        .map_err(db("queueing a directive"))?;
    }
    // Bounded per patient: nothing older than the longest window is read,
    // and never more events than that window could need.
    conn.prepare_cached(&prune_events(rec.max_events))
        .and_then(|mut s| s.execute(params![practice, patient, rec.prune_events_before_ms]))
        .map_err(db("pruning appointment events"))?;
    conn.prepare_cached(
        "DELETE FROM behavior_firings WHERE practice_id = ? AND patient_id = ? AND anchor_at_ms < ?",
    )
    .and_then(|mut s| s.execute(params![practice, patient, rec.prune_firings_before_ms]))
    .map_err(db("pruning firings"))?;
    conn.prepare_cached("DELETE FROM appointment_answers WHERE received_at_ms < ?")
        .and_then(|mut s| s.execute([now - APPOINTMENT_DEDUP_MS]))
        .map_err(db("pruning appointment answers"))?;
    head.append(&rec.audit);
    Ok((Recorded::New, rec.answer))
}

fn record_call(conn: &Connection, c: &CallContact) -> Result<(), StoreError> {
    const OP: &str = "recording a call";
    let (practice, patient) = (c.practice.as_str(), c.patient.expose());
    conn.prepare_cached(
        "INSERT INTO calls (practice_id, call_id, patient_id, started_at_ms, language, review)
         VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (practice_id, call_id) DO UPDATE SET review = MAX(review, excluded.review)",
    )
    .and_then(|mut s| {
        s.execute(params![
            practice,
            c.call.as_str(),
            patient,
            c.started_at_ms,
            c.language,
            i64::from(c.review)
        ])
    })
    .map_err(db(OP))?;
    conn.prepare_cached(&PRUNE_CALLS)
        .and_then(|mut s| s.execute(params![practice, patient]))
        .map_err(db(OP))?;
    Ok(())
}

/// The calls kept per patient, the limit written into the text: SQLite
/// prepares a statement again on every run when its `IN (SELECT .. LIMIT
/// ?)` takes the limit as a parameter (`SQLITE_STMTSTATUS_REPREPARE`
/// counts one a run), and that was 8% of the server's time in closed loop.
static PRUNE_CALLS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "DELETE FROM calls WHERE practice_id = ?1 AND patient_id = ?2 AND call_id NOT IN (
             SELECT call_id FROM calls WHERE practice_id = ?1 AND patient_id = ?2
             ORDER BY started_at_ms DESC LIMIT {CALLS_PER_PATIENT})"
    )
});

/// The appointment events kept per patient; the limit in the text, as in
/// [`PRUNE_CALLS`] (it comes from the rules, the same for every event).
fn prune_events(max_events: u32) -> String {
    format!(
        "DELETE FROM appointment_events WHERE practice_id = ?1 AND patient_id = ?2
           AND (occurred_at_ms < ?3 OR event_id NOT IN (
               SELECT event_id FROM appointment_events WHERE practice_id = ?1 AND patient_id = ?2
               ORDER BY occurred_at_ms DESC, event_id DESC LIMIT {max_events}))"
    )
}

/// The patient's most recent escalation still open or acknowledged and
/// created since `since_ms`; read inside the writer's transaction, so
/// nothing can open another for the patient before this write commits.
fn open_in_tx(
    conn: &Connection,
    e: &Escalation,
    since_ms: i64,
) -> Result<Option<Open>, StoreError> {
    const OP: &str = "finding the patient's open escalation";
    let row: Option<(String, i64)> = conn
        .prepare_cached(super::OPEN_FOR_PATIENT)
        .and_then(|mut s| {
            s.query_row(
                params![e.practice.as_str(), e.patient.expose(), since_ms],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
        .map_err(db(OP))?;
    let Some((id, severity)) = row else {
        return Ok(None);
    };
    Ok(Some(Open {
        id: EscalationId::parse(&id).map_err(|_| corrupt(OP, "bad escalation id"))?,
        severity: Severity::from_code(severity).ok_or_else(|| corrupt(OP, "bad severity"))?,
    }))
}

/// Writes an escalation (or attaches it to the patient's open one, see
/// [`EscalationWrite::CreateUnlessOpen`]); `audit` and `verdict` are
/// retargeted to match.
fn write_escalation(
    conn: &Connection,
    write: &EscalationWrite,
    audit: &mut Vec<AuditEvent>,
    verdict: Option<&mut MessageVerdict>,
) -> Result<Escalated, StoreError> {
    match write {
        EscalationWrite::Create(e) => create(conn, e),
        EscalationWrite::Raise { id, severity } => raise(conn, *id, *severity),
        EscalationWrite::CreateUnlessOpen {
            escalation,
            since_ms,
        } => {
            let open = open_in_tx(conn, escalation, *since_ms)?;
            let dedup = Dedup::decide(open, escalation.severity);
            retarget(audit, verdict, escalation.id, &dedup);
            match dedup {
                Dedup::Create => create(conn, escalation),
                Dedup::Attach(o) => Ok(Escalated::Attached(o)),
                Dedup::Raise(o) => raise(conn, o.id, escalation.severity),
            }
        }
    }
}

fn create(conn: &Connection, e: &Escalation) -> Result<Escalated, StoreError> {
    let now = now_ms();
    let id = e.id.to_string();
    conn.prepare_cached(
        "INSERT INTO escalations (id, practice_id, patient_id, conversation_id, channel, tier,
             rule_id, reason_code, severity, state, utterance_id, created_at_ms, updated_at_ms)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .and_then(|mut s| {
        s.execute(params![
            id,
            e.practice.as_str(),
            e.patient.expose(),
            e.origin.id(),
            e.origin.channel(),
            e.tier.code(),
            e.rule_id,
            e.reason_code,
            e.severity.code(),
            e.state.as_str(),
            e.utterance_id,
            e.created_at_ms,
            now
        ])
    })
    .map_err(db("recording an escalation"))?;
    queue_page(conn, &id, e.severity, e.practice.as_str(), now)?;
    Ok(Escalated::Created(Open {
        id: e.id,
        severity: e.severity,
    }))
}

fn queue_page(
    conn: &Connection,
    id: &str,
    severity: Severity,
    practice: &str,
    now: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO outbox (escalation_id, severity, practice_id, created_at_ms, next_attempt_at_ms)
         VALUES (?, ?, ?, ?, ?)",
    )
    .and_then(|mut s| s.execute(params![id, severity.code(), practice, now, now]))
    .map(|_| ())
    .map_err(db("queueing a page"))
}

fn raise(conn: &Connection, id: EscalationId, severity: Severity) -> Result<Escalated, StoreError> {
    let now = now_ms();
    let key = id.to_string();
    let practice: Option<String> = conn
        .prepare_cached(
            "UPDATE escalations SET severity = ?, updated_at_ms = ?
             WHERE id = ? AND severity < ? RETURNING practice_id",
        )
        .and_then(|mut s| {
            s.query_row(params![severity.code(), now, key, severity.code()], |r| {
                r.get(0)
            })
            .optional()
        })
        .map_err(db("raising an escalation"))?;
    let open = Open { id, severity };
    // Already at or above this severity: nothing to page again.
    let Some(practice) = practice else {
        return Ok(Escalated::Attached(open));
    };
    queue_page(conn, &key, severity, &practice, now)?;
    Ok(Escalated::Raised(open))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of each pruning statement must not prepare it again: that
    /// is the cost their limits were written into the text to avoid.
    #[test]
    fn the_pruning_statements_are_prepared_once() {
        let conn = Connection::open_in_memory().expect("an in-memory database");
        for step in super::super::MIGRATIONS {
            conn.execute_batch(step).expect("a migration step");
        }
        for i in 0..3 {
            let patient = format!("p{i}");
            conn.prepare_cached(&PRUNE_CALLS)
                .and_then(|mut s| s.execute(params!["practice", patient]))
                .expect("pruning calls");
            conn.prepare_cached(&prune_events(40))
                .and_then(|mut s| s.execute(params!["practice", patient, 0]))
                .expect("pruning events");
        }
        for sql in [PRUNE_CALLS.clone(), prune_events(40)] {
            let s = conn.prepare_cached(&sql).expect("cached");
            assert_eq!(s.get_status(rusqlite::StatementStatus::Run), 3, "{sql}");
            assert_eq!(
                s.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "prepared again on a run: {sql}"
            );
        }
    }
}
