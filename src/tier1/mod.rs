//! Tier 1: unambiguous crisis language, found with no model in the path.
//!
//! Text is [normalized](normalize), matched against the literal patterns of
//! the [rule files](rules) by one automaton ([`Matcher`]), filtered by
//! exclusions, and weighed by its [context]. The result is a list of
//! [`Detection`]s, each `escalate` or `review`; turning detections into
//! escalations is the escalation module's job, not this one's.

mod automaton;
pub mod context;
pub mod matcher;
pub mod normalize;
pub mod phrase;
pub mod rules;
mod words;

pub use context::ContextKind;
pub use matcher::{Detection, Matcher, RuleIndex, StreamState};
pub use normalize::Normalizer;
pub use rules::{Action, Category, RuleSet};
