//! SMS through AWS SNS (`Publish` to a phone number), with the real
//! `aws-sdk-sns` client.
//!
//! The client is built without touching the network: the region comes from
//! the config, so loading never asks instance metadata for it, and
//! credentials come from the standard chain only when the first page goes
//! out. Nothing on the detection path waits for AWS. Every call has an
//! operation timeout, so a black-holed endpoint fails (and is retried by
//! the outbox) instead of hanging the pager.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_sns::Client;
use aws_sdk_sns::config::Region;
use aws_sdk_sns::types::MessageAttributeValue;

use super::NotifyError;
use crate::config::Sns;

pub struct SnsNotifier {
    client: Client,
    sender_id: String,
    origination_number: String,
}

fn attribute(value: &str) -> Result<MessageAttributeValue, NotifyError> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| NotifyError(format!("building a message attribute: {e}")))
}

impl SnsNotifier {
    pub async fn new(config: &Sns) -> SnsNotifier {
        // No retries inside the SDK: Publish is not idempotent, and a retry
        // after a timed-out attempt that SNS did take sends the SMS twice.
        // The outbox retries, with backoff, metrics and an audit trail.
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_millis(config.timeout_ms))
                    .operation_attempt_timeout(Duration::from_millis(config.timeout_ms))
                    .operation_timeout(Duration::from_millis(config.timeout_ms * 2))
                    .build(),
            );
        if !config.endpoint_url.is_empty() {
            loader = loader.endpoint_url(&config.endpoint_url);
        }
        let shared = loader.load().await;
        SnsNotifier {
            client: Client::new(&shared),
            sender_id: config.sender_id.clone(),
            origination_number: config.origination_number.clone(),
        }
    }

    /// Sends `text` to `phone` (E.164) as a transactional SMS; returns
    /// SNS's message id. Errors name the failure, never the number or text.
    pub async fn publish(&self, phone: &str, text: &str) -> Result<String, NotifyError> {
        let mut req = self
            .client
            .publish()
            .phone_number(phone)
            .message(text)
            .message_attributes("AWS.SNS.SMS.SMSType", attribute("Transactional")?);
        if !self.sender_id.is_empty() {
            req = req.message_attributes("AWS.SNS.SMS.SenderID", attribute(&self.sender_id)?);
        }
        if !self.origination_number.is_empty() {
            req = req.message_attributes(
                "AWS.MM.SMS.OriginationNumber",
                attribute(&self.origination_number)?,
            );
        }
        let out = req.send().await.map_err(|e| {
            let code = e
                .as_service_error()
                .and_then(|s| aws_sdk_sns::error::ProvideErrorMetadata::code(s))
                .unwrap_or("no service response");
            NotifyError(format!("SNS Publish failed: {code}"))
        })?;
        Ok(out.message_id().unwrap_or_default().to_string())
    }
}
