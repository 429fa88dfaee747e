//! Tier 2: a contextual model answers what Tier 1 marked for review, and
//! every way that can go wrong ends in an escalation.
//!
//! The seam is the [`Classifier`] trait; Bedrock's Converse API is one
//! implementation ([`bedrock`]). Whatever a classifier returns goes through
//! [`judge`], the one place that decides: only a well-formed answer with
//! `escalate = false` dismisses a review. A timeout, throttling, an HTTP
//! error, a network failure, a refusal, a missing or malformed tool call, an
//! answer outside the schema or a full queue escalates, with a reason code
//! that says which. Tier 2 never sees Tier 1's escalations, so no answer
//! can cancel one.

pub mod bedrock;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::domain::{Severity, Speaker};

/// The model's risk level, after the Columbia scale's ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    None,
    Low,
    Moderate,
    High,
    Imminent,
}

impl Risk {
    pub const ALL: [&'static str; 5] = ["none", "low", "moderate", "high", "imminent"];

    pub fn severity(self) -> Severity {
        match self {
            Risk::None | Risk::Low => Severity::Low,
            Risk::Moderate => Severity::Moderate,
            Risk::High => Severity::High,
            Risk::Imminent => Severity::Imminent,
        }
    }
}

/// Why the model answered as it did: a closed list, so the answer can be
/// audited and counted without free text.
pub const REASON_CODES: &[&str] = &[
    "no_risk_indicators",
    "figurative_language",
    "negated",
    "third_party",
    "past_history",
    "passive_ideation",
    "active_ideation",
    "plan_or_intent",
    "preparatory_behavior",
    "recent_attempt",
    "self_harm",
    "hopelessness",
    "perceived_burden",
    "farewell",
    "access_to_means",
    "harm_to_others",
    "danger_at_home",
    "unclear",
];

/// A well-formed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub risk: Risk,
    pub escalate: bool,
    /// One of [`REASON_CODES`].
    pub reason_code: &'static str,
}

/// One labeled turn of the conversation's recent window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub speaker: Speaker,
    pub text: String,
}

/// Why a classifier gave no usable answer. Each maps to a reason code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClassifyError {
    #[error("the model did not answer within the deadline")]
    Timeout,
    #[error("the model service is throttling")]
    Throttled,
    #[error("the model service answered HTTP {0}")]
    Http(u16),
    #[error("the model service could not be reached")]
    Network,
    #[error("the model stopped without the tool call ({0})")]
    NoToolUse(String),
    #[error("the answer has no tool call")]
    NoToolCall,
    #[error("the answer's tool call is malformed: {0}")]
    Malformed(&'static str),
    #[error("the classifier's queue is full")]
    QueueFull,
    #[error("the model service's response could not be read")]
    BadResponse,
    #[error("the model is failing; not asked until the circuit closes")]
    CircuitOpen,
}

impl ClassifyError {
    pub fn reason_code(&self) -> &'static str {
        match self {
            ClassifyError::Timeout => "failsafe.timeout",
            ClassifyError::Throttled => "failsafe.throttled",
            ClassifyError::Http(s) if *s >= 500 => "failsafe.http_5xx",
            ClassifyError::Http(_) => "failsafe.http_4xx",
            ClassifyError::Network => "failsafe.network",
            ClassifyError::NoToolUse(_) => "failsafe.refused",
            ClassifyError::NoToolCall => "failsafe.no_tool_call",
            ClassifyError::Malformed(_) => "failsafe.malformed",
            ClassifyError::QueueFull => "failsafe.queue_full",
            ClassifyError::BadResponse => "failsafe.bad_response",
            ClassifyError::CircuitOpen => "failsafe.circuit_open",
        }
    }
}

#[async_trait]
pub trait Classifier: Send + Sync {
    /// Assesses the window; the last patient turn is the one under review.
    async fn classify(&self, window: &[Turn]) -> Result<Answer, ClassifyError>;

    /// The model id or inference profile, for the audit log.
    fn model(&self) -> &str;
}

