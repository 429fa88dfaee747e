//! Tier 1, one table per phenomenon. Each row is a conversation (speaker,
//! text, final) and the outcome Tier 1 must reach for it; a new phenomenon
//! is one more row. Sentences here are not in the corpora.

use std::sync::OnceLock;

use crisisd::corpus::{Conversation, Event, Outcome};
use crisisd::domain::{Channel, Speaker};
use crisisd::replay::{Verdict, replay};
use crisisd::tier1::{Action, ContextKind, Matcher, StreamState};

fn matcher() -> &'static Matcher {
    static M: OnceLock<Matcher> = OnceLock::new();
    M.get_or_init(|| Matcher::builtin().expect("the shipped rules compile"))
}

const P: Speaker = Speaker::Patient;
const A: Speaker = Speaker::Agent;
const C: Speaker = Speaker::Clinician;

fn run(events: &[Ev]) -> Verdict {
    let conv = Conversation {
        line: 0,
        id: "t".into(),
        channel: Channel::Voice,
        events: events
            .iter()
            .map(|(speaker, text, is_final)| Event {
                speaker: *speaker,
                text: text.to_string(),
                is_final: *is_final,
            })
            .collect(),
        label: None,
        tags: Vec::new(),
    };
    replay(matcher(), &conv)
}

/// One event: who, what, and whether it is final.
type Ev<'a> = (Speaker, &'a str, bool);

