//! Delivering pages: the outbox worker and the [`Notifier`] seam.
//!
//! Escalations put their page in the store's outbox in the same
//! transaction that records them. This worker wakes when the store commits
//! a page (and on a short timer, for retries), finds who is on call for the
//! practice in the roster, renders the SMS from the template, sends it, and
//! marks the page delivered with the provider's message id and an audit
//! row. A crash between send and mark sends the page again on restart: a
//! page is repeated only when its delivery was not recorded, and never
//! lost. A page carries severity, tier, an opaque patient reference, a short
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
use crate::store::{Delivery, Page, Store};

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
const BATCH: u32 = 32;

/// Retry delay after `attempts` failures: doubling from one second, capped
/// at a minute, with up to a quarter more at random so that many failed
/// pages do not retry in step.
pub fn backoff_ms(attempts: i64) -> i64 {
    let base = 1000 * (1i64 << attempts.clamp(0, 6)).min(60);
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
}

impl Pager {
    /// Runs until `stop` turns true, waking on `wake` or the poll timer.
    pub async fn run(self, wake: Arc<Notify>, mut stop: watch::Receiver<bool>) {
        loop {
            match self.store.due_pages(now_ms(), BATCH).await {
                Ok(pages) => {
                    for page in pages {
                        self.deliver(page).await;
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
                return;
            }
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
