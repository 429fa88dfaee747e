//! The scheduling side of the service: appointment events into Tier 3, and
//! the directives that have no live channel out to the practice's gateway.
//!
//! One event of one patient is judged at a time (a lock per patient
//! stripe), against the history the store holds, and everything it causes
//! (its answer, the firings, the escalation with its page, the queued
//! directive, the audit rows) is one transaction. An event the store could
//! not take is answered `UNAVAILABLE` and changes nothing: the scheduling
//! system sends it again, and the same event id then gets the same answer.
//!
//! Directives for a practice are kept in the store until a gateway
//! acknowledges them. A subscription replays what is pending, then follows
//! the store: woken by a local commit, and polling so that directives
//! queued by another replica arrive too.

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::Status;

use super::auth::Principal;
use super::convert::{self, AppointmentIn};
use super::pb;
use super::service::Core;
use crate::audit::AuditEvent;
use crate::domain::Tier;
use crate::escalation::{Origin, Trigger, now_ms};
use crate::ids::{PatientId, PracticeId};
use crate::store::{
    AppointmentAnswer, AppointmentRecord, EscalationWrite, FiringRecord, QueuedDirective, Recorded,
};

/// Stripes of the per-patient lock: events of one patient are judged one
/// at a time; others rarely wait.
pub const PATIENT_STRIPES: usize = 64;
/// How often a subscription looks for directives another replica queued.
const SUBSCRIPTION_POLL: Duration = Duration::from_secs(1);
/// Directives read per look; the rest follow on the next.
const SUBSCRIPTION_BATCH: u32 = 256;

fn unavailable(e: crate::store::StoreError) -> Status {
    tracing::error!(error = %e, "store failed on an appointment event");
    Status::unavailable("the store is unavailable; send the event again")
}

impl Core {
    fn patient_stripe(&self, practice: &PracticeId, patient: &PatientId) -> usize {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = rustc_hash::FxBuildHasher.build_hasher();
        practice.as_str().hash(&mut h);
        patient.expose().hash(&mut h);
        (h.finish() as usize) % PATIENT_STRIPES
    }

    /// Judges one appointment event and records it with all it causes.
    pub async fn appointment_event(
        &self,
        who: &Principal,
        request_id: &str,
        input: AppointmentIn,
    ) -> Result<AppointmentAnswer, Status> {
        let AppointmentIn {
            practice,
            patient,
            event,
        } = input;
        who.may_act_for(&practice)?;
        let _turn = self.patient_locks[self.patient_stripe(&practice, &patient)]
            .lock()
            .await;
        if let Some(first) = self
            .store
            .appointment_answer(&practice, &event.id)
            .await
            .map_err(unavailable)?
        {
            metrics::counter!("crisisd_appointment_events_total", "kind" => event.kind.as_str(), "result" => "duplicate").increment(1);
            return Ok(first);
        }
        let rules = &self.behavior;
        let now = now_ms();
        let window = rules.longest_window_ms();
        let since = event.occurred_at_ms.min(now).saturating_sub(window);
        let (history, language) = self
            .store
            .behavior_history(&practice, &patient, since, since)
            .await
            .map_err(unavailable)?;
        let fired = rules.evaluate(&history, &event);
        let origin = Origin::Appointment(event.appointment.to_string());
        let mut audit = vec![AuditEvent {
            actor: who.name.clone(),
            request_id: request_id.to_string(),
            action: "appointment.event".to_string(),
            subject: format!("appointment:{}", event.appointment),
            detail: serde_json::json!({
                "event": event.id.as_str(),
                "kind": event.kind.as_str(),
                "initiator": event.initiator.map(crate::tier3::Initiator::as_str),
                "rules": fired.iter().map(|f| rules.rule(f.rule).id.as_str()).collect::<Vec<_>>(),
            }),
        }];
        let mut answer = AppointmentAnswer {
            escalation_id: None,
            rule_ids: fired
                .iter()
                .map(|f| rules.rule(f.rule).id.clone())
                .collect(),
        };
        let (mut write, mut directive) = (None, None);
        // The most severe rule speaks for the event; all of them cool down.
        if let Some(top) = fired.iter().max_by_key(|f| rules.rule(f.rule).severity) {
            let rule = rules.rule(top.rule);
            let trigger = Trigger {
                tier: Tier::Behavior,
                severity: rule.severity,
                rule_id: rule.id.clone(),
                reason_code: rule.id.clone(),
            };
            // The store decides, in the write's transaction, whether this
            // opens an escalation, raises the patient's open one or attaches
            // to it (one page per patient); the directive goes with the
            // first two only.
            let e = self.new_escalation(
                &trigger,
                &practice,
                &patient,
                origin.clone(),
                event.id.as_str(),
            );
            let id = e.id;
            write = Some(EscalationWrite::CreateUnlessOpen {
                escalation: Box::new(e),
                since_ms: self.dedup_since(),
            });
            directive = Some(QueuedDirective {
                seq: 0,
                directive_id: uuid::Uuid::now_v7().to_string(),
                practice: practice.clone(),
                patient: patient.clone(),
                directive: self.directive(
                    id,
                    &trigger,
                    practice.as_str(),
                    language.as_deref().unwrap_or("en"),
                    event.id.as_str(),
                ),
            });
            audit.push(Core::escalation_audit(
                &who.name,
                request_id,
                "escalation.create",
                id,
                &origin,
                &trigger,
            ));
            answer.escalation_id = Some(id.to_string());
            tracing::info!(event_id = %event.id, rule = %rule.id, "behavior pattern fired");
        }
        let record = AppointmentRecord {
            practice: practice.clone(),
            patient,
            firings: fired
                .iter()
                .map(|f| FiringRecord {
                    rule_id: rules.rule(f.rule).id.clone(),
                    anchor_event: f.anchor_event.clone(),
                    anchor_at_ms: f.anchor_at_ms,
                })
                .collect(),
            answer: answer.clone(),
            write,
            directive,
            audit,
            prune_events_before_ms: now.saturating_sub(window),
            max_events: rules.longest_streak().max(1) * 8,
            prune_firings_before_ms: now
                .saturating_sub(window)
                .saturating_sub(rules.longest_cooldown_ms()),
            event,
        };
        let kind = record.event.kind;
        let (recorded, answer) = self
            .store
            .record_appointment(record)
            .await
            .map_err(unavailable)?;
        if recorded == Recorded::New {
            let result = if answer.escalation_id.is_some() {
                "escalated"
            } else {
                "none"
            };
            metrics::counter!("crisisd_appointment_events_total", "kind" => kind.as_str(), "result" => result).increment(1);
            if let Some(id) = &answer.escalation_id {
                tracing::info!(escalation_id = %id, "behavior escalation recorded");
            }
        }
        Ok(answer)
    }

