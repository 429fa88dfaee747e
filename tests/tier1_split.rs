//! The streaming window: a patient text split at any word boundary into
//! two fragments (two finals, or two texts of a thread) is detected at
//! least as strongly as the whole is: every rule the whole text fires, the
//! fragments fire, with an action as strong. Checked exhaustively over
//! every patient line of the corpora, and as a property over generated
//! phrase soup.
//!
//! Not "exactly as the whole": a final is judged when it arrives, so
//! context that comes only in the next fragment ("I attempted suicide" |
//! "when I was sixteen", "I could just die" | "of embarrassment") cannot
//! lower what the first already escalated. Streaming can be more cautious
//! than the whole text, never less; the test prints how often it is.

use std::collections::BTreeSet;
use std::io::BufReader;
use std::sync::OnceLock;

use crisisd::domain::Speaker;
use crisisd::tier1::{Action, Matcher, StreamState};
use proptest::prelude::*;

fn matcher() -> &'static Matcher {
    static M: OnceLock<Matcher> = OnceLock::new();
    M.get_or_init(|| Matcher::builtin().expect("the shipped rules compile"))
}

/// The strongest action per rule: what the escalation decision reads.
fn verdict(parts: &[&str]) -> BTreeSet<(u32, bool)> {
    let m = matcher();
    let mut st = StreamState::new();
    let mut best = std::collections::BTreeMap::new();
    for p in parts {
        for d in m.feed(&mut st, Speaker::Patient, p, true) {
            let e = best.entry(d.rule.0).or_insert(false);
            *e |= d.action == Action::Escalate;
        }
    }
    best.into_iter().collect()
}

/// Whether `split` holds every rule of `whole`, each at least as strong.
fn covers(split: &BTreeSet<(u32, bool)>, whole: &BTreeSet<(u32, bool)>) -> bool {
    whole
        .iter()
        .all(|&(r, esc)| split.iter().any(|&(r2, esc2)| r2 == r && (esc2 || !esc)))
}

/// Every split of `text` at a space: (left, right).
fn splits(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.char_indices()
        .filter(|&(_, c)| c == ' ')
        .map(move |(i, _)| (&text[..i], &text[i + 1..]))
}

#[test]
fn every_corpus_line_split_at_every_word_boundary_is_detected_as_the_whole() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut checked = 0;
    let mut differ = Vec::new();
    let mut stricter = 0;
    for f in [
        "sample.jsonl",
        "holdout.jsonl",
        "holdout2.jsonl",
        "holdout3.jsonl",
        "holdout4.jsonl",
        "holdout5.jsonl",
        "holdout6.jsonl",
        "holdout7.jsonl",
        "dev.jsonl",
    ] {
        let file = std::fs::File::open(dir.join(f)).expect("corpus");
        let (convs, _) = crisisd::corpus::read(BufReader::new(file));
        for c in convs {
            for e in c.events.iter().filter(|e| e.speaker == Speaker::Patient) {
                let whole = verdict(&[&e.text]);
                for (l, r) in splits(&e.text) {
                    checked += 1;
                    let got = verdict(&[l, r]);
                    if !covers(&got, &whole) {
                        differ.push(format!("{}: {l:?} | {r:?}: {got:?} vs {whole:?}", c.id));
                    } else if got != whole {
                        stricter += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 5000, "only {checked} splits");
    eprintln!("{checked} splits: {stricter} more cautious than the whole text");
    assert!(
        differ.is_empty(),
        "{} of {checked} splits miss what the whole text finds:\n{}",
        differ.len(),
        differ.join("\n")
    );
}

/// Words that build crisis, review, negated, third-party and benign text.
const WORDS: &[&str] = &[
    "i",
    "want",
    "to",
    "kill",
    "myself",
    "end",
    "my",
    "life",
    "im",
    "not",
    "going",
    "never",
    "would",
    "she",
    "wants",
    "herself",
    "cant",
    "do",
    "this",
    "anymore",
    "suicide",
    "thinking",
    "about",
    "pills",
    "tonight",
    "hurt",
    "cut",
    "die",
    "dead",
    "better",
    "off",
    "appointment",
    "tuesday",
    "the",
    "and",
    "um",
    "so",
    "really",
    "plan",
    "used",
    "when",
    "was",
    "if",
    "fail",
    "me",
    "quiero",
    "matar",
    "no",
    "puedo",
    "más",
    "💊",
    "k1ll",
    "sui",
    "cide",
    // Sentence ends: a cue must not reach across one, split or not.
    "no.",
    "really?",
    "!",
    "ok.",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn phrase_soup_split_anywhere_between_words_is_detected_as_the_whole(
        words in proptest::collection::vec(proptest::sample::select(WORDS), 1..14),
        cut in any::<proptest::sample::Index>(),
    ) {
        let text = words.join(" ");
        let spaces: Vec<(&str, &str)> = splits(&text).collect();
        if spaces.is_empty() {
            return Ok(());
        }
        let (l, r) = spaces[cut.index(spaces.len())];
        let (split, whole) = (verdict(&[l, r]), verdict(&[&text]));
        prop_assert!(covers(&split, &whole), "{:?} | {:?}: {:?} vs {:?}", l, r, split, whole);
    }
}
