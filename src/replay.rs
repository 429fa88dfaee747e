//! Replaying recorded conversations through Tier 1, offline: the same
//! streaming calls the service makes, one conversation at a time.

use serde::Serialize;

use crate::corpus::{Conversation, Outcome};
use crate::tier1::{Action, Matcher, StreamState};

/// What Tier 1 decided for a whole conversation: the strongest outcome, the
/// rule that first reached it, and the event where that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub rule: Option<String>,
    pub event: Option<usize>,
}

pub fn replay(matcher: &Matcher, conv: &Conversation) -> Verdict {
    let mut state = StreamState::new();
    let mut best: Option<(Action, usize, usize)> = None; // action, rule, event
    for (i, e) in conv.events.iter().enumerate() {
        for d in matcher.feed(&mut state, e.speaker, &e.text, e.is_final) {
            if best.is_none_or(|(a, _, _)| d.action > a) {
                best = Some((d.action, d.rule.0 as usize, i));
            }
        }
    }
    match best {
        None => Verdict {
            outcome: Outcome::None,
            rule: None,
            event: None,
        },
        Some((a, r, i)) => Verdict {
            outcome: match a {
                Action::Escalate => Outcome::Escalate,
                Action::Review => Outcome::Review,
            },
            rule: Some(matcher.rules().rules[r].id.clone()),
            event: Some(i),
        },
    }
}

/// One line of `crisisd replay` output; the field order is the format.
#[derive(Debug, Serialize)]
pub struct ReplayLine<'a> {
    pub id: &'a str,
    pub outcome: &'static str,
    pub tier: Option<u8>,
    pub rule: Option<&'a str>,
    pub event: Option<usize>,
}

impl<'a> ReplayLine<'a> {
    pub fn new(id: &'a str, v: &'a Verdict) -> Self {
        ReplayLine {
            id,
            outcome: v.outcome.as_str(),
            tier: (v.outcome != Outcome::None).then_some(1),
            rule: v.rule.as_deref(),
            event: v.event,
        }
    }
}
