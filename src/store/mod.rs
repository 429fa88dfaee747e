//! Durable state: escalations, their outbox of pages, message verdicts and
//! the audit log.
//!
//! One seam, the [`Store`] trait, with SQLite as the embedded default and
//! PostgreSQL for several replicas sharing one database. Every write that changes
//! what happened to a patient is one transaction: the escalation, its page
//! in the outbox and its audit row commit together or not at all, before
//! the service answers.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use thiserror::Error;

use crate::audit::{AuditEvent, AuditRow};
use crate::domain::{Disposition, EscalationState, Severity, Tier};
use crate::escalation::{Directive, Escalation, Open};
use crate::ids::{AppointmentEventId, CallId, EscalationId, MessageId, PatientId, PracticeId};
use crate::tier3;

#[derive(Debug, Error)]
pub enum StoreError {
    /// The database failed; the message names the operation, not the data.
    #[error("store {op}: {source}")]
    Db {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// The SQLite writer failed; as `Db`, the operation, not the data.
    #[error("store {op}: {source}")]
    Sqlite {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store {op}: {message}")]
    Corrupt { op: &'static str, message: String },
    #[error("opening the store at {path}: {message}")]
    Open { path: String, message: String },
    /// Connecting to PostgreSQL; never names the URL (it may hold a
    /// password).
    #[error("connecting to the database (store.url): {source}")]
    Connect {
        #[source]
        source: sqlx::Error,
    },
}

/// The verdict given for one inbound message, kept so that a repeated
/// message id gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageVerdict {
    pub escalation_id: Option<EscalationId>,
    /// The directive sent with it, if any.
    pub directive: Option<Directive>,
}

impl MessageVerdict {
    /// The directive as both stores keep it: JSON text, or none.
    pub(crate) fn directive_json(&self, op: &'static str) -> Result<Option<String>, StoreError> {
        self.directive
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError::Corrupt {
                op,
                message: e.to_string(),
            })
    }
}

/// What to do about an escalation alongside recording a message or an
/// utterance.
#[derive(Debug, Clone)]
pub enum EscalationWrite {
    Create(Box<Escalation>),
    Raise {
        id: EscalationId,
        severity: Severity,
    },
    /// A new escalation, unless the patient already has one open or
    /// acknowledged and created since `since_ms` (the dedup window): then
    /// the trigger attaches to that one, raising it (and paging again) when
    /// its severity is higher. Decided inside the write's transaction, under
    /// a per-patient lock, so that two conversations, or two replicas,
    /// escalating one patient at the same moment make one escalation and
    /// one page. The audit row and verdict prepared for the new escalation
    /// are retargeted to the one it attached to.
    CreateUnlessOpen {
        escalation: Box<Escalation>,
        since_ms: i64,
    },
}

/// What an escalation write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escalated {
    /// A new escalation, paged.
    Created(Open),
    /// The patient's open escalation took the trigger; nothing was written.
    Attached(Open),
    /// An open escalation's severity rose (now the one given), paged again.
    Raised(Open),
}

impl Escalated {
    /// The escalation the trigger ended up on, with its severity now.
    pub fn open(self) -> Open {
        match self {
            Escalated::Created(o) | Escalated::Attached(o) | Escalated::Raised(o) => o,
        }
    }
}

/// How a [`EscalationWrite::CreateUnlessOpen`] turns out once the patient's
/// open escalation (looked up under the lock) is known.
pub(crate) enum Dedup {
    Create,
    Attach(Open),
    Raise(Open),
}

impl Dedup {
    pub(crate) fn decide(open: Option<Open>, severity: Severity) -> Dedup {
        match open {
            None => Dedup::Create,
            Some(o) if severity > o.severity => Dedup::Raise(o),
            Some(o) => Dedup::Attach(o),
        }
    }
}

/// Points what was prepared for a new escalation `from` at the one it
/// attached to: the audit row of a rise says so and names it; on a plain
/// attach the creation's audit row is dropped (nothing happened to record).
pub(crate) fn retarget(
    audit: &mut Vec<AuditEvent>,
    verdict: Option<&mut MessageVerdict>,
    from: EscalationId,
    to: &Dedup,
) {
    let (target, raised) = match to {
        Dedup::Create => return,
        Dedup::Attach(o) => (o.id, false),
        Dedup::Raise(o) => (o.id, true),
    };
    let subject = format!("escalation:{from}");
    if raised {
        for e in audit.iter_mut().filter(|e| e.subject == subject) {
            e.action = "escalation.raise".to_string();
            e.subject = format!("escalation:{target}");
        }
    } else {
        audit.retain(|e| e.subject != subject);
    }
    if let Some(v) = verdict {
        if v.escalation_id == Some(from) {
            v.escalation_id = Some(target);
        }
        if let Some(d) = v.directive.as_mut()
            && d.escalation_id == from.to_string()
        {
            d.escalation_id = target.to_string();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Written now.
    New,
    /// The message id was seen before: nothing was written.
    Duplicate,
}

/// A filter and page for listing escalations, newest first.
#[derive(Debug, Clone, Default)]
pub struct EscalationQuery {
    /// None: every practice (admins only).
    pub practice: Option<PracticeId>,
    pub state: Option<EscalationState>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub limit: u32,
    /// Continue after this (created_at_ms, id), from the previous page.
    pub after: Option<(i64, String)>,
}

/// Whom a page is for: the practice's on-call clinician (its backup when
/// nobody is on call), or the backup as well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageTarget {
    Primary,
    Backup,
}

impl PageTarget {
    pub fn as_str(self) -> &'static str {
        match self {
            PageTarget::Primary => "primary",
            PageTarget::Backup => "backup",
        }
    }
}

