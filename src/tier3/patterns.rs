//! Evaluation: which rules a new event completes.
//!
//! A rule fires on an event only when that event takes part in the match
//! (it completes the streak, or it is the no-show or the late
//! cancellation), so an old pattern is never reported again by an
//! unrelated event. Each firing is anchored at the time of the match's last
//! event; a cooldown suppresses a firing whose anchor lies within the
//! cooldown of an earlier one, before or after it, so the answer does not
//! depend on the order the events arrived in.

use super::rules::Condition;
use super::{BehaviorRules, Event, History};

/// One rule that fired on an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// Index into [`BehaviorRules::rules`].
    pub rule: usize,
    /// When the match's last event happened.
    pub anchor_at_ms: i64,
    /// That event.
    pub anchor_event: String,
}

impl BehaviorRules {
    /// The rules that `new` completes, given the patient's history (which
    /// need not be sorted and may already hold `new`).
    pub fn evaluate(&self, history: &History, new: &Event) -> Vec<Fired> {
        let mut timeline: Vec<&Event> = history.events.iter().filter(|e| e.id != new.id).collect();
        timeline.push(new);
        timeline.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        let mut fired = Vec::new();
        for (i, rule) in self.rules().iter().enumerate() {
            if !rule.on.matches(new) {
                continue;
            }
            let cooled = |anchor: i64| {
                !history.firings.iter().any(|f| {
                    f.rule_id == rule.id && (anchor - f.anchor_at_ms).abs() < rule.cooldown_ms
                })
            };
            let anchor = match &rule.condition {
                Condition::Streak {
                    count,
                    within_ms,
                    reset,
                } => streak_anchor(
                    &timeline,
                    new,
                    rule,
                    *count as usize,
                    *within_ms,
                    reset,
                    &cooled,
                ),
                Condition::AfterEscalation { tiers, within_ms } => history
                    .escalations
                    .iter()
                    .any(|(at, tier)| {
                        tiers.contains(tier)
                            && *at <= new.occurred_at_ms
                            && new.occurred_at_ms - at <= *within_ms
                    })
                    .then_some(new),
                Condition::AfterReview { within_ms } => history
                    .calls
                    .iter()
                    .filter(|c| c.started_at_ms <= new.occurred_at_ms)
                    .max_by_key(|c| c.started_at_ms)
                    .filter(|c| {
                        c.review
                            && within_ms.is_none_or(|w| new.occurred_at_ms - c.started_at_ms <= w)
                    })
                    .map(|_| new),
            };
            if let Some(a) = anchor.filter(|a| cooled(a.occurred_at_ms)) {
                fired.push(Fired {
                    rule: i,
                    anchor_at_ms: a.occurred_at_ms,
                    anchor_event: a.id.as_str().to_string(),
                });
            }
        }
        fired
    }
}

