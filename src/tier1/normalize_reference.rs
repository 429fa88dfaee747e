//! The normalizer as it was before the single-pass rewrite, kept verbatim
//! (tests only) as the oracle the property tests hold the fast path to:
//! the normalized text is part of Tier 1's contract (`crisisd normalize`,
//! rule checks), so the rewrite must produce it byte for byte.
#![allow(dead_code)]

use rustc_hash::FxHashSet;

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::{decompose_canonical, is_combining_mark};

/// Tokens of history kept while normalizing one text.
const HIST: usize = 8;

/// An ASCII byte that ends a word and means nothing else: not a letter or
/// digit, not an apostrophe (dropped inside words), not a symbol that may
/// stand for a letter, not the colon of an emoji shortcode.
#[inline]
fn is_plain_break(b: u8) -> bool {
    !(b.is_ascii_alphanumeric() || matches!(b, b':' | b'\'' | b'`' | b'@' | b'$' | b'!' | b'|'))
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
fn is_filler(w: &str) -> bool {
    // Cheap rejection first: this runs on every word.
    if w.len() > 4 || !matches!(w.as_bytes().first(), Some(b'u' | b'e' | b'h' | b'm' | b'a')) {
        return false;
    }
    matches!(
        w,
        "um" | "umm"
            | "ummm"
            | "uh"
            | "uhh"
            | "uhhh"
            | "uhm"
            | "erm"
            | "hmm"
            | "hm"
            | "mm"
            | "mmm"
            | "ah"
            | "ahh"
            | "eh"
            | "ehh"
            | "em"
            | "emm"
            | "mhm"
    )
}

/// Units that may follow a number without the digits being read as letters.
const NUMBER_SUFFIXES: &[&str] = &[
    "st", "nd", "rd", "th", "am", "pm", "s", "k", "m", "mg", "ml", "kg", "lb", "lbs", "x", "h",
    "hr", "hrs", "min", "mins", "yo", "yr", "yrs", "ft", "in", "g", "mo",
];

/// The crisis vocabulary that one-edit typos are repaired to, and the words
/// that must never be rewritten (every word a rule uses, plus any extras).
#[derive(Debug, Clone, Default)]
pub struct Vocabulary {
    /// Repair targets, bucketed by first letter for a cheap pre-filter.
    by_first: Vec<Vec<Box<str>>>,
    /// Per first letter, a bit for each target length: most words are
    /// rejected by one lookup, before any comparison.
    lengths: [u64; 26],
    /// Words that are already right and must not be rewritten.
    known: FxHashSet<Box<str>>,
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
        };
        // Only known words that a repair would otherwise rewrite need
        // remembering; the rest cannot be confused with the vocabulary.
        for w in known {
            if v.repair(w).is_some() {
                known_set.insert(Box::from(w));
            }
        }
        v.known = known_set;
        v
    }

    /// Whether `a` followed by `b` spells a repair target (a split word).
    #[inline]
    fn is_target_pair(&self, a: &str, b: &str) -> bool {
        let Some(&first) = a.as_bytes().first() else {
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
    fn is_target_pair_slow(&self, a: &str, b: &str, first: u8) -> bool {
        self.by_first
            .get(usize::from(first - b'a'))
            .is_some_and(|bucket| {
                bucket
                    .iter()
                    .any(|w| w.len() == a.len() + b.len() && w.starts_with(a) && w.ends_with(b))
            })
    }

    /// The repair target for `token`, if it is one edit from exactly the
    /// vocabulary (first letter kept) and not itself a known word.
    #[inline]
    fn repair(&self, token: &str) -> Option<&str> {
        let bytes = token.as_bytes();
        if bytes.len() < 3 || !bytes[0].is_ascii_lowercase() {
            return None;
        }
        // Runs on every word: the length mask turns nearly all away here.
        let near = 0b111u64 << (bytes.len() - 1).min(61);
        if self.lengths[usize::from(bytes[0] - b'a')] & near == 0 {
            return None;
        }
        self.repair_near(token)
    }

    #[cold]
    fn repair_near(&self, token: &str) -> Option<&str> {
        let bytes = token.as_bytes();
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
        let left_start = buf[..at - 1].rfind(' ').map_or(0, |i| i + 1);
        let right_end = buf[at..].find(' ').map_or(buf.len(), |i| at + i);
        if self
            .vocabulary
            .is_target_pair(&buf[left_start..at - 1], &buf[at..right_end])
        {
            buf.remove(at - 1);
            return left_start;
        }
        at
    }

    /// Appends the normalized form of `input` to `out`, separated from what
    /// `out` already holds by one space. Allocates only for the scratch word.
    pub fn normalize_into(&self, input: &str, out: &mut String) {
        let mut em = Emitter {
            vocab: &self.vocabulary,
            out,
            base: 0,
            hist: [(0, 0); HIST],
            hist_len: 0,
            run: String::new(),
            tok: String::with_capacity(32),
            plain: String::with_capacity(32),
            last_colon: false,
            tok_after_colon: false,
        };
        em.base = em.out.len();
        // ASCII runs take the fast path; only the non-ASCII stretches between
        // them go through NFKC. Splitting there is safe: what NFKC would
        // compose across the seam is a combining mark, which is dropped.
        let bytes = input.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let end = bytes[i..]
                .iter()
                .position(|b| !b.is_ascii())
                .map_or(bytes.len(), |p| i + p);
            em.ascii_run(&input[i..end]);
            i = end;
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
    }
}

/// Streams characters into tokens and tokens into the output.
struct Emitter<'a> {
    vocab: &'a Vocabulary,
    out: &'a mut String,
    /// Where this call's output begins in `out`.
    base: usize,
    /// Byte ranges in `out` of the last few tokens written by this call,
    /// oldest first; enough to undo split words and repeated pairs.
    hist: [(usize, usize); HIST],
    hist_len: usize,
    /// Pending run of single-letter tokens, letters only.
    run: String,
    /// The word being read.
    tok: String,
    /// Scratch for a plain word on its direct path.
    plain: String,
    /// The previous character was a `:`.
    last_colon: bool,
    /// The word being read began right after a `:` (a `:pill:` shortcode).
    tok_after_colon: bool,
}

