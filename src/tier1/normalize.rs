//! Text normalization: the one function that both rule phrases and patient
//! text pass through before they meet in the automaton.
//!
//! Matching is only as good as the agreement between how a rule is written
//! and how a patient types or an ASR engine hears. Instead of teaching the
//! automaton every spelling, every input is folded into a small canonical
//! alphabet: lowercase ASCII letters, digits, single spaces between words, and
//! `:name:` tokens for the emoji that carry risk. The steps, in order:
//!
//! 1. Unicode NFKC (fullwidth, ligatures, mathematical letters → ASCII).
//! 2. Format characters (zero-width space/joiners, BOM, bidi controls,
//!    variation selectors) are dropped, so they cannot split a word.
//! 3. Case folding, diacritic folding (Spanish rules are written without
//!    accents), and a short table of Cyrillic/Greek look-alikes.
//! 4. Apostrophes of every kind are dropped (`i'm` → `im`); all other
//!    punctuation, symbols and control characters become word breaks.
//! 5. Inside a word, common digit/symbol substitutions are undone
//!    (`k1ll`, `su1c1de`, `$elf`); numbers with units (`3pm`, `2nd`) are kept.
//! 6. Speech fillers (`um`, `uh`, …) are dropped, runs of three or more single
//!    letters are rejoined (`k i l l` → `kill`), and immediate word repeats are
//!    collapsed (`i i want` → `i want`).
//! 7. Near-misses of a closed crisis vocabulary are repaired by one edit
//!    (`suicidel`, `myslef`, `kil`), never touching the first letter and never
//!    rewriting a word the rules themselves use, so `ill` or `skill` stay put.
//!
//! Normalization is idempotent and never fails; the property tests in this
//! module hold it to both.
//!
//! **Speed.** Long texts are almost all plain ASCII words, so those take one
//! pass: a word's letters are lowercased straight into the output, hashed
//! once, and one lookup in the vocabulary's *lexicon* says everything the
//! word steps need (filler? a typo of which target? could it be half of a
//! split target word?). Repeats compare the kept hashes before any bytes.
//! Everything else (digits, symbols, apostrophes, non-ASCII) takes the
//! general token path. The normalizer as it was before this rewrite is kept
//! in the tests as the oracle the fast path must match byte for byte.

use rustc_hash::FxHashSet;

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::{decompose_canonical, is_combining_mark};

use super::words::{WordTable, hash, hash_pair, hash_short};

/// Tokens of history kept while normalizing one text (a power of two: the
/// history is a ring). Four are not enough: a split word merged at the end
/// of a repeated pair ("kill myself kill mys elf") leaves the pair's first
/// half out of reach, and the repeat uncollapsed (found by fuzzing).
const HIST: usize = 8;

/// Byte classes of ASCII for the single pass; every byte from 0x80 up is
/// `HIGH` and leaves the pass for NFKC.
const BREAK: u8 = 0;
const LETTER: u8 = 1;
const DIGIT: u8 = 2;
/// `:` `'` `` ` `` `@` `$` `!` `|`: each means something next to a word.
const SPECIAL: u8 = 3;
const HIGH: u8 = 4;

static CLASS: [u8; 256] = {
    let mut t = [HIGH; 256];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        t[b] = if c.is_ascii_alphabetic() {
            LETTER
        } else if c.is_ascii_digit() {
            DIGIT
        } else if matches!(c, b':' | b'\'' | b'`' | b'@' | b'$' | b'!' | b'|') {
            SPECIAL
        } else {
            BREAK
        };
        b += 1;
    }
    t
};

/// An ASCII byte that ends a word and means nothing else: not a letter or
/// digit, not an apostrophe (dropped inside words), not a symbol that may
/// stand for a letter, not the colon of an emoji shortcode.
#[inline]
fn is_plain_break(b: u8) -> bool {
    CLASS[usize::from(b)] == BREAK
}

/// ASCII that ends a sentence: `.` `?` `!` `;` and line breaks. A context
/// cue does not reach across one ("Not really. I want to die" is no
/// negated wish), so the matcher is told where sentences begin.
static STOP: [bool; 256] = {
    let mut t = [false; 256];
    t[b'.' as usize] = true;
    t[b'?' as usize] = true;
    t[b'!' as usize] = true;
    t[b';' as usize] = true;
    t[b'\n' as usize] = true;
    t[b'\r' as usize] = true;
    t
};

#[inline]
fn is_stop(b: u8) -> bool {
    STOP[usize::from(b)]
}

/// Non-ASCII that ends or opens a sentence (after NFKC, which makes
/// fullwidth `？` `！` ASCII and `…` three dots).
fn is_stop_char(c: char) -> bool {
    matches!(c, '\u{BF}' | '\u{A1}' | '\u{3002}' | '\u{FF61}')
}

/// Emoji that carry risk in a patient's words, and the token each becomes.
/// Crisis Text Line found the pill emoji more predictive than the word
/// "suicide"; the others name a method or death itself.
pub const RISK_EMOJI: &[(char, &str)] = &[
    ('\u{1F48A}', ":pill:"),      // 💊
    ('\u{1F52B}', ":gun:"),       // 🔫
    ('\u{1FAA2}', ":knot:"),      // 🪢
    ('\u{26B0}', ":coffin:"),     // ⚰
    ('\u{1FAA6}', ":headstone:"), // 🪦
    ('\u{1F52A}', ":knife:"),     // 🔪
];

/// Speech-recognition fillers, dropped wherever they stand. Not "er": in
/// this domain that is the emergency room.
const FILLERS: &[&str] = &[
    "um", "umm", "ummm", "uh", "uhh", "uhhh", "uhm", "erm", "hmm", "hm", "mm", "mmm", "ah", "ahh",
    "eh", "ehh", "em", "emm", "mhm",
];

fn is_filler(w: &str) -> bool {
    // Cheap rejection first: this runs on every word of the token path.
    if w.len() > 4 || !matches!(w.as_bytes().first(), Some(b'u' | b'e' | b'h' | b'm' | b'a')) {
        return false;
    }
    FILLERS.contains(&w)
}

/// Units that may follow a number without the digits being read as letters.
const NUMBER_SUFFIXES: &[&str] = &[
    "st", "nd", "rd", "th", "am", "pm", "s", "k", "m", "mg", "ml", "kg", "lb", "lbs", "x", "h",
    "hr", "hrs", "min", "mins", "yo", "yr", "yrs", "ft", "in", "g", "mo",
];

/// What the lexicon knows of a word, packed in one `u64`: its flags in
/// the low byte; with `TYPO`, the index in `Vocabulary::targets` it is
/// repaired to (bits 16-31); with `CODED`, the word's id in the matcher's
/// automaton (bits 32-47). One word, because every word of every text
/// carries one through the history ring: as a struct of three fields it
/// was packed and unpacked there, a dozen instructions a word.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Lex(u64);

impl Lex {
    #[inline(always)]
    fn has(self, flag: u8) -> bool {
        self.0 & u64::from(flag) != 0
    }

    #[inline(always)]
    fn target(self) -> u16 {
        (self.0 >> 16) as u16
    }

    #[inline(always)]
    fn code(self) -> u16 {
        (self.0 >> 32) as u16
    }

    fn add(&mut self, flag: u8) {
        self.0 |= u64::from(flag);
    }

    fn set_target(&mut self, target: u16) {
        self.0 = (self.0 & !(0xFFFF << 16)) | (u64::from(target) << 16);
    }

    fn set_code(&mut self, code: u16) {
        self.0 = (self.0 & !(0xFFFF << 32)) | (u64::from(code) << 32);
    }
}

/// A speech filler.
const FILLER: u8 = 1;
/// One edit from a repair target, and repaired to `target`.
const TYPO: u8 = 2;
/// The beginning of a repair target (so it may be the left half of a split).
const LEFT: u8 = 4;
/// The end of a repair target (so it may be the right half of a split).
const RIGHT: u8 = 8;
/// A word the rules use, with its id in the automaton.
const CODED: u8 = 16;

/// A word of normalized output as the normalizer wrote it, for the matcher:
/// where it is, and its code in the automaton if the rules use it. Saves the
/// matcher finding and looking up every word again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WordRef {
    pub s: usize,
    pub e: usize,
    pub code: Option<u16>,
}

/// Takes the words of the normalized output, in order, once each is
/// final: a word is handed on when it leaves the history ring (no repeat
/// or merge reaches it there) or when the text ends. The matcher steps
/// its automaton here, so a long text's words are never stored in a list
/// and read back.
pub(crate) trait WordSink {
    /// `word` is final and lies at `out[word.s..word.e]`.
    fn word(&mut self, out: &[u8], word: WordRef);
}

impl WordSink for Vec<WordRef> {
    #[inline]
    fn word(&mut self, _out: &[u8], word: WordRef) {
        self.push(word);
    }
}

