//! Properties of Tier 1 with the shipped rules and their real vocabulary:
//! normalization never panics, is idempotent and stays in the matcher's
//! alphabet; feeding arbitrary text in arbitrary fragments never panics and
//! keeps the per-conversation state small.

use std::sync::OnceLock;

use crisisd::domain::Speaker;
use crisisd::tier1::normalize::is_normal_form;
use crisisd::tier1::{Matcher, StreamState};
use proptest::prelude::*;

fn matcher() -> &'static Matcher {
    static M: OnceLock<Matcher> = OnceLock::new();
    M.get_or_init(|| Matcher::builtin().expect("the shipped rules compile"))
}

/// Text that looks like what patients type: letters, digits, the symbols
/// leetspeak uses, apostrophes of every kind, zero-width characters,
/// accents, look-alikes and emoji.
fn texty() -> impl Strategy<Value = String> {
    proptest::string::string_regex(
        "([a-zA-Z]{1,8}|[0-9@$!|]|[ .,?'’:]{1,3}|\u{200B}|\u{FE0F}|[áéíóúñü]|[аеіоѕ]|\u{1F48A}|\u{26B0}|um|uh| [a-z] )*",
    )
    .expect("valid regex")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn normalization_is_idempotent_and_in_the_alphabet(s in "\\PC{0,80}") {
        let n = matcher().normalizer();
        let once = n.normalize(&s);
        prop_assert!(is_normal_form(&once), "{once:?}");
        prop_assert_eq!(n.normalize(&once), once);
    }

    #[test]
    fn normalization_is_idempotent_on_texty_input(s in texty()) {
        let n = matcher().normalizer();
        let once = n.normalize(&s);
        prop_assert!(is_normal_form(&once), "{once:?}");
        prop_assert_eq!(n.normalize(&once), once);
    }

    #[test]
    fn feeding_fragments_never_panics(
        parts in proptest::collection::vec((texty(), any::<bool>(), 0u8..3), 1..12)
    ) {
        let m = matcher();
        let mut st = StreamState::new();
        for (text, is_final, who) in parts {
            let speaker = [Speaker::Patient, Speaker::Agent, Speaker::Clinician][usize::from(who)];
            let _ = m.feed(&mut st, speaker, &text, is_final);
            prop_assert!(st.footprint() < 1024);
        }
    }
}

/// Inputs the fuzzer (`scripts/fuzz`) found breaking a property, kept as
/// rows: (input, its normal form).
#[test]
fn fuzz_findings_stay_fixed() {
    let cases: &[(&str, &str)] = &[
        // A split word merged at the end of a repeated pair: the repeat
        // must still collapse (the history once held too few words).
        ("kll mself kll mys\u{1}elf", "kill myself"),
        ("kill myself kill mys elf", "kill myself"),
    ];
    let n = matcher().normalizer();
    for (input, want) in cases {
        let once = n.normalize(input);
        assert_eq!(&once, want, "{input:?}");
        assert_eq!(n.normalize(&once), once, "idempotent: {input:?}");
    }
}
