//! The texts Tier 1 is measured on, shared by `benches/tier1.rs` and
//! `examples/tier1_passes.rs` so that a profile and the bench see the same
//! words.

use std::hint::black_box;

use crisisd::domain::Speaker;
use crisisd::tier1::{Matcher, StreamState};

/// Patient utterances of 60-120 bytes, the size of one ASR final or one text,
/// built from the corpora's patient lines. `risky_every`: one utterance in
/// that many carries a line from an escalate or review case; the rest are
/// benign (scheduling, therapy talk, idioms), as on a real line.
pub fn utterances(risky_every: usize) -> Vec<String> {
    let (mut benign, mut risky) = (Vec::new(), Vec::new());
    for file in [
        include_str!("../../tests/data/sample.jsonl"),
        include_str!("../../tests/data/dev.jsonl"),
    ] {
        for line in file.lines() {
            let Ok(c) = crisisd::corpus::parse_line(line) else {
                continue;
            };
            for e in c
                .events
                .into_iter()
                .filter(|e| e.speaker == Speaker::Patient)
            {
                match c.label {
                    Some(crisisd::corpus::Outcome::None) => benign.push(e.text),
                    _ => risky.push(e.text),
                }
            }
        }
    }
    let mut out = Vec::new();
    let (mut b, mut r) = (benign.iter().cycle(), risky.iter().cycle());
    while out.len() < 2000 {
        let mut cur = String::new();
        if out.len() % risky_every == 0 {
            cur.push_str(r.next().expect("risky lines"));
        }
        while cur.len() < 60 {
            if !cur.is_empty() {
                cur.push_str(". ");
            }
            cur.push_str(b.next().expect("benign lines"));
        }
        if cur.len() <= 120 {
            out.push(cur);
        }
    }
    out
}

/// One long text (a transcript of an hour or a pasted document): 20,000
/// of the typical utterances, 1.55 MiB.
pub fn long_text() -> String {
    utterances(10)
        .iter()
        .cycle()
        .take(20_000)
        .map(|u| format!("{u}. "))
        .collect()
}

/// The typical loop: each of `utts` fed as a final, a fresh conversation
/// every 8 utterances, as on a busy line. Returns how many detections.
pub fn feed_as_finals(matcher: &Matcher, utts: &[String]) -> usize {
    let mut n = 0;
    for chunk in utts.chunks(8) {
        let mut st = StreamState::new();
        for u in chunk {
            n += matcher
                .feed(&mut st, Speaker::Patient, black_box(u), true)
                .len();
        }
    }
    n
}
