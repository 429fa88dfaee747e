//! Normalizer and matcher over arbitrary bytes: whole texts, and the same
//! bytes as a stream of fragments (split at newlines, alternating partial
//! and final, with agent turns between). Nothing may panic, and the
//! per-conversation state stays under a kibibyte.
#![no_main]

use std::sync::OnceLock;

use crisisd::domain::Speaker;
use crisisd::tier1::{Matcher, StreamState};
use libfuzzer_sys::fuzz_target;

fn matcher() -> &'static Matcher {
    static M: OnceLock<Matcher> = OnceLock::new();
    M.get_or_init(|| Matcher::builtin().expect("the shipped rules compile"))
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let m = matcher();
    let normal = m.normalizer().normalize(&text);
    assert_eq!(m.normalizer().normalize(&normal), normal, "idempotent");
    let _ = m.detect(&text);
    let mut st = StreamState::new();
    for (i, part) in text.split('\n').enumerate() {
        let speaker = if i % 5 == 4 { Speaker::Agent } else { Speaker::Patient };
        let _ = m.feed(&mut st, speaker, part, i % 2 == 1);
        assert!(st.footprint() < 1024, "state grew to {}", st.footprint());
    }
});