/// What re-paging needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepagePolicy {
    pub ack_timeout_ms: i64,
    pub max_rounds: u32,
}

/// A page waiting in the outbox, with what its text and routing need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub id: i64,
    pub escalation_id: EscalationId,
    pub severity: Severity,
    pub tier: Tier,
    pub practice: String,
    /// PHI: only for the opaque reference in the text.
    pub patient: PatientId,
    pub attempts: i64,
    pub created_at_ms: i64,
    pub target: PageTarget,
    /// A backup page was already queued for this one.
    pub backup_queued: bool,
}

/// A page handed to the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub page: i64,
    pub at_ms: i64,
    /// The roster entry it went to.
    pub clinician_id: String,
    pub provider_message_id: String,
}

/// The answer given to an appointment event, kept so that a repeated
/// event id gets the same one.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppointmentAnswer {
    /// The escalation it opened, raised or attached to.
    pub escalation_id: Option<String>,
    /// Behavior rules that fired on it.
    pub rule_ids: Vec<String>,
}

/// A behavior rule that fired, kept for its cooldown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiringRecord {
    pub rule_id: String,
    pub anchor_event: String,
    pub anchor_at_ms: i64,
}

/// A directive with no live channel, waiting for the practice's gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedDirective {
    /// Assigned by the store; 0 before it is queued.
    pub seq: i64,
    pub directive_id: String,
    pub practice: PracticeId,
    /// PHI: whom the gateway texts.
    pub patient: PatientId,
    pub directive: Directive,
}

/// One appointment event with everything it caused, written in one
/// transaction.
#[derive(Debug, Clone)]
pub struct AppointmentRecord {
    pub practice: PracticeId,
    pub patient: PatientId,
    pub event: tier3::Event,
    pub answer: AppointmentAnswer,
    pub firings: Vec<FiringRecord>,
    pub write: Option<EscalationWrite>,
    pub directive: Option<QueuedDirective>,
    pub audit: Vec<AuditEvent>,
    /// The patient's events that happened before this are dropped...
    pub prune_events_before_ms: i64,
    /// ...and beyond this many, the oldest...
    pub max_events: u32,
    /// ...and firings anchored before this.
    pub prune_firings_before_ms: i64,
}

/// A call, as Tier 3 remembers it for the patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallContact {
    pub practice: PracticeId,
    pub patient: PatientId,
    pub call: CallId,
    pub started_at_ms: i64,
    pub language: String,
    /// A Tier 1 review happened in it; once set, it stays set.
    pub review: bool,
}

/// Calls kept per patient: Tier 3 reads only the last one before an event.
pub const CALLS_PER_PATIENT: i64 = 8;

/// Answers kept for repeated appointment event ids.
pub const APPOINTMENT_DEDUP_MS: i64 = 400 * 86_400_000;

#[async_trait]
pub trait Store: Send + Sync {
    /// Records an escalation (new, or a rise in severity) with its page in
    /// the outbox and its audit row, in one transaction.
    async fn escalate(
        &self,
        write: EscalationWrite,
        audit: AuditEvent,
    ) -> Result<Escalated, StoreError>;

    /// Records an inbound message's verdict, any escalation it causes, and
    /// the audit rows, in one transaction; unless the message id was
    /// recorded before, in which case nothing is written. With a write, also
    /// what it did (the verdict recorded names the escalation it ended on).
    async fn record_message(
        &self,
        message: &MessageId,
        verdict: &MessageVerdict,
        write: Option<EscalationWrite>,
        audit: Vec<AuditEvent>,
    ) -> Result<(Recorded, Option<Escalated>), StoreError>;

    /// The verdict recorded for a message id, if any.
    async fn message_verdict(
        &self,
        message: &MessageId,
    ) -> Result<Option<MessageVerdict>, StoreError>;

    /// Appends to the audit log.
    async fn audit(&self, event: AuditEvent) -> Result<(), StoreError>;

    async fn get_escalation(&self, id: EscalationId) -> Result<Option<Escalation>, StoreError>;

    async fn list_escalations(&self, q: &EscalationQuery) -> Result<Vec<Escalation>, StoreError>;

    /// Audit rows with `at_ms >= since_ms`, in order.
    async fn audit_rows(&self, since_ms: i64) -> Result<Vec<AuditRow>, StoreError>;

    /// The last row's sequence number and hash as recorded beside the log,
    /// so that rows cut from its end are noticed.
    async fn audit_head(&self) -> Result<(i64, String), StoreError>;

