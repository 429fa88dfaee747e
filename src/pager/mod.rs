//! Delivering pages: the outbox worker and the [`Notifier`] seam.
//!
//! Escalations put their page in the store's outbox in the same
//! transaction that records them; this worker delivers what is due and
//! marks it, so a crash between the two loses nothing (an undelivered page
//! is delivered on the next start). A page carries the escalation id,
//! severity, tier and practice only: never text, never the patient.

pub mod console;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use thiserror::Error;
use tokio::sync::watch;

use crate::escalation::now_ms;
use crate::store::{Page, Store};

#[derive(Debug, Error)]
#[error("delivering a page failed: {0}")]
pub struct NotifyError(pub String);

#[async_trait]
pub trait Notifier: Send + Sync {
    async fn send(&self, page: &Page) -> Result<(), NotifyError>;
}

/// How often the outbox is polled.
const POLL: Duration = Duration::from_millis(250);
/// Pages taken per poll.
const BATCH: u32 = 32;

/// Retry delay after `attempts` failures: doubling from one second, capped
/// at a minute.
pub fn backoff_ms(attempts: i64) -> i64 {
    1000 * (1i64 << attempts.clamp(0, 6)).min(60)
}

/// Runs until `stop` turns true.
pub async fn run(
    store: Arc<dyn Store>,
    notifier: Arc<dyn Notifier>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match store.due_pages(now_ms(), BATCH).await {
            Ok(pages) => {
                for page in pages {
                    let id = page.escalation_id;
                    match notifier.send(&page).await {
                        Ok(()) => {
                            if let Err(e) = store.page_delivered(page.id, now_ms()).await {
                                tracing::error!(escalation_id = %id, error = %e, "marking a page delivered failed");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(escalation_id = %id, attempts = page.attempts + 1, error = %e, "page not delivered; will retry");
                            let at = now_ms() + backoff_ms(page.attempts);
                            if let Err(e) = store.page_failed(page.id, at).await {
                                tracing::error!(escalation_id = %id, error = %e, "marking a page failed failed");
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "reading the outbox failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
    }
}
