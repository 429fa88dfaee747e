//! Domain types shared by every module: who spoke, on which channel.

use serde::{Deserialize, Serialize};

/// Who said an utterance or sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Speaker {
    Patient,
    /// The AI voice receptionist or text assistant.
    Agent,
    Clinician,
}

/// Where a conversation happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// A call transcript: events are utterances, possibly partial.
    Voice,
    /// A text thread: events are messages.
    Sms,
}