/// The crisis vocabulary that one-edit typos are repaired to, and the words
/// that must never be rewritten (every word a rule uses, plus any extras).
#[derive(Debug, Clone)]
pub struct Vocabulary {
    /// Repair targets, bucketed by first letter for a cheap pre-filter.
    by_first: Vec<Vec<Box<str>>>,
    /// Per first letter, a bit for each target length: most words are
    /// rejected by one lookup, before any comparison.
    lengths: [u64; 26],
    /// Words that are already right and must not be rewritten.
    known: FxHashSet<Box<str>>,
    /// Every word the word steps treat specially: fillers, every string one
    /// edit from a target that `repair` rewrites (with what to), and every
    /// beginning and end of a target. Built from `repair` itself, so one
    /// lookup answers exactly what the slower checks would.
    lexicon: WordTable<Lex>,
    targets: Vec<Box<str>>,
    /// The lexicon's entries for the single letters `a` to `z`, which
    /// spaced-out words and the words "i" and "a" commit one by one.
    letters: [Lex; 26],
}

impl Default for Vocabulary {
    fn default() -> Self {
        Vocabulary::new([], [])
    }
}

impl Vocabulary {
    /// `repair`: canonical words typos are mapped to. `known`: words left as
    /// they are even when one edit away from a repair target.
    pub fn new<'a>(
        repair: impl IntoIterator<Item = &'a str>,
        known: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut by_first: Vec<Vec<Box<str>>> = vec![Vec::new(); 26];
        let mut known_set: FxHashSet<Box<str>> = FxHashSet::default();
        for w in repair {
            let Some(&b) = w.as_bytes().first() else {
                continue;
            };
            if !b.is_ascii_lowercase() || !w.bytes().all(|c| c.is_ascii_lowercase()) {
                continue;
            }
            let bucket = &mut by_first[usize::from(b - b'a')];
            if !bucket.iter().any(|x| &**x == w) {
                bucket.push(Box::from(w));
            }
            known_set.insert(Box::from(w));
        }
        let mut lengths = [0u64; 26];
        for (i, bucket) in by_first.iter().enumerate() {
            for w in bucket {
                lengths[i] |= 1u64 << w.len().min(63);
            }
        }
        let mut v = Vocabulary {
            by_first,
            lengths,
            known: FxHashSet::default(),
            lexicon: WordTable::with_capacity(0),
            targets: Vec::new(),
            letters: [Lex::default(); 26],
        };
        // Only known words that a repair would otherwise rewrite need
        // remembering; the rest cannot be confused with the vocabulary.
        for w in known {
            if v.repair(w).is_some() {
                known_set.insert(Box::from(w));
            }
        }
        v.known = known_set;
        v.build_lexicon();
        v
    }

    /// Fills the lexicon. Typos are found by trying every single edit past
    /// the first letter of every target (deleting, swapping, inserting or
    /// substituting a letter) and asking `repair` about each: every word
    /// `repair` rewrites is one such edit, so the lexicon holds exactly the
    /// words it rewrites, with the same answer.
    fn build_lexicon(&mut self) {
        let targets: Vec<Box<str>> = self.by_first.iter().flatten().cloned().collect();
        let mut lexicon: WordTable<Lex> = WordTable::with_capacity(1024);
        for f in FILLERS {
            lexicon
                .entry_with(f.as_bytes(), |_| Lex::default())
                .add(FILLER);
        }
        let mut cand: Vec<u8> = Vec::with_capacity(64);
        for t in &targets {
            let w = t.as_bytes();
            for k in 1..=w.len() {
                lexicon.entry_with(&w[..k], |_| Lex::default()).add(LEFT);
                lexicon
                    .entry_with(&w[k - 1..], |_| Lex::default())
                    .add(RIGHT);
            }
            let try_cand = |cand: &[u8], lexicon: &mut WordTable<Lex>| {
                let Ok(s) = std::str::from_utf8(cand) else {
                    return;
                };
                let Some(to) = self.repair(s) else {
                    return;
                };
                let Some(i) = targets.iter().position(|x| &**x == to) else {
                    return;
                };
                let Ok(i) = u16::try_from(i) else {
                    return;
                };
                let e = lexicon.entry_with(cand, |_| Lex::default());
                e.add(TYPO);
                e.set_target(i);
            };
            for p in 1..=w.len() {
                // Delete or swap at p.
                if p < w.len() {
                    cand.clear();
                    cand.extend_from_slice(&w[..p]);
                    cand.extend_from_slice(&w[p + 1..]);
                    try_cand(&cand, &mut lexicon);
                }
                if p + 1 < w.len() {
                    cand.clear();
                    cand.extend_from_slice(w);
                    cand.swap(p, p + 1);
                    try_cand(&cand, &mut lexicon);
                }
                for c in b'a'..=b'z' {
                    // Insert before p, or substitute at p.
                    cand.clear();
                    cand.extend_from_slice(&w[..p]);
                    cand.push(c);
                    cand.extend_from_slice(&w[p..]);
                    try_cand(&cand, &mut lexicon);
                    if p < w.len() {
                        cand.clear();
                        cand.extend_from_slice(w);
                        cand[p] = c;
                        try_cand(&cand, &mut lexicon);
                    }
                }
            }
        }
        self.lexicon = lexicon;
        self.targets = targets;
        self.refresh_letters();
    }

    fn refresh_letters(&mut self) {
        for (l, b) in self.letters.iter_mut().zip(b'a'..=b'z') {
            *l = self.lexicon.get(&[b]).unwrap_or_default();
        }
    }

    /// `lex` of the one-letter word `b` (a lowercase ASCII letter).
    #[inline]
    fn letter_lex(&self, b: u8) -> Lex {
        match self.letters.get(usize::from(b.wrapping_sub(b'a'))) {
            Some(&l) => l,
            None => self.lex(&[b], hash(&[b])),
        }
    }

    #[inline]
    fn lex(&self, w: &[u8], h: u64) -> Lex {
        self.lexicon.get_or_default(w, h)
    }

    /// Gives each word the rules use its id in the matcher's automaton.
    pub(crate) fn set_codes<'w>(&mut self, codes: impl IntoIterator<Item = (&'w [u8], u16)>) {
        for (w, code) in codes {
            let e = self.lexicon.entry_with(w, |_| Lex::default());
            e.add(CODED);
            e.set_code(code);
        }
        self.lexicon.spread();
        self.refresh_letters();
    }

    /// The automaton's id of normalized word `w`, if the rules use it.
    #[inline]
    pub(crate) fn code(&self, w: &[u8]) -> Option<u16> {
        code_of(self.lexicon.get(w).unwrap_or_default())
    }

    /// Whether `a` followed by `b` spells a repair target (a split word).
    #[inline]
    fn is_target_pair(&self, a: &[u8], b: &[u8]) -> bool {
        let Some(&first) = a.first() else {
            return false;
        };
        if !first.is_ascii_lowercase()
            || self.lengths[usize::from(first - b'a')] & (1u64 << (a.len() + b.len()).min(63)) == 0
        {
            return false;
        }
        self.is_target_pair_slow(a, b, first)
    }

    #[cold]
    fn is_target_pair_slow(&self, a: &[u8], b: &[u8], first: u8) -> bool {
        self.by_first
            .get(usize::from(first - b'a'))
            .is_some_and(|bucket| {
                bucket.iter().any(|w| {
                    let w = w.as_bytes();
                    w.len() == a.len() + b.len() && w.starts_with(a) && w.ends_with(b)
                })
            })
    }

    /// The repair target for `token`, if it is one edit from exactly the
    /// vocabulary (first letter kept) and not itself a known word. The
    /// lexicon is built from this; normalizing looks it up there instead.
    fn repair(&self, token: &str) -> Option<&str> {
        let bytes = token.as_bytes();
        if bytes.len() < 3 || !bytes[0].is_ascii_lowercase() {
            return None;
        }
        let near = 0b111u64 << (bytes.len() - 1).min(61);
        if self.lengths[usize::from(bytes[0] - b'a')] & near == 0 {
            return None;
        }
        if !bytes.iter().all(u8::is_ascii_lowercase) {
            return None;
        }
        let bucket = self.by_first.get(usize::from(bytes[0] - b'a'))?;
        // A same-length candidate (a swapped or mistyped letter) beats one
        // that needs a letter added or removed: `suicidel` is `suicidal`.
        let mut found: Option<&str> = None;
        for w in bucket {
            let wb = w.as_bytes();
            if wb.len().abs_diff(bytes.len()) > 1 || wb == bytes || !one_edit(bytes, wb) {
                continue;
            }
            if found.is_none_or(|f| f.len() != bytes.len() && wb.len() == bytes.len()) {
                found = Some(w);
            }
        }
        let target = found?;
        if self.known.contains(token) {
            return None;
        }
        Some(target)
    }
}

