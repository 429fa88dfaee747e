//! Context around a match that lowers `escalate` to `review`.
//!
//! "I'm not going to kill myself", "my brother wants to kill himself", "I
//! tried to kill myself when I was sixteen", "if I fail I'm going to kill
//! myself": the words are crisis words, the meaning is not an unambiguous
//! crisis. Tier 1 cannot weigh that, so such matches go to `review` (Tier 2,
//! or a clinician) instead of paging at once. Context never lowers a match to
//! nothing: a negated crisis phrase is still a conversation about suicide.
//!
//! Cues are phrases from the rule files. A cue is looked for just before the
//! matched phrase (`adjacent`, stepping over `skip` words such as "really"),
//! or anywhere within `reach` words before or after it, not crossing a
//! `barrier` word such as "but" that starts a new thought.

use rustc_hash::{FxHashMap, FxHashSet};

use serde::Deserialize;

/// The farthest a cue may stand from its phrase, in words.
pub const MAX_REACH: usize = 12;

/// Why a match was lowered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextKind {
    Negation,
    ThirdParty,
    Past,
    Condition,
}

impl ContextKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ContextKind::Negation => "negation",
            ContextKind::ThirdParty => "third_party",
            ContextKind::Past => "past",
            ContextKind::Condition => "condition",
        }
    }
}

/// One kind of context for one language.
#[derive(Debug, Clone)]
pub struct ContextRule {
    pub kind: ContextKind,
    /// A `before` cue must end right before the match (skip words aside).
    pub adjacent: bool,
    /// How many words away a cue may stand (or be skipped, when adjacent).
    pub reach: usize,
    /// Cue phrases looked for before the match, as word lists.
    before: Vec<Vec<String>>,
    /// Cue phrases looked for after the match.
    after: Vec<Vec<String>>,
    skip: FxHashSet<String>,
    barriers: FxHashSet<String>,
    /// Cues by the word they end or begin with: this runs on every match,
    /// and a kind has a hundred cues or more once phrases are expanded, so
    /// each word of context looks up the few cues it could belong to.
    before_by_last: FxHashMap<String, Vec<usize>>,
    before_by_first: FxHashMap<String, Vec<usize>>,
    after_by_first: FxHashMap<String, Vec<usize>>,
}

fn index(
    cues: &[Vec<String>],
    key: impl Fn(&[String]) -> Option<&String>,
) -> FxHashMap<String, Vec<usize>> {
    let mut m: FxHashMap<String, Vec<usize>> = FxHashMap::default();
    for (i, c) in cues.iter().enumerate() {
        if let Some(w) = key(c) {
            m.entry(w.clone()).or_default().push(i);
        }
    }
    m
}

impl ContextRule {
    pub fn new(
        kind: ContextKind,
        before: Vec<Vec<String>>,
        after: Vec<Vec<String>>,
        adjacent: bool,
        reach: usize,
        skip: impl IntoIterator<Item = String>,
        barriers: impl IntoIterator<Item = String>,
    ) -> Self {
        ContextRule {
            kind,
            adjacent,
            reach,
            before_by_last: index(&before, |c| c.last()),
            before_by_first: index(&before, |c| c.first()),
            after_by_first: index(&after, |c| c.first()),
            before,
            after,
            skip: skip.into_iter().collect(),
            barriers: barriers.into_iter().collect(),
        }
    }

    /// Whether this context holds, given the words before the match (in text
    /// order) and after it.
    pub fn applies(&self, before: &[&str], after: &[&str]) -> bool {
        self.applies_before(before) || self.applies_after(after)
    }

    fn applies_before(&self, before: &[&str]) -> bool {
        if self.before.is_empty() {
            return false;
        }
        if self.adjacent {
            let mut end = before.len();
            let mut skipped = 0;
            while end > 0 {
                if self
                    .before_by_last
                    .get(before[end - 1])
                    .is_some_and(|cues| {
                        cues.iter()
                            .any(|&c| ends_with(&before[..end], &self.before[c]))
                    })
                {
                    return true;
                }
                if skipped >= self.reach || !self.skip.contains(before[end - 1]) {
                    return false;
                }
                end -= 1;
                skipped += 1;
            }
            return false;
        }
        let lo = before.len().saturating_sub(self.reach);
        let region = &before[lo..];
        let start = region
            .iter()
            .rposition(|w| self.barriers.contains(*w))
            .map_or(0, |i| i + 1);
        contains(&region[start..], &self.before, &self.before_by_first)
    }

    fn applies_after(&self, after: &[&str]) -> bool {
        if self.after.is_empty() {
            return false;
        }
        let region = &after[..after.len().min(self.reach)];
        let end = region
            .iter()
            .position(|w| self.barriers.contains(*w))
            .unwrap_or(region.len());
        contains(&region[..end], &self.after, &self.after_by_first)
    }
}

fn ends_with(words: &[&str], cue: &[String]) -> bool {
    words.len() >= cue.len()
        && words[words.len() - cue.len()..]
            .iter()
            .zip(cue)
            .all(|(a, b)| *a == b)
}

/// Whether any cue occurs in `words`, looking up cues by each word.
fn contains(
    words: &[&str],
    cues: &[Vec<String>],
    by_first: &FxHashMap<String, Vec<usize>>,
) -> bool {
    (0..words.len()).any(|i| {
        by_first.get(words[i]).is_some_and(|cs| {
            cs.iter().any(|&c| {
                let cue = &cues[c];
                words.len() - i >= cue.len() && words[i..].iter().zip(cue).all(|(a, b)| *a == b)
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(adjacent: bool, reach: usize, before: &[&str], after: &[&str]) -> ContextRule {
        let cues = |l: &[&str]| {
            l.iter()
                .map(|c| c.split(' ').map(str::to_string).collect())
                .collect()
        };
        ContextRule::new(
            ContextKind::Negation,
            cues(before),
            cues(after),
            adjacent,
            reach,
            ["really", "ever"].iter().map(|s| s.to_string()),
            ["but", "now"].iter().map(|s| s.to_string()),
        )
    }

    #[test]
    fn adjacent_table() {
        let r = rule(true, 2, &["not", "never", "no plans to"], &[]);
        let cases: &[(&str, bool)] = &[
            ("im not", true),
            ("i would never", true),
            ("i would never ever", true),
            ("im not really ever", true),
            ("im not okay i", false),
            ("i have no plans to", true),
            ("", false),
            ("not really really really", false),
        ];
        for (before, want) in cases {
            let words: Vec<&str> = before.split_whitespace().collect();
            assert_eq!(r.applies(&words, &[]), *want, "{before:?}");
        }
    }

    #[test]
    fn reach_table() {
        let r = rule(
            false,
            6,
            &["used to", "when i was"],
            &["years ago", "when i was"],
        );
        let cases: &[(&str, &str, bool)] = &[
            ("i used to", "", true),
            ("when i was sixteen i", "", true),
            ("i used to be fine but now i", "", false),
            ("", "when i was sixteen", true),
            ("", "two years ago", true),
            ("", "last night", false),
            ("", "but it was years ago", false),
            ("when i was a kid and a teenager and now i", "", false),
        ];
        for (before, after, want) in cases {
            let b: Vec<&str> = before.split_whitespace().collect();
            let a: Vec<&str> = after.split_whitespace().collect();
            assert_eq!(r.applies(&b, &a), *want, "{before:?} / {after:?}");
        }
    }
}
