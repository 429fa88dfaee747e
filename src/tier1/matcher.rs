//! The Tier 1 matcher: one Aho-Corasick automaton over every expanded
//! pattern of every language, fed a conversation as it arrives.
//!
//! Shape and why:
//!
//! * **One automaton, one pass.** Rules and exclusions of all languages are
//!   literals in one automaton (patients switch languages mid-sentence), and
//!   each text is scanned once with overlapping matches, so a short pattern
//!   inside a longer one is still seen.
//! * **Prefixes checked, not compiled.** A rule may require one of its
//!   prefixes ("want to", "gonna") to end right before its phrase. Prefixes
//!   are looked up on a match instead of multiplied into the literals, which
//!   keeps the automaton at tens of thousands of literals, not hundreds.
//! * **Whole words, one step per word.** The automaton runs over words, not
//!   letters (see `automaton.rs`): each word a rule uses has an
//!   id, handed out with the word by the normalizer's lexicon, and every
//!   other word sends the automaton back to its start. A phrase therefore
//!   matches only on word bounds, and a text costs one step per word. The one
//!   exception is the joined form of an unambiguous multi-word pattern
//!   (`killmyself`, `wanttodie`), looked for inside every word of eight or
//!   more letters: that many letters of crisis phrase do not turn up inside
//!   benign words.
//! * **Streaming.** Each conversation keeps a short window of the patient's
//!   recent normalized words and the automaton's state at its end
//!   ([`StreamState`]), so a phrase split across two utterances or two texts
//!   is found without rescanning; only matches that reach into the new text
//!   are reported, so nothing is reported twice.
//! * **Partials.** A partial ASR hypothesis is matched against the window
//!   without joining it, for the earliest warning. A match in a partial is
//!   reported once two more words follow it (so "I want to die…" can still
//!   become "…dye my hair"), and its final does not report the rule again.
//! * **Only the patient.** Agent and clinician lines (the 988 script itself)
//!   never trigger. The one use of the agent's words: when it asks a
//!   screening question, the patient's "yes" is the patient's disclosure.
//! * **Exclusions, then context.** A rule match lying wholly inside an
//!   exclusion match is dropped. Overlapping survivors form a phrase whose
//!   surroundings may lower `escalate` to `review`, never to nothing.

use std::cell::{Cell, RefCell};

use rustc_hash::FxHashMap;

use aho_corasick::{AhoCorasick, MatchKind};
use thiserror::Error;

use super::automaton::{START, StateId, WordAutomaton};
use super::context::{ContextKind, ContextSet, OTHER};
use super::normalize::{Normalizer, Vocabulary, WordRef, WordSink};
use super::rules::{Action, Rule, RuleSet};
use super::words::{WordTable, hash};
use crate::domain::Speaker;

/// Joined forms shorter than this stay whole-word only.
const MIN_JOINED_LEN: usize = 8;
// `JoinedHeads` keys every joined form by its first eight bytes.
const _: () = assert!(MIN_JOINED_LEN >= 8);
/// Words of the patient's recent speech kept per conversation.
const WINDOW_WORDS: usize = 16;
/// Bytes of recent speech kept per conversation, whatever the word count.
const WINDOW_BYTES: usize = 192;
/// Words on either side of a phrase that context cues are looked for in.
const CONTEXT_WORDS: usize = super::context::MAX_REACH + 4;
/// Filler words allowed between a rule's prefix and its phrase.
const PREFIX_SKIP: usize = 2;
/// Words that must follow a match in a partial hypothesis before it is
/// reported: exclusions ("die my hair", "cut myself some slack") reach up
/// to two words past the crisis words, and ASR revises homophones.
const PARTIAL_LOOKAHEAD: usize = 2;
/// Rules remembered from partial hypotheses until the next final.
const EARLY_SLOTS: usize = 8;

/// Index of a rule in the matcher's [`RuleSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleIndex(pub u32);

/// One rule's verdict on new text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    pub rule: RuleIndex,
    /// The action after context: never stronger than the rule's own.
    pub action: Action,
    /// Set when context lowered `escalate` to `review`.
    pub lowered_by: Option<ContextKind>,
    /// Found in a partial hypothesis, ahead of its final.
    pub early: bool,
}

#[derive(Debug, Error)]
pub enum BuildError {
    #[error("too many rules or patterns for the automaton: {0}")]
    TooLarge(String),
    #[error("building the automaton failed: {0}")]
    Automaton(#[from] aho_corasick::BuildError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Rule(u32),
    Exclusion(u32),
}

#[derive(Debug, Clone)]
struct PatternInfo {
    /// What the literal stands for; `more` only when shared, which is rare,
    /// so building tens of thousands of literals allocates nothing per one.
    first: Target,
    more: Vec<Target>,
    /// Length of the literal in normalized text, where its match begins
    /// before its end.
    len: usize,
}

/// Per-conversation matching state: the patient's recent words and what
/// partial hypotheses already reported. Well under 1 KiB.
#[derive(Debug, Clone, Default)]
pub struct StreamState {
    window: String,
    early: Vec<(RuleIndex, Action)>,
    /// The agent's last final asked this screening question, unanswered.
    asked: Option<u16>,
    /// The automaton's state at the end of `window`, if it can be resumed.
    resume: Option<StateId>,
    /// The spaced letters the last final ended with, as typed ("k i l"),
    /// and how many of the window's last words they became: a run that
    /// goes on in the next fragment is normalized again as one.
    letters: String,
    letter_words: u8,
    /// Where the window's words that begin a sentence begin, in bytes
    /// back from its end (it holds at most `WINDOW_BYTES`).
    starts: Vec<u8>,
    /// The last final ended a sentence: the next word begins one.
    ends_sentence: bool,
}

const _: () = assert!(WINDOW_BYTES <= u8::MAX as usize);

impl StreamState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes this state holds, inline and on the heap.
    pub fn footprint(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.window.capacity()
            + self.early.capacity() * std::mem::size_of::<(RuleIndex, Action)>()
            + self.letters.capacity()
            + self.starts.capacity()
    }
}

/// The compiled rule set. Immutable and `Sync`: share one across streams.
#[derive(Debug)]
pub struct Matcher {
    /// The automaton over words: each word a rule uses has an id, every
    /// other word sends it back to its start. Driven word by word so that
    /// its state can be kept between a conversation's fragments.
    automaton: WordAutomaton,
    patterns: Vec<PatternInfo>,
    /// Joined forms, matched inside words of at least `MIN_JOINED_LEN`.
    joined: Option<AhoCorasick>,
    joined_patterns: Vec<PatternInfo>,
    /// The first four bytes of every joined form, as a bit set: a long
    /// word holds a joined form only if one of its four-byte windows that
    /// leave room for eight bytes is in it, so most long words skip the
    /// automaton.
    joined_heads: JoinedHeads,
    rules: RuleSet,
    /// Also knows each rule word's id in `automaton` (its lexicon): the words
    /// it writes come with their codes.
    normalizer: Normalizer,
    /// Context rules per rule language, indexed like `languages`.
    context: Vec<ContextSet>,
    rule_language: Vec<u16>,
    /// Required prefixes per rule, if any.
    prefixes: Vec<Option<Prefixes>>,
    /// Words that may stand between a prefix and its phrase.
    prefix_skip: WordTable<()>,
    /// Screening questions of every language, pattern id → screening index.
    questions: Option<AhoCorasick>,
    question_of: Vec<u16>,
    /// Length in bytes of the longest literal.
    max_literal: usize,
}

#[derive(Default)]
struct Literals<'a> {
    index: FxHashMap<&'a str, usize>,
    strings: Vec<&'a str>,
    patterns: Vec<PatternInfo>,
}