#[inline]
fn code_of(lex: Lex) -> Option<u16> {
    lex.has(CODED).then_some(lex.code())
}

/// Whether `t` becomes `w` by one edit past the first letter: deleting or
/// inserting a letter, swapping two neighbours, or (for words of six letters
/// or more, where a substitution rarely lands on another real word)
/// substituting one.
fn one_edit(t: &[u8], w: &[u8]) -> bool {
    let prefix = t.iter().zip(w).take_while(|(a, b)| a == b).count();
    if prefix == 0 || prefix == t.len().min(w.len()) && t.len() == w.len() {
        return false;
    }
    match t.len() as isize - w.len() as isize {
        0 => {
            // substitution or transposition at `prefix`
            let i = prefix;
            if i + 1 < t.len() && t[i] == w[i + 1] && t[i + 1] == w[i] && t[i + 2..] == w[i + 2..] {
                return w.len() >= 4;
            }
            w.len() >= 6 && t[i + 1..] == w[i + 1..]
        }
        1 => w.len() >= 4 && t[prefix + 1..] == w[prefix..],
        -1 => w.len() >= 4 && t[prefix..] == w[prefix + 1..],
        _ => false,
    }
}

/// The normalizer. Cheap to share: it holds only the vocabulary.
#[derive(Debug, Clone, Default)]
pub struct Normalizer {
    vocabulary: Vocabulary,
}

impl Normalizer {
    /// A normalizer without typo repair: what rule phrases are checked with.
    pub fn basic() -> Self {
        Normalizer::default()
    }

    pub fn with_vocabulary(vocabulary: Vocabulary) -> Self {
        Normalizer { vocabulary }
    }

    pub(crate) fn vocabulary(&self) -> &Vocabulary {
        &self.vocabulary
    }

    pub fn normalize(&self, input: &str) -> String {
        let mut out = String::with_capacity(input.len());
        self.normalize_into(input, &mut out);
        out
    }

    /// If the word ending just before byte `at` of normalized `buf` and the
    /// word starting at `at` together spell a vocabulary word, joins them.
    /// Returns where the (possibly joined) word at `at` now begins.
    pub fn join_split_at(&self, buf: &mut String, at: usize) -> usize {
        if at < 2 || at > buf.len() || buf.as_bytes()[at - 1] != b' ' {
            return at;
        }
        // Bytes, not `str` searches: this runs at every seam of a stream,
        // on words of a few letters, where a `str` search costs more to set
        // up than to run.
        let bytes = buf.as_bytes();
        let left_start = bytes[..at - 1]
            .iter()
            .rposition(|&b| b == b' ')
            .map_or(0, |i| i + 1);
        let right_end = bytes[at..]
            .iter()
            .position(|&b| b == b' ')
            .map_or(bytes.len(), |i| at + i);
        if self
            .vocabulary
            .is_target_pair(&bytes[left_start..at - 1], &bytes[at..right_end])
        {
            buf.remove(at - 1);
            return left_start;
        }
        at
    }

    /// Appends the normalized form of `input` to `out`, separated from what
    /// `out` already holds by one space. Allocates only for scratch words.
    pub fn normalize_into(&self, input: &str, out: &mut String) {
        self.normalize_inner(input, out, None::<&mut Vec<WordRef>>, None, false);
    }

    /// `normalize_into`, handing each word it appends to `sink` (if given),
    /// in order, and pushing onto `starts` where in `out` each appended
    /// word that begins a sentence begins. `after_stop`: what `out` holds
    /// ended a sentence, so the first word appended begins one. Returns
    /// whether `input` ends one.
    pub(crate) fn normalize_marking<S: WordSink>(
        &self,
        input: &str,
        out: &mut String,
        sink: Option<&mut S>,
        starts: &mut Vec<usize>,
        after_stop: bool,
    ) -> bool {
        self.normalize_inner(input, out, sink, Some(starts), after_stop)
    }

    fn normalize_inner<S: WordSink>(
        &self,
        input: &str,
        out: &mut String,
        words: Option<&mut S>,
        starts: Option<&mut Vec<usize>>,
        after_stop: bool,
    ) -> bool {
        // The output is built as bytes (only ASCII is ever written, so it
        // stays UTF-8) and handed back as a `String` at the end.
        let mut bytes_out = std::mem::take(out).into_bytes();
        bytes_out.reserve(input.len() + 1);
        let Scratch {
            run,
            tok,
            plain,
            apos,
            cleaned,
        } = SCRATCH.take();
        let mut em = Emitter {
            vocab: &self.vocabulary,
            words,
            base: bytes_out.len(),
            out: bytes_out,
            hist: [Tok::default(); HIST],
            top: HIST - 1,
            hist_len: 0,
            run,
            tok,
            plain,
            apos,
            cleaned,
            last_colon: false,
            tok_after_colon: false,
            starts,
            pending: after_stop,
            run_stop: 0,
        };
        // ASCII takes the single pass; only the non-ASCII stretches between
        // ASCII go through NFKC. Splitting there is safe: what NFKC would
        // compose across the seam is a combining mark, which is dropped.
        let bytes = input.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            i = em.ascii_run(bytes, i);
            if i < bytes.len() {
                let end = bytes[i..]
                    .iter()
                    .position(u8::is_ascii)
                    .map_or(bytes.len(), |p| i + p);
                for c in input[i..end].nfkc() {
                    em.char(c);
                }
                i = end;
            }
        }
        em.end_token();
        em.flush_run();
        em.hand_on_rest();
        let ends_sentence = em.pending;
        SCRATCH.set(Scratch::kept(em.run, em.tok, em.plain, em.apos, em.cleaned));
        *out = match String::from_utf8(em.out) {
            Ok(s) => s,
            // Unreachable: only ASCII is written after valid UTF-8.
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        ends_sentence
    }
}

/// The emitter's scratch buffers, kept between calls on each thread: a
/// typical utterance's first single letter or cleaned word would
/// otherwise allocate, and those allocations and frees were a tenth of
/// its normalizing.
#[derive(Default)]
struct Scratch {
    run: String,
    tok: String,
    plain: Vec<u8>,
    apos: String,
    cleaned: String,
}

/// Buffers grown past this by one odd text are given back, not kept.
const SCRATCH_KEEP: usize = 4096;