/// What Tier 2 decided about one review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Well-formed, `escalate = false`: the review is dismissed.
    Dismiss { reason_code: &'static str },
    /// Escalate: the model said so, or it failed and the fail-safe did.
    Escalate {
        severity: Severity,
        reason_code: String,
    },
}

/// The one rule: only a well-formed "no" dismisses. A failure escalates at
/// `failsafe_severity`, the severity Tier 1 gave the review.
pub fn judge(result: Result<Answer, ClassifyError>, failsafe_severity: Severity) -> Decision {
    match result {
        Ok(a) if !a.escalate => Decision::Dismiss {
            reason_code: a.reason_code,
        },
        Ok(a) => Decision::Escalate {
            // The model may see more risk than Tier 1 did, never less.
            severity: a.risk.severity().max(failsafe_severity),
            reason_code: format!("model.{}", a.reason_code),
        },
        Err(e) => Decision::Escalate {
            severity: failsafe_severity,
            reason_code: e.reason_code().to_string(),
        },
    }
}

/// Parses a tool call's input strictly: exactly the three fields, each of
/// its type, the enums within their lists.
pub fn parse_answer(v: &serde_json::Value) -> Result<Answer, ClassifyError> {
    let obj = v
        .as_object()
        .ok_or(ClassifyError::Malformed("input is not an object"))?;
    if obj
        .keys()
        .any(|k| !matches!(k.as_str(), "risk" | "escalate" | "reason_code"))
    {
        return Err(ClassifyError::Malformed("unknown field"));
    }
    let risk = match obj.get("risk").and_then(|r| r.as_str()) {
        Some("none") => Risk::None,
        Some("low") => Risk::Low,
        Some("moderate") => Risk::Moderate,
        Some("high") => Risk::High,
        Some("imminent") => Risk::Imminent,
        Some(_) => return Err(ClassifyError::Malformed("risk is not one of the levels")),
        None => return Err(ClassifyError::Malformed("risk is missing")),
    };
    let escalate =
        obj.get("escalate")
            .and_then(|e| e.as_bool())
            .ok_or(ClassifyError::Malformed(
                "escalate is missing or not a boolean",
            ))?;
    let reason = obj
        .get("reason_code")
        .and_then(|r| r.as_str())
        .ok_or(ClassifyError::Malformed("reason_code is missing"))?;
    let reason_code =
        REASON_CODES
            .iter()
            .find(|c| **c == reason)
            .copied()
            .ok_or(ClassifyError::Malformed(
                "reason_code is not one of the codes",
            ))?;
    Ok(Answer {
        risk,
        escalate,
        reason_code,
    })
}

/// Outcomes remembered for the error rate.
const CIRCUIT_WINDOW: usize = 20;
/// Fewest outcomes before the circuit may open.
const CIRCUIT_MIN: usize = 10;
/// How long an open circuit waits before letting one request try.
pub const CIRCUIT_COOL_OFF: std::time::Duration = std::time::Duration::from_secs(5);

/// A circuit breaker over the model's recent outcomes. When half or more
/// of the last calls failed, the model is not asked for a while: every
/// review escalates at once (it would have, after the deadline) instead of
/// piling requests onto a failing service. Then one request tries again.
#[derive(Debug, Default)]
pub struct Circuit {
    recent: std::collections::VecDeque<bool>,
    open_until: Option<std::time::Instant>,
}

impl Circuit {
    /// Whether to ask the model now.
    pub fn allow(&mut self, now: std::time::Instant) -> bool {
        match self.open_until {
            Some(t) if now < t => false,
            Some(_) => {
                // Half-open: this one tries; failing, it opens again.
                self.open_until = Some(now + CIRCUIT_COOL_OFF);
                true
            }
            None => true,
        }
    }

    pub fn record(&mut self, failed: bool, now: std::time::Instant) {
        if self.recent.len() == CIRCUIT_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(failed);
        if !failed {
            self.open_until = None;
        } else if self.recent.len() >= CIRCUIT_MIN && self.error_rate() >= 0.5 {
            self.open_until = Some(now + CIRCUIT_COOL_OFF);
        }
    }

