//! Escalation: the one place that turns detections into escalations.
//!
//! Tiers report what they see; this module decides whether that is an
//! escalation, how severe, and whether it opens a new escalation or attaches
//! to the one already open in the conversation. Severity follows the
//! Columbia scale's ladder: intent, plan, preparation and a recent attempt
//! are imminent; active ideation and self-harm high; a passive wish
//! moderate. A `review` detection goes to the contextual classifier (Tier 2)
//! when there is one; without one, or when it cannot answer, the fail-safe
//! escalates it.

use serde::{Deserialize, Serialize};

use crate::domain::{Disposition, EscalationState, Severity, Tier};
use crate::ids::{EscalationId, PatientId, PracticeId};
use crate::tier1::{Action, Category, Detection, Matcher};

/// Why the fail-safe escalated a review: no classifier is configured.
pub const FAILSAFE_NO_CLASSIFIER: &str = "failsafe.no_classifier";

/// One reason to escalate, from one tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub tier: Tier,
    pub severity: Severity,
    /// The rule that fired (never text).
    pub rule_id: String,
    /// The rule id for a phrase; `failsafe.*` when Tier 2 could not clear it.
    pub reason_code: String,
}

fn escalate_severity(c: Category) -> Severity {
    match c {
        Category::Intent
        | Category::PlanOrMethod
        | Category::PreparatoryAct
        | Category::RecentAttempt => Severity::Imminent,
        Category::ActiveIdeation | Category::SelfHarm => Severity::High,
        _ => Severity::Moderate,
    }
}

fn review_severity(c: Category) -> Severity {
    match c {
        Category::AccessToMeans
        | Category::HarmToOthers
        | Category::DangerAtHome
        | Category::Farewell => Severity::Moderate,
        _ => Severity::Low,
    }
}

/// The strongest trigger among Tier 1's detections, if any. With no
/// classifier, every `review` is escalated by the fail-safe rule.
pub fn decide(matcher: &Matcher, detections: &[Detection]) -> Option<Trigger> {
    detections
        .iter()
        .map(|d| {
            let rule = matcher.rule(d.rule);
            match d.action {
                Action::Escalate => Trigger {
                    tier: Tier::Phrase,
                    severity: escalate_severity(rule.category),
                    rule_id: rule.id.clone(),
                    reason_code: rule.id.clone(),
                },
                Action::Review => Trigger {
                    tier: Tier::Context,
                    severity: review_severity(rule.category),
                    rule_id: rule.id.clone(),
                    reason_code: FAILSAFE_NO_CLASSIFIER.to_string(),
                },
            }
        })
        // Phrase before fail-safe at equal severity: it is the surer reason.
        .max_by_key(|t| (t.severity, t.tier == Tier::Phrase))
}

/// Where an escalation arose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Call(String),
    Thread(String),
    /// Tier 3: the appointment whose event completed the pattern.
    Appointment(String),
}

impl Origin {
    pub fn id(&self) -> &str {
        match self {
            Origin::Call(s) | Origin::Thread(s) | Origin::Appointment(s) => s,
        }
    }

    pub fn channel(&self) -> &'static str {
        match self {
            Origin::Call(_) => "voice",
            Origin::Thread(_) => "sms",
            Origin::Appointment(_) => "schedule",
        }
    }
}

/// An escalation as recorded. Holds no text: the rule and the utterance or
/// message id say what fired.
#[derive(Debug, Clone)]
pub struct Escalation {
    pub id: EscalationId,
    pub practice: PracticeId,
    pub patient: PatientId,
    pub origin: Origin,
    pub tier: Tier,
    pub rule_id: String,
    pub reason_code: String,
    pub severity: Severity,
    pub state: EscalationState,
    /// The utterance or message that opened it.
    pub utterance_id: String,
    pub created_at_ms: i64,
    pub handling: Handling,
}

/// What responders have done about an escalation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handling {
    pub acknowledged_by: Option<String>,
    pub acknowledged_at_ms: Option<i64>,
    pub resolved_by: Option<String>,
    pub resolved_at_ms: Option<i64>,
    pub disposition: Option<Disposition>,
    /// Rounds of pages sent or queued (the first page is round 1).
    pub page_rounds: u32,
}

/// What goes back on the live channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directive {
    pub escalation_id: String,
    pub tier: Tier,
    pub severity: Severity,
    pub referral_text: String,
    pub utterance_id: String,
    pub reason_code: String,
}

/// The escalation open in one conversation, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Open {
    pub id: EscalationId,
    pub severity: Severity,
}

/// What a trigger does to a conversation's open escalation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No escalation open: record a new one and send a directive.
    New,
    /// Severity rises: record the rise, re-page, send a directive again.
    Raise(Open),
    /// Already covered: nothing new to record or send.
    Attach(Open),
}

pub fn step(open: Option<Open>, trigger: &Trigger) -> Step {
    match open {
        None => Step::New,
        Some(o) if trigger.severity > o.severity => Step::Raise(o),
        Some(o) => Step::Attach(o),
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher() -> &'static Matcher {
        static M: std::sync::OnceLock<Matcher> = std::sync::OnceLock::new();
        M.get_or_init(|| Matcher::builtin().expect("rules"))
    }

    #[test]
    fn decision_table() {
        let cases: &[(&str, Option<(Tier, Severity)>)] = &[
            (
                "i have a plan to kill myself tonight",
                Some((Tier::Phrase, Severity::Imminent)),
            ),
            (
                "i want to kill myself",
                Some((Tier::Phrase, Severity::High)),
            ),
            (
                "i wish i was dead",
                Some((Tier::Phrase, Severity::Moderate)),
            ),
            (
                "im not going to kill myself",
                Some((Tier::Context, Severity::Low)),
            ),
            ("can we move my appointment to friday", None),
        ];
        for (text, want) in cases {
            let got = decide(matcher(), &matcher().detect(text)).map(|t| (t.tier, t.severity));
            assert_eq!(got, *want, "{text:?}");
        }
    }

    #[test]
    fn steps() {
        let t = |s| Trigger {
            tier: Tier::Phrase,
            severity: s,
            rule_id: "r".into(),
            reason_code: "r".into(),
        };
        let open = Open {
            id: EscalationId::new(),
            severity: Severity::High,
        };
        assert_eq!(step(None, &t(Severity::Low)), Step::New);
        assert_eq!(step(Some(open), &t(Severity::Imminent)), Step::Raise(open));
        assert_eq!(step(Some(open), &t(Severity::High)), Step::Attach(open));
        assert_eq!(step(Some(open), &t(Severity::Low)), Step::Attach(open));
    }
}