impl Scratch {
    fn kept(run: String, tok: String, plain: Vec<u8>, apos: String, cleaned: String) -> Self {
        let small = |c: usize| c <= SCRATCH_KEEP;
        if [
            run.capacity(),
            tok.capacity(),
            plain.capacity(),
            apos.capacity(),
            cleaned.capacity(),
        ]
        .into_iter()
        .all(small)
        {
            // Cleared on the way in: every buffer is empty where a call
            // begins, as a new one would be.
            let clear = |mut s: String| {
                s.clear();
                s
            };
            let mut plain = plain;
            plain.clear();
            Scratch {
                run: clear(run),
                tok: clear(tok),
                plain,
                apos: clear(apos),
                cleaned: clear(cleaned),
            }
        } else {
            Scratch::default()
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

/// The first eight bytes of `b` (which has at least eight) as one `u64`.
#[inline(always)]
fn load(b: &[u8]) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[..8]);
    u64::from_le_bytes(x)
}

/// `bytes[start..]` as one `u64`: its first eight bytes if it has them,
/// else the bytes up to `end` (then the text's last, at most eight), with
/// zeros after. The word at the end of a text is read the way the others
/// are: it used to take the general path, once for every utterance.
#[inline(always)]
fn load_at(bytes: &[u8], start: usize, end: usize) -> u64 {
    match bytes.get(start..start + 8) {
        Some(chunk) => load(chunk),
        None => {
            let mut x = [0u8; 8];
            let n = (end - start).min(8);
            x[..n].copy_from_slice(&bytes[start..start + n]);
            u64::from_le_bytes(x)
        }
    }
}

/// Where the run of ASCII letters that goes on at `bytes[i]` ends (the
/// letter before `i` is known). Eight bytes at a time while there are eight.
#[inline]
fn letters_end(bytes: &[u8], mut i: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let x = u64::from_le_bytes(b);
        // Per byte, with its high bit: folded to lower case (`| 0x20`),
        // at least `a`, and not past `z`; bytes of 0x80 and up are not
        // letters. Sums stay within each byte: the high bits are cleared.
        let y = (x | (0x20 * ONES)) & !HIGH_BITS;
        let ge_a = y + (0x80 - u64::from(b'a')) * ONES;
        let gt_z = y + (0x80 - u64::from(b'z') - 1) * ONES;
        let letter = ge_a & !gt_z & !x & HIGH_BITS;
        let not_letter = !letter & HIGH_BITS;
        if not_letter != 0 {
            return i + (not_letter.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < bytes.len() && CLASS[usize::from(bytes[i])] == LETTER {
        i += 1;
    }
    i
}

/// Whether a word of two letters or more, between plain breaks (or at the
/// text's end), begins at `bytes[j]` and is no filler: one that ends a run
/// of single letters, rather than joining it (`k i l l`) or being dropped
/// from between them (`k um i l l`). Fillers begin with one of `a e h m
/// u`; a word beginning so is not looked up but left to the general path.
#[inline]
fn starts_plain_word(bytes: &[u8], j: usize) -> bool {
    let Some(&first) = bytes.get(j) else {
        return false;
    };
    if CLASS[usize::from(first)] != LETTER
        || matches!(first | 0x20, b'a' | b'e' | b'h' | b'm' | b'u')
    {
        return false;
    }
    let k = letters_end(bytes, j + 1);
    k - j >= 2 && bytes.get(k).is_none_or(|&b| is_plain_break(b))
}

/// A word in the output: where it is, its hash, and its lexicon entry.
#[derive(Debug, Clone, Copy, Default)]
struct Tok {
    s: usize,
    e: usize,
    hash: u64,
    lex: Lex,
}

/// Streams characters into tokens and tokens into the output.
struct Emitter<'a, S> {
    vocab: &'a Vocabulary,
    /// Where each word this call wrote goes once final, when asked for.
    words: Option<&'a mut S>,
    out: Vec<u8>,
    /// Where this call's output begins in `out`.
    base: usize,
    /// The last few tokens written by this call (a ring, `hist_len` of
    /// them, the newest at `top`); enough to undo split words and repeated
    /// pairs. Indexed from the newest: every look-back starts there.
    hist: [Tok; HIST],
    top: usize,
    hist_len: usize,
    /// Pending run of single-letter tokens, letters only.
    run: String,
    /// The word being read.
    tok: String,
    /// Scratch for a plain word that must wait for a run to go first.
    plain: Vec<u8>,
    /// Scratch for a word with apostrophes.
    apos: String,
    /// Scratch for a word whose symbols are cleaned.
    cleaned: String,
    /// The previous character was a `:`.
    last_colon: bool,
    /// The word being read began right after a `:` (a `:pill:` shortcode).
    tok_after_colon: bool,
    /// Where words that begin a sentence begin, when asked for.
    starts: Option<&'a mut Vec<usize>>,
    /// A sentence ended since the last word written: the next begins one.
    pending: bool,
    /// A sentence ended after this many of the held-back single letters
    /// (0: none did).
    run_stop: usize,
}

impl<S: WordSink> Emitter<'_, S> {
    /// Reads ASCII from `bytes[i..]` up to the first non-ASCII byte, and
    /// returns where that is.
    fn ascii_run(&mut self, bytes: &[u8], mut i: usize) -> usize {
        let n = bytes.len();
        while i < n {
            let b = bytes[i];
            let class = CLASS[usize::from(b)];
            if class != LETTER {
                if class == HIGH {
                    return i;
                }
                // Between words, a break changes nothing but the colon flag.
                if class == BREAK && self.tok.is_empty() {
                    self.last_colon = false;
                    if is_stop(b) {
                        self.stop();
                    }
                } else {
                    self.ascii(b);
                }
                i += 1;
                continue;
            }
            // Runs of letters, the bulk of any text, are copied whole.
            let start = i;
            i = letters_end(bytes, i + 1);
            let letters = &bytes[start..i];
            if !self.tok.is_empty() || self.last_colon {
                if self.tok.is_empty() {
                    self.tok_after_colon = self.last_colon;
                }
                self.tok
                    .extend(letters.iter().map(|&c| char::from(c | 0x20)));
                self.last_colon = false;
                continue;
            }
            // A word of letters alone, between plain breaks or at the
            // text's end, needs no cleaning: it is lowercased straight into
            // the output and goes to the word steps there. (Not where a
            // non-ASCII byte follows: the word may go on in a non-ASCII
            // letter.)
            let next = bytes.get(i).copied();
            if next.is_none_or(is_plain_break) {
                if letters.len() >= 2 {
                    self.plain_word_at(bytes, start, i);
                } else if self.run.is_empty() && starts_plain_word(bytes, i + 1) {
                    // "i want", "a lot": a plain word follows, which would
                    // write a run of this one letter as it is at once.
                    self.letter(letters[0] | 0x20);
                } else {
                    // A single letter waits: it may be one of `k i l l`.
                    self.run.push(char::from(letters[0] | 0x20));
                }
                if next.is_some_and(is_stop) {
                    self.stop();
                }
                // The break after it changes nothing: no token is being
                // read and it is no colon. (At the end, past it: the loop
                // ends all the same.)
                i += 1;
                continue;
            }
            match next {
                Some(b'\'' | b'`') => i = self.apostrophe_word(bytes, start, i),
                _ => {
                    self.tok_after_colon = false;
                    self.tok
                        .extend(letters.iter().map(|&c| char::from(c | 0x20)));
                }
            }
        }
        n
    }

    /// `i'm`, `don't`: letters with apostrophes (dropped) among them, from
    /// `bytes[start..]`; an apostrophe is at `i`. Returns where it stops.
    /// Between plain breaks this is a plain word; otherwise its letters
    /// become the token being read, as the token path would have it.
    fn apostrophe_word(&mut self, bytes: &[u8], start: usize, mut i: usize) -> usize {
        let n = bytes.len();
        let mut w = std::mem::take(&mut self.apos);
        w.clear();
        w.extend(bytes[start..i].iter().map(|&c| char::from(c | 0x20)));
        loop {
            while i < n && matches!(bytes[i], b'\'' | b'`') {
                i += 1;
            }
            if i < n && CLASS[usize::from(bytes[i])] == LETTER {
                let from = i;
                i = letters_end(bytes, i + 1);
                w.extend(bytes[from..i].iter().map(|&c| char::from(c | 0x20)));
                if i < n && matches!(bytes[i], b'\'' | b'`') {
                    continue;
                }
            }
            break;
        }
        if i < n && is_plain_break(bytes[i]) {
            if w.len() >= 2 {
                self.plain_key(w.as_bytes());
            } else {
                self.run.push_str(&w);
            }
        } else {
            self.tok_after_colon = false;
            self.tok.push_str(&w);
        }
        self.apos = w;
        i
    }

    /// The one-letter word `b` (lowercase), written as a run of one.
    #[inline(never)]
    fn letter(&mut self, b: u8) {
        if self.needs_space() {
            self.out.push(b' ');
        }
        let s = self.out.len();
        self.out.push(b);
        let lex = self.vocab.letter_lex(b);
        self.committed(s, hash_short(1, u64::from(b)), lex);
    }

    /// Whether the next word needs a space before it.
    #[inline]
    fn needs_space(&self) -> bool {
        self.hist_len > 0 || (self.base > 0 && self.out.last() != Some(&b' '))
    }

    /// A plain word of ASCII letters (two or more), not yet lowercased.
    #[inline]
    fn plain_word(&mut self, letters: &[u8]) {
        let mark = self.out.len();
        if self.needs_space() {
            self.out.push(b' ');
        }
        let s = self.out.len();
        self.out.extend(letters.iter().map(|&c| c | 0x20));
        let h = hash(&self.out[s..]);
        self.plain_written(mark, s, h);
    }

    /// `plain_word` of lowercase `w`: one of up to sixteen letters, as
    /// `plain_word_at` has it, keyed and hashed in `u64`s rather than
    /// written and hashed byte by byte. "I'm", "don't" and "can't" are
    /// common in speech; each took the general path. Not inlined: the
    /// word loop's registers are better spent on the words of letters.
    #[inline(never)]
    fn plain_key(&mut self, w: &[u8]) {
        let len = w.len();
        if len > 16 {
            self.plain_word(w);
            return;
        }
        let mut key = [0u8; 16];
        key[..len].copy_from_slice(w);
        let x0 = load(&key[..8]);
        if len <= 8 {
            self.plain_lowered(&key[..8], len, hash_short(len, x0));
        } else {
            let x1 = load(&key[8..]);
            self.plain_lowered(&key, len, hash_pair(len, x0, x1));
        }
    }

    /// `plain_word` of `bytes[start..end]`. A word of at most eight
    /// letters (nearly all) is lowercased as one `u64`, written with one
    /// store and hashed as is; one of up to sixteen as two.
    #[inline]
    fn plain_word_at(&mut self, bytes: &[u8], start: usize, end: usize) {
        const LOWER: u64 = 0x2020_2020_2020_2020;
        let len = end - start;
        // Letters only up to `end`: `| 0x20` lowercases each of them, and
        // the mask clears what follows.
        let mask = |n: usize| u64::MAX >> (64 - 8 * n);
        if (1..=8).contains(&len) {
            let x = (load_at(bytes, start, end) | LOWER) & mask(len);
            self.plain_lowered(&x.to_le_bytes(), len, hash_short(len, x));
        } else if (9..=16).contains(&len) {
            // Nearly all the rest: two `u64`s, the first all letters.
            let x0 = load(&bytes[start..start + 8]) | LOWER;
            let x1 = (load_at(bytes, start + 8, end) | LOWER) & mask(len - 8);
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&x0.to_le_bytes());
            key[8..].copy_from_slice(&x1.to_le_bytes());
            self.plain_lowered(&key, len, hash_pair(len, x0, x1));
        } else {
            self.plain_word(&bytes[start..end]);
        }
    }

