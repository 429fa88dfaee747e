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
//! `barrier` word such as "but" that starts a new thought. A cue right
//! after one of its rule's `not_after` phrases is none: "if" in "I don't
//! know if I'll still be here" asks whether, and opens no condition.

use rustc_hash::{FxHashMap, FxHashSet};

use super::words::WordTable;

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
    /// Phrases after which a cue is no cue.
    not_after: Vec<Vec<String>>,
    /// Cues by the word they end or begin with: a kind has a hundred cues
    /// or more once phrases are expanded, so each word of context looks up
    /// the few cues it could belong to.
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
        let skip: FxHashSet<String> = skip.into_iter().collect();
        let barriers: FxHashSet<String> = barriers.into_iter().collect();
        let before_by_last = index(&before, |c| c.last());
        let before_by_first = index(&before, |c| c.first());
        let after_by_first = index(&after, |c| c.first());
        ContextRule {
            kind,
            adjacent,
            reach,
            before_by_last,
            before_by_first,
            after_by_first,
            before,
            after,
            skip,
            barriers,
            not_after: Vec::new(),
        }
    }

    /// The rule, with phrases after which a cue is none.
    pub fn with_not_after(mut self, not_after: Vec<Vec<String>>) -> Self {
        self.not_after = not_after;
        self
    }

    /// Whether this context holds, given the words before the match (in text
    /// order) and after it. The matcher runs the same test on word ids
    /// (`ContextSet`); this form, on the words as written, is what the
    /// compiled one is tested against.
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
                if self.before_by_last.get(w).is_some_and(|cues| {
                    cues.iter().any(|&c| {
                        let cue = &self.before[c];
                        ends_with(&before[..end], cue)
                            && !self.after_not_after(&before[..end - cue.len()])
                    })
                }) {
                    return true;
                }
                if skipped >= self.reach || !self.skip.contains(w) {
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
        (lo + start..before.len()).any(|i| {
            self.before_by_first.get(before[i]).is_some_and(|cs| {
                cs.iter().any(|&c| {
                    let cue = &self.before[c];
                    before.len() - i >= cue.len()
                        && before[i..].iter().zip(cue).all(|(a, b)| *a == b)
                        && !self.after_not_after(&before[..i])
                })
            })
        })
    }

    /// Whether `words` end with a phrase that makes a cue after it none.
    fn after_not_after(&self, words: &[&str]) -> bool {
        self.not_after.iter().any(|p| ends_with(words, p))
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
        contains(&region[..end], &self.after, &self.after_by_first)
    }

    #[inline]
    fn is_barrier(&self, w: &str) -> bool {
        self.barriers.contains(w)
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

/// The context rules of one language, compiled to word ids: each word
/// around a match is looked up once, in one table, and every rule then
/// compares ids. `ContextRule::applies` is the same test on strings, where
/// each rule asks its own sets about every word again; this runs for every
/// escalate match, and on a long text the string form was 7% of Tier 1.
#[derive(Debug, Clone, Default)]
pub(crate) struct ContextSet {
    words: WordTable<u16>,
    rules: Vec<Compiled>,
    /// How many words before and after a match some rule can look at.
    need_before: usize,
    need_after: usize,
}

/// The id of a word that no cue, skip or barrier list of the language has.
pub(crate) const OTHER: u16 = u16::MAX;

#[derive(Debug, Clone)]
struct Compiled {
    kind: ContextKind,
    adjacent: bool,
    reach: usize,
    before: Vec<Vec<u16>>,
    after: Vec<Vec<u16>>,
    skip: IdSet,
    barriers: IdSet,
    not_after: Vec<Vec<u16>>,
    /// Cue indices by the id of the word they end or begin with.
    before_by_last: Vec<Vec<u32>>,
    before_by_first: Vec<Vec<u32>>,
    after_by_first: Vec<Vec<u32>>,
}

#[derive(Debug, Clone, Default)]
struct IdSet(Vec<u64>);

impl IdSet {
    fn insert(&mut self, id: u16) {
        let i = usize::from(id);
        if self.0.len() <= i / 64 {
            self.0.resize(i / 64 + 1, 0);
        }
        self.0[i / 64] |= 1 << (i % 64);
    }

    #[inline]
    fn contains(&self, id: u16) -> bool {
        let i = usize::from(id);
        self.0.get(i / 64).is_some_and(|b| b & (1 << (i % 64)) != 0)
    }
}

impl ContextSet {
    /// `None` if the language has more context words than ids.
    pub(crate) fn new(rules: &[ContextRule]) -> Option<ContextSet> {
        let mut words: WordTable<u16> = WordTable::with_capacity(64);
        let mut too_many = false;
        let mut id = |w: &str| {
            words.insert_with(w.as_bytes(), |n| {
                u16::try_from(n)
                    .ok()
                    .filter(|&i| i != OTHER)
                    .unwrap_or_else(|| {
                        too_many = true;
                        OTHER
                    })
            })
        };
        let mut compiled = Vec::with_capacity(rules.len());
        let (mut need_before, mut need_after) = (0, 0);
        for r in rules {
            let cues = |cs: &[Vec<String>], id: &mut dyn FnMut(&str) -> u16| -> Vec<Vec<u16>> {
                cs.iter()
                    .map(|c| c.iter().map(|w| id(w)).collect())
                    .collect()
            };
            let before = cues(&r.before, &mut id);
            let after = cues(&r.after, &mut id);
            let set = |ws: &FxHashSet<String>, id: &mut dyn FnMut(&str) -> u16| {
                let mut s = IdSet::default();
                for w in ws {
                    s.insert(id(w));
                }
                s
            };
            let skip = set(&r.skip, &mut id);
            let barriers = set(&r.barriers, &mut id);
            let not_after = cues(&r.not_after, &mut id);
            let longest = before.iter().map(Vec::len).max().unwrap_or(0);
            // A cue's start is checked against the phrases before it too.
            let longest_not_after = not_after.iter().map(Vec::len).max().unwrap_or(0);
            if !before.is_empty() {
                need_before = need_before.max(
                    longest_not_after
                        + if r.adjacent {
                            r.reach + longest
                        } else {
                            r.reach
                        },
                );
            }
            if !after.is_empty() {
                need_after = need_after.max(r.reach);
            }
            compiled.push(Compiled {
                kind: r.kind,
                adjacent: r.adjacent,
                reach: r.reach,
                before_by_last: by_id(&before, |c| c.last()),
                before_by_first: by_id(&before, |c| c.first()),
                after_by_first: by_id(&after, |c| c.first()),
                before,
                after,
                skip,
                barriers,
                not_after,
            });
        }
        (!too_many).then_some(ContextSet {
            words,
            rules: compiled,
            need_before,
            need_after,
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// How many words before a match, and after it, `kind_of` can use.
    pub(crate) fn reach(&self) -> (usize, usize) {
        (self.need_before, self.need_after)
    }

    /// The id of a word of normalized text.
    #[inline]
    pub(crate) fn id(&self, w: &[u8]) -> u16 {
        self.words.get(w).unwrap_or(OTHER)
    }

    /// The first rule's kind that holds for the words before the match (in
    /// text order) and after it, as ids: what `ContextRule::applies` on the
    /// same words, rule by rule, finds first.
    pub(crate) fn kind_of(&self, before: &[u16], after: &[u16]) -> Option<ContextKind> {
        self.rules
            .iter()
            .find(|c| c.applies_before(before) || c.applies_after(after))
            .map(|c| c.kind)
    }

    /// Which of the rules hold, in order: what the tests compare.
    #[cfg(test)]
    fn each(&self, before: &[u16], after: &[u16]) -> Vec<bool> {
        self.rules
            .iter()
            .map(|c| c.applies_before(before) || c.applies_after(after))
            .collect()
    }
}

fn by_id(cues: &[Vec<u16>], key: impl Fn(&[u16]) -> Option<&u16>) -> Vec<Vec<u32>> {
    let mut m: Vec<Vec<u32>> = Vec::new();
    for (i, c) in cues.iter().enumerate() {
        if let Some(&w) = key(c) {
            let w = usize::from(w);
            if m.len() <= w {
                m.resize(w + 1, Vec::new());
            }
            // Cue lists are far below 4 billion entries.
            m[w].push(i as u32);
        }
    }
    m
}

impl Compiled {
    fn applies_before(&self, before: &[u16]) -> bool {
        if self.before.is_empty() {
            return false;
        }
        if self.adjacent {
            let mut end = before.len();
            let mut skipped = 0;
            while end > 0 {
                let w = before[end - 1];
                if self.before_by_last.get(usize::from(w)).is_some_and(|cues| {
                    cues.iter().any(|&c| {
                        let cue = &self.before[c as usize];
                        ends_with_ids(&before[..end], cue)
                            && !self.after_not_after(&before[..end - cue.len()])
                    })
                }) {
                    return true;
                }
                if skipped >= self.reach || !self.skip.contains(w) {
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
            .rposition(|&w| self.barriers.contains(w))
            .map_or(0, |i| i + 1);
        (lo + start..before.len()).any(|i| {
            self.before_by_first
                .get(usize::from(before[i]))
                .is_some_and(|cs| {
                    cs.iter().any(|&c| {
                        let cue = &self.before[c as usize];
                        before.len() - i >= cue.len()
                            && before[i..i + cue.len()] == **cue
                            && !self.after_not_after(&before[..i])
                    })
                })
        })
    }

    /// Whether `words` end with a phrase that makes a cue after it none.
    fn after_not_after(&self, words: &[u16]) -> bool {
        self.not_after.iter().any(|p| ends_with_ids(words, p))
    }

    fn applies_after(&self, after: &[u16]) -> bool {
        if self.after.is_empty() {
            return false;
        }
        let region = &after[..after.len().min(self.reach)];
        let end = region
            .iter()
            .position(|&w| self.barriers.contains(w))
            .unwrap_or(region.len());
        contains_ids(&region[..end], &self.after, &self.after_by_first)
    }
}

fn ends_with_ids(words: &[u16], cue: &[u16]) -> bool {
    words.len() >= cue.len() && words[words.len() - cue.len()..] == *cue
}

fn contains_ids(words: &[u16], cues: &[Vec<u16>], by_first: &[Vec<u32>]) -> bool {
    (0..words.len()).any(|i| {
        by_first.get(usize::from(words[i])).is_some_and(|cs| {
            cs.iter().any(|&c| {
                let cue = &cues[c as usize];
                words.len() - i >= cue.len() && words[i..i + cue.len()] == **cue
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(adjacent: bool, reach: usize, before: &[&str], after: &[&str]) -> ContextRule {
        rule_not_after(adjacent, reach, before, after, &[])
    }

    fn rule_not_after(
        adjacent: bool,
        reach: usize,
        before: &[&str],
        after: &[&str],
        not_after: &[&str],
    ) -> ContextRule {
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
        .with_not_after(cues(not_after))
    }

    /// "idk if ill still be here … thinking about killing myself": the "if"
    /// asks whether and opens no condition; "if i fail … kill myself" does.
    #[test]
    fn a_cue_after_a_not_after_phrase_is_none() {
        fn words(s: &str) -> Vec<&str> {
            s.split(' ').collect()
        }
        for adjacent in [false, true] {
            let r = rule_not_after(adjacent, 10, &["if"], &[], &["idk", "dont know"]);
            let set = ContextSet::new(std::slice::from_ref(&r)).expect("ids suffice");
            let ids = |ws: &[&str]| ws.iter().map(|w| set.id(w.as_bytes())).collect::<Vec<_>>();
            for (before, holds) in [
                (
                    "idk if ill still be here by then ive been thinking about",
                    false,
                ),
                ("i dont know if", false),
                ("if i fail my test im going to", !adjacent),
                ("i really if", true),
                ("idk if i can but if", true),
                ("dont know if", false),
                ("know if", true),
            ] {
                let b = words(before);
                assert_eq!(r.applies(&b, &[]), holds, "{before:?} adjacent={adjacent}");
                assert_eq!(set.each(&ids(&b), &[]), vec![holds], "{before:?} compiled");
            }
        }
    }

    /// The compiled form finds what the string form finds, rule by rule in
    /// order, on the shipped rules, given only the words `reach` says it
    /// needs of the sixteen the matcher once gave the string form.
    mod compiled {
        use super::super::*;
        use proptest::prelude::*;
        use std::sync::OnceLock;

        /// Per language: its rules, compiled, and words to build context
        /// from in four pools: whole cues, skip words, barriers, others.
        type Shipped = Vec<(Vec<ContextRule>, ContextSet, [Vec<String>; 4])>;

        fn shipped() -> &'static Shipped {
            static S: OnceLock<Shipped> = OnceLock::new();
            S.get_or_init(|| {
                let rules = crate::tier1::RuleSet::builtin().expect("shipped rules load");
                rules
                    .context
                    .values()
                    .map(|rs| {
                        let pool = |f: &dyn Fn(&ContextRule) -> Vec<String>| {
                            let mut p: Vec<String> = rs.iter().flat_map(f).collect();
                            p.sort();
                            p.dedup();
                            p
                        };
                        let cues = pool(&|r| {
                            r.before
                                .iter()
                                .chain(&r.after)
                                .chain(&r.not_after)
                                .map(|c| c.join(" "))
                                .collect()
                        });
                        let skip = pool(&|r| r.skip.iter().cloned().collect());
                        let barriers = pool(&|r| r.barriers.iter().cloned().collect());
                        // Cue words alone, which begin or end cues without
                        // making one, and words of no list.
                        let mut others =
                            pool(&|r| r.before.iter().chain(&r.after).flatten().cloned().collect());
                        others.extend(["the", "pills", "x", "kill", "myself"].map(String::from));
                        let set = ContextSet::new(rs).expect("ids suffice");
                        (rs.clone(), set, [cues, skip, barriers, others])
                    })
                    .collect()
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(6000))]
            #[test]
            fn same_as_the_string_form(
                lang in 0usize..8,
                b in prop::collection::vec((0usize..4, any::<prop::sample::Index>()), 0..=8),
                a in prop::collection::vec((0usize..4, any::<prop::sample::Index>()), 0..=8),
            ) {
                let all = shipped();
                let (rules, set, pools) = &all[lang % all.len()];
                let words = |picks: &[(usize, prop::sample::Index)]| -> Vec<&str> {
                    let mut w: Vec<&str> = picks
                        .iter()
                        .filter(|(p, _)| !pools[*p].is_empty())
                        .flat_map(|(p, i)| pools[*p][i.index(pools[*p].len())].split(' '))
                        .collect();
                    w.truncate(16);
                    w
                };
                let (before, after) = (words(&b), words(&a));
                let (nb, na) = set.reach();
                let ids = |ws: &[&str]| ws.iter().map(|w| set.id(w.as_bytes())).collect::<Vec<_>>();
                let (b, a) = (
                    ids(&before[before.len().saturating_sub(nb)..]),
                    ids(&after[..after.len().min(na)]),
                );
                let want: Vec<bool> = rules.iter().map(|c| c.applies(&before, &after)).collect();
                prop_assert_eq!(set.each(&b, &a), want, "{:?} / {:?}", before, after);
                let first = rules.iter().find(|c| c.applies(&before, &after)).map(|c| c.kind);
                prop_assert_eq!(set.kind_of(&b, &a), first);
            }
        }

        #[test]
        fn every_language_has_rules_and_reaches_within_the_window() {
            for (rules, set, _) in shipped() {
                assert!(!rules.is_empty() && !set.is_empty());
                let (nb, na) = set.reach();
                assert!(nb > 0 && nb <= 16 && na <= 16, "{nb} {na}");
            }
        }
    }

    /// Whether `r` holds, asserting that its compiled form agrees.
    fn both(r: &ContextRule, before: &[&str], after: &[&str]) -> bool {
        let set = ContextSet::new(std::slice::from_ref(r)).expect("ids suffice");
        let ids = |ws: &[&str]| ws.iter().map(|w| set.id(w.as_bytes())).collect::<Vec<_>>();
        let strings = r.applies(before, after);
        assert_eq!(
            set.kind_of(&ids(before), &ids(after)).is_some(),
            strings,
            "{before:?} / {after:?}"
        );
        strings
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
            assert_eq!(both(&r, &words, &[]), *want, "{before:?}");
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
            assert_eq!(both(&r, &b, &a), *want, "{before:?} / {after:?}");
        }
    }
}