    pub fn error_rate(&self) -> f64 {
        if self.recent.is_empty() {
            return 0.0;
        }
        self.recent.iter().filter(|f| **f).count() as f64 / self.recent.len() as f64
    }

    pub fn is_open(&self, now: std::time::Instant) -> bool {
        self.open_until.is_some_and(|t| now < t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn circuit_opens_on_failures_and_tries_again_after_cooling_off() {
        let t0 = std::time::Instant::now();
        let mut c = Circuit::default();
        for _ in 0..9 {
            assert!(c.allow(t0));
            c.record(true, t0);
        }
        assert!(!c.is_open(t0), "too few outcomes to judge");
        c.record(true, t0);
        assert!(c.is_open(t0) && !c.allow(t0));
        let later = t0 + CIRCUIT_COOL_OFF;
        assert!(c.allow(later), "half-open: one request tries");
        assert!(!c.allow(later), "and only one");
        c.record(false, later);
        assert!(!c.is_open(later) && c.allow(later), "a success closes it");
        assert!(c.error_rate() > 0.8);
    }

    #[test]
    fn answer_parsing_table() {
        // (tool input, (risk, escalate) or the malformation named)
        type Case = (serde_json::Value, Result<(Risk, bool), &'static str>);
        let cases: &[Case] = &[
            (
                json!({"risk": "high", "escalate": true, "reason_code": "active_ideation"}),
                Ok((Risk::High, true)),
            ),
            (
                json!({"risk": "none", "escalate": false, "reason_code": "figurative_language"}),
                Ok((Risk::None, false)),
            ),
            (
                json!({"risk": "high", "escalate": true}),
                Err("reason_code is missing"),
            ),
            (
                json!({"escalate": false, "reason_code": "unclear"}),
                Err("risk is missing"),
            ),
            (
                json!({"risk": "severe", "escalate": true, "reason_code": "unclear"}),
                Err("risk is not one of the levels"),
            ),
            (
                json!({"risk": "low", "escalate": "no", "reason_code": "unclear"}),
                Err("escalate is missing or not a boolean"),
            ),
            (
                json!({"risk": "low", "escalate": false, "reason_code": "because I said so"}),
                Err("reason_code is not one of the codes"),
            ),
            (
                json!({"risk": "low", "escalate": false, "reason_code": "unclear", "note": "x"}),
                Err("unknown field"),
            ),
            (json!(["none"]), Err("input is not an object")),
        ];
        for (input, want) in cases {
            let got = parse_answer(input).map(|a| (a.risk, a.escalate));
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, *w, "{input}"),
                (Err(ClassifyError::Malformed(m)), Err(w)) => assert_eq!(m, *w, "{input}"),
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn only_a_well_formed_no_dismisses() {
        let answer = |escalate, risk| {
            Ok(Answer {
                risk,
                escalate,
                reason_code: "unclear",
            })
        };
        assert!(matches!(
            judge(answer(false, Risk::Low), Severity::Low),
            Decision::Dismiss { .. }
        ));
        assert_eq!(
            judge(answer(true, Risk::Imminent), Severity::Low),
            Decision::Escalate {
                severity: Severity::Imminent,
                reason_code: "model.unclear".into()
            }
        );
        // The model never lowers what Tier 1 saw.
        assert_eq!(
            judge(answer(true, Risk::Low), Severity::Moderate),
            Decision::Escalate {
                severity: Severity::Moderate,
                reason_code: "model.unclear".into()
            }
        );
        for e in [
            ClassifyError::Timeout,
            ClassifyError::Throttled,
            ClassifyError::Http(400),
            ClassifyError::Http(503),
            ClassifyError::Network,
            ClassifyError::NoToolUse("end_turn".into()),
            ClassifyError::NoToolCall,
            ClassifyError::Malformed("risk is missing"),
            ClassifyError::QueueFull,
            ClassifyError::BadResponse,
            ClassifyError::CircuitOpen,
        ] {
            let code = e.reason_code();
            assert_eq!(
                judge(Err(e), Severity::Moderate),
                Decision::Escalate {
                    severity: Severity::Moderate,
                    reason_code: code.into()
                }
            );
            assert!(code.starts_with("failsafe."));
        }
    }
}