impl<'a> Literals<'a> {
    fn add(&mut self, s: &'a str, t: Target) {
        let i = *self.index.entry(s).or_insert_with(|| {
            self.strings.push(s);
            self.patterns.push(PatternInfo {
                first: t,
                more: Vec::new(),
                len: s.len(),
            });
            self.patterns.len() - 1
        });
        let p = &mut self.patterns[i];
        if p.first != t && !p.more.contains(&t) {
            p.more.push(t);
        }
    }
}

/// Word ids fit in 16 bits.
const MAX_WORDS: usize = 1 << 16;

/// Bits for the eight-byte beginnings of joined forms (see `joined_heads`).
#[derive(Debug, Clone)]
struct JoinedHeads {
    bits: Vec<u64>,
}

/// 8 KiB of bits. Four-byte heads in 2^14 bits let a quarter of a long
/// text's long words through to the joined automaton, of which one in a
/// hundred held a joined form; eight bytes tell far more of them apart.
const JOINED_HEAD_BITS: u32 = 16;

impl Default for JoinedHeads {
    fn default() -> Self {
        JoinedHeads {
            bits: vec![0; 1 << (JOINED_HEAD_BITS - 6)],
        }
    }
}

impl JoinedHeads {
    #[inline]
    fn bit(head: u64) -> usize {
        (head.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - JOINED_HEAD_BITS)) as usize
    }

    fn insert(&mut self, joined: &[u8]) {
        if let Some(head) = joined.first_chunk::<8>() {
            let i = Self::bit(u64::from_le_bytes(*head));
            self.bits[i / 64] |= 1 << (i % 64);
        }
    }

    /// Whether `word` may hold a joined form (of `MIN_JOINED_LEN` = 8
    /// bytes or more): never false when it does, as one of its eight-byte
    /// windows is then that form's head.
    #[inline]
    fn may_hold(&self, word: &[u8]) -> bool {
        word.windows(8).any(|w| {
            let mut head = [0u8; 8];
            head.copy_from_slice(w);
            let i = Self::bit(u64::from_le_bytes(head));
            self.bits[i / 64] & (1 << (i % 64)) != 0
        })
    }
}

/// The set of word sequences one of which must end right before a match.
#[derive(Debug)]
struct Prefixes {
    /// Keys (see `PREFIX_KEY_START`) of the prefixes' endings of every
    /// length, each saying whether it is a whole prefix: the walk back from
    /// a match stops at the first word no prefix ends with, which is nearly
    /// always the first. Building a matcher keys thousands of prefixes and
    /// allocates none for them. A collision could only make a rule fire.
    endings: FxHashMap<u64, bool>,
    max_words: usize,
}

/// The key of a word sequence is built from its last word back, one step
/// per word from the word's table hash: a match's preceding words are each
/// hashed once, however many prefix lengths are tried.
const PREFIX_KEY_START: u64 = 0x243F_6A88_85A3_08D3;

#[inline]
fn prefix_key_step(key: u64, word_hash: u64) -> u64 {
    (key.rotate_left(26) ^ word_hash).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl Prefixes {
    fn new(prefixes: &[String]) -> Self {
        let mut endings: FxHashMap<u64, bool> = FxHashMap::default();
        let mut max_words = 0;
        for p in prefixes {
            let mut key = PREFIX_KEY_START;
            let mut words = 0;
            for w in p.rsplit(' ') {
                key = prefix_key_step(key, hash(w.as_bytes()));
                endings.entry(key).or_insert(false);
                words += 1;
            }
            endings.insert(key, true);
            max_words = max_words.max(words);
        }
        Prefixes { endings, max_words }
    }
}

/// The word of `bytes` that ends at `end`: where it starts.
#[inline]
fn word_start(bytes: &[u8], end: usize) -> usize {
    let mut from = end;
    while from > 0 && bytes[from - 1] != b' ' {
        from -= 1;
    }
    from
}

impl Prefixes {
    /// Where the longest prefix ending at byte `start` of normalized
    /// `bytes` begins. Spoken filler such as "like" or "just" may stand
    /// between the prefix and the phrase ("gonna like take all the pills"),
    /// up to two words.
    fn start_before(&self, bytes: &[u8], start: usize, skip: &WordTable<()>) -> Option<usize> {
        // Where the text before the phrase ends, without its space.
        let mut end = start.checked_sub(1).filter(|&e| bytes[e] == b' ')?;
        for _ in 0..=PREFIX_SKIP {
            // The longest prefix ending exactly at `end`, and the last word.
            let mut best = None;
            let mut last = None;
            let mut key = PREFIX_KEY_START;
            let mut i = end;
            for _ in 0..self.max_words {
                let from = word_start(bytes, i);
                let h = hash(&bytes[from..i]);
                last.get_or_insert((from, h));
                key = prefix_key_step(key, h);
                match self.endings.get(&key) {
                    // No prefix ends with these words, so no longer one.
                    None => break,
                    Some(&whole) if whole => best = Some(from),
                    Some(_) => {}
                }
                if from == 0 {
                    break;
                }
                i = from - 1;
            }
            if best.is_some() {
                return best;
            }
            let (from, h) = last.unwrap_or_else(|| {
                let from = word_start(bytes, end);
                (from, hash(&bytes[from..end]))
            });
            if from == 0 || skip.get_hashed(&bytes[from..end], h).is_none() {
                return None;
            }
            end = from - 1;
        }
        None
    }
}

thread_local! {
    /// The window and the new text, normalized, the literals the new
    /// text's words end, and where its sentences begin.
    static SCRATCH: RefCell<(String, Vec<Ended>, Vec<usize>)> = RefCell::new((
        String::with_capacity(512),
        Vec::with_capacity(16),
        Vec::with_capacity(8),
    ));
}

/// A literal ending at a word of the new text: which, and where it ends.
#[derive(Debug, Clone, Copy)]
struct Ended {
    end: usize,
    pattern: u32,
    /// A joined form, found inside a word.
    joined: bool,
}

/// Steps the automaton over the new text's words as the normalizer hands
/// them on, keeping the literals they end: the scan then has no words to
/// loop over again.
struct Stepper<'m> {
    matcher: &'m Matcher,
    sid: StateId,
    ended: &'m mut Vec<Ended>,
}

impl WordSink for Stepper<'_> {
    // Inlined into the normalizer's word steps: a call per word cost more
    // than the step.
    #[inline(always)]
    fn word(&mut self, out: &[u8], word: WordRef) {
        self.sid = self.matcher.step(self.sid, out, word, Some(self.ended));
    }
}

/// What dropping repeats at a fragment's seam did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seam {
    Unchanged,
    /// The new text lost words: its words as normalized are not the
    /// buffer's any more.
    Changed,
    /// The window lost its last word too: rescan from here.
    Rescan(usize),
}

struct RawMatch {
    start: usize,
    end: usize,
    target: Target,
}