    /// A plain word, lowercased into `key[..len]` (zeros after), hash `h`.
    /// Looked up before it is written: a filler is then never written, and
    /// single letters held back go first without moving it.
    #[inline(always)]
    fn plain_lowered(&mut self, key: &[u8], len: usize, h: u64) {
        let lex = self.vocab.lex(&key[..len], h);
        if lex.has(FILLER) {
            return;
        }
        self.flush_run();
        if self.needs_space() {
            self.out.push(b' ');
        }
        let s = self.out.len();
        self.out.extend_from_slice(key);
        self.out.truncate(s + len);
        self.committed(s, h, lex);
    }

    /// The plain word at `out[s..]` (hash `h`) is written, after a space
    /// from `mark` if it needed one: drops it if a filler, else commits it.
    #[inline]
    fn plain_written(&mut self, mark: usize, s: usize, h: u64) {
        let lex = self.vocab.lex(&self.out[s..], h);
        if lex.has(FILLER) {
            self.out.truncate(mark);
            return;
        }
        if !self.run.is_empty() {
            // Single letters held back for a spaced-out word go first.
            let mut w = std::mem::take(&mut self.plain);
            w.clear();
            w.extend_from_slice(&self.out[s..]);
            self.out.truncate(mark);
            self.flush_run();
            if self.needs_space() {
                self.out.push(b' ');
            }
            let s = self.out.len();
            self.out.extend_from_slice(&w);
            self.committed(s, h, lex);
            self.plain = w;
            return;
        }
        self.committed(s, h, lex);
    }

    #[inline]
    fn ascii(&mut self, b: u8) {
        let colon = b == b':';
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'A'..=b'Z' => {
                if self.tok.is_empty() {
                    self.tok_after_colon = self.last_colon;
                }
                self.tok.push(b.to_ascii_lowercase() as char)
            }
            b':' => self.colon(),
            b'\'' | b'`' => {}
            // Inside a word these stand for letters; `$` and `@` also lead
            // words ($elf, @ll). Elsewhere they are dropped.
            b'@' | b'$' => self.tok.push(b as char),
            b'!' | b'|' => {
                if !self.tok.is_empty() {
                    self.tok.push(b as char)
                } else if b == b'!' {
                    self.stop();
                }
            }
            _ => {
                self.end_token();
                if is_stop(b) {
                    self.stop();
                }
            }
        }
        self.last_colon = colon;
    }

    /// `:pill:` and the like are the emoji's shortcodes (and the emoji's own
    /// normalized form, which keeps normalization idempotent).
    fn colon(&mut self) {
        if self.tok_after_colon
            && let Some(&(_, token)) = RISK_EMOJI
                .iter()
                .find(|(_, t)| t[1..t.len() - 1] == *self.tok)
        {
            self.tok.clear();
            self.word(token);
            return;
        }
        self.end_token();
    }

    fn char(&mut self, c: char) {
        if c.is_ascii() {
            self.ascii(c as u8);
            return;
        }
        if let Some(&(_, token)) = RISK_EMOJI.iter().find(|(e, _)| *e == c) {
            self.last_colon = false;
            self.end_token();
            self.word(token);
            return;
        }
        if is_format(c) || is_apostrophe(c) {
            return;
        }
        self.last_colon = false;
        // Decompose to drop accents, then fold case and look-alikes.
        decompose_canonical(c, |d| {
            if !is_combining_mark(d) {
                for l in d.to_lowercase() {
                    self.folded(l);
                }
            }
        });
    }

    fn folded(&mut self, c: char) {
        if c.is_ascii() {
            self.ascii(c as u8);
            return;
        }
        if is_combining_mark(c) || is_format(c) {
            return;
        }
        match confusable(c) {
            Some(s) => {
                for b in s.bytes() {
                    self.ascii(b);
                }
            }
            None => {
                self.end_token();
                if is_stop_char(c) {
                    self.stop();
                }
            }
        }
    }

    /// Finishes the word being read: strips stray symbols, undoes
    /// substitutions, and hands it on.
    fn end_token(&mut self) {
        if self.tok.is_empty() {
            return;
        }
        let mut tok = std::mem::take(&mut self.tok);
        // "help!": the `!` a word ends with ends its sentence.
        let stop = tok.ends_with('!');
        clean_word(&mut tok, &mut self.cleaned);
        if !tok.is_empty() {
            self.word_owned(&tok);
        }
        tok.clear();
        self.tok = tok;
        if stop {
            self.stop();
        }
    }

    /// A sentence ends here: the next word written begins one. Single
    /// letters still held back are written first, so the mark waits for
    /// them.
    #[inline]
    fn stop(&mut self) {
        if self.run.is_empty() {
            self.pending = true;
        } else {
            self.run_stop = self.run.len();
        }
    }

    /// The word about to be committed at `out[s..]` begins a sentence.
    #[cold]
    fn mark_start(&mut self, s: usize) {
        self.pending = false;
        if let Some(starts) = &mut self.starts {
            starts.push(s);
        }
    }

    fn word_owned(&mut self, w: &str) {
        if is_filler(w) {
            return;
        }
        if w.len() == 1 && w.as_bytes()[0].is_ascii_lowercase() {
            self.run.push_str(w);
            return;
        }
        self.flush_run();
        self.commit(w.as_bytes());
    }

    /// A word that is already canonical (an emoji token).
    fn word(&mut self, w: &str) {
        self.flush_run();
        self.commit(w.as_bytes());
    }

    #[inline]
    fn flush_run(&mut self) {
        if !self.run.is_empty() {
            self.flush_run_slow();
        }
    }

    fn flush_run_slow(&mut self) {
        let run = std::mem::take(&mut self.run);
        let stop = std::mem::take(&mut self.run_stop);
        if run.len() >= 3 {
            // "m m m" joins to "mmm", itself a filler. A sentence end
            // inside the run ("k. i. l. l") is lost in the joined word.
            if !is_filler(&run) {
                self.commit(run.as_bytes());
            }
        } else {
            // One or two: "i", "a" (common enough to skip the lookup).
            for (k, &b) in run.as_bytes().iter().enumerate() {
                if stop > 0 && k == stop {
                    self.pending = true;
                }
                self.letter(b);
            }
        }
        if stop > 0 && stop == run.len() {
            self.pending = true;
        }
        let mut run = run;
        run.clear();
        self.run = run;
    }

    fn commit(&mut self, w: &[u8]) {
        if self.needs_space() {
            self.out.push(b' ');
        }
        let s = self.out.len();
        self.out.extend_from_slice(w);
        let h = hash(w);
        let lex = self.vocab.lex(w, h);
        self.committed(s, h, lex);
    }

    /// The word at `out[s..]` (hash `h`, lexicon entry `lex`) is written:
    /// repairs it and runs the steps that look back at earlier words.
    /// Inlined into the plain-word path: it runs for every word, and a
    /// call there costs more than its own work.
    #[inline(always)]
    fn committed(&mut self, s: usize, mut h: u64, mut lex: Lex) {
        if self.pending {
            self.mark_start(s);
        }
        if lex.has(TYPO) {
            self.repair_last(s, &mut h, &mut lex);
        }
        let l = self.hist_len;
        // Nearly every word is no repeat (its hash differs from the word or
        // pair before) and no half of a split target (flags): then none of
        // the look-back steps can change anything.
        let maybe = l >= 1 && {
            let prev = self.back(0);
            prev.hash == h
                || (prev.lex.has(LEFT) && lex.has(RIGHT))
                || (l >= 3 && self.back(1).hash == h)
        };
        self.push_hist(Tok {
            s,
            e: self.out.len(),
            hash: h,
            lex,
        });
        if maybe {
            self.look_back();
        }
    }

    #[cold]
    fn look_back(&mut self) {
        while self.merge_split_word() || self.collapse_repeat(1) || self.collapse_repeat(2) {}
    }

    #[cold]
    fn repair_last(&mut self, s: usize, h: &mut u64, lex: &mut Lex) {
        let Some(t) = self.vocab.targets.get(usize::from(lex.target())) else {
            return;
        };
        self.out.truncate(s);
        self.out.extend_from_slice(t.as_bytes());
        *h = hash(t.as_bytes());
        *lex = self.vocab.lex(t.as_bytes(), *h);
    }

    /// The token `j` places before the newest (`back(0)` is the newest);
    /// `j` below `hist_len`.
    #[inline]
    fn back(&self, j: usize) -> &Tok {
        &self.hist[self.top.wrapping_sub(j) % HIST]
    }

    // Always inlined: left to the compiler it was a call per word, whose
    // register saves and spilled arguments cost a quarter of the step.
    #[inline(always)]
    fn push_hist(&mut self, t: Tok) {
        // A full ring overwrites its oldest token, which is then final.
        if self.hist_len == HIST
            && let Some(words) = &mut self.words
        {
            let old = self.hist[self.top.wrapping_add(1) % HIST];
            words.word(
                &self.out,
                WordRef {
                    s: old.s,
                    e: old.e,
                    code: code_of(old.lex),
                },
            );
        }
        self.top = self.top.wrapping_add(1);
        self.hist[self.top % HIST] = t;
        self.hist_len = (self.hist_len + 1).min(HIST);
    }

    /// At the text's end, the words still in the ring are final too.
    fn hand_on_rest(&mut self) {
        let Some(words) = &mut self.words else {
            return;
        };
        for j in (0..self.hist_len).rev() {
            let t = self.hist[self.top.wrapping_sub(j) % HIST];
            words.word(
                &self.out,
                WordRef {
                    s: t.s,
                    e: t.e,
                    code: code_of(t.lex),
                },
            );
        }
    }

    /// Token equality: the hashes turn nearly every pair away.
    #[inline]
    fn same_token(&self, i: usize, j: usize) -> bool {
        let (x, y) = (self.back(i), self.back(j));
        x.hash == y.hash && self.out[x.s..x.e] == self.out[y.s..y.e]
    }

    /// Drops the last `n` tokens (at most `hist_len`) from the output.
    fn pop(&mut self, n: usize) {
        self.hist_len -= n;
        self.top = self.top.wrapping_sub(n);
        let end = if self.hist_len == 0 {
            // Back to where this call began, minus the separator it added:
            // the oldest token dropped is the one after the new top.
            self.hist[self.top.wrapping_add(1) % HIST]
                .s
                .saturating_sub(1)
                .max(self.base)
        } else {
            self.back(0).e
        };
        self.out.truncate(end);
        // A dropped word that began a sentence hands that on to the next.
        if let Some(starts) = &mut self.starts
            && starts.last().is_some_and(|&p| p >= end)
        {
            while starts.last().is_some_and(|&p| p >= end) {
                starts.pop();
            }
            self.pending = true;
        }
    }

    /// `sui cide` → `suicide`, `my self` → `myself`: two words that together
    /// are a crisis vocabulary word become that word.
    #[inline]
    fn merge_split_word(&mut self) -> bool {
        if self.hist_len < 2 {
            return false;
        }
        let (a, b) = (*self.back(1), *self.back(0));
        // Only a beginning and an end of a target can make one.
        if !a.lex.has(LEFT) || !b.lex.has(RIGHT) {
            return false;
        }
        self.merge_slow(a, b)
    }

    #[cold]
    fn merge_slow(&mut self, a: Tok, b: Tok) -> bool {
        if !self
            .vocab
            .is_target_pair(&self.out[a.s..a.e], &self.out[b.s..b.e])
        {
            return false;
        }
        // Remove the space between the two words; the second no longer
        // begins anything.
        if let Some(starts) = &mut self.starts
            && starts.last() == Some(&b.s)
        {
            starts.pop();
        }
        self.out.remove(b.s - 1);
        self.hist_len -= 1;
        self.top = self.top.wrapping_sub(1);
        let e = b.e - 1;
        let h = hash(&self.out[a.s..e]);
        let lex = self.vocab.lex(&self.out[a.s..e], h);
        self.hist[self.top % HIST] = Tok {
            s: a.s,
            e,
            hash: h,
            lex,
        };
        true
    }

    /// Collapses an immediate repeat of the last `n` words: `i i` → `i`,
    /// `all the all the` → `all the`.
    #[inline]
    fn collapse_repeat(&mut self, n: usize) -> bool {
        let l = self.hist_len;
        let repeated = match n {
            1 => l >= 2 && self.same_token(0, 1),
            2 => l >= 4 && self.same_token(0, 2) && self.same_token(1, 3),
            _ => false,
        };
        if repeated {
            self.pop(n);
        }
        repeated
    }
}

