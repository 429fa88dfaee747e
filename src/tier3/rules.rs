//! `behavior.toml`: Tier 3's pattern rules, as data.
//!
//! The language is three conditions over one event filter (see the shipped
//! file for the format). Loading validates every rule and reports every
//! problem at once, each naming the file and the rule, so that a rule the
//! evaluator could not honour (a streak of one, a zero window, a condition
//! missing or doubled) stops the server at start instead of silently never
//! firing.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use super::{Initiator, Kind};
use crate::domain::{Severity, Tier};

/// The shipped rules, compiled in.
const BUILTIN: (&str, &str) = (
    "rules/behavior.toml",
    include_str!("../../rules/behavior.toml"),
);

/// Longest streak a rule may ask for; it bounds what is kept per patient.
pub const MAX_STREAK: u32 = 32;
/// Longest window or cooldown: state older than this is never read.
pub const MAX_WINDOW: Duration = Duration::from_secs(366 * 86_400);

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RuleError {
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: cannot read: {message}")]
    Io { file: String, message: String },
    #[error("{file}: rule `{rule}`: {message}")]
    Invalid {
        file: String,
        rule: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: String,
    #[serde(default)]
    description: String,
    severity: Severity,
    cooldown: String,
    on: RawOn,
    streak: Option<RawStreak>,
    after_escalation: Option<RawAfterEscalation>,
    after_review: Option<RawAfterReview>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOn {
    kinds: Vec<Kind>,
    initiator: Option<Initiator>,
    notice_under: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStreak {
    count: u32,
    within: String,
    #[serde(default)]
    reset: Vec<Kind>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAfterEscalation {
    tiers: Vec<Tier>,
    within: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAfterReview {
    within: Option<String>,
}

/// Which events a rule looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct On {
    pub kinds: Vec<Kind>,
    pub initiator: Option<Initiator>,
    /// Only events made less than this many ms before the session.
    pub notice_under_ms: Option<i64>,
}

impl On {
    pub fn matches(&self, e: &super::Event) -> bool {
        self.kinds.contains(&e.kind)
            && self
                .initiator
                .is_none_or(|want| e.initiator.is_none_or(|got| got == want))
            && self
                .notice_under_ms
                .is_none_or(|n| e.scheduled_for_ms.saturating_sub(e.occurred_at_ms) < n)
    }
}

/// What must hold, besides the event itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    Streak {
        count: u32,
        within_ms: i64,
        reset: Vec<Kind>,
    },
    AfterEscalation {
        tiers: Vec<Tier>,
        within_ms: i64,
    },
    AfterReview {
        within_ms: Option<i64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BehaviorRule {
    pub id: String,
    pub description: String,
    pub severity: Severity,
    pub cooldown_ms: i64,
    pub on: On,
    pub condition: Condition,
}

impl BehaviorRule {
    /// How far back this rule reads events or escalations.
    pub fn window_ms(&self) -> i64 {
        match &self.condition {
            Condition::Streak { within_ms, .. } | Condition::AfterEscalation { within_ms, .. } => {
                *within_ms
            }
            Condition::AfterReview { within_ms } => within_ms.unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct BehaviorRules {
    rules: Vec<BehaviorRule>,
    /// Where they came from, for reports.
    pub file: String,
}

fn duration_ms(s: &str) -> Result<i64, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("duration {s:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("duration {s:?} must be more than zero"));
    }
    if d > MAX_WINDOW {
        return Err(format!("duration {s:?} is longer than 366 days"));
    }
    Ok(d.as_millis() as i64)
}

fn compile(raw: RawRule) -> Result<BehaviorRule, String> {
    if raw.id.is_empty()
        || !raw
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err("the id must be letters, digits, `.`, `_` or `-`".to_string());
    }
    if raw.on.kinds.is_empty() {
        return Err("`on.kinds` is empty: the rule could never fire".to_string());
    }
    let cooldown_ms = duration_ms(&raw.cooldown).map_err(|e| format!("`cooldown`: {e}"))?;
    let notice_under_ms = raw
        .on
        .notice_under
        .as_deref()
        .map(duration_ms)
        .transpose()
        .map_err(|e| format!("`on.notice_under`: {e}"))?;
    let conditions = usize::from(raw.streak.is_some())
        + usize::from(raw.after_escalation.is_some())
        + usize::from(raw.after_review.is_some());
    if conditions != 1 {
        return Err(format!(
            "needs exactly one of `streak`, `after_escalation`, `after_review`; has {conditions}"
        ));
    }
    let condition = if let Some(s) = raw.streak {
        if !(2..=MAX_STREAK).contains(&s.count) {
            return Err(format!(
                "`streak.count` must be 2-{MAX_STREAK}, not {}",
                s.count
            ));
        }
        if let Some(k) = s.reset.iter().find(|k| raw.on.kinds.contains(k)) {
            return Err(format!(
                "`{}` is both in `on.kinds` and in `streak.reset`",
                k.as_str()
            ));
        }
        Condition::Streak {
            count: s.count,
            within_ms: duration_ms(&s.within).map_err(|e| format!("`streak.within`: {e}"))?,
            reset: s.reset,
        }
    } else if let Some(a) = raw.after_escalation {
        if a.tiers.is_empty() {
            return Err("`after_escalation.tiers` is empty".to_string());
        }
        if a.tiers.contains(&Tier::Behavior) {
            // A behavior escalation feeding behavior rules would let one
            // pattern page again through another without new evidence.
            return Err("`after_escalation.tiers` may name phrase and context only".to_string());
        }
        Condition::AfterEscalation {
            tiers: a.tiers,
            within_ms: duration_ms(&a.within)
                .map_err(|e| format!("`after_escalation.within`: {e}"))?,
        }
    } else {
        let r = raw.after_review.unwrap_or(RawAfterReview { within: None });
        Condition::AfterReview {
            within_ms: r
                .within
                .as_deref()
                .map(duration_ms)
                .transpose()
                .map_err(|e| format!("`after_review.within`: {e}"))?,
        }
    };
    Ok(BehaviorRule {
        id: raw.id,
        description: raw.description,
        severity: raw.severity,
        cooldown_ms,
        on: On {
            kinds: raw.on.kinds,
            initiator: raw.on.initiator,
            notice_under_ms,
        },
        condition,
    })
}

impl BehaviorRules {
    /// The shipped `rules/behavior.toml`.
    pub fn builtin() -> Result<BehaviorRules, Vec<RuleError>> {
        BehaviorRules::from_source(BUILTIN.0, BUILTIN.1)
    }

    /// Loads a behavior rule file.
    pub fn load(path: &Path) -> Result<BehaviorRules, Vec<RuleError>> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![RuleError::Io {
                file: file.clone(),
                message: e.to_string(),
            }]
        })?;
        BehaviorRules::from_source(&file, &text)
    }

    /// Parses and validates; every problem is reported, not only the first.
    pub fn from_source(file: &str, text: &str) -> Result<BehaviorRules, Vec<RuleError>> {
        let parsed: File = toml::from_str(text).map_err(|e| {
            vec![RuleError::Parse {
                file: file.to_string(),
                message: e.message().to_string(),
            }]
        })?;
        let mut errors = Vec::new();
        let mut rules = Vec::new();
        let mut seen = HashSet::new();
        for raw in parsed.rule {
            let id = raw.id.clone();
            if !seen.insert(id.clone()) {
                errors.push(RuleError::Invalid {
                    file: file.to_string(),
                    rule: id,
                    message: "id already used".to_string(),
                });
                continue;
            }
            match compile(raw) {
                Ok(r) => rules.push(r),
                Err(message) => errors.push(RuleError::Invalid {
                    file: file.to_string(),
                    rule: id,
                    message,
                }),
            }
        }
        if errors.is_empty() {
            Ok(BehaviorRules {
                rules,
                file: file.to_string(),
            })
        } else {
            Err(errors)
        }
    }

    pub fn rules(&self) -> &[BehaviorRule] {
        &self.rules
    }

    pub fn rule(&self, i: usize) -> &BehaviorRule {
        &self.rules[i]
    }

    /// How far back any rule reads events: older events are pruned.
    pub fn longest_window_ms(&self) -> i64 {
        self.rules
            .iter()
            .map(BehaviorRule::window_ms)
            .max()
            .unwrap_or(0)
    }

    /// How far back past firings matter.
    pub fn longest_cooldown_ms(&self) -> i64 {
        self.rules.iter().map(|r| r.cooldown_ms).max().unwrap_or(0)
    }

    /// The longest streak asked for: at most this many events of a patient
    /// are ever needed in one window.
    pub fn longest_streak(&self) -> u32 {
        self.rules
            .iter()
            .filter_map(|r| match r.condition {
                Condition::Streak { count, .. } => Some(count),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[rule]]
id = "s"
severity = "moderate"
cooldown = "30d"
on = { kinds = ["cancelled", "no_show"], initiator = "patient" }
streak = { count = 3, within = "45d", reset = ["attended"] }
"#;

    fn errors(text: &str) -> Vec<String> {
        match BehaviorRules::from_source("b.toml", text) {
            Ok(_) => vec![],
            Err(es) => es.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn shipped_rules_load() {
        let r = BehaviorRules::builtin().expect("shipped rules");
        assert_eq!(r.rules().len(), 3);
        assert_eq!(r.longest_window_ms(), 45 * 86_400_000);
        assert_eq!(r.longest_streak(), 3);
    }

    #[test]
    fn rules_that_cannot_be_evaluated_are_rejected_by_name() {
        assert!(errors(GOOD).is_empty());
        let cases: &[(&str, &str)] = &[
            (
                "streak = { count = 1, within = \"45d\" }",
                "b.toml: rule `s`: `streak.count` must be 2-32, not 1",
            ),
            (
                "streak = { count = 3, within = \"0d\" }",
                "b.toml: rule `s`: `streak.within`: duration \"0d\" must be more than zero",
            ),
            (
                "streak = { count = 3, within = \"soon\" }",
                "b.toml: rule `s`: `streak.within`: duration \"soon\"",
            ),
            (
                "streak = { count = 3, within = \"400d\" }",
                "b.toml: rule `s`: `streak.within`: duration \"400d\" is longer than 366 days",
            ),
            (
                "streak = { count = 3, within = \"45d\", reset = [\"cancelled\"] }",
                "b.toml: rule `s`: `cancelled` is both in `on.kinds` and in `streak.reset`",
            ),
            (
                "streak = { count = 3, within = \"45d\" }\nafter_review = {}",
                "b.toml: rule `s`: needs exactly one of `streak`, `after_escalation`, `after_review`; has 2",
            ),
            (
                "",
                "b.toml: rule `s`: needs exactly one of `streak`, `after_escalation`, `after_review`; has 0",
            ),
            (
                "after_escalation = { tiers = [\"behavior\"], within = \"14d\" }",
                "b.toml: rule `s`: `after_escalation.tiers` may name phrase and context only",
            ),
            (
                "after_escalation = { tiers = [], within = \"14d\" }",
                "b.toml: rule `s`: `after_escalation.tiers` is empty",
            ),
            ("sreak = {}", "b.toml: unknown field `sreak`"),
        ];
        let head = "[[rule]]\nid = \"s\"\nseverity = \"moderate\"\ncooldown = \"30d\"\non = { kinds = [\"cancelled\"] }\n";
        for (tail, want) in cases {
            let got = errors(&format!("{head}{tail}\n"));
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "{tail:?}: got {got:?}, want {want:?}"
            );
        }
        let more: &[(&str, &str)] = &[
            (
                "[[rule]]\nid = \"s\"\nseverity = \"moderate\"\ncooldown = \"30d\"\non = { kinds = [] }\nafter_review = {}\n",
                "b.toml: rule `s`: `on.kinds` is empty: the rule could never fire",
            ),
            (
                "[[rule]]\nid = \"s\"\nseverity = \"moderate\"\ncooldown = \"0s\"\non = { kinds = [\"no_show\"] }\nafter_review = {}\n",
                "b.toml: rule `s`: `cooldown`: duration \"0s\" must be more than zero",
            ),
            (
                "[[rule]]\nid = \"s\"\nseverity = \"dire\"\ncooldown = \"1d\"\non = { kinds = [\"no_show\"] }\nafter_review = {}\n",
                "b.toml: unknown variant `dire`",
            ),
            (
                "[[rule]]\nid = \"s\"\nseverity = \"low\"\ncooldown = \"1d\"\non = { kinds = [\"vanished\"] }\nafter_review = {}\n",
                "b.toml: unknown variant `vanished`",
            ),
        ];
        for (text, want) in more {
            let got = errors(text);
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "{text:?}: got {got:?}, want {want:?}"
            );
        }
        let dup = format!("{GOOD}{GOOD}");
        assert_eq!(errors(&dup), vec!["b.toml: rule `s`: id already used"]);
    }
}