impl Matcher {
    pub fn new(rules: RuleSet) -> Result<Matcher, BuildError> {
        let too_large = |what: &str| BuildError::TooLarge(what.to_string());
        // Joined forms only where they matter: unambiguous phrases typed as
        // one word. Each is another literal in the automaton.
        let joined: Vec<Vec<String>> = rules
            .rules
            .iter()
            .map(|r| {
                if r.action == Action::Escalate && r.prefixes.is_empty() {
                    r.patterns.iter().filter_map(|p| joined_form(p)).collect()
                } else {
                    Vec::new()
                }
            })
            .collect();
        // Literals borrowed from the rule set; duplicates share one entry.
        let mut lit = Literals::default();
        let mut joined_lit = Literals::default();
        for (i, r) in rules.rules.iter().enumerate() {
            let t = Target::Rule(u32::try_from(i).map_err(|_| too_large("rules"))?);
            for p in &r.patterns {
                lit.add(p, t);
            }
            for j in &joined[i] {
                joined_lit.add(j, t);
            }
        }
        for (i, x) in rules.exclusions.iter().enumerate() {
            let t = Target::Exclusion(u32::try_from(i).map_err(|_| too_large("exclusions"))?);
            for p in &x.patterns {
                lit.add(p, t);
            }
        }
        let max_literal = lit.strings.iter().map(|s| s.len()).max().unwrap_or(0);
        // Each literal becomes the ids of its words.
        let mut words: WordTable<u16> = WordTable::with_capacity(4096);
        let mut coded: Vec<u16> = Vec::new();
        let mut bounds: Vec<usize> = Vec::with_capacity(lit.strings.len() + 1);
        bounds.push(0);
        let mut overflow = false;
        for s in &lit.strings {
            for w in s.split(' ') {
                coded.push(words.insert_with(w.as_bytes(), |i| {
                    u16::try_from(i).unwrap_or_else(|_| {
                        overflow = true;
                        0
                    })
                }));
            }
            bounds.push(coded.len());
        }
        if overflow || words.len() > MAX_WORDS {
            return Err(too_large("distinct words"));
        }
        let automaton =
            WordAutomaton::new(bounds.windows(2).map(|b| &coded[b[0]..b[1]]), words.len())
                .map_err(|_| too_large("automaton states"))?;
        let patterns = lit.patterns;
        let joined = if joined_lit.strings.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::Standard)
                    .build(&joined_lit.strings)?,
            )
        };
        let joined_patterns = joined_lit.patterns;
        let mut joined_heads = JoinedHeads::default();
        for j in &joined_lit.strings {
            joined_heads.insert(j.as_bytes());
        }

        let mut languages: Vec<String> = Vec::new();
        let mut rule_language = Vec::with_capacity(rules.rules.len());
        for r in &rules.rules {
            let i = match languages.iter().position(|l| *l == r.language) {
                Some(i) => i,
                None => {
                    languages.push(r.language.clone());
                    languages.len() - 1
                }
            };
            rule_language.push(u16::try_from(i).map_err(|_| too_large("languages"))?);
        }
        let context = languages
            .iter()
            .map(|l| {
                ContextSet::new(rules.context.get(l).map_or(&[], Vec::as_slice))
                    .ok_or_else(|| too_large("context words"))
            })
            .collect::<Result<_, _>>()?;

        let prefixes = rules
            .rules
            .iter()
            .map(|r| (!r.prefixes.is_empty()).then(|| Prefixes::new(&r.prefixes)))
            .collect();
        let mut question_of = Vec::new();
        let mut question_strings: Vec<&str> = Vec::new();
        for (i, sc) in rules.screening.iter().enumerate() {
            let i = u16::try_from(i).map_err(|_| too_large("screening"))?;
            for q in &sc.questions {
                question_strings.push(q);
                question_of.push(i);
            }
        }
        let questions = if question_strings.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostFirst)
                    .build(&question_strings)?,
            )
        };
        let mut prefix_skip = WordTable::with_capacity(rules.prefix_skip.len());
        for w in &rules.prefix_skip {
            prefix_skip.insert_with(w.as_bytes(), |_| ());
        }
        let mut vocabulary =
            Vocabulary::new(rules.repair.iter().map(String::as_str), known_words(&rules));
        vocabulary.set_codes(words.iter());
        Ok(Matcher {
            automaton,
            patterns,
            joined,
            joined_patterns,
            joined_heads,
            normalizer: Normalizer::with_vocabulary(vocabulary),
            rules,
            context,
            rule_language,
            prefixes,
            prefix_skip,
            questions,
            question_of,
            max_literal,
        })
    }

    /// The shipped rules, compiled.
    pub fn builtin() -> Result<Matcher, String> {
        let rules = RuleSet::builtin().map_err(|es| {
            es.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        })?;
        Matcher::new(rules).map_err(|e| e.to_string())
    }

    pub fn rule(&self, i: RuleIndex) -> &Rule {
        &self.rules.rules[i.0 as usize]
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    pub fn normalizer(&self) -> &Normalizer {
        &self.normalizer
    }

    /// Number of literal patterns in the automaton.
    pub fn pattern_count(&self) -> usize {
        self.patterns.len()
    }

    /// Feeds one utterance or message. Returns what it newly detects, at
    /// most one detection per rule, strongest first.
    pub fn feed(
        &self,
        state: &mut StreamState,
        speaker: Speaker,
        text: &str,
        is_final: bool,
    ) -> Vec<Detection> {
        self.feed_with(state, speaker, text, is_final, true)
    }

    /// `feed`; `fused`: scan the words as the normalizer wrote them, with
    /// their codes. Without it, the scan finds and looks up every word of
    /// the normalized text again: the tests hold the two to one answer.
    fn feed_with(
        &self,
        state: &mut StreamState,
        speaker: Speaker,
        text: &str,
        is_final: bool,
        fused: bool,
    ) -> Vec<Detection> {
        if speaker != Speaker::Patient {
            if speaker == Speaker::Agent && is_final {
                state.asked = self.screening_question(text);
            }
            return Vec::new();
        }
        SCRATCH.with(|s| {
            let mut scratch = s.borrow_mut();
            let (buf, ended, starts) = &mut *scratch;
            buf.clear();
            ended.clear();
            starts.clear();
            buf.push_str(&state.window);
            starts.extend(state.starts.iter().map(|&d| buf.len() - usize::from(d)));
            let mut after_stop = state.ends_sentence;
            let mut old = buf.len();
            let mut resume = if old > 0 { state.resume } else { Some(START) };
            let joined;
            let mut input = text;
            if old > 0 && !state.letters.is_empty() && starts_with_letter(text) {
                // Spaced letters go on from the last fragment ("k i l" |
                // "l m y s e l f"): what they became is taken back off the
                // window and they are normalized again with the new text,
                // as the whole text would be; the window's end is rescanned.
                if let Some(cut) = last_words_start(buf, usize::from(state.letter_words)) {
                    joined = format!("{} {text}", state.letters);
                    input = &joined;
                    buf.truncate(cut.saturating_sub(1));
                    old = buf.len();
                    // A sentence that began with the letters begins with
                    // them again.
                    while starts.last().is_some_and(|&p| p >= old) {
                        starts.pop();
                        after_stop = true;
                    }
                    resume = if old > 0 { None } else { Some(START) };
                }
            }
            let in_window = starts.len();
            let (stepped, ends_sentence) = match resume {
                Some(sid) if fused => {
                    let mut stepper = Stepper {
                        matcher: self,
                        sid,
                        ended,
                    };
                    let ends = self.normalizer.normalize_marking(
                        input,
                        buf,
                        Some(&mut stepper),
                        starts,
                        after_stop,
                    );
                    (Some(stepper.sid), ends)
                }
                _ => {
                    let ends = self.normalizer.normalize_marking(
                        input,
                        buf,
                        None::<&mut Vec<WordRef>>,
                        starts,
                        after_stop,
                    );
                    (None, ends)
                }
            };
            // The seam's edits below take words and spaces from the front
            // of the new text: its sentence starts are held from the end
            // meanwhile, where those edits do not move them.
            let before_seam = buf.len();
            for p in &mut starts[in_window..] {
                *p = before_seam - *p;
            }
            let seam = old;
            let mut rescanned = None;
            if old > 0 && buf.len() > old {
                match drop_boundary_repeats(buf, old) {
                    Seam::Unchanged => {}
                    Seam::Changed => resume = None,
                    Seam::Rescan(at) => {
                        old = at;
                        resume = None;
                        rescanned = Some(at);
                    }
                }
            }
            // A word split across two fragments ("sui" | "cide") is one word.
            if old > 0 && buf.len() > old {
                let joined = self.normalizer.join_split_at(buf, old + 1);
                if joined != old + 1 {
                    // The window's last word changed: rescan its end.
                    old = joined;
                    resume = None;
                }
            }
            restore_starts(buf, starts, in_window, seam, rescanned);
            // The normalizer's words are the new text's exactly, unless the
            // scan must start earlier.
            let stepped = stepped
                .filter(|_| resume.is_some())
                .map(|sid| (&ended[..], sid));
            let (mut found, end_state) = if buf.len() > old {
                let (found, sid) = self.scan(buf, starts, old, !is_final, resume, stepped);
                (found, Some(sid))
            } else {
                (Vec::new(), resume)
            };
            // What a partial already reported is not reported again, by a
            // later partial or by the final.
            found.retain(|d| {
                !state
                    .early
                    .iter()
                    .any(|(r, a)| *r == d.rule && *a >= d.action)
            });
            if is_final {
                if let Some(q) = state.asked.take()
                    && let Some(d) = self.affirmation(q, &buf[old..])
                    && !found.iter().any(|f| f.rule == d.rule)
                {
                    found.insert(0, d);
                }
                state.early.clear();
                state.resume = end_state;
                keep_tail(&mut state.window, buf);
                let tail = buf.len() - state.window.len();
                state.starts.clear();
                state.starts.extend(
                    starts
                        .iter()
                        .filter(|&&p| p >= tail)
                        .filter_map(|&p| u8::try_from(buf.len() - p).ok()),
                );
                state.ends_sentence = ends_sentence;
                self.remember_letters(state, input);
            } else {
                for d in &mut found {
                    d.early = true;
                    if state.early.len() < EARLY_SLOTS {
                        state.early.push((d.rule, d.action));
                    }
                }
            }
            found
        })
    }

    /// Keeps the single letters `text` ends with, as typed, and how many
    /// words of the window they became.
    fn remember_letters(&self, state: &mut StreamState, text: &str) {
        state.letters.clear();
        state.letter_words = 0;
        // Nearly every text ends in a word of several letters: then there
        // is no run, and the split below, which allocates, is not needed.
        let mut back = text.trim_end().chars().rev();
        if !(back.next().is_some_and(char::is_alphanumeric)
            && back.next().is_none_or(char::is_whitespace))
        {
            return;
        }
        let mut run: Vec<&str> = text
            .split_whitespace()
            .rev()
            .take_while(|t| is_single_char(t))
            .take(MAX_LETTER_RUN)
            .collect();
        if run.is_empty() {
            return;
        }
        run.reverse();
        let raw = run.join(" ");
        let became = self.normalizer.normalize(&raw);
        let words = if became.is_empty() {
            0
        } else {
            became.split(' ').count()
        };
        // Only a run that is the window's end as written: anything the
        // normalizer dropped or merged across it is not taken apart.
        if words > 0 && state.window.ends_with(became.as_str()) {
            state.letters = raw;
            state.letter_words = u8::try_from(words).unwrap_or(u8::MAX);
        }
    }

    /// Which screening question, if any, the agent's text asks. Not one
    /// inside a condition with no question mark anywhere: "if at any time
    /// you think of hurting yourself, you can call 988" is the referral,
    /// and the patient's "yes, thanks" to it is no disclosure.
    fn screening_question(&self, text: &str) -> Option<u16> {
        let ac = self.questions.as_ref()?;
        let norm = self.normalizer.normalize(text);
        let bytes = norm.as_bytes();
        let asks = text.contains(['?', '\u{bf}', '\u{ff1f}']);
        ac.find_iter(&norm)
            .find(|m| {
                (m.start() == 0 || bytes[m.start() - 1] == b' ')
                    && (m.end() == bytes.len() || bytes[m.end()] == b' ')
                    && (asks || !conditional_before(&norm[..m.start()]))
            })
            .map(|m| self.question_of[m.pattern().as_usize()])
    }

    /// A detection if the patient's normalized answer to screening question
    /// `q` opens with one of the answers that disclose risk.
    fn affirmation(&self, q: u16, answer: &str) -> Option<Detection> {
        let sc = self.rules.screening.get(usize::from(q))?;
        let answer = answer.trim_start();
        let yes = sc.answers.iter().any(|y| {
            answer.starts_with(y.as_str())
                && answer.as_bytes().get(y.len()).is_none_or(|&b| b == b' ')
        });
        // Rule indices were checked to fit a u32 when the matcher was built.
        let rule = RuleIndex(u32::try_from(sc.rule).ok()?);
        yes.then_some(Detection {
            rule,
            action: self.rules.rules[sc.rule].action,
            lowered_by: None,
            early: false,
        })
    }

    /// Matches a whole text at once, with no stream state: what a single
    /// final message from the patient would detect.
    pub fn detect(&self, text: &str) -> Vec<Detection> {
        self.feed(&mut StreamState::new(), Speaker::Patient, text, true)
    }

    /// One automaton step over `word` of `bytes`, from state `sid`; the
    /// literals it ends go to `ended`, if given. Also looks for joined
    /// forms inside a long word.
    #[inline(always)]
    fn step(
        &self,
        sid: StateId,
        bytes: &[u8],
        word: WordRef,
        ended: Option<&mut Vec<Ended>>,
    ) -> StateId {
        let WordRef { s, e, code } = word;
        let Some(ended) = ended else {
            return code.map_or(START, |w| self.automaton.next(sid, w));
        };
        let sid = match code {
            Some(w) => {
                let sid = self.automaton.next(sid, w);
                for &pattern in self.automaton.matches(sid) {
                    ended.push(Ended {
                        end: e,
                        pattern,
                        joined: false,
                    });
                }
                sid
            }
            // No literal holds this word: every partial match dies.
            None => START,
        };
        if e - s >= MIN_JOINED_LEN
            && let Some(ac) = &self.joined
            && self.joined_heads.may_hold(&bytes[s..e])
        {
            for m in ac.find_overlapping_iter(&bytes[s..e]) {
                ended.push(Ended {
                    end: s + m.end(),
                    pattern: m.pattern().as_u32(),
                    joined: true,
                });
            }
        }
        sid
    }

    /// Scans normalized `buf`, of which `buf[old..]` is new. In a partial,
    /// a rule match must be followed by at least one more word. `stepped`,
    /// when given, is what the automaton met stepping over the words of
    /// `buf[old..]` as the normalizer wrote them, from `resume` (then
    /// given too), and the state it ended in.
    fn scan(
        &self,
        buf: &str,
        starts: &[usize],
        old: usize,
        partial: bool,
        resume: Option<StateId>,
        stepped: Option<(&[Ended], StateId)>,
    ) -> (Vec<Detection>, StateId) {
        let bytes = buf.as_bytes();
        let mut raw: Vec<RawMatch> = Vec::new();
        // Either carry on from the state the window ended in, or rescan the
        // window's end: a match reaching into the new text starts at most
        // one literal's length before it.
        let (mut sid, from) = match resume {
            Some(sid) => (sid, old),
            None => {
                let from = old.saturating_sub(self.max_literal);
                let from = bytes[..from]
                    .iter()
                    .rposition(|&b| b == b' ')
                    .map_or(0, |i| i + 1);
                (START, from)
            }
        };
        let mut push = |info: &PatternInfo, end: usize| {
            // A match can begin in text the window no longer holds.
            let Some(start) = end.checked_sub(info.len) else {
                return;
            };
            for &target in std::iter::once(&info.first).chain(&info.more) {
                if partial
                    && matches!(target, Target::Rule(_))
                    && !words_follow(bytes, end, PARTIAL_LOOKAHEAD)
                {
                    continue;
                }
                raw.push(RawMatch { start, end, target });
            }
        };
        // Without the normalizer's steps, find and look up the words of the
        // text again (a rescan of the window's end: a few words).
        let found_again: Vec<Ended>;
        let ended = match stepped {
            Some((ended, end)) => {
                sid = end;
                ended
            }
            None => {
                let mut ended = Vec::new();
                for word in self.words_of(bytes, from) {
                    let record = (word.e > old).then_some(&mut ended);
                    sid = self.step(sid, bytes, word, record);
                }
                found_again = ended;
                &found_again
            }
        };
        for &Ended {
            end,
            pattern,
            joined,
        } in ended
        {
            let info = if joined {
                &self.joined_patterns[pattern as usize]
            } else {
                &self.patterns[pattern as usize]
            };
            push(info, end);
        }
        if raw.is_empty() {
            return (Vec::new(), sid);
        }
        let excluded = Excluded::new(
            raw.iter()
                .filter(|m| matches!(m.target, Target::Exclusion(_)))
                .map(|m| (m.start, m.end)),
        );
        // (phrase start including any prefix, end, rule); exclusions are
        // judged on the matched words alone.
        let mut hits: Vec<(usize, usize, u32)> = raw
            .iter()
            .filter_map(|m| match m.target {
                Target::Rule(r) => Some((m.start, m.end, r)),
                Target::Exclusion(_) => None,
            })
            .filter(|(s, e, _)| !excluded.contains(*s, *e))
            .filter_map(|(s, e, r)| match &self.prefixes[r as usize] {
                None => Some((s, e, r)),
                Some(p) => p
                    .start_before(bytes, s, &self.prefix_skip)
                    .map(|ps| (ps, e, r)),
            })
            .collect();
        if hits.is_empty() {
            return (Vec::new(), sid);
        }
        hits.sort_unstable();

        // Overlapping hits form one phrase; its surroundings are its context.
        let mut found: Vec<Detection> = Vec::new();
        let mut i = 0;
        while i < hits.len() {
            let (start, mut end) = (hits[i].0, hits[i].1);
            let mut j = i + 1;
            while j < hits.len() && hits[j].0 < end {
                end = end.max(hits[j].1);
                j += 1;
            }
            let cluster = &hits[i..j];
            let needs_context = cluster
                .iter()
                .any(|h| self.rules.rules[h.2 as usize].action == Action::Escalate);
            let mut lowered: Vec<(u16, Option<ContextKind>)> = Vec::new();
            for &(_, _, r) in cluster {
                let rule = &self.rules.rules[r as usize];
                let mut action = rule.action;
                let mut by = None;
                if needs_context && action == Action::Escalate {
                    let lang = self.rule_language[r as usize];
                    by = match lowered.iter().find(|(l, _)| *l == lang) {
                        Some((_, k)) => *k,
                        None => {
                            let k = self.context_of(lang, buf, starts, start, end);
                            lowered.push((lang, k));
                            k
                        }
                    };
                    if by.is_some() {
                        action = Action::Review;
                    }
                }
                let rule = RuleIndex(r);
                match found.iter_mut().find(|d| d.rule == rule) {
                    Some(d) if d.action < action => {
                        d.action = action;
                        d.lowered_by = by;
                    }
                    Some(_) => {}
                    None => found.push(Detection {
                        rule,
                        action,
                        lowered_by: by,
                        early: false,
                    }),
                }
            }
            i = j;
        }
        found.sort_by(|a, b| b.action.cmp(&a.action).then(a.rule.cmp(&b.rule)));
        (found, sid)
    }

    /// The words of normalized `bytes` from `from` (a word's start), with
    /// their codes.
    fn words_of(&self, bytes: &[u8], from: usize) -> Vec<WordRef> {
        let vocabulary = self.normalizer.vocabulary();
        let mut words = Vec::new();
        let mut at = from;
        while at < bytes.len() {
            if bytes[at] == b' ' {
                at += 1;
                continue;
            }
            let ws = at;
            let we = bytes[ws..]
                .iter()
                .position(|&b| b == b' ')
                .map_or(bytes.len(), |p| ws + p);
            at = we;
            words.push(WordRef {
                s: ws,
                e: we,
                code: vocabulary.code(&bytes[ws..we]),
            });
        }
        words
    }

    /// The context rule, if any, that lowers the phrase at `buf[start..end]`.
    /// Context is read within the phrase's sentence: a word in `starts`
    /// begins one, and no cue reaches across ("Never. I'm going to kill
    /// myself" is not negated).
    fn context_of(
        &self,
        lang: u16,
        buf: &str,
        starts: &[usize],
        start: usize,
        end: usize,
    ) -> Option<ContextKind> {
        let set = &self.context[usize::from(lang)];
        if set.is_empty() {
            return None;
        }
        // Context reaches a few words at most; never split a long text
        // whole, and keep the words' ids on the stack: this runs for every
        // match. (Byte loops: for words this short, `split` costs more.)
        let (need_before, need_after) = set.reach();
        let bytes = buf.as_bytes();
        let begins = |p: usize| starts.binary_search(&p).is_ok();
        let mut before = [OTHER; CONTEXT_WORDS];
        let mut nb = 0;
        let mut i = start;
        while nb < need_before.min(CONTEXT_WORDS) && !begins(i) {
            while i > 0 && bytes[i - 1] == b' ' {
                i -= 1;
            }
            if i == 0 {
                break;
            }
            let e = i;
            while i > 0 && bytes[i - 1] != b' ' {
                i -= 1;
            }
            before[nb] = set.id(&bytes[i..e]);
            nb += 1;
        }
        let before = &mut before[..nb];
        before.reverse();
        let mut after = [OTHER; CONTEXT_WORDS];
        let mut na = 0;
        let mut i = end;
        while na < need_after.min(CONTEXT_WORDS) {
            while i < bytes.len() && bytes[i] == b' ' {
                i += 1;
            }
            if i == bytes.len() || begins(i) {
                break;
            }
            let s = i;
            while i < bytes.len() && bytes[i] != b' ' {
                i += 1;
            }
            after[na] = set.id(&bytes[s..i]);
            na += 1;
        }
        set.kind_of(before, &after[..na])
    }
}