/// Turns a raw word of `[a-z0-9@$!|]` into `[a-z0-9]`: symbols at the edges
/// go, and inside a word that has letters, digits and symbols that stand for
/// letters become those letters unless the word is a number with a unit.
/// `scratch` is where a rewritten word is built; it is swapped with `tok`,
/// so neither buffer is given up (a token path that allocated per token
/// spent more on the allocator than on the tokens).
fn clean_word(tok: &mut String, scratch: &mut String) {
    if tok.bytes().all(|b| b.is_ascii_lowercase()) {
        return;
    }
    let is_sym = |b: u8| matches!(b, b'@' | b'$' | b'!' | b'|');
    // `$` and `@` lead words in leetspeak ($elf, @ll); other symbols don't.
    let start = tok
        .bytes()
        .position(|b| !is_sym(b) || ((b == b'$' || b == b'@') && tok.len() > 1))
        .unwrap_or(tok.len());
    let end = tok
        .bytes()
        .rposition(|b| !is_sym(b) || b == b'$')
        .map_or(start, |i| i + 1)
        .max(start);
    let bytes = &tok.as_bytes()[start..end];
    let has_letter = bytes.iter().any(u8::is_ascii_lowercase);
    let has_other = bytes.iter().any(|b| !b.is_ascii_lowercase());
    if !has_other {
        if start > 0 || end < tok.len() {
            tok.truncate(end);
            tok.drain(..start);
        }
        return;
    }
    let cleaned = scratch;
    cleaned.clear();
    if !has_letter || is_number_with_unit(bytes) {
        cleaned.extend(bytes.iter().filter(|b| !is_sym(**b)).map(|&b| b as char));
    } else {
        for &b in bytes {
            let c = match b {
                b'0' => 'o',
                b'1' | b'!' => 'i',
                b'3' => 'e',
                b'4' | b'@' => 'a',
                b'5' | b'$' => 's',
                b'7' => 't',
                b'|' => 'l',
                other => other as char,
            };
            cleaned.push(c);
        }
    }
    std::mem::swap(tok, cleaned);
}

fn is_number_with_unit(bytes: &[u8]) -> bool {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return false;
    }
    let rest = &bytes[digits..];
    rest.iter().all(u8::is_ascii_lowercase) && NUMBER_SUFFIXES.iter().any(|s| s.as_bytes() == rest)
}

fn is_apostrophe(c: char) -> bool {
    matches!(
        c,
        '\u{2018}'
            | '\u{2019}'
            | '\u{201B}'
            | '\u{2032}'
            | '\u{02BC}'
            | '\u{02B9}'
            | '\u{00B4}'
            | '\u{FF07}'
    )
}

/// Unicode format characters (category Cf) and variation selectors: invisible,
/// and used to split words so that a matcher misses them.
fn is_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{0600}'..='\u{0605}' | '\u{061C}' | '\u{06DD}' | '\u{070F}'
        | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}' | '\u{180B}'..='\u{180F}'
        | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}'
        | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}' | '\u{FFF9}'..='\u{FFFB}'
        | '\u{110BD}' | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// Letters from other scripts that pass for Latin ones, and Latin letters
/// that have no canonical decomposition.
fn confusable(c: char) -> Option<&'static str> {
    Some(match c {
        'а' | 'α' | 'ɑ' => "a",
        'в' | 'β' => "b",
        'с' | 'ϲ' => "c",
        'ԁ' | 'đ' | 'ð' => "d",
        'е' | 'ε' | 'є' => "e",
        'ɡ' => "g",
        'һ' | 'ħ' => "h",
        'і' | 'ı' | 'ι' | 'ї' => "i",
        'ј' => "j",
        'к' | 'κ' => "k",
        'ӏ' | 'ł' => "l",
        'м' => "m",
        'п' | 'η' => "n",
        'о' | 'ο' | 'ø' | 'σ' => "o",
        'р' | 'ρ' => "p",
        'ԛ' => "q",
        'г' => "r",
        'ѕ' => "s",
        'т' | 'τ' | 'ŧ' => "t",
        'υ' => "u",
        'ν' => "v",
        'ԝ' | 'ω' => "w",
        'х' | 'χ' => "x",
        'у' | 'γ' => "y",
        'ß' => "ss",
        'æ' => "ae",
        'œ' => "oe",
        _ => return None,
    })
}

