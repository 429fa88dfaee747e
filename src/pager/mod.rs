//! Delivering pages: the outbox worker and the [`Notifier`] seam.
//!
//! Escalations put their page in the store's outbox in the same
//! transaction that records them. This worker wakes when the store commits
//! a page (and on a short timer, for retries), finds who is on call for the
//! practice in the roster, renders the SMS from the template, sends it, and
//! marks the page delivered with the provider's message id and an audit
//! row. Pages are claimed in the store for a lease before they are sent,
//! so that several replicas sharing one database never send the same page;
//! one that dies holding claims loses them when the lease runs out, and
//! another replica sends those pages. A crash between send and mark sends
//! the page again: a page is repeated only when its delivery was not
//! recorded, and never lost. A page carries severity, tier, an opaque patient reference, a short
//! escalation id and the practice: never text, never a name.

pub mod console;
pub mod sms;
pub mod sns;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;
use tokio::sync::{Notify, watch};

use crate::audit::AuditEvent;
use crate::escalation::now_ms;
use crate::roster::{Clinician, Roster};
use crate::store::{Delivery, Page, PageTarget, RepagePolicy, Store};

#[derive(Debug, Error)]
#[error("delivering a page failed: {0}")]
pub struct NotifyError(pub String);

/// Sends one page. `to` is None when no roster is configured (only the
/// console can do anything with that). Returns the provider's message id.
#[async_trait]
pub trait Notifier: Send + Sync {
    async fn send(&self, to: Option<&Clinician>, text: &str) -> Result<String, NotifyError>;
}

#[async_trait]
impl Notifier for sns::SnsNotifier {
    async fn send(&self, to: Option<&Clinician>, text: &str) -> Result<String, NotifyError> {
        let to = to.ok_or_else(|| NotifyError("no roster: nobody to send an SMS to".into()))?;
        self.publish(to.phone.expose(), text).await
    }
}

/// Polled this often even without a signal, for retries that come due.
const POLL: Duration = Duration::from_millis(250);
/// Pages taken per round.
const BATCH: u32 = 64;
/// Re-paging and the outbox gauges run at most this often, however often
/// pages wake the pager: the re-page query looks at every open escalation
/// and is a write through the store's one writer, and on every page's
/// commit it ran 200 times a second under load. Acknowledgement timeouts
/// are minutes.
const UPKEEP: Duration = Duration::from_secs(1);
/// Pages in flight at once: one slow provider answer must not hold up the
/// pages behind it.
const IN_FLIGHT: usize = 16;

/// Retry delay after `attempts` failures: doubling from one second, capped
/// at 15 seconds, with up to a quarter more at random so that many failed
/// pages do not retry in step. The cap is short on purpose: once SNS is
/// back, a crisis page should not sit out a long backoff (a minute's cap
/// delayed pages by up to 75 s after an outage ended).
pub fn backoff_ms(attempts: i64) -> i64 {
    let base = 1000 * (1i64 << attempts.clamp(0, 4)).min(15);
    let mut b = [0u8; 2];
    let jitter = match getrandom::fill(&mut b) {
        Ok(()) => i64::from(u16::from_le_bytes(b)) * (base / 4) / i64::from(u16::MAX),
        Err(_) => 0,
    };
    base + jitter
}

pub struct Pager {
    pub store: Arc<dyn Store>,
    pub notifier: Arc<dyn Notifier>,
    pub roster: Option<Arc<Roster>>,
    pub template: String,
    /// Keys the opaque patient reference.
    pub patient_ref_secret: Vec<u8>,
    pub repage: RepagePolicy,
    /// How long a claimed page is this pager's alone.
    pub claim_lease_ms: i64,
    pub backup_after_failures: i64,
    pub backup_after_ms: i64,
}

impl Pager {
    /// Runs until `stop` turns true, waking on `wake` or the poll timer.
    /// Pages go out concurrently, each claimed in the store while in flight
    /// so that no round here or in another replica sends it twice.
    pub async fn run(self, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        let mut upkeep_due = tokio::time::Instant::now();
        loop {
            while tasks.try_join_next().is_some() {}
            if tokio::time::Instant::now() >= upkeep_due {
                upkeep_due = tokio::time::Instant::now() + UPKEEP;
                this.upkeep().await;
            }
            // Claim no more than there are free slots: a claimed page waits
            // for nothing but its send, so its lease is not spent queueing.
            let free = u32::try_from(slots.available_permits())
                .unwrap_or(BATCH)
                .min(BATCH);
            let claimed = if free == 0 {
                Ok(Vec::new())
            } else {
                this.store
                    .claim_pages(now_ms(), this.claim_lease_ms, free)
                    .await
            };
            match claimed {
                Ok(pages) => {
                    for page in pages {
                        let Ok(slot) = slots.clone().acquire_owned().await else {
                            break;
                        };
                        let pager = this.clone();
                        tasks.spawn(async move {
                            pager.deliver(page).await;
                            drop(slot);
                        });
                    }
                }
                Err(e) => tracing::error!(error = %e, "reading the outbox failed"),
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = stop.changed() => {}
            }
            if *stop.borrow() {
                // Let what is in flight finish and be recorded.
                while tasks.join_next().await.is_some() {}
                return;
            }
        }
    }

