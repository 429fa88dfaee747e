use crisisd::domain::Speaker;
use crisisd::tier1::{Matcher, StreamState};
fn main() {
    let m = Matcher::builtin().unwrap();
    let mut texts = Vec::new();
    for line in include_str!("../tests/data/dev.jsonl").lines() {
        if let Ok(c) = crisisd::corpus::parse_line(line) { for e in c.events { texts.push(e.text); } }
    }
    let mut n = 0;
    for _ in 0..300 {
        for chunk in texts.chunks(8) {
            let mut st = StreamState::new();
            for t in chunk { n += m.feed(&mut st, Speaker::Patient, t, true).len(); }
        }
    }
    println!("{n}");
}
