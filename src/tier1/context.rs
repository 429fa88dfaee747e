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
    /// For each set above, a filter that turns away most words that are
    /// not in it before they are hashed and looked up: every word of a
    /// match's surroundings is asked about, most of them more than once.
    skip_filter: WordFilter,
    barrier_filter: WordFilter,
    before_last_filter: WordFilter,
    before_first_filter: WordFilter,
    after_first_filter: WordFilter,
}

/// A set of words as 256 bits, one per signature of a word's length and
/// its first and last bytes: never says no to a word of the set.
#[derive(Debug, Clone, Default)]
struct WordFilter([u64; 4]);

impl WordFilter {
    fn of<'a>(words: impl IntoIterator<Item = &'a String>) -> Self {
        let mut f = WordFilter::default();
        for w in words {
            let i = Self::signature(w);
            f.0[i / 64] |= 1 << (i % 64);
        }
        f
    }

    #[inline]
    fn signature(w: &str) -> usize {
        let b = w.as_bytes();
        let (first, last) = match (b.first(), b.last()) {
            (Some(&f), Some(&l)) => (u32::from(f), u32::from(l)),
            _ => (0, 0),
        };
        let x = ((b.len() as u32) << 16) | (first << 8) | last;
        (x.wrapping_mul(0x9E37_79B1) >> 24) as usize
    }

    #[inline]
    fn may_contain(&self, w: &str) -> bool {
        let i = Self::signature(w);
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
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
        let skip: FxHashSet<String> = skip.into_iter().collect();
        let barriers: FxHashSet<String> = barriers.into_iter().collect();
        let before_by_last = index(&before, |c| c.last());
        let before_by_first = index(&before, |c| c.first());
        let after_by_first = index(&after, |c| c.first());
        ContextRule {
            kind,
            adjacent,
            reach,
            skip_filter: WordFilter::of(&skip),
            barrier_filter: WordFilter::of(&barriers),
            before_last_filter: WordFilter::of(before_by_last.keys()),
            before_first_filter: WordFilter::of(before_by_first.keys()),
            after_first_filter: WordFilter::of(after_by_first.keys()),
            before_by_last,
            before_by_first,
            after_by_first,
            before,
            after,
            skip,
            barriers,
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
                let w = before[end - 1];
                if self.before_last_filter.may_contain(w)
                    && self.before_by_last.get(w).is_some_and(|cues| {
                        cues.iter()
                            .any(|&c| ends_with(&before[..end], &self.before[c]))
                    })
                {
                    return true;
                }
                if skipped >= self.reach
                    || !(self.skip_filter.may_contain(w) && self.skip.contains(w))
                {
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
            .rposition(|w| self.is_barrier(w))
            .map_or(0, |i| i + 1);
        contains(
            &region[start..],
            &self.before,
            &self.before_by_first,
            &self.before_first_filter,
        )
    }

    fn applies_after(&self, after: &[&str]) -> bool {
        if self.after.is_empty() {
            return false;
        }
        let region = &after[..after.len().min(self.reach)];
        let end = region
            .iter()
            .position(|w| self.is_barrier(w))
            .unwrap_or(region.len());
        contains(
            &region[..end],
            &self.after,
            &self.after_by_first,
            &self.after_first_filter,
        )
    }

    #[inline]
    fn is_barrier(&self, w: &str) -> bool {
        self.barrier_filter.may_contain(w) && self.barriers.contains(w)
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
    filter: &WordFilter,
) -> bool {
    (0..words.len()).any(|i| {
        filter.may_contain(words[i])
            && by_first.get(words[i]).is_some_and(|cs| {
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
    fn filter_holds_every_word_of_its_set() {
        let words: Vec<String> = [
            "not",
            "never",
            "dont",
            "i",
            "a",
            "",
            "when",
            "was",
            "my",
            "brother",
            "hes",
            "theyre",
            "neither",
            "intentions",
            "x",
            "zz",
            "no longer",
        ]
        .iter()
        .map(|w| w.to_string())
        .collect();
        let f = WordFilter::of(&words);
        for w in &words {
            assert!(f.may_contain(w), "{w:?}");
        }
        // It turns words away, or it would save nothing.
        let others = ["tuesday", "appointment", "pizza", "okay", "the", "session"];
        assert!(others.iter().any(|w| !f.may_contain(w)));
        assert!(!WordFilter::default().may_contain("not"));
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
