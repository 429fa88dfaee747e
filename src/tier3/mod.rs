//! Tier 3: behavioral signals from the schedule.
//!
//! A patient who stops coming can be in more danger than one who says so.
//! This module owns the appointment events of one patient, the pattern
//! rules over them (`rules/behavior.toml`, data not code) and their
//! evaluation. It is pure: the api layer loads a patient's history from the
//! store, asks [`BehaviorRules::evaluate`] what fires on a new event, and
//! hands the result to the escalation path.
//!
//! Patterns are judged on `occurred_at` order, never arrival order, so an
//! event that arrives late is placed where it happened. What has fired
//! stays fired: a late `attended` event that would have broken a streak
//! does not take back a page already sent (a clinician resolves it).
//!
//! ```
//! use crisisd::tier3::{BehaviorRules, Event, History, Initiator, Kind};
//! use crisisd::ids::{AppointmentEventId, AppointmentId};
//!
//! let rules = BehaviorRules::builtin().expect("the shipped rules load");
//! let day = 86_400_000;
//! let cancel = |n: i64| Event {
//!     id: AppointmentEventId::parse(&format!("e{n}")).unwrap(),
//!     appointment: AppointmentId::parse(&format!("a{n}")).unwrap(),
//!     kind: Kind::Cancelled,
//!     initiator: Some(Initiator::Patient),
//!     occurred_at_ms: n * 7 * day,
//!     scheduled_for_ms: n * 7 * day + 3 * day,
//! };
//! let mut history = History::default();
//! history.events = vec![cancel(1), cancel(2)];
//! let fired = rules.evaluate(&history, &cancel(3));
//! assert_eq!(rules.rule(fired[0].rule).id, "behavior.cancellation_streak");
//! ```

pub mod patterns;
pub mod rules;

use serde::{Deserialize, Serialize};

use crate::domain::Tier;
use crate::ids::AppointmentEventId;
use crate::ids::AppointmentId;

pub use patterns::Fired;
pub use rules::{BehaviorRule, BehaviorRules, RuleError};

/// What happened to an appointment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Booked,
    Cancelled,
    Rescheduled,
    NoShow,
    Attended,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Booked => "booked",
            Kind::Cancelled => "cancelled",
            Kind::Rescheduled => "rescheduled",
            Kind::NoShow => "no_show",
            Kind::Attended => "attended",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        [
            Kind::Booked,
            Kind::Cancelled,
            Kind::Rescheduled,
            Kind::NoShow,
            Kind::Attended,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// Who made the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Initiator {
    Patient,
    Practice,
}

impl Initiator {
    pub fn as_str(self) -> &'static str {
        match self {
            Initiator::Patient => "patient",
            Initiator::Practice => "practice",
        }
    }

    pub fn parse(s: &str) -> Option<Initiator> {
        match s {
            "patient" => Some(Initiator::Patient),
            "practice" => Some(Initiator::Practice),
            _ => None,
        }
    }
}

/// One appointment event of one patient, validated at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: AppointmentEventId,
    pub appointment: AppointmentId,
    pub kind: Kind,
    /// Required for cancellations and reschedules; a no-show is the
    /// patient's by nature.
    pub initiator: Option<Initiator>,
    pub occurred_at_ms: i64,
    pub scheduled_for_ms: i64,
}

impl Event {
    /// Placement in the patient's timeline: by when it happened, ties
    /// broken by id so every replica and every arrival order agree.
    fn order_key(&self) -> (i64, &str) {
        (self.occurred_at_ms, self.id.as_str())
    }
}

/// One call of the patient, as Tier 3 sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallRecord {
    pub started_at_ms: i64,
    /// A Tier 1 `review` detection happened in the patient's speech.
    pub review: bool,
}

/// A rule that fired before, for cooldowns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PastFiring {
    pub rule_id: String,
    pub anchor_at_ms: i64,
}

/// What the store knows about one patient that the rules read.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Earlier appointment events, any order.
    pub events: Vec<Event>,
    /// The patient's escalations: creation time and tier.
    pub escalations: Vec<(i64, Tier)>,
    /// The patient's most recent calls.
    pub calls: Vec<CallRecord>,
    pub firings: Vec<PastFiring>,
}