/// Words that open a condition, in the languages with screening
/// questions ("si" only as the agent writes it: "sí" folds to it too, but
/// a "yes" before a question with no question mark is no question).
const CONDITION_OPENERS: &[&str] = &["if", "when", "whenever", "unless", "should", "si", "cuando"];

/// How many words before a screening question a condition's opener may
/// stand ("if at any time in the past few weeks you have had thoughts of").
const CONDITION_REACH: usize = 8;

/// Whether one of the last `CONDITION_REACH` words of normalized `before`
/// opens a condition.
fn conditional_before(before: &str) -> bool {
    before
        .split(' ')
        .rev()
        .filter(|w| !w.is_empty())
        .take(CONDITION_REACH)
        .any(|w| CONDITION_OPENERS.contains(&w))
}

/// Words typo repair must leave alone: every word of every pattern, prefix
/// and exclusion, and the rule files' own `keep` list.
pub(crate) fn known_words(rules: &RuleSet) -> impl Iterator<Item = &str> {
    rules
        .rules
        .iter()
        .flat_map(|r| r.patterns.iter().chain(&r.prefixes))
        .chain(rules.exclusions.iter().flat_map(|x| x.patterns.iter()))
        .flat_map(|p| p.split(' '))
        .chain(rules.keep.iter().map(String::as_str))
}

