//! crisisd: real-time crisis detection for therapy practices.
//!
//! Every call transcript and every inbound text from a patient passes
//! through crisisd as it happens. This crate holds the detection core; the
//! `crisisd` binary wraps it in a command line.
//!
//! Tier 1 finds unambiguous crisis language with no model in the path. One
//! [`Matcher`](tier1::Matcher) is compiled from the rule files and shared;
//! each conversation keeps a small [`StreamState`](tier1::StreamState):
//!
//! ```
//! use crisisd::domain::Speaker;
//! use crisisd::tier1::{Action, Matcher, StreamState};
//!
//! let matcher = Matcher::builtin().expect("the shipped rules compile");
//! let mut call = StreamState::new();
//!
//! // The agent's own script never triggers.
//! let d = matcher.feed(&mut call, Speaker::Agent, "Are you thinking of hurting yourself?", true);
//! assert!(d.is_empty());
//!
//! // A phrase split across two utterances is still found.
//! assert!(matcher.feed(&mut call, Speaker::Patient, "honestly I want to", true).is_empty());
//! let d = matcher.feed(&mut call, Speaker::Patient, "k1ll myslef", true);
//! assert_eq!(d[0].action, Action::Escalate);
//! println!("rule {}", matcher.rule(d[0].rule).id);
//!
//! // Negation lowers to review; it never dismisses.
//! let d = matcher.detect("I'm not going to hurt myself");
//! assert_eq!(d[0].action, Action::Review);
//! ```

pub mod api;
pub mod audit;
pub mod config;
pub mod conversation;
pub mod corpus;
pub mod domain;
pub mod escalation;
pub mod eval;
pub mod ids;
pub mod loadgen;
pub mod pager;
pub mod phone;
pub mod replay;
pub mod roster;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tier1;
pub mod tier2;
pub mod tier3;
