//! The default notifier: prints the page it would send, one line on
//! stdout, for a service run with no SMS provider configured. The line
//! names the clinician by roster id, never by name or number.

use async_trait::async_trait;

use super::{Notifier, NotifyError};
use crate::roster::Clinician;

pub struct Console;

#[async_trait]
impl Notifier for Console {
    async fn send(&self, to: Option<&Clinician>, text: &str) -> Result<String, NotifyError> {
        let to = to.map_or_else(|| "(no roster)".to_string(), |c| c.id.to_string());
        println!("PAGE (console, not sent) to {to}: {text}");
        Ok(format!("console-{}", uuid::Uuid::now_v7().simple()))
    }
}