/// Exclusion spans, answering "does one contain [s, e)?" in a step or two
/// when asked in order, in log time otherwise, so a long text full of
/// idioms stays linear.
struct Excluded {
    /// (end, start) sorted by end, with the smallest start from each index on.
    spans: Vec<(usize, usize)>,
    min_start_from: Vec<usize>,
    /// Where the last question's end fell in `spans`. The scan asks in
    /// the order matches end, the order the spans come in too, so the
    /// next answer is nearly always a step or two on: a binary search
    /// for each of a long text's 19,000 matches was a fifth of the scan.
    cursor: Cell<usize>,
}

impl Excluded {
    fn new(spans: impl Iterator<Item = (usize, usize)>) -> Self {
        let mut spans: Vec<(usize, usize)> = spans.map(|(s, e)| (e, s)).collect();
        // Matches come in the order they end: only a caller's odd order
        // needs sorting (the order among equal ends does not matter).
        if !spans.is_sorted_by_key(|&(end, _)| end) {
            spans.sort_unstable_by_key(|&(end, _)| end);
        }
        let mut min_start_from = vec![usize::MAX; spans.len()];
        let mut m = usize::MAX;
        for (i, &(_, s)) in spans.iter().enumerate().rev() {
            m = m.min(s);
            min_start_from[i] = m;
        }
        Excluded {
            spans,
            min_start_from,
            cursor: Cell::new(0),
        }
    }