    /// Pages due for delivery (a read: claimed ones included).
    async fn due_pages(&self, now_ms: i64, limit: u32) -> Result<Vec<Page>, StoreError>;

    /// Claims pages due for delivery and not claimed by anyone (or whose
    /// claim's lease ran out) for `lease_ms`: until then no other pager,
    /// in this process or another replica, gets them. Delivered or failed
    /// releases the claim; a pager that dies holding one loses it when the
    /// lease expires, and another takes the page over.
    async fn claim_pages(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<Page>, StoreError>;

    /// Marks a page delivered and appends its audit row, together.
    async fn page_delivered(&self, delivery: Delivery, audit: AuditEvent)
    -> Result<(), StoreError>;

    async fn page_failed(&self, page: i64, retry_at_ms: i64) -> Result<(), StoreError>;

    /// Marks an open escalation acknowledged and cancels its pages not yet
    /// sent; appends `audit` only when that changed something. None when
    /// there is no such escalation.
    async fn acknowledge(
        &self,
        id: EscalationId,
        responder: &str,
        audit: AuditEvent,
    ) -> Result<Option<Escalation>, StoreError>;

    /// Resolves an escalation (open or acknowledged) with a disposition;
    /// idempotent like `acknowledge`.
    async fn resolve(
        &self,
        id: EscalationId,
        responder: &str,
        disposition: Disposition,
        audit: AuditEvent,
    ) -> Result<Option<Escalation>, StoreError>;

    /// Queues another round of pages (primary and backup) for every open
    /// escalation not acknowledged within the timeout, up to the policy's
    /// rounds; returns how many escalations were re-paged.
    async fn repage(&self, now_ms: i64, policy: RepagePolicy) -> Result<usize, StoreError>;

    /// Queues a page to the backup alongside `page`, once.
    async fn page_backup(&self, page: &Page, audit: AuditEvent) -> Result<(), StoreError>;

    /// The patient's most recent escalation still open or acknowledged and
    /// created since `since_ms`, with its severity: new triggers from any
    /// conversation attach to it instead of paging again.
    async fn open_for_patient(
        &self,
        practice: &PracticeId,
        patient: &PatientId,
        since_ms: i64,
    ) -> Result<Option<(EscalationId, Severity)>, StoreError>;

    /// Undelivered pages and the creation time of the oldest.
    async fn outbox_depth(&self) -> Result<(i64, Option<i64>), StoreError>;

    /// Notified after a commit that put a page in the outbox, so the pager
    /// sends it at once instead of on its next poll.
    fn pages_signal(&self) -> std::sync::Arc<tokio::sync::Notify>;

    /// The answer recorded for an appointment event id, if any.
    async fn appointment_answer(
        &self,
        practice: &PracticeId,
        event: &AppointmentEventId,
    ) -> Result<Option<AppointmentAnswer>, StoreError>;

    /// What Tier 3 reads about one patient: events that happened since
    /// `events_since_ms`, escalations created since `escalations_since_ms`,
    /// the last calls, firings; and the language of the last call.
    async fn behavior_history(
        &self,
        practice: &PracticeId,
        patient: &PatientId,
        events_since_ms: i64,
        escalations_since_ms: i64,
    ) -> Result<(tier3::History, Option<String>), StoreError>;

    /// Records an appointment event, its answer, firings, any escalation
    /// and queued directive, and audit rows, in one transaction, and prunes
    /// the patient's history; unless the event id was recorded before, in
    /// which case nothing is written.
    ///
    /// The escalation write is [`EscalationWrite::CreateUnlessOpen`]: the
    /// store decides, in the transaction, whether it opens, raises or
    /// attaches; the directive is queued only for the first two, naming
    /// the escalation it ended on. Returns the answer as recorded (for a
    /// duplicate, the first one).
    async fn record_appointment(
        &self,
        record: AppointmentRecord,
    ) -> Result<(Recorded, AppointmentAnswer), StoreError>;

    /// Remembers a call of the patient (started, or a review in it).
    async fn record_call(&self, call: CallContact) -> Result<(), StoreError>;

    /// Directives of the practice not yet acknowledged, oldest first.
    async fn pending_directives(
        &self,
        practice: &PracticeId,
        limit: u32,
    ) -> Result<Vec<QueuedDirective>, StoreError>;

    /// A queued directive, acknowledged or not.
    async fn queued_directive(
        &self,
        directive_id: &str,
    ) -> Result<Option<QueuedDirective>, StoreError>;

    /// Marks a directive received by a gateway; appends `audit` when that
    /// changed something. False when there is no such directive.
    async fn acknowledge_directive(
        &self,
        directive_id: &str,
        by: &str,
        audit: AuditEvent,
    ) -> Result<bool, StoreError>;

    /// Changes after a commit that queued a directive, so subscriptions
    /// send it at once instead of on their next poll.
    fn directives_signal(&self) -> tokio::sync::watch::Receiver<u64>;

    /// A small write that must reach the disk: whether the store can take
    /// an escalation now. Health reports not-ready while it fails.
    async fn probe(&self) -> Result<(), StoreError>;

    /// Flushes and closes.
    async fn close(&self);
}