impl Emitter<'_> {
    fn ascii_run(&mut self, input: &str) {
        let bytes = input.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if !b.is_ascii_alphabetic() {
                // Between words, a break changes nothing but the colon flag.
                if self.tok.is_empty() && is_plain_break(b) {
                    self.last_colon = false;
                } else {
                    self.ascii(b);
                }
                i += 1;
                continue;
            }
            // Runs of letters, the bulk of any text, are copied whole.
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            // A word of letters alone, between plain breaks, needs no
            // cleaning: it goes straight to the word steps. (At the run's
            // end the word may go on in a non-ASCII letter, so not there.)
            let len = i - start;
            if self.tok.is_empty()
                && !self.last_colon
                && len >= 2
                && bytes.get(i).is_some_and(|&b| is_plain_break(b))
            {
                let mut w = std::mem::take(&mut self.plain);
                w.clear();
                w.push_str(&input[start..i]);
                w.make_ascii_lowercase();
                self.word_owned(&w);
                self.plain = w;
                continue;
            }
            if self.tok.is_empty() {
                self.tok_after_colon = self.last_colon;
            }
            let at = self.tok.len();
            self.tok.push_str(&input[start..i]);
            self.tok[at..].make_ascii_lowercase();
            self.last_colon = false;
        }
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
                }
            }
            _ => self.end_token(),
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
            None => self.end_token(),
        }
    }

    /// Finishes the word being read: strips stray symbols, undoes
    /// substitutions, and hands it on.
    fn end_token(&mut self) {
        if self.tok.is_empty() {
            return;
        }
        let mut tok = std::mem::take(&mut self.tok);
        clean_word(&mut tok);
        if !tok.is_empty() {
            self.word_owned(&tok);
        }
        tok.clear();
        self.tok = tok;
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
        self.commit(w);
    }

    /// A word that is already canonical (an emoji token).
    fn word(&mut self, w: &str) {
        self.flush_run();
        self.commit(w);
    }

    fn flush_run(&mut self) {
        if self.run.is_empty() {
            return;
        }
        let run = std::mem::take(&mut self.run);
        if run.len() >= 3 {
            // "m m m" joins to "mmm", itself a filler.
            if !is_filler(&run) {
                self.commit(&run);
            }
        } else {
            for i in 0..run.len() {
                self.commit(&run[i..i + 1]);
            }
        }
        let mut run = run;
        run.clear();
        self.run = run;
    }

    fn commit(&mut self, w: &str) {
        let w = self.vocab.repair(w).unwrap_or(w);
        if self.hist_len > 0 || (self.base > 0 && !self.out.ends_with(' ')) {
            self.out.push(' ');
        }
        let s = self.out.len();
        self.out.push_str(w);
        self.push_hist((s, self.out.len()));
        while self.merge_split_word() || self.collapse_repeat(1) || self.collapse_repeat(2) {}
    }

    fn push_hist(&mut self, r: (usize, usize)) {
        if self.hist_len == HIST {
            self.hist.copy_within(1.., 0);
            self.hist_len -= 1;
        }
        self.hist[self.hist_len] = r;
        self.hist_len += 1;
    }

    /// Token equality, rejecting on length before comparing: this runs
    /// after every word, and almost every pair differs early.
    #[inline]
    fn same_token(&self, i: usize, j: usize) -> bool {
        let ((a, b), (c, d)) = (self.hist[i], self.hist[j]);
        let out = self.out.as_bytes();
        // By hand: for words this short a call into memcmp costs more.
        b - a == d - c && out[a..b].iter().zip(&out[c..d]).all(|(x, y)| x == y)
    }

    fn tok_at(&self, i: usize) -> &str {
        let (s, e) = self.hist[i];
        &self.out[s..e]
    }

    /// Drops the last token(s) from the output.
    fn pop(&mut self, n: usize) {
        self.hist_len -= n;
        let end = if self.hist_len == 0 {
            // Back to where this call began, minus the separator it added.
            let (s, _) = self.hist[0];
            s.saturating_sub(1).max(self.base)
        } else {
            self.hist[self.hist_len - 1].1
        };
        self.out.truncate(end);
    }

    /// `sui cide` → `suicide`, `my self` → `myself`: two words that together
    /// are a crisis vocabulary word become that word.
    #[inline]
    fn merge_split_word(&mut self) -> bool {
        if self.hist_len < 2 {
            return false;
        }
        let (a, b) = (
            self.tok_at(self.hist_len - 2),
            self.tok_at(self.hist_len - 1),
        );
        if !self.vocab.is_target_pair(a, b) {
            return false;
        }
        let (s, _) = self.hist[self.hist_len - 2];
        let (bs, be) = self.hist[self.hist_len - 1];
        // Remove the space between the two words.
        self.out.replace_range(bs - 1..bs, "");
        self.hist_len -= 1;
        self.hist[self.hist_len - 1] = (s, be - 1);
        true
    }

    /// Collapses an immediate repeat of the last `n` words: `i i` → `i`,
    /// `all the all the` → `all the`.
    #[inline]
    fn collapse_repeat(&mut self, n: usize) -> bool {
        let l = self.hist_len;
        let repeated = match n {
            1 => l >= 2 && self.same_token(l - 1, l - 2),
            2 => l >= 4 && self.same_token(l - 1, l - 3) && self.same_token(l - 2, l - 4),
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
fn clean_word(tok: &mut String) {
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
            *tok = tok[start..end].to_string();
        }
        return;
    }
    let mut cleaned = String::with_capacity(bytes.len());
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
    *tok = cleaned;
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
