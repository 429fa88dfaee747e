//! Domain types shared by every module: who spoke, on which channel, which
//! tier decided and how urgent it is.

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

/// Which tier decided an escalation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// An unambiguous phrase.
    Phrase,
    /// The contextual classifier, or its fail-safe.
    Context,
    /// Signals from the schedule.
    Behavior,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Phrase => "phrase",
            Tier::Context => "context",
            Tier::Behavior => "behavior",
        }
    }

    pub fn code(self) -> i64 {
        match self {
            Tier::Phrase => 1,
            Tier::Context => 2,
            Tier::Behavior => 3,
        }
    }

    pub fn from_code(c: i64) -> Option<Tier> {
        match c {
            1 => Some(Tier::Phrase),
            2 => Some(Tier::Context),
            3 => Some(Tier::Behavior),
            _ => None,
        }
    }
}

/// How urgent an escalation is; ordered, so a rise can be seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Low,
    Moderate,
    High,
    Imminent,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Moderate => "moderate",
            Severity::High => "high",
            Severity::Imminent => "imminent",
        }
    }

    pub fn code(self) -> i64 {
        match self {
            Severity::Low => 1,
            Severity::Moderate => 2,
            Severity::High => 3,
            Severity::Imminent => 4,
        }
    }

    pub fn from_code(c: i64) -> Option<Severity> {
        match c {
            1 => Some(Severity::Low),
            2 => Some(Severity::Moderate),
            3 => Some(Severity::High),
            4 => Some(Severity::Imminent),
            _ => None,
        }
    }
}

/// How an escalation was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    PatientSafe,
    EmergencyServices,
    Referred,
    FalseAlarm,
    Unreachable,
}

impl Disposition {
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::PatientSafe => "patient_safe",
            Disposition::EmergencyServices => "emergency_services",
            Disposition::Referred => "referred",
            Disposition::FalseAlarm => "false_alarm",
            Disposition::Unreachable => "unreachable",
        }
    }

    pub fn parse(s: &str) -> Option<Disposition> {
        [
            Disposition::PatientSafe,
            Disposition::EmergencyServices,
            Disposition::Referred,
            Disposition::FalseAlarm,
            Disposition::Unreachable,
        ]
        .into_iter()
        .find(|d| d.as_str() == s)
    }
}

/// Where an escalation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EscalationState {
    Open,
    Acknowledged,
    Resolved,
}

impl EscalationState {
    pub fn as_str(self) -> &'static str {
        match self {
            EscalationState::Open => "open",
            EscalationState::Acknowledged => "acknowledged",
            EscalationState::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<EscalationState> {
        match s {
            "open" => Some(EscalationState::Open),
            "acknowledged" => Some(EscalationState::Acknowledged),
            "resolved" => Some(EscalationState::Resolved),
            _ => None,
        }
    }
}