fn check(table: &[(&[Ev], Outcome)]) {
    let mut failures = Vec::new();
    for (events, want) in table {
        let got = run(events);
        if got.outcome != *want {
            failures.push(format!("{events:?}: want {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn one(text: &str) -> [Ev<'_>; 1] {
    [(P, text, true)]
}

/// Single-utterance rows: (text, outcome).
fn check_texts(table: &[(&str, Outcome)]) {
    let mut failures = Vec::new();
    for (text, want) in table {
        let got = run(&one(text));
        if got.outcome != *want {
            failures.push(format!("{text:?}: want {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

use Outcome::{Escalate, None as Benign, Review};

#[test]
fn explicit_first_person_risk_escalates() {
    check_texts(&[
        ("I'm going to end my life this weekend", Escalate),
        ("i keep thinking about killing myself", Escalate),
        ("I wish I were dead", Escalate),
        ("I have a plan to kill myself", Escalate),
        ("I'm going to hang myself in the garage", Escalate),
        ("I took a whole bottle of tylenol an hour ago", Escalate),
        ("I've been cutting my wrists again", Escalate),
        ("I'm writing my suicide note now", Escalate),
        ("I'm going to jump off the bridge tonight", Escalate),
        ("I have been having suicidal thoughts", Escalate),
    ]);
}

#[test]
fn texting_slang_escalates() {
    check_texts(&[
        ("gonna kms", Escalate),
        ("i wanna unalive myself fr", Escalate),
        ("ready to ctb", Escalate),
        ("thinking about sewerslide", Escalate),
        ("i just wanna die lol", Escalate),
        ("gonna end it tn", Escalate),
    ]);
}

#[test]
fn phrases_match_whole_words_and_joined_forms_match_inside_words() {
    check_texts(&[
        ("i want to die", Escalate),
        ("i want to diet before summer", Benign), // not "die"
        ("i want to kill myselfies", Benign),     // not "myself"
        ("we kill mosquitos myself", Benign),     // words apart
        ("honestly iwanttokillmyself", Escalate), // joined, inside a word
        ("killmyselfnow", Escalate),              // joined, then more letters
        ("lolendmylifeplz", Escalate),            // joined, mid-word
        ("kms", Escalate),                        // a word of its own
        ("kmsx", Benign),                         // short forms stay whole
    ]);
}

#[test]
fn variants_and_unicode_tricks_are_seen_through() {
    check_texts(&[
        ("I WANT TO END MY LIFE", Escalate),               // case
        ("I don\u{2019}t want to live anymore", Escalate), // curly apostrophe
        ("i\tam going to   kill   myself", Escalate),      // whitespace
        ("kill... my... self!!!", Escalate),               // punctuation
        ("endmylife", Escalate),                           // joined
        ("i w4nt to k1ll mys3lf", Escalate),               // leet
        ("i feel sucidal", Escalate),                      // typo
        ("i want to d\u{200D}ie", Escalate),               // zero-width joiner
        ("i want to kіll myself", Escalate),               // Cyrillic і
        ("ｉ ｗａｎｔ ｔｏ ｄｉｅ", Escalate),             // fullwidth
        ("k i l l  m y s e l f", Escalate),                // spaced letters
        ("thinking about sui cide", Escalate),             // split word
        ("i want to kill my\u{00AD}self", Escalate),       // soft hyphen
    ]);
}

#[test]
fn speech_recognition_disfluencies_are_seen_through() {
    check_texts(&[
        ("i um i uh want to uh die", Escalate),
        ("i'm i'm i'm going to kill myself", Escalate),
        ("im gonna like take all the the pills", Escalate),
        ("i was in the ER after my overdose", Escalate),
    ]);
}

#[test]
fn phrases_split_across_fragments_are_found() {
    check(&[
        (
            &[(P, "I want to", true), (P, "kill myself", true)],
            Escalate,
        ),
        (
            &[
                (P, "sometimes I think about ending", true),
                (P, "my life", true),
            ],
            Escalate,
        ),
        // The agent talking in between does not break the patient's phrase.
        (
            &[
                (P, "I want", true),
                (A, "mm-hm, go on", true),
                (P, "to die", true),
            ],
            Escalate,
        ),
        // A word split across two texts.
        (
            &[(P, "thinking about sui", true), (P, "cide", true)],
            Escalate,
        ),
        // Spaced-out letters that go on in the next text, inside a word
        // and between two.
        (
            &[(P, "i'm going to k i l", true), (P, "l m y s e l f", true)],
            Escalate,
        ),
        (&[(P, "k i l l", true), (P, "m y s e l f", true)], Escalate),
    ]);
}

/// A long partial full of matches costs about what the same text as a final
/// does. Each match in a partial must be followed by two more words; counting
/// every word to the text's end instead made a 1.6 MB partial 400 times
/// slower than its final. A ratio, not a time: it holds on any machine.
#[test]
fn a_long_partial_costs_about_what_its_final_does() {
    let m = matcher();
    let text = "i want to die and i feel hopeless. we talked about the appointment. ".repeat(3_000);
    let time = |is_final: bool| {
        (0..3)
            .map(|_| {
                let t = std::time::Instant::now();
                let found = m.feed(&mut StreamState::new(), P, &text, is_final);
                assert!(!found.is_empty());
                t.elapsed()
            })
            .min()
            .unwrap_or_default()
    };
    let (partial, fin) = (time(false), time(true));
    assert!(
        partial < fin * 5,
        "a {} KB partial took {partial:?}, its final {fin:?}",
        text.len() / 1000
    );
}

#[test]
fn partials_warn_early_and_finals_do_not_escalate_twice() {
    let m = matcher();
    let mut st = StreamState::new();
    assert!(m.feed(&mut st, P, "I'm going to kill", false).is_empty());
    let early = m.feed(&mut st, P, "I'm going to kill myself tonight with", false);
    assert_eq!(early.len(), 1, "{early:?}");
    assert!(early[0].early && early[0].action == Action::Escalate);
    // Later partials and the final repeat nothing already reported.
    assert!(
        m.feed(
            &mut st,
            P,
            "I'm going to kill myself tonight with pills",
            false
        )
        .is_empty()
    );
    assert!(
        m.feed(
            &mut st,
            P,
            "I'm going to kill myself tonight with pills",
            true
        )
        .is_empty()
    );
    // A new utterance is new.
    let again = m.feed(&mut st, P, "I want to die", true);
    assert_eq!(again[0].action, Action::Escalate);

    check(&[
        // The early warning needs two words after the phrase, so an ASR
        // homophone revised by the final does not page anyone.
        (
            &[
                (P, "I want to die", false),
                (P, "I want to die my", false),
                (P, "I want to dye my hair", true),
            ],
            Benign,
        ),
        (
            &[
                (P, "I think I'm going", false),
                (P, "I think I'm going to kill myself", true),
            ],
            Escalate,
        ),
    ]);
}

#[test]
fn only_the_patients_words_are_matched() {
    check(&[
        (
            &[
                (
                    A,
                    "If you're thinking about suicide, call or text 988.",
                    true,
                ),
                (P, "ok thanks", true),
            ],
            Benign,
        ),
        (
            &[
                (C, "Have you wanted to kill yourself or die?", true),
                (P, "no never", true),
            ],
            Benign,
        ),
        (
            &[(A, "I want to kill myself is something people say", true)],
            Benign,
        ),
    ]);
}

#[test]
fn a_yes_to_the_screening_question_escalates() {
    check(&[
        (
            &[
                (A, "Have you had thoughts of killing yourself?", true),
                (P, "yes, a lot lately", true),
            ],
            Escalate,
        ),
        (
            &[
                (A, "Are you thinking about hurting yourself?", true),
                (P, "kind of", true),
            ],
            Escalate,
        ),
        (
            &[
                (A, "Have you had thoughts of killing yourself?", true),
                (P, "no, not at all", true),
            ],
            Benign,
        ),
        (
            &[
                (A, "¿Ha tenido pensamientos de quitarse la vida?", true),
                (P, "sí, todos los días", true),
            ],
            Escalate,
        ),
        // The 988 referral names the thoughts in a condition, and asks
        // nothing: a "yes, thanks" to it is no disclosure.
        (
            &[
                (
                    A,
                    "Si en algún momento piensa en hacerse daño, puede llamar o mandar un texto al 988.",
                    true,
                ),
                (P, "Sí, gracias. Solo llamo para confirmar mi cita.", true),
            ],
            Benign,
        ),
        (
            &[
                (
                    A,
                    "If at any point you have thoughts of killing yourself, you can call or text 988.",
                    true,
                ),
                (P, "yes thank you, see you tuesday", true),
            ],
            Benign,
        ),
        // A condition before a real question does not hide it.
        (
            &[
                (
                    A,
                    "If you don't mind me asking, are you having thoughts of suicide?",
                    true,
                ),
                (P, "yes", true),
            ],
            Escalate,
        ),
        (
            &[
                (
                    A,
                    "Si me permite preguntar, ¿ha pensado en quitarse la vida?",
                    true,
                ),
                (P, "sí", true),
            ],
            Escalate,
        ),
        // A yes to something else is nothing.
        (
            &[(A, "Is Tuesday at three okay?", true), (P, "yes", true)],
            Benign,
        ),
        // PHQ-9 item 9, answered with a frequency.
        (
            &[
                (
                    A,
                    "How often have you had thoughts that you would be better off dead?",
                    true,
                ),
                (P, "nearly every day", true),
            ],
            Escalate,
        ),
        // Asked whether they are safe, "I don't know" needs a look.
        (
            &[
                (A, "Are you safe right now?", true),
                (P, "I don't know", true),
            ],
            Review,
        ),
        (
            &[
                (A, "Are you safe right now?", true),
                (P, "yes I'm safe", true),
            ],
            Benign,
        ),
    ]);
}

#[test]
fn negation_lowers_to_review_never_to_nothing() {
    check_texts(&[
        ("I'm not going to kill myself", Review),
        ("I would never end my life", Review),
        ("I don't want to die, I'm just exhausted", Review),
        ("I have no plans to hurt myself", Review),
        ("I'm not suicidal", Review),
        ("no me voy a matar", Review),
    ]);
    let d = matcher().detect("I'm not going to kill myself");
    assert_eq!(d[0].lowered_by, Some(ContextKind::Negation));
    // A negation in another clause does not lower.
    check_texts(&[("I'm not okay and I want to kill myself", Escalate)]);
    // "no sé, me quiero morir": "I don't know, I want to die".
    check_texts(&[("no sé, me quiero morir", Escalate)]);
}

/// A context cue reads within its sentence. Normalization drops the
/// punctuation, and before sentence starts were kept a cue at the end of
/// one sentence lowered an unambiguous phrase in the next.
#[test]
fn a_cue_does_not_reach_across_a_sentence_end() {
    check_texts(&[
        ("Not really. I want to die.", Escalate),
        ("I don't. I want to die", Escalate),
        ("Never. I'm going to kill myself tonight", Escalate),
        ("No! I want to kill myself", Escalate),
        ("I talked to my sister. I want to die", Escalate),
        (
            "I said goodbye to my mom. Going to kill myself tonight",
            Escalate,
        ),
        ("Last year was hard; I want to kill myself", Escalate),
        ("Ya hablé con mi hermana. Me quiero matar", Escalate),
        ("¿Yo? No. Me quiero matar", Escalate),
        // Within the sentence, the cue still lowers; after a sentence end,
        // the next sentence is no cue for the one before.
        ("I'm not going to kill myself. I promise", Review),
        ("Honestly? I would never end my life.", Review),
        ("Mi hermano se quiere matar. No sé qué hacer", Review),
    ]);
    check(&[
        // Across finals: the first ended its sentence.
        (
            &[(P, "Not really.", true), (P, "I want to die", true)],
            Escalate,
        ),
        (
            &[
                (
                    P,
                    "My insurance changed last month, can you update it?",
                    true,
                ),
                (P, "honestly I just want to kill myself", true),
            ],
            Escalate,
        ),
        // The sentence end in the second fragment.
        (
            &[(P, "not really", true), (P, ". I want to die", true)],
            Escalate,
        ),
        // A final with no sentence end goes on into the next: a phrase
        // split over two keeps its negation.
        (
            &[(P, "I'm not", true), (P, "going to kill myself", true)],
            Review,
        ),
        (
            &[
                (P, "my son said", true),
                (P, "he wants to kill himself", true),
            ],
            Review,
        ),
    ]);
}

#[test]
fn third_party_is_reviewed() {
    check_texts(&[
        ("my sister is thinking about suicide", Review),
        ("my son said he wants to kill himself", Review),
        ("my friend has been cutting herself", Review),
        ("she tried to end her life last year", Review),
        ("mi hermano se quiere matar", Review),
    ]);
}

#[test]
fn past_time_is_reviewed_recent_is_not() {
    check_texts(&[
        ("I tried to kill myself when I was fifteen", Review),
        ("I used to cut myself in high school", Review),
        ("I tried to kill myself last night", Escalate),
        ("I overdosed yesterday", Escalate),
    ]);
}

#[test]
fn conditions_and_hyperbole_are_reviewed() {
    check_texts(&[
        (
            "if they cancel my flight again I'm going to kill myself",
            Review,
        ),
        (
            "I'll kill myself if I have to do another group project",
            Review,
        ),
        ("si me vuelven a cobrar me mato", Review),
        // "sí" (yes) loses its accent, and must not read as "si" (if).
        ("si, me quiero matar", Escalate),
        // "if" after "don't know" asks whether: no condition, even within
        // the condition's reach across a sentence (holdout5).
        (
            "honestly idk if ill still be here by then. ive been thinking about killing myself every day",
            Escalate,
        ),
        (
            "i dont know if i can go on. i want to kill myself",
            Escalate,
        ),
        ("no se si voy a aguantar. me quiero matar", Escalate),
        // A condition still is one.
        ("if i fail this exam im going to kill myself", Review),
    ]);
}

/// What holdout5 (2026-12-02, written blind) found missed: a whole bottle
/// taken in Spanish, driving into a median, going back to a bridge and
/// thinking of the jump, a farewell of thanks.
#[test]
fn holdout5_phenomena() {
    check_texts(&[
        (
            "anoche me tome un frasco entero de pastillas para no despertar",
            Escalate,
        ),
        ("me trague una caja completa de calmantes", Escalate),
        ("me voy a tomar todo el frasco de pastillas", Escalate),
        (
            "thinking about driving my car into the median on the way home",
            Escalate,
        ),
        (
            "i keep going to the bridge at night and thinking about jumping",
            Escalate,
        ),
        ("i keep thinking about jumping off it", Review),
        (
            "just wanted to say thank you for everything. goodbye",
            Review,
        ),
        ("idk if ill still be here next week", Review),
        // Benign neighbours stay quiet.
        ("thanks for everything, see you next week", Benign),
        ("i drove my car into the garage and went to bed", Benign),
        ("me tome una pastilla para el dolor de cabeza", Benign),
    ]);
}

/// What holdout6 (2026-12-02, written blind) found missed or over-read: a
/// hedged wish not to live, someone else's pills counted, a place reached
/// to jump, a day named after a past attempt, a Spanish farewell; and on
/// the other side a haircut, ending things with a therapist, and where to
/// live rather than whether.
#[test]
fn holdout6_phenomena() {
    check_texts(&[
        (
            "i dont think i even want to be alive at this point",
            Escalate,
        ),
        ("ion wanna exist", Escalate),
        ("i popped about twenty of my roommates pills", Escalate),
        ("drove out to the overpass to jump", Escalate),
        (
            "i overdosed years ago. yesterday i took a whole bottle of pills",
            Escalate,
        ),
        ("gonna swallow all my pils", Escalate),
        ("me estoy despidiendo de mis hijos", Review),
        ("before i go through with it i want to see my kids", Review),
        ("ive given away all my things", Review),
        ("my brother doesnt want to live anymore", Review),
        // Benign neighbours stay quiet.
        ("mañana me voy a cortar el cabello y la barba", Benign),
        ("me estoy cortando las uñas", Benign),
        (
            "i want to end things with my old therapist, not with you",
            Benign,
        ),
        ("came here to jump start the battery", Benign),
        ("i dont want to live with my parents anymore", Benign),
        ("honestly i dont want to live in this city", Benign),
        ("ya no quiero vivir con mi suegra", Benign),
        // The crisis language next to them still counts.
        ("i dont want to live with this pain", Escalate),
        ("i dont want to live with myself", Escalate),
        ("no quiero vivir con este dolor", Escalate),
    ]);
}

/// holdout7's misses, by phenomenon (written blind, first run 0.630 /
/// 0.721), with their benign neighbours.
#[test]
fn holdout7_phenomena() {
    check_texts(&[
        // Someone else's pills, all of them, and a caregiver's.
        ("i just took all my dads pills", Escalate),
        ("took all of my sisters meds an hour ago", Escalate),
        ("i took all my moms pills away from her", Benign),
        // A vehicle driven into something, with the intent said.
        ("i wanna drive straight into a wall", Escalate),
        ("gonna crash my truck head on into a semi", Escalate),
        ("we drove straight into the city for the game", Benign),
        // A height measured against a fall.
        (
            "checked if the parking garage was tall enough to kill me",
            Escalate,
        ),
        ("is the fence high enough to keep the dog in", Benign),
        // A fixing judged for a hanging.
        (
            "i think the rafter in the basement will hold my weight",
            Escalate,
        ),
        ("will the branch hold me if i climb higher", Benign),
        ("bought rope today", Review),
        // "Me mato" with a day or a decision.
        ("esta noche me mato", Escalate),
        ("ya tome la decision que me mato", Escalate),
        ("mañana me mato estudiando para el examen", Benign),
        ("el sabado me mato el partido", Benign),
        // Passive wishes in other words.
        ("ojalá dormirme y ya no despertar", Escalate),
        ("things would be better if i never existed", Escalate),
        // Not knowing whether one wants to live is no negation.
        ("idk if i want to be alive", Review),
        ("no sé si puedo seguir viviendo", Review),
        ("i dont know if i want to go on the trip", Benign),
        // Threats against the patient, reported; the idiom stays quiet.
        ("my boyfriend texted me hes gonna kill me", Review),
        ("my stepdad came over with a gun", Review),
        ("mi novio me escribió que me va a matar", Review),
        ("mi papá tiene un arma en la casa", Review),
        ("my mom is going to kill me if im late lol", Benign),
        ("mi mamá me va a matar si llego tarde", Benign),
        // Third parties at a height.
        ("mi primo se quiere tirar de un edificio", Review),
        // ASR of "suicide".
        ("been thinking about sue a side", Review),
        // Spanish negation reaches past "estoy pensando en".
        ("no he pensado en lastimarme", Review),
        // But not past "quiero": the "no" is not the phrase's.
        ("ya no quiero, me quiero matar", Escalate),
    ]);
}

#[test]
fn ambiguous_language_goes_to_review() {
    check_texts(&[
        ("I can't do this anymore", Review),
        ("everyone would be better off without me", Review),
        ("I just want to disappear", Review),
        (
            "I gave my cat to my neighbor, she'll take better care of her",
            Review,
        ),
        ("I have a gun in my nightstand", Review),
        ("I'm going to kill my stepdad", Review),
        ("my boyfriend hits me when he drinks", Review),
        ("ya no aguanto más", Review),
        ("soy una carga para mi familia", Review),
        ("I'm done. I can't anymore.", Review),
        ("I don't see a future for myself", Review),
        ("my husband keeps a gun in the nightstand", Review),
    ]);
}

#[test]
fn risk_emoji_lead_to_review() {
    check_texts(&[
        ("\u{1F48A}\u{1F48A}\u{1F48A}", Review),
        ("tonight \u{1F52B}", Review),
        ("\u{1FAA2}", Review),
        ("\u{26B0}\u{FE0F}", Review),
        ("\u{1FAA6}", Review),
        ("lol \u{1F480}", Benign), // the skull is laughter
    ]);
}

#[test]
fn benign_idioms_and_mentions_stay_quiet() {
    check_texts(&[
        ("I almost killed myself laughing at that show", Benign),
        ("I'm cutting myself some slack this week", Benign),
        ("I shot myself in the foot with that email", Benign),
        ("I overdosed on coffee this morning", Benign),
        ("this traffic is killing me", Benign),
        ("I'm dying to see the new movie", Benign),
        ("my phone is dead", Benign),
        ("that pie was to die for", Benign),
        ("I want to die of embarrassment", Benign),
        ("she killed it at the recital", Benign),
        ("I hurt myself at the gym", Benign),
        ("I cut myself shaving", Benign),
        ("I watched a documentary about suicide prevention", Benign),
        ("me muero de hambre", Benign),
        ("me quiero morir de la risa jaja", Benign),
        ("me corté el pelo", Benign),
        ("can I move my appointment to Thursday", Benign),
        ("I need a refill of my meds", Benign),
        ("I took my pills this morning", Benign),
        ("the ER called about my mom's bill", Benign),
    ]);
}

#[test]
fn spanish_is_covered() {
    check_texts(&[
        ("me quiero morir", Escalate),
        ("voy a quitarme la vida", Escalate),
        ("ya no quiero vivir", Escalate),
        ("pienso en suicidarme", Escalate),
        ("me tomé todas las pastillas", Escalate),
        ("me voy a tirar del puente", Escalate),
        ("kiero matarme", Escalate),
        ("ya no kiero vivir", Escalate),
        ("ojalá no despertar mañana", Escalate),
        ("tengo todas mis pastillas listas", Review),
        ("no tiene sentido seguir", Review),
        ("mi jefe quiere matarme", Review),
    ]);
}

#[test]
fn stream_state_stays_under_a_kibibyte() {
    let m = matcher();
    let mut st = StreamState::new();
    let long = "this is a very long rambling utterance about nothing in particular ".repeat(50);
    for i in 0..200 {
        m.feed(&mut st, P, &long, i % 3 != 0);
        m.feed(&mut st, A, &long, true);
        m.feed(&mut st, P, &"x".repeat(5000), true);
        assert!(st.footprint() < 1024, "{} bytes", st.footprint());
        // Every word its own sentence: the window's sentence starts.
        m.feed(&mut st, P, &"a. no. b! ok? ".repeat(40), true);
        assert!(st.footprint() < 1024, "{} bytes", st.footprint());
    }
}

#[test]
fn splitting_a_text_anywhere_finds_the_same_escalation() {
    let texts = [
        "honestly I want to kill myself tonight",
        "I'm going to take all my sleeping pills",
        "i keep thinking about ending my life",
        "me voy a quitar la vida",
    ];
    for text in texts {
        let words: Vec<&str> = text.split(' ').collect();
        for cut in 1..words.len() {
            let (a, b) = (words[..cut].join(" "), words[cut..].join(" "));
            let got = run(&[(P, &a, true), (P, &b, true)]);
            assert_eq!(got.outcome, Escalate, "{a:?} | {b:?}");
        }
    }
}