/// The last event of the earliest streak that holds `new` and passes the
/// cooldown, if any.
fn streak_anchor<'a>(
    timeline: &[&'a Event],
    new: &Event,
    rule: &super::BehaviorRule,
    count: usize,
    within_ms: i64,
    reset: &[super::Kind],
    cooled: &impl Fn(i64) -> bool,
) -> Option<&'a Event> {
    // The run of matching events around `new`, cut at resets; events of
    // neither kind (a booking, a practice's cancellation) are ignored.
    let mut run: Vec<&Event> = Vec::new();
    let mut holds_new = false;
    for e in timeline {
        if reset.contains(&e.kind) {
            if holds_new {
                break;
            }
            run.clear();
        } else if rule.on.matches(e) {
            holds_new |= e.id == new.id;
            run.push(e);
        }
    }
    let pos = run.iter().position(|e| e.id == new.id)?;
    let first = pos.saturating_sub(count - 1);
    (first..=pos)
        .filter(|&s| s + count <= run.len())
        .map(|s| (run[s], run[s + count - 1]))
        .find(|(a, b)| b.occurred_at_ms - a.occurred_at_ms <= within_ms && cooled(b.occurred_at_ms))
        .map(|(_, b)| b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Tier;
    use crate::ids::{AppointmentEventId, AppointmentId};
    use crate::tier3::{CallRecord, Initiator, Kind, PastFiring};

    const DAY: i64 = 86_400_000;
    const HOUR: i64 = 3_600_000;

    fn rules() -> BehaviorRules {
        BehaviorRules::builtin().expect("shipped rules")
    }

    /// `c`: patient cancellation, `p`: practice cancellation, `n`: no-show,
    /// `a`: attended, `b`: booked; at `day` days, the session 3 days later.
    fn ev(n: usize, kind: char, day: i64) -> Event {
        let (kind, initiator) = match kind {
            'c' => (Kind::Cancelled, Some(Initiator::Patient)),
            'p' => (Kind::Cancelled, Some(Initiator::Practice)),
            'n' => (Kind::NoShow, None),
            'a' => (Kind::Attended, None),
            'b' => (Kind::Booked, Some(Initiator::Patient)),
            _ => unreachable!("test table"),
        };
        Event {
            id: AppointmentEventId::parse(&format!("e{n}")).expect("id"),
            appointment: AppointmentId::parse(&format!("a{n}")).expect("id"),
            kind,
            initiator,
            occurred_at_ms: day * DAY,
            scheduled_for_ms: day * DAY + 3 * DAY,
        }
    }

    /// Feeds `seq` (kind, day) in arrival order `order`, keeping firings as
    /// the service would; returns the ids of the rules fired, in order.
    fn run(seq: &[(char, i64)], order: &[usize], base: &History) -> Vec<String> {
        let r = rules();
        let mut h = base.clone();
        let mut out = Vec::new();
        for &i in order {
            let e = ev(i, seq[i].0, seq[i].1);
            for f in r.evaluate(&h, &e) {
                out.push(r.rule(f.rule).id.clone());
                h.firings.push(PastFiring {
                    rule_id: r.rule(f.rule).id.clone(),
                    anchor_at_ms: f.anchor_at_ms,
                });
            }
            h.events.push(e);
        }
        out
    }

    const STREAK: &str = "behavior.cancellation_streak";

    /// (what, events as (kind, day), the rules that fire in order).
    type Case<'a> = (&'a str, &'a [(char, i64)], &'a [&'a str]);

    #[test]
    fn streak_table() {
        let none: &[&str] = &[];
        let cases: &[Case] = &[
            (
                "three cancellations in 45 days",
                &[('c', 0), ('c', 10), ('c', 20)],
                &[STREAK],
            ),
            (
                "no-shows count too",
                &[('c', 0), ('n', 10), ('n', 44)],
                &[STREAK],
            ),
            ("two are not enough", &[('c', 0), ('c', 10)], none),
            (
                "attended in between resets",
                &[('c', 0), ('a', 5), ('c', 10), ('c', 20)],
                none,
            ),
            (
                "attended then three more fires",
                &[('c', 0), ('a', 5), ('c', 10), ('c', 20), ('c', 30)],
                &[STREAK],
            ),
            (
                "outside the window does not fire",
                &[('c', 0), ('c', 30), ('c', 46)],
                none,
            ),
            (
                "a later window fires",
                &[('c', 0), ('c', 30), ('c', 46), ('c', 50)],
                &[STREAK],
            ),
            (
                "practice cancellations neither count nor reset",
                &[('c', 0), ('p', 5), ('c', 10), ('p', 15), ('c', 20)],
                &[STREAK],
            ),
            (
                "bookings neither count nor reset",
                &[('c', 0), ('b', 1), ('c', 10), ('c', 20)],
                &[STREAK],
            ),
            (
                "cooldown: a fourth in a row is not paged again",
                &[('c', 0), ('c', 5), ('c', 10), ('c', 15), ('c', 20)],
                &[STREAK],
            ),
            (
                "after the cooldown it fires again",
                &[
                    ('c', 0),
                    ('c', 5),
                    ('c', 10),
                    ('c', 30),
                    ('c', 35),
                    ('c', 41),
                ],
                &[STREAK, STREAK],
            ),
        ];
        for (name, seq, want) in cases {
            let order: Vec<usize> = (0..seq.len()).collect();
            assert_eq!(run(seq, &order, &History::default()), *want, "{name}");
        }
    }

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in permutations(n - 1) {
            for i in 0..=p.len() {
                let mut q = p.clone();
                q.insert(i, n - 1);
                out.push(q);
            }
        }
        out
    }

    #[test]
    fn arrival_order_does_not_change_the_answer() {
        // Every arrival order of each sequence fires what in-order fires.
        // (Two limits, pinned by the tests below: a late `attended` cannot
        // take back a page, and across more than one cooldown which streak
        // anchors a firing can depend on what was known when.)
        let seqs: &[&[(char, i64)]] = &[
            &[('c', 0), ('c', 10), ('c', 20)],
            &[('c', 0), ('c', 30), ('c', 46)],
            &[('c', 0), ('c', 30), ('c', 46), ('c', 50)],
            &[('c', 0), ('p', 5), ('n', 10), ('b', 15), ('c', 20)],
            &[('c', 0), ('c', 5), ('c', 10), ('c', 15), ('c', 20)],
            &[('a', 0), ('c', 5), ('n', 10), ('c', 12), ('c', 50)],
        ];
        for seq in seqs {
            let order: Vec<usize> = (0..seq.len()).collect();
            let want = run(seq, &order, &History::default());
            for p in permutations(seq.len()) {
                assert_eq!(
                    run(seq, &p, &History::default()),
                    want,
                    "{seq:?} in order {p:?}"
                );
            }
        }
    }

    #[test]
    fn across_cooldowns_the_anchor_follows_what_was_known() {
        // In order, the streak fires at day 10 and again at day 41, past
        // the 30-day cooldown. Had day 30 arrived before day 10, the first
        // firing is anchored at day 30 and day 41 falls inside its cooldown.
        let seq = &[
            ('c', 0),
            ('c', 5),
            ('c', 10),
            ('c', 30),
            ('c', 35),
            ('c', 41),
        ];
        assert_eq!(
            run(seq, &[0, 1, 2, 3, 4, 5], &History::default()),
            vec![STREAK, STREAK]
        );
        assert_eq!(
            run(seq, &[0, 1, 3, 2, 4, 5], &History::default()),
            vec![STREAK]
        );
    }

    #[test]
    fn a_late_attended_event_does_not_take_back_a_page() {
        // In order: no streak. With the attended session arriving last, the
        // three cancellations fired before it was known; that stands.
        let seq = &[('c', 0), ('a', 5), ('c', 10), ('c', 20)];
        assert!(run(seq, &[0, 1, 2, 3], &History::default()).is_empty());
        assert_eq!(run(seq, &[0, 2, 3, 1], &History::default()), vec![STREAK]);
    }

    #[test]
    fn no_show_after_escalation() {
        let rule = "behavior.no_show_after_escalation";
        let with = |at: i64, tier: Tier| History {
            escalations: vec![(at, tier)],
            ..History::default()
        };
        let cases: &[(&str, History, char, &[&str])] = &[
            (
                "no-show 10 days after a phrase escalation",
                with(0, Tier::Phrase),
                'n',
                &[rule],
            ),
            (
                "after a context escalation",
                with(0, Tier::Context),
                'n',
                &[rule],
            ),
            (
                "not after a behavior escalation",
                with(0, Tier::Behavior),
                'n',
                &[],
            ),
            ("not 15 days after", with(-5 * DAY, Tier::Phrase), 'n', &[]),
            (
                "not before the escalation",
                with(11 * DAY, Tier::Phrase),
                'n',
                &[],
            ),
            (
                "not for an attended session",
                with(0, Tier::Phrase),
                'a',
                &[],
            ),
        ];
        for (name, h, kind, want) in cases {
            let got: Vec<String> = rules()
                .evaluate(h, &ev(1, *kind, 10))
                .iter()
                .map(|f| rules().rule(f.rule).id.clone())
                .collect();
            assert_eq!(got, *want, "{name}");
        }
        // Cooldown: a second no-show 3 days later is not paged again.
        let h = with(0, Tier::Phrase);
        assert_eq!(run(&[('n', 5), ('n', 8)], &[0, 1], &h), vec![rule]);
        assert_eq!(run(&[('n', 5), ('n', 8)], &[1, 0], &h), vec![rule]);
    }

    #[test]
    fn late_cancellation_after_review() {
        let rule = "behavior.late_cancellation_after_review";
        let calls = |v: &[(i64, bool)]| History {
            calls: v
                .iter()
                .map(|&(at, review)| CallRecord {
                    started_at_ms: at,
                    review,
                })
                .collect(),
            ..History::default()
        };
        let late = |hours: i64| {
            let mut e = ev(1, 'c', 10);
            e.scheduled_for_ms = e.occurred_at_ms + hours * HOUR;
            e
        };
        let cases: &[(&str, History, Event, &[&str])] = &[
            (
                "12 hours' notice after a review",
                calls(&[(5 * DAY, true)]),
                late(12),
                &[rule],
            ),
            (
                "after the session started",
                calls(&[(5 * DAY, true)]),
                late(-1),
                &[rule],
            ),
            ("48 hours' notice", calls(&[(5 * DAY, true)]), late(48), &[]),
            (
                "the last call had no review",
                calls(&[(2 * DAY, true), (5 * DAY, false)]),
                late(12),
                &[],
            ),
            (
                "the review was in the last call",
                calls(&[(2 * DAY, false), (5 * DAY, true)]),
                late(12),
                &[rule],
            ),
            (
                "a call after the cancellation is not before it",
                calls(&[(5 * DAY, true), (11 * DAY, false)]),
                late(12),
                &[rule],
            ),
            ("no calls", History::default(), late(12), &[]),
        ];
        for (name, h, e, want) in cases {
            let got: Vec<String> = rules()
                .evaluate(h, e)
                .iter()
                .map(|f| rules().rule(f.rule).id.clone())
                .collect();
            assert_eq!(got, *want, "{name}");
        }
        // A practice's late cancellation is not the patient pulling away.
        let mut e = late(12);
        e.initiator = Some(Initiator::Practice);
        assert!(rules().evaluate(&calls(&[(5 * DAY, true)]), &e).is_empty());
    }
}