    /// Whether an exclusion spans `s..e`: one that ends at or after `e`
    /// and begins at or before `s`.
    fn contains(&self, s: usize, e: usize) -> bool {
        let spans = &self.spans;
        let mut i = self.cursor.get();
        if i > 0 && spans[i - 1].0 >= e {
            // Asked out of order: search from the beginning.
            i = spans.partition_point(|&(end, _)| end < e);
        } else {
            while i < spans.len() && spans[i].0 < e {
                i += 1;
            }
        }
        self.cursor.set(i);
        i < spans.len() && self.min_start_from[i] <= s
    }
}

/// Whether `n` whole words follow byte `end` of `bytes`. The match may end
/// inside a word (joined forms): the rest of that word does not count.
fn words_follow(bytes: &[u8], end: usize, n: usize) -> bool {
    // Normalized text has single spaces and no trailing one, so each space
    // starts a word. Counting stops at `n`: a long partial is not walked to
    // its end for every match in it.
    bytes[end..].iter().filter(|&&b| b == b' ').take(n).count() >= n
}

/// The joined form of a multi-word pattern, if long enough to be safe
/// inside a word.
fn joined_form(p: &str) -> Option<String> {
    if !p.contains(' ') || p.contains(':') {
        return None;
    }
    let j: String = p.split(' ').collect();
    (j.len() >= MIN_JOINED_LEN).then_some(j)
}

/// Longest run of spaced letters carried from one fragment to the next.
const MAX_LETTER_RUN: usize = 24;

fn is_single_char(t: &str) -> bool {
    let mut c = t.chars();
    c.next().is_some_and(char::is_alphanumeric) && c.next().is_none()
}

/// Whether `text` begins with a single letter or digit standing alone.
fn starts_with_letter(text: &str) -> bool {
    text.split_whitespace().next().is_some_and(is_single_char)
}

/// Puts the new text's sentence starts (`starts[in_window..]`, held as
/// bytes back from the end) back as positions in `buf`, after the seam's
/// edits. A start whose word an edit took is handed to the first new word,
/// as the normalizer hands on a dropped word's; one inside a word joined
/// across the seam is dropped. `rescanned`: the window lost its words
/// after this one.
fn restore_starts(
    buf: &str,
    starts: &mut Vec<usize>,
    in_window: usize,
    seam: usize,
    rescanned: Option<usize>,
) {
    let bytes = buf.as_bytes();
    let len = bytes.len();
    // Where the window ends now: the new text's words begin after it.
    let window_end = match rescanned {
        Some(at) => bytes[at..]
            .iter()
            .position(|&b| b == b' ')
            .map_or(len, |i| at + i),
        None => seam,
    };
    let mut lost = false;
    let mut kept = 0;
    for r in 0..starts.len() {
        let p = if r < in_window {
            if rescanned.is_some_and(|at| starts[r] > at) {
                continue;
            }
            starts[r]
        } else {
            match len.checked_sub(starts[r]) {
                Some(p) if p > window_end || window_end == 0 => p,
                _ => {
                    lost = true;
                    continue;
                }
            }
        };
        if p < len && (p == 0 || bytes[p - 1] == b' ') {
            starts[kept] = p;
            kept += 1;
        }
    }
    starts.truncate(kept);
    if lost && window_end + 1 < len && bytes[window_end] == b' ' {
        starts.push(window_end + 1);
    }
    starts.sort_unstable();
    starts.dedup();
}

/// Where the last `k` words of normalized `buf` begin, if it has as many.
fn last_words_start(buf: &str, k: usize) -> Option<usize> {
    if k == 0 {
        return None;
    }
    let mut start = buf.len();
    for _ in 0..k {
        let before = buf[..start].trim_end_matches(' ');
        start = before.rfind(' ').map_or(0, |i| i + 1);
        if before.is_empty() {
            return None;
        }
    }
    Some(start)
}

/// Drops the words at the start of the new text (`buf[old..]`, after its
/// separating space) that repeat the window's last word or last two, as
/// the normalizer collapses repeats within one text ("wanna" | "wanna
/// live"); the window is not touched, so its automaton state holds. A
/// pair repeated across the seam ("all the all" | "the pills") loses the
/// window's last word instead: then returns where the window now ends, to
/// be rescanned from.
fn drop_boundary_repeats(buf: &mut String, old: usize) -> Seam {
    if !may_repeat_at_seam(buf.as_bytes(), old) {
        return Seam::Unchanged;
    }
    drop_seam_repeats(buf, old)
}

/// `drop_boundary_repeats` without the quick test.
fn drop_seam_repeats(buf: &mut String, old: usize) -> Seam {
    let mut back = buf[..old].rsplit(' ');
    let (last, prev, third) = (back.next(), back.next(), back.next());
    let mut dropped = 0;
    let mut straddle = false;
    loop {
        let new_part = &buf[old + 1 + dropped..];
        let mut it = new_part.split(' ');
        let (n0, n1) = (it.next().filter(|w| !w.is_empty()), it.next());
        let take = match (n0, n1) {
            (Some(a), _) if Some(a) == last => a.len(),
            (Some(a), Some(b)) if Some(a) == prev && Some(b) == last => a.len() + 1 + b.len(),
            (Some(a), _) if dropped == 0 && Some(a) == prev && last == third => {
                straddle = true;
                a.len()
            }
            _ => break,
        };
        dropped += (take + 1).min(new_part.len());
        if straddle {
            break;
        }
    }
    if dropped == 0 {
        // "x" + "y x y …" is "x y x y …": the pair collapses to "x y …".
        let new_part = &buf[old + 1..];
        let mut it = new_part.split(' ');
        if let (Some(a), Some(b), Some(c)) = (it.next(), it.next(), it.next())
            && Some(b) == last
            && c == a
            && !a.is_empty()
        {
            let (from, to) = (
                old + 1 + a.len(),
                old + 1 + a.len() + 1 + b.len() + 1 + c.len(),
            );
            buf.replace_range(from..to, "");
            return Seam::Changed;
        }
        return Seam::Unchanged;
    }
    let (from, to) = (old + 1, (old + 1 + dropped).min(buf.len()));
    buf.replace_range(from..to, "");
    if buf.len() == old + 1 {
        // Nothing new is left: no separator either.
        buf.truncate(old);
    }
    if !straddle {
        return Seam::Changed;
    }
    // "x y x" + "y …" is "x y x y …": the pair collapses to "x y …".
    let Some(cut) = buf[..old].rfind(' ') else {
        return Seam::Changed;
    };
    buf.replace_range(cut..old, "");
    Seam::Rescan(buf[..cut].rfind(' ').map_or(0, |i| i + 1).min(cut))
}