/// Whether `s` is in the normalizer's output alphabet: words of `[a-z0-9]`
/// or emoji tokens, separated by single spaces, no space at either end.
pub fn is_normal_form(s: &str) -> bool {
    if s.is_empty() {
        return true;
    }
    s.split(' ').all(|w| {
        !w.is_empty()
            && (w
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                || RISK_EMOJI.iter().any(|(_, t)| *t == w))
    })
}

#[cfg(test)]
#[path = "normalize_reference.rs"]
mod reference;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn crisis_vocab() -> Normalizer {
        Normalizer::with_vocabulary(Vocabulary::new(
            [
                "suicide", "suicidal", "myself", "kill", "killing", "overdose",
            ],
            ["ill", "skill", "kills", "suicida", "suicidas"],
        ))
    }

    #[test]
    fn letters_end_table() {
        let cases: &[(&str, usize, usize)] = &[
            ("want to", 1, 4),
            ("abcdefghijklmnopqrstuvwxyz ", 1, 26),
            ("ABCDEFGHIJKLMNOPQRSTUVWXYZ", 1, 26),
            ("az@[`{AZ", 1, 2),
            ("aaaaaaaa\u{e9}", 1, 8),
            ("aaaaaaaaa\u{e9}", 1, 9),
            ("x0123456789", 1, 1),
            ("abcdefgh", 8, 8),
            ("ab\x7fcdefghij", 1, 2),
            ("abcdefg\tij", 1, 7),
        ];
        for (s, from, want) in cases {
            assert_eq!(letters_end(s.as_bytes(), *from), *want, "{s:?}");
        }
        // Against the table, at every start, on every byte next to letters.
        for b in 0..=255u8 {
            let mut bytes = b"abcdefghijkl".to_vec();
            for at in 1..bytes.len() {
                let saved = bytes[at];
                bytes[at] = b;
                let slow = (1..bytes.len())
                    .find(|&i| CLASS[usize::from(bytes[i])] != LETTER)
                    .unwrap_or(bytes.len());
                assert_eq!(letters_end(&bytes, 1), slow, "byte {b} at {at}");
                bytes[at] = saved;
            }
        }
    }

    #[test]
    fn table() {
        let n = crisis_vocab();
        let cases: &[(&str, &str)] = &[
            ("I'M GOING TO KILL MYSELF", "im going to kill myself"),
            ("I’ve been thinking", "ive been thinking"),
            ("i  want \t to   die", "i want to die"),
            ("i want to kill myself...", "i want to kill myself"),
            ("i want to die\u{200B}", "i want to die"),
            ("i want to d\u{200B}ie", "i want to die"),
            ("ｉ ｗａｎｔ ｔｏ ｄｉｅ", "i want to die"),
            ("i want to d1e", "i want to die"),
            ("k1ll mys3lf", "kill myself"),
            ("su1c1d@l", "suicidal"),
            ("$elf harm", "self harm"),
            ("meet at 3pm on the 2nd", "meet at 3pm on the 2nd"),
            ("call 988", "call 988"),
            ("i feel suicidel", "i feel suicidal"),
            ("myslef", "myself"),
            ("kil myself", "kill myself"),
            ("im ill", "im ill"),
            ("lack the skill", "lack the skill"),
            ("pensamientos suicidas", "pensamientos suicidas"),
            ("i um i want to uh die", "i want to die"),
            ("thinking about sui cide", "thinking about suicide"),
            ("i want to kill my self", "i want to kill myself"),
            ("take like all the all the pills", "take like all the pills"),
            ("myself my self", "myself"),
            ("im im gonna end it", "im gonna end it"),
            ("k i l l myself", "kill myself"),
            ("k.m.s", "kms"),
            ("m m m ok", "ok"),
            ("i a m", "iam"),
            ("qu\u{00E9} m\u{00E1}s", "que mas"),
            ("ma\u{00F1}ana", "manana"),
            ("quiero morir", "quiero morir"),
            ("kіll mysеlf", "kill myself"), // Cyrillic і and е
            ("pills\u{1F48A}\u{1F48A}", "pills :pill:"),
            ("\u{26B0}\u{FE0F}", ":coffin:"),
            ("", ""),
            ("!!!", ""),
        ];
        for (input, want) in cases {
            assert_eq!(&n.normalize(input), want, "input {input:?}");
        }
    }

    #[test]
    fn appends_with_one_space() {
        let n = Normalizer::basic();
        let mut out = String::from("i want");
        n.normalize_into("To die", &mut out);
        assert_eq!(out, "i want to die");
        let mut out = String::from("i want");
        n.normalize_into("...", &mut out);
        assert_eq!(out, "i want");
    }

    /// `starts_plain_word` leaves every word beginning as a filler may to
    /// the general path; a filler beginning otherwise would be missed there.
    #[test]
    fn fillers_begin_where_starts_plain_word_looks() {
        for f in FILLERS {
            assert!(!starts_plain_word(f.as_bytes(), 0), "{f}");
        }
        assert!(starts_plain_word(b"want to", 0));
        assert!(!starts_plain_word(b"k i l l", 0));
        assert!(!starts_plain_word(b"want!", 0));
    }

    #[test]
    fn one_edit_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("kil", "kill", true),
            ("kiill", "kill", true),
            ("ill", "kill", false),
            ("skill", "kill", false),
            ("will", "kill", false),
            ("myslef", "myself", true),
            ("suicidel", "suicidal", true),
            ("sucidal", "suicidal", true),
            ("suicidle", "suicide", true),
            ("kilt", "kill", false),
        ];
        for (t, w, want) in cases {
            assert_eq!(one_edit(t.as_bytes(), w.as_bytes()), *want, "{t} → {w}");
        }
    }

    /// The shipped vocabulary, in the new normalizer and in the reference.
    fn shipped() -> &'static (Normalizer, reference::Normalizer) {
        use std::sync::OnceLock;
        static N: OnceLock<(Normalizer, reference::Normalizer)> = OnceLock::new();
        N.get_or_init(|| {
            let rules = crate::tier1::RuleSet::builtin().expect("the shipped rules load");
            let repair = || rules.repair.iter().map(String::as_str);
            let known = || crate::tier1::matcher::known_words(&rules);
            (
                Normalizer::with_vocabulary(Vocabulary::new(repair(), known())),
                reference::Normalizer::with_vocabulary(reference::Vocabulary::new(
                    repair(),
                    known(),
                )),
            )
        })
    }

    /// Byte for byte what the reference normalizer writes, appended to
    /// `prefix` as a stream's window would be.
    fn same_as_reference(prefix: &str, s: &str) -> Result<(), TestCaseError> {
        let (new, old) = shipped();
        prop_assert_eq!(new.normalize(s), old.normalize(s), "input {:?}", s);
        let (mut a, mut b) = (prefix.to_string(), prefix.to_string());
        new.normalize_into(s, &mut a);
        old.normalize_into(s, &mut b);
        prop_assert_eq!(a, b, "input {:?} after {:?}", s, prefix);
        Ok(())
    }

    /// Words that exercise every word step: fillers, typos and their
    /// targets, halves of split targets, single letters, repeats, case,
    /// leetspeak, apostrophes, emoji and look-alikes.
    fn wordy() -> impl Strategy<Value = String> {
        let words = prop::sample::select(vec![
            "i",
            "a",
            "k",
            "I",
            "want",
            "to",
            "die",
            "kill",
            "kil",
            "KIL",
            "Kiil",
            "myself",
            "myslef",
            "my",
            "self",
            "sui",
            "cide",
            "suicidel",
            "sucidal",
            "suicide",
            "suicidal",
            "um",
            "Uh",
            "mm",
            "m",
            "hmm",
            "all",
            "the",
            "ill",
            "skill",
            "kills",
            "life",
            "lif",
            "overdose",
            "overdos",
            "over",
            "dose",
            "hopeless",
            "hope",
            "less",
            "burden",
            "wrists",
            "unalive",
            "hanging",
            "hang",
            "ing",
            "herself",
            "her",
            "himself",
            "him",
            "lethal",
            "suicidarme",
            "suicidio",
            "pastillas",
            "ahorcarme",
            "k1ll",
            "$elf",
            "i'm",
            "don’t",
            "3pm",
            "988",
            ":pill:",
            "\u{1F48A}",
            "kіll",
            "e",
            "s",
            "l",
            "x",
            "pill",
            "pills",
            "Myself",
            "MY",
            "SELF",
            "wanttodie",
            "killmyself",
        ]);
        let seps = prop::sample::select(vec![" ", "  ", ". ", ", ", "!", "?", "\n", "-", "'", ":"]);
        prop::collection::vec((words, seps), 0..24).prop_map(|v| {
            v.into_iter().fold(String::new(), |mut s, (w, sep)| {
                s.push_str(w);
                s.push_str(sep);
                s
            })
        })
    }

    #[test]
    fn lexicon_matches_repair_on_every_word_of_the_rules() {
        let rules = crate::tier1::RuleSet::builtin().expect("the shipped rules load");
        let (new, _) = shipped();
        let v = &new.vocabulary;
        for w in crate::tier1::matcher::known_words(&rules)
            .chain(rules.repair.iter().map(String::as_str))
        {
            let lex = v.lex(w.as_bytes(), hash(w.as_bytes()));
            let got = lex
                .has(TYPO)
                .then(|| &*v.targets[usize::from(lex.target())]);
            assert_eq!(got, v.repair(w), "{w}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn same_as_reference_on_arbitrary_text(prefix in "[a-z]{0,6}( [a-z]{1,6}){0,3}", s in "\\PC*") {
            same_as_reference(&prefix, &s)?;
        }

        #[test]
        fn same_as_reference_on_words(prefix in "(|sui|my|kill|i|i want)", s in wordy()) {
            same_as_reference(&prefix, &s)?;
        }

        #[test]
        fn same_as_reference_on_texty_input(prefix in "(|my|k)", s in "[a-zA-Z0-9 '@$!|.,:\u{200B}\u{2019}\u{E9}\u{1F48A}]{0,60}") {
            same_as_reference(&prefix, &s)?;
        }

        #[test]
        fn typos_repair_as_the_reference_does(w in "[a-z]{3,11}", t in 0usize..25, p in 1usize..12, c in "[a-z]", op in 0u8..4) {
            // Single edits of the shipped targets, and random words.
            let (new, old) = shipped();
            let targets = &new.vocabulary.targets;
            let base = targets[t % targets.len()].to_string();
            let mut b = base.clone().into_bytes();
            let p = p.min(b.len() - 1).max(1);
            match op {
                0 => { b.remove(p); }
                1 => { b.insert(p, c.as_bytes()[0]); }
                2 => { b[p] = c.as_bytes()[0]; }
                _ => if p + 1 < b.len() { b.swap(p, p + 1); },
            }
            let edited = String::from_utf8(b).expect("ascii");
            for s in [&w, &edited, &format!("{edited} {w}"), &format!("{} {}", &edited[..p], &edited[p..])] {
                prop_assert_eq!(new.normalize(s), old.normalize(s), "input {:?}", s);
            }
        }
    }

    /// Runs `normalize_marking` after `prefix` with and without a word
    /// sink, checks both agree and that every start is where a word the
    /// sink was handed begins, and returns the output, starts and flag.
    fn marked(
        n: &Normalizer,
        prefix: &str,
        s: &str,
        after_stop: bool,
    ) -> Result<(String, Vec<usize>, bool), TestCaseError> {
        let base = n.normalize(prefix);
        let (mut a, mut b) = (base.clone(), base.clone());
        let (mut sa, mut sb) = (Vec::new(), Vec::new());
        let mut words = Vec::new();
        let ea = n.normalize_marking(s, &mut a, None::<&mut Vec<WordRef>>, &mut sa, after_stop);
        let eb = n.normalize_marking(s, &mut b, Some(&mut words), &mut sb, after_stop);
        prop_assert_eq!(&a, &b, "input {:?}", s);
        prop_assert_eq!(&sa, &sb, "input {:?}", s);
        prop_assert_eq!(ea, eb, "input {:?}", s);
        let out = a.as_bytes();
        for (k, &p) in sa.iter().enumerate() {
            prop_assert!(k == 0 || sa[k - 1] < p, "{:?} in {:?}", sa, a);
            prop_assert!(p >= base.len() && p < out.len(), "{} in {:?}", p, a);
            prop_assert!(
                out[p] != b' ' && (p == 0 || out[p - 1] == b' '),
                "{} in {:?}",
                p,
                a
            );
            prop_assert!(words.iter().any(|w: &WordRef| w.s == p), "{} in {:?}", p, a);
        }
        // Marking changes nothing the plain call writes.
        let mut plain = base;
        n.normalize_into(s, &mut plain);
        prop_assert_eq!(&plain, &a);
        Ok((a, sa, ea))
    }

    #[test]
    fn sentence_starts_by_example() {
        let (n, _) = shipped();
        let cases: &[(&str, bool, &str, &[&str], bool)] = &[
            // input, after_stop, output, the words that begin a sentence, ends one
            (
                "Not really. I want to die",
                false,
                "not really i want to die",
                &["i"],
                false,
            ),
            ("no! kill myself", false, "no kill myself", &["kill"], false),
            ("help! now", false, "help now", &["now"], false),
            ("ok?", false, "ok", &[], true),
            ("ok", true, "ok", &["ok"], false),
            (
                "one; two\nthree",
                false,
                "one two three",
                &["two", "three"],
                false,
            ),
            ("\u{BF}Yo? No.", false, "yo no", &["yo", "no"], true),
            (
                "Never... kill myself",
                false,
                "never kill myself",
                &["kill"],
                false,
            ),
            ("um. I want", false, "i want", &["i"], false),
        ];
        for &(input, after, want_out, want_starts, want_end) in cases {
            let (out, starts, end) = marked(n, "", input, after).expect("consistent");
            assert_eq!(out, want_out, "{input:?}");
            let words: Vec<&str> = starts
                .iter()
                .map(|&p| out[p..].split(' ').next().unwrap_or(""))
                .collect();
            assert_eq!(words, want_starts, "{input:?}");
            assert_eq!(end, want_end, "{input:?}");
        }
    }

    /// Plain words the normalizer keeps as written: no filler, repeat,
    /// single letter or typo of the crisis vocabulary.
    const PLAIN: &[&str] = &[
        "want", "die", "kill", "myself", "sister", "tonight", "honestly", "never", "really",
        "tuesday", "pills", "quiero", "matar", "not", "going", "hermana",
    ];
    const SEPS: &[&str] = &[
        " ",
        ". ",
        "? ",
        "! ",
        "; ",
        "\n",
        " . ",
        " - ",
        ", ",
        "?! ",
        "\u{2026} ",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Where sentences begin, exactly, on words the normalizer keeps.
        #[test]
        fn sentence_starts_are_exact_on_plain_words(
            // Distinct words: a repeated word or pair would be dropped.
            words in prop::sample::subsequence(PLAIN.to_vec(), 1..12).prop_shuffle(),
            seps in prop::collection::vec(prop::sample::select(SEPS), 12),
            after_stop in any::<bool>(),
            prefix in "(|i want|kill)",
        ) {
            let (n, _) = shipped();
            let parts: Vec<(&str, &str)> = words.into_iter().zip(seps).collect();
            let mut input = String::new();
            let mut want_words = Vec::new();
            let mut stop_before = after_stop;
            for &(w, sep) in &parts {
                if stop_before {
                    want_words.push(w);
                }
                input.push_str(w);
                input.push_str(sep);
                stop_before = !matches!(sep, " " | " - " | ", ");
            }
            if parts.first().is_some_and(|p| prefix.ends_with(p.0)) {
                return Ok(());
            }
            let (out, starts, end) = marked(n, &prefix, &input, after_stop)?;
            let words: Vec<&str> = starts
                .iter()
                .map(|&p| out[p..].split(' ').next().unwrap_or(""))
                .collect();
            prop_assert_eq!(words, want_words, "{:?} after {:?}", input, prefix);
            prop_assert_eq!(end, stop_before, "{:?}", input);
        }

        /// Consistent on any text: what `marked` checks holds.
        #[test]
        fn sentence_starts_are_word_starts(
            prefix in "(|sui|my|k|i want.)",
            s in "[a-zA-Z0-9 '@$!|.,:;?\n\u{BF}\u{A1}\u{3002}\u{200B}\u{2019}\u{E9}\u{1F48A}]{0,60}",
            after_stop in any::<bool>(),
        ) {
            let (n, _) = shipped();
            marked(n, &prefix, &s, after_stop)?;
        }

        #[test]
        fn sentence_starts_on_arbitrary_text(s in "\\PC*", after_stop in any::<bool>()) {
            let (n, _) = shipped();
            marked(n, "i want", &s, after_stop)?;
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_panics_and_is_normal(s in "\\PC*") {
            let out = crisis_vocab().normalize(&s);
            prop_assert!(is_normal_form(&out), "{out:?}");
        }

        #[test]
        fn idempotent(s in "\\PC*") {
            let n = crisis_vocab();
            let once = n.normalize(&s);
            prop_assert_eq!(n.normalize(&once), once);
        }

        #[test]
        fn idempotent_on_texty_input(s in "[a-zA-Z0-9 '@$!|.,:\u{200B}\u{2019}]{0,40}") {
            let n = crisis_vocab();
            let once = n.normalize(&s);
            prop_assert!(is_normal_form(&once), "{once:?}");
            prop_assert_eq!(n.normalize(&once), once);
        }
    }
}
