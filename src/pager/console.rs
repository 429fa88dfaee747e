//! The default notifier: prints the page it would send, one line on
//! stdout, for a service run with no SMS provider configured.

use async_trait::async_trait;

use super::{Notifier, NotifyError};
use crate::store::Page;

pub struct Console;

/// The page text: what an on-call clinician needs to act, nothing more.
pub fn page_text(page: &Page) -> String {
    format!(
        "crisisd: {} severity escalation {} at practice {}. Open the escalation to respond.",
        page.severity.as_str().to_uppercase(),
        page.escalation_id,
        page.practice
    )
}

#[async_trait]
impl Notifier for Console {
    async fn send(&self, page: &Page) -> Result<(), NotifyError> {
        println!("PAGE (console, not sent) {}", page_text(page));
        Ok(())
    }
}