    /// Re-pages what is due and reports the outbox's depth and age.
    async fn upkeep(&self) {
        match self.store.repage(now_ms(), self.repage).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::warn!(
                    escalations = n,
                    "not acknowledged in time: paging again, and the backup"
                );
                metrics::counter!("crisisd_repages_total").increment(n as u64);
            }
            Err(e) => tracing::error!(error = %e, "re-paging failed"),
        }
        match self.store.outbox_depth().await {
            Ok((depth, oldest)) => {
                metrics::gauge!("crisisd_outbox_depth").set(depth as f64);
                let age = oldest.map_or(0, |o| now_ms().saturating_sub(o));
                metrics::gauge!("crisisd_outbox_oldest_age_seconds").set(age as f64 / 1000.0);
            }
            Err(e) => tracing::error!(error = %e, "reading the outbox depth failed"),
        }
    }

    fn text(&self, page: &Page) -> String {
        let id = page.escalation_id.to_string();
        let facts = sms::PageFacts {
            severity: page.severity.as_str().to_uppercase(),
            tier: page.tier.as_str().to_string(),
            id: id[id.len().saturating_sub(8)..].to_string(),
            patient: sms::patient_ref(&self.patient_ref_secret, page.patient.expose()),
            practice: page.practice.clone(),
        };
        // The template was checked at start-up.
        sms::render(&self.template, &facts)
            .unwrap_or_else(|_| sms::render(sms::DEFAULT_TEMPLATE, &facts).unwrap_or_default())
    }

    async fn deliver(&self, page: Page) {
        let id = page.escalation_id;
        let to = match &self.roster {
            None => None,
            Some(roster) => match roster.on_call(&page.practice, jiff::Timestamp::now()) {
                Some(on_call) if page.target == PageTarget::Backup => Some(on_call.backup),
                Some(on_call) => {
                    if on_call.primary.is_none() {
                        tracing::warn!(escalation_id = %id, practice = %page.practice, "nobody on call: paging the practice's backup");
                        metrics::counter!("crisisd_pages_nobody_on_call_total").increment(1);
                    }
                    Some(on_call.paged())
                }
                None => {
                    tracing::error!(escalation_id = %id, practice = %page.practice, "practice not in the roster: nobody to page");
                    metrics::counter!("crisisd_pages_unroutable_total").increment(1);
                    self.failed(&page, "practice not in the roster").await;
                    return;
                }
            },
        };
        let text = self.text(&page);
        if page.attempts == 0 {
            // From the page's commit (with its escalation) to its request.
            let waited = now_ms().saturating_sub(page.created_at_ms);
            metrics::histogram!("crisisd_page_request_latency_seconds")
                .record(waited as f64 / 1000.0);
        }
        let started = std::time::Instant::now();
        match self.notifier.send(to, &text).await {
            Ok(provider_message_id) => {
                metrics::counter!("crisisd_pages_sent_total").increment(1);
                metrics::histogram!("crisisd_page_send_seconds")
                    .record(started.elapsed().as_secs_f64());
                let clinician_id = to.map_or_else(|| "-".to_string(), |c| c.id.to_string());
                let audit = AuditEvent {
                    actor: "crisisd".to_string(),
                    request_id: uuid::Uuid::now_v7().to_string(),
                    action: "page.sent".to_string(),
                    subject: format!("escalation:{id}"),
                    detail: serde_json::json!({
                        "clinician": clinician_id,
                        "provider_message_id": provider_message_id,
                        "attempt": page.attempts + 1,
                        "target": page.target.as_str(),
                    }),
                };
                let delivery = Delivery {
                    page: page.id,
                    at_ms: now_ms(),
                    clinician_id: clinician_id.clone(),
                    provider_message_id,
                };
                tracing::info!(escalation_id = %id, clinician = %clinician_id, "page sent");
                if let Err(e) = self.store.page_delivered(delivery, audit).await {
                    tracing::error!(escalation_id = %id, error = %e, "recording a delivered page failed; it may be sent again");
                }
            }
            Err(e) => {
                metrics::counter!("crisisd_pages_failed_total").increment(1);
                tracing::warn!(escalation_id = %id, attempts = page.attempts + 1, error = %e, "page not delivered; will retry");
                self.failed(&page, "send failed").await;
                let age = now_ms().saturating_sub(page.created_at_ms);
                if page.target == PageTarget::Primary
                    && !page.backup_queued
                    && (page.attempts + 1 >= self.backup_after_failures
                        || age >= self.backup_after_ms)
                {
                    tracing::warn!(escalation_id = %id, "page still failing: paging the backup as well");
                    metrics::counter!("crisisd_pages_backup_total").increment(1);
                    let audit = AuditEvent {
                        actor: "crisisd".to_string(),
                        request_id: uuid::Uuid::now_v7().to_string(),
                        action: "page.backup".to_string(),
                        subject: format!("escalation:{id}"),
                        detail: serde_json::json!({ "attempts": page.attempts + 1, "age_ms": age }),
                    };
                    if let Err(e) = self.store.page_backup(&page, audit).await {
                        tracing::error!(escalation_id = %id, error = %e, "queueing the backup page failed");
                    }
                }
            }
        }
    }

    async fn failed(&self, page: &Page, why: &str) {
        let at = now_ms() + backoff_ms(page.attempts);
        if let Err(e) = self.store.page_failed(page.id, at).await {
            tracing::error!(escalation_id = %page.escalation_id, why, error = %e, "recording a failed page failed");
        }
    }
}