    /// Feeds one practice's pending directives into `tx` until the client
    /// goes or the server shuts down.
    pub async fn follow_directives(
        &self,
        practice: PracticeId,
        tx: mpsc::Sender<Result<pb::Directive, Status>>,
    ) {
        let mut signal = self.store.directives_signal();
        let mut closing = self.closing.clone();
        // Sent on this subscription and not yet acknowledged: not again.
        let mut sent: HashSet<i64> = HashSet::new();
        loop {
            let shutting_down = *closing.borrow_and_update();
            if shutting_down {
                let _ = tx
                    .send(Err(Status::unavailable(
                        "the server is shutting down; subscribe again",
                    )))
                    .await;
                return;
            }
            match self
                .store
                .pending_directives(&practice, SUBSCRIPTION_BATCH)
                .await
            {
                Ok(pending) => {
                    let full = pending.len() == SUBSCRIPTION_BATCH as usize;
                    let last = pending.last().map_or(0, |d| d.seq);
                    let seqs: HashSet<i64> = pending.iter().map(|d| d.seq).collect();
                    sent.retain(|s| seqs.contains(s) || (full && *s > last));
                    for d in &pending {
                        if sent.contains(&d.seq) {
                            continue;
                        }
                        if tx.send(Ok(convert::queued_directive(d))).await.is_err() {
                            return;
                        }
                        sent.insert(d.seq);
                        metrics::counter!("crisisd_subscription_directives_total").increment(1);
                        tracing::info!(directive_id = %d.directive_id, escalation_id = %d.directive.escalation_id, "directive sent to a subscription");
                    }
                }
                Err(e) => tracing::error!(error = %e, "reading queued directives failed"),
            }
            tokio::select! {
                r = signal.changed() => {
                    if r.is_err() {
                        // The store is closing; the poll still runs.
                        tokio::time::sleep(SUBSCRIPTION_POLL).await;
                    }
                }
                _ = tokio::time::sleep(SUBSCRIPTION_POLL) => {}
                _ = tx.closed() => return,
                r = closing.changed() => {
                    if r.is_err() {
                        // The server is gone without a word: so is this.
                        return;
                    }
                }
            }
        }
    }

    /// A gateway has a directive: it is not sent again.
    pub async fn acknowledge_directive(
        &self,
        who: &Principal,
        request_id: &str,
        directive_id: &str,
    ) -> Result<(), Status> {
        let valid = uuid::Uuid::parse_str(directive_id).is_ok_and(|u| u.get_version_num() == 7);
        if !valid {
            return Err(Status::invalid_argument(
                "directive_id must be a directive id from SubscribeDirectives",
            ));
        }
        let not_found = || Status::not_found("no such directive");
        let queued = self
            .store
            .queued_directive(directive_id)
            .await
            .map_err(unavailable)?
            .ok_or_else(not_found)?;
        // Another practice's directive is as good as absent.
        who.may_act_for(&queued.practice).map_err(|_| not_found())?;
        let audit = AuditEvent {
            actor: who.name.clone(),
            request_id: request_id.to_string(),
            action: "directive.acknowledge".to_string(),
            subject: format!("directive:{directive_id}"),
            detail: serde_json::json!({ "escalation": queued.directive.escalation_id }),
        };
        let found = self
            .store
            .acknowledge_directive(directive_id, &who.name, audit)
            .await
            .map_err(unavailable)?;
        if found { Ok(()) } else { Err(not_found()) }
    }
}

/// The answer as the client sees it.
pub fn ack(event_id: &str, a: &AppointmentAnswer) -> pb::AppointmentEventAck {
    pb::AppointmentEventAck {
        event_id: event_id.to_string(),
        outcome: if a.escalation_id.is_some() {
            pb::Outcome::Escalated
        } else {
            pb::Outcome::None
        } as i32,
        escalation_id: a.escalation_id.clone().unwrap_or_default(),
        rule_ids: a.rule_ids.clone(),
    }
}