/// Whether `drop_boundary_repeats` can change anything at the seam
/// `old`: only if the new text's first word repeats one of the window's
/// last two words, or its second word the window's last. Nearly no seam
/// is either, and this asks with a few byte comparisons where the full
/// test splits both sides into words (an eighth of a typical utterance's
/// time went there).
fn may_repeat_at_seam(buf: &[u8], old: usize) -> bool {
    let word_before = |end: usize| {
        let s = buf[..end]
            .iter()
            .rposition(|&b| b == b' ')
            .map_or(0, |i| i + 1);
        (s, &buf[s..end])
    };
    let word_from = |s: usize| {
        let rest = &buf[s..];
        &rest[..rest.iter().position(|&b| b == b' ').unwrap_or(rest.len())]
    };
    let (s, last) = word_before(old);
    let prev = s.checked_sub(1).map(|end| word_before(end).1);
    if old >= buf.len() {
        return false;
    }
    let from = old + 1;
    let first = word_from(from);
    let second = (from + first.len() < buf.len()).then(|| word_from(from + first.len() + 1));
    !first.is_empty() && (first == last || Some(first) == prev || second == Some(last))
}

/// Keeps the last words of `buf` in `window`, bounded in words and bytes.
fn keep_tail(window: &mut String, buf: &str) {
    let bytes = buf.as_bytes();
    let (words, start) = spaces_back(bytes);
    let start = match start {
        // The whole text fits.
        _ if bytes.len() <= WINDOW_BYTES && words < WINDOW_WORDS => 0,
        Some(s) => s,
        // A single word longer than the window keeps its end. Normalized
        // text is ASCII, so any byte offset is a char boundary.
        None => bytes.len() - bytes.len().min(WINDOW_BYTES),
    };
    let tail = &buf[start..];
    if window.capacity() > 2 * WINDOW_BYTES {
        *window = String::with_capacity(WINDOW_BYTES);
    }
    window.clear();
    window.push_str(tail);
}

/// Walks back over the last `WINDOW_BYTES + 1` bytes of `bytes`, counting
/// spaces up to `WINDOW_WORDS`: how many it counted, and where the word
/// after the last one counted begins. Eight bytes at a time: at every
/// final this walks the whole window, and byte by byte that was a tenth
/// of a typical utterance's time.
fn spaces_back(bytes: &[u8]) -> (usize, Option<usize>) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let floor = bytes.len().saturating_sub(WINDOW_BYTES + 1);
    let (mut words, mut start) = (0, None);
    let mut end = bytes.len();
    while end >= floor + 8 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[end - 8..end]);
        // A high bit for each space byte, exactly: zero bytes of `x`, with
        // no carry between bytes (the high bits are handled apart).
        let x = u64::from_le_bytes(b) ^ (u64::from(b' ') * ONES);
        let mut spaces = !(((x & LOW7) + LOW7) | x) & HIGH;
        while spaces != 0 {
            // The highest space first: the walk goes backwards.
            let k = (63 - spaces.leading_zeros() as usize) / 8;
            words += 1;
            start = Some(end - 8 + k + 1);
            if words == WINDOW_WORDS {
                return (words, start);
            }
            spaces &= !(0x80 << (8 * k));
        }
        end -= 8;
    }
    for i in (floor..end).rev() {
        if bytes[i] == b' ' {
            words += 1;
            start = Some(i + 1);
            if words == WINDOW_WORDS {
                break;
            }
        }
    }
    (words, start)
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn shipped() -> &'static Matcher {
        static M: OnceLock<Matcher> = OnceLock::new();
        M.get_or_init(|| Matcher::builtin().expect("the shipped rules compile"))
    }

    /// Fragments of a conversation: crisis phrases, idioms, context cues,
    /// split and joined words, typos, fillers, and arbitrary Unicode.
    fn fragment() -> impl Strategy<Value = String> {
        let phrase = prop::sample::select(vec![
            "I want to kill myself",
            "im going to kill my self",
            "k i l l myself",
            "kil myslef",
            "i want to die",
            "wanttodie",
            "killmyself tonight",
            "i feel suicidel",
            "sui",
            "cide",
            "my",
            "self",
            "i'm not going to hurt myself",
            "my brother wants to kill himself",
            "when i was 16 i tried to overdose",
            "if i fail im going to end it",
            "killed myself laughing",
            "cutting myself some slack",
            "i could just die",
            "um",
            "uh I I want to",
            "take all the pills",
            "all the all the pills",
            "\u{1F48A}\u{1F48A}",
            "quiero morir",
            "me quiero suicidar",
            "gonna like take all my pills",
            "yes",
            "no",
            "i have a plan",
            "hang myself",
            "im a burden",
            "nobody would miss me",
            "Not really.",
            "no.",
            "? ",
            "\u{BF}Yo? No.",
            "Never! ",
            "",
        ]);
        prop_oneof![
            3 => prop::collection::vec(phrase, 1..4).prop_map(|v| v.join(" ")),
            1 => "\\PC{0,40}",
            1 => "[a-zA-Z '.,!]{0,40}",
        ]
    }

    /// A window's sentence starts lie at its words' starts, in order.
    fn starts_are_word_starts(state: &StreamState) -> Result<(), TestCaseError> {
        let w = state.window.as_bytes();
        let mut last = None;
        for &d in &state.starts {
            let d = usize::from(d);
            prop_assert!(d > 0 && d <= w.len(), "{} in {:?}", d, state.window);
            let p = w.len() - d;
            prop_assert!(
                w[p] != b' ' && (p == 0 || w[p - 1] == b' '),
                "{} in {:?}",
                p,
                state.window
            );
            prop_assert!(
                last.is_none_or(|l| l < p),
                "{:?} in {:?}",
                state.starts,
                state.window
            );
            last = Some(p);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1500))]

        /// Scanning the normalizer's words gives what finding and looking
        /// up every word of the normalized text again gives, fragment by
        /// fragment, partial or final, and leaves the same stream state.
        #[test]
        fn fused_scan_matches_the_text_scan(
            parts in prop::collection::vec((fragment(), any::<bool>(), 0u8..4), 1..10)
        ) {
            let m = shipped();
            let (mut a, mut b) = (StreamState::new(), StreamState::new());
            for (text, is_final, who) in parts {
                let speaker = [Speaker::Patient, Speaker::Patient, Speaker::Agent, Speaker::Clinician][usize::from(who)];
                let fused = m.feed_with(&mut a, speaker, &text, is_final, true);
                let plain = m.feed_with(&mut b, speaker, &text, is_final, false);
                prop_assert_eq!(fused, plain, "{:?}", text);
                prop_assert_eq!(&a.window, &b.window);
                prop_assert_eq!(a.resume, b.resume);
                prop_assert_eq!(&a.starts, &b.starts);
                prop_assert_eq!(a.ends_sentence, b.ends_sentence);
                starts_are_word_starts(&a)?;
            }
        }

        /// The same for one text cut anywhere (inside words too) and fed
        /// piece by piece.
        #[test]
        fn fused_scan_matches_the_text_scan_on_split_text(
            text in prop::collection::vec(fragment(), 1..6).prop_map(|v| v.join(" ")),
            cuts in prop::collection::vec(0usize..200, 0..6),
            finals in any::<u8>(),
        ) {
            let m = shipped();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (text.len() + 1)).collect();
            cuts.push(text.len());
            cuts.sort_unstable();
            let (mut a, mut b) = (StreamState::new(), StreamState::new());
            let mut from = 0;
            for (k, cut) in cuts.into_iter().enumerate() {
                let Some(piece) = text.get(from..cut) else { continue };
                from = cut;
                let is_final = finals & (1 << (k % 8)) != 0 || from == text.len();
                let fused = m.feed_with(&mut a, Speaker::Patient, piece, is_final, true);
                let plain = m.feed_with(&mut b, Speaker::Patient, piece, is_final, false);
                prop_assert_eq!(fused, plain, "{:?} of {:?}", piece, text);
                prop_assert_eq!(&a.window, &b.window);
                prop_assert_eq!(&a.starts, &b.starts);
                prop_assert_eq!(a.ends_sentence, b.ends_sentence);
                starts_are_word_starts(&a)?;
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The quick test before dropping repeats at a seam turns away only
        /// seams where the full test changes nothing. Few words, so that
        /// repeats are common.
        #[test]
        fn seam_quick_test_turns_away_only_what_changes_nothing(
            window in "[ab]{1,2}( [ab]{1,2}){0,4}",
            new in "[ab]{1,2}( [ab]{1,2}){0,4}",
        ) {
            let mut buf = format!("{window} {new}");
            let old = window.len();
            let buf0 = buf.clone();
            let got = drop_seam_repeats(&mut buf, old);
            // What it says it did is what it did.
            prop_assert_eq!(got == Seam::Unchanged, buf == buf0, "{:?} | {:?}", window, new);
            let changed = got != Seam::Unchanged;
            if !may_repeat_at_seam(buf0.as_bytes(), old) {
                prop_assert!(!changed, "{:?} | {:?} became {:?}", window, new, buf);
            }
        }
    }

    /// `spaces_back` as it was written first, one byte at a time.
    fn spaces_back_bytewise(bytes: &[u8]) -> (usize, Option<usize>) {
        let floor = bytes.len().saturating_sub(WINDOW_BYTES + 1);
        let (mut words, mut start) = (0, None);
        for i in (floor..bytes.len()).rev() {
            if bytes[i] == b' ' {
                words += 1;
                start = Some(i + 1);
                if words == WINDOW_WORDS {
                    break;
                }
            }
        }
        (words, start)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Eight bytes at a time, the walk back counts what the byte walk
        /// counts, on texts around the window's size in words and bytes.
        #[test]
        fn spaces_back_matches_the_byte_walk(
            text in prop_oneof![
                "[a-z]{1,12}( {1,2}[a-z]{0,12}){0,30}",
                "[a ]{0,400}",
                "[a-z ]{180,200}",
            ]
        ) {
            prop_assert_eq!(spaces_back(text.as_bytes()), spaces_back_bytewise(text.as_bytes()));
        }
    }

    #[test]
    fn tail_is_bounded() {
        let mut w = String::new();
        let long: String = (0..100).map(|i| format!("w{i} ")).collect();
        keep_tail(&mut w, long.trim_end());
        assert!(w.split(' ').count() <= WINDOW_WORDS, "{w}");
        assert!(w.ends_with("w99"));
        keep_tail(&mut w, &"x".repeat(5000));
        assert!(w.len() <= WINDOW_BYTES);
        keep_tail(&mut w, "i want");
        assert_eq!(w, "i want");
        let sixteen: String = (0..16)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        keep_tail(&mut w, &sixteen);
        assert_eq!(w, sixteen);
        keep_tail(&mut w, &format!("extra {sixteen}"));
        assert_eq!(w, sixteen);
    }

    #[test]
    fn joined_heads_pass_every_word_holding_a_joined_form() {
        let m = shipped();
        let mut n = 0;
        // The joined forms `Matcher::new` builds: escalate rules without
        // prefixes.
        let joined = m
            .rules
            .rules
            .iter()
            .filter(|r| r.action == Action::Escalate && r.prefixes.is_empty())
            .flat_map(|r| &r.patterns);
        for p in joined {
            let Some(j) = joined_form(p) else { continue };
            for w in [
                j.clone(),
                format!("so{j}"),
                format!("{j}ok"),
                format!("x{j}yz"),
            ] {
                assert!(m.joined_heads.may_hold(w.as_bytes()), "{w}");
            }
            n += 1;
        }
        assert!(n > 100, "only {n} joined forms");
        // And it is a filter: everyday long words rarely get through.
        let everyday = [
            "appointment",
            "tomorrow",
            "something",
            "everything",
            "therapist",
            "relationship",
            "unfortunately",
            "prescription",
            "insurance",
            "yesterday",
            "reschedule",
            "afternoon",
            "wednesday",
            "thursday",
            "wondering",
            "completely",
            "important",
            "conversation",
            "medication",
            "overwhelmed",
        ];
        let through = everyday
            .iter()
            .filter(|w| m.joined_heads.may_hold(w.as_bytes()))
            .count();
        assert!(
            through <= 2,
            "{through} of {} everyday words",
            everyday.len()
        );
    }

    #[test]
    fn excluded_spans_table() {
        let x = Excluded::new([(0, 10), (20, 25), (5, 30)].into_iter());
        let cases: &[((usize, usize), bool)] = &[
            ((0, 10), true),
            ((2, 8), true),
            ((6, 30), true),
            ((4, 26), false),
            ((21, 24), true),
            ((30, 31), false),
        ];
        for ((s, e), want) in cases {
            assert_eq!(x.contains(*s, *e), *want, "{s}..{e}");
        }
        assert!(!Excluded::new(std::iter::empty()).contains(0, 1));
    }

    /// A span of up to ten bytes starting in `0..45`.
    fn span() -> impl Strategy<Value = (usize, usize)> {
        (0usize..45, 1usize..=10).prop_map(|(s, len)| (s, s + len))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Asked in any order, about spans given in any order, the cursor
        /// answers as a search over every span does. (The scan gives both
        /// in the order matches end; sorting the inputs here is that case.)
        #[test]
        fn excluded_agrees_with_every_span_in_any_order(
            spans in prop::collection::vec(span(), 0..12),
            asks in prop::collection::vec(span(), 0..20),
            spans_sorted in any::<bool>(),
            asks_sorted in any::<bool>(),
        ) {
            let mut given = spans.clone();
            if spans_sorted {
                given.sort_by_key(|&(_, e)| e);
            }
            let ex = Excluded::new(given.into_iter());
            let mut asks = asks;
            if asks_sorted {
                asks.sort_by_key(|&(_, e)| e);
            }
            for (s, e) in asks {
                let want = spans.iter().any(|&(xs, xe)| xs <= s && e <= xe);
                prop_assert_eq!(ex.contains(s, e), want, "{:?} {}..{}", spans, s, e);
            }
        }
    }

    #[test]
    fn word_follows_table() {
        let cases: &[(&str, usize, usize, bool)] = &[
            ("kill myself", 11, 1, false),
            ("kill myself now", 11, 1, true),
            ("kill myself now", 11, 2, false),
            ("kill myself right now", 11, 2, true),
            ("killmyselfnow", 10, 1, false),
            ("killmyselfnow ok", 10, 1, true),
        ];
        for (s, end, n, want) in cases {
            assert_eq!(words_follow(s.as_bytes(), *end, *n), *want, "{s} {n}");
        }
    }
}
