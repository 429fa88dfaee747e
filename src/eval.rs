//! Scoring replay verdicts against corpus labels: the confusion table, the
//! four figures of the corpus README, and the cases that went wrong.
//!
//! - tier1-recall: `escalate` cases that escalate / all `escalate` cases.
//! - safety-recall: `escalate` and `review` cases that escalate or go to
//!   review / all of them. Under 1.0 is a patient who was missed.
//! - false-escalation: `none` cases that escalate / all `none` cases.
//! - review-load: `none` cases that go to review / all `none` cases.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::corpus::Outcome;
use crate::replay::Verdict;

/// A labeled case and what replay made of it.
#[derive(Debug, Clone)]
pub struct Scored {
    pub id: String,
    pub label: Outcome,
    pub tags: Vec<String>,
    pub verdict: Verdict,
}

impl Scored {
    /// Wrong for safety or for precision; reviewing a benign case is load,
    /// not an error, and is listed apart.
    pub fn is_wrong(&self) -> bool {
        match self.label {
            Outcome::Escalate => self.verdict.outcome != Outcome::Escalate,
            Outcome::Review => self.verdict.outcome == Outcome::None,
            Outcome::None => self.verdict.outcome == Outcome::Escalate,
        }
    }

    fn is_load(&self) -> bool {
        self.label == Outcome::None && self.verdict.outcome == Outcome::Review
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    pub tier1_recall: Option<f64>,
    pub safety_recall: Option<f64>,
    pub false_escalation: Option<f64>,
    pub review_load: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub min_tier1_recall: f64,
    pub min_safety_recall: f64,
    pub max_false_escalation: f64,
    pub max_review_load: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            min_tier1_recall: 0.97,
            min_safety_recall: 1.0,
            max_false_escalation: 0.02,
            max_review_load: 0.10,
        }
    }
}

fn ratio(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

pub fn figures(cases: &[Scored]) -> Figures {
    let count = |f: &dyn Fn(&Scored) -> bool| cases.iter().filter(|c| f(c)).count();
    let esc = count(&|c| c.label == Outcome::Escalate);
    let esc_ok = count(&|c| c.label == Outcome::Escalate && c.verdict.outcome == Outcome::Escalate);
    let risky = count(&|c| c.label != Outcome::None);
    let risky_ok = count(&|c| c.label != Outcome::None && c.verdict.outcome != Outcome::None);
    let none = count(&|c| c.label == Outcome::None);
    let none_esc = count(&|c| c.label == Outcome::None && c.verdict.outcome == Outcome::Escalate);
    let none_rev = count(&|c| c.label == Outcome::None && c.verdict.outcome == Outcome::Review);
    Figures {
        tier1_recall: ratio(esc_ok, esc),
        safety_recall: ratio(risky_ok, risky),
        false_escalation: ratio(none_esc, none),
        review_load: ratio(none_rev, none),
    }
}

/// Which way a figure must lie from its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Min,
    Max,
}

impl Figures {
    /// Each figure with its name, threshold and the threshold's direction.
    pub fn rows(&self, t: &Thresholds) -> [(&'static str, Option<f64>, Bound, f64); 4] {
        [
            (
                "tier1-recall",
                self.tier1_recall,
                Bound::Min,
                t.min_tier1_recall,
            ),
            (
                "safety-recall",
                self.safety_recall,
                Bound::Min,
                t.min_safety_recall,
            ),
            (
                "false-escalation",
                self.false_escalation,
                Bound::Max,
                t.max_false_escalation,
            ),
            (
                "review-load",
                self.review_load,
                Bound::Max,
                t.max_review_load,
            ),
        ]
    }

    /// The figures that miss their threshold, as `name value bound` triples.
    /// A figure with nothing to count (no case of its label) cannot miss.
    pub fn failures(&self, t: &Thresholds) -> Vec<(&'static str, f64, f64)> {
        self.rows(t)
            .into_iter()
            .filter_map(|(name, v, dir, bound)| {
                let v = v?;
                let missed = match dir {
                    Bound::Min => v < bound,
                    Bound::Max => v > bound,
                };
                missed.then_some((name, v, bound))
            })
            .collect()
    }
}

fn fig(v: Option<f64>) -> String {
    v.map_or("n/a".to_string(), |v| format!("{v:.3}"))
}

/// The full human-readable report. Its last line is the verdict.
pub fn report(cases: &[Scored], t: &Thresholds) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{} labeled cases", cases.len());
    let _ = writeln!(s, "\nconfusion (rows: label, columns: outcome)");
    let _ = writeln!(
        s,
        "  {:<10} {:>9} {:>7} {:>5}",
        "", "escalate", "review", "none"
    );
    for label in Outcome::ALL {
        let row: Vec<usize> = Outcome::ALL
            .iter()
            .map(|o| {
                cases
                    .iter()
                    .filter(|c| c.label == label && c.verdict.outcome == *o)
                    .count()
            })
            .collect();
        let _ = writeln!(
            s,
            "  {:<10} {:>9} {:>7} {:>5}",
            label.as_str(),
            row[0],
            row[1],
            row[2]
        );
    }

    let mut by_tag: BTreeMap<&str, [usize; 5]> = BTreeMap::new(); // cases, esc, rev, none, wrong
    for c in cases {
        for tag in &c.tags {
            let e = by_tag.entry(tag.as_str()).or_default();
            e[0] += 1;
            e[match c.verdict.outcome {
                Outcome::Escalate => 1,
                Outcome::Review => 2,
                Outcome::None => 3,
            }] += 1;
            e[4] += usize::from(c.is_wrong());
        }
    }
    let _ = writeln!(s, "\nby tag");
    let _ = writeln!(
        s,
        "  {:<18} {:>5} {:>9} {:>7} {:>5} {:>6}",
        "tag", "cases", "escalate", "review", "none", "wrong"
    );
    for (tag, n) in &by_tag {
        let _ = writeln!(
            s,
            "  {:<18} {:>5} {:>9} {:>7} {:>5} {:>6}",
            tag, n[0], n[1], n[2], n[3], n[4]
        );
    }

    let wrong: Vec<&Scored> = cases.iter().filter(|c| c.is_wrong()).collect();
    let _ = writeln!(s, "\nwrong ({})", wrong.len());
    for c in &wrong {
        line(&mut s, c);
    }
    let load: Vec<&Scored> = cases.iter().filter(|c| c.is_load()).collect();
    let _ = writeln!(s, "\nbenign cases sent to review ({})", load.len());
    for c in &load {
        line(&mut s, c);
    }

    let f = figures(cases);
    let _ = writeln!(s, "\nfigures");
    for (name, v, dir, bound) in f.rows(t) {
        let dir = match dir {
            Bound::Min => "min",
            Bound::Max => "max",
        };
        let _ = writeln!(s, "  {name:<17} {}  ({dir} {bound})", fig(v));
    }
    let fails = f.failures(t);
    let summary = format!(
        "tier1-recall={} safety-recall={} false-escalation={} review-load={} cases={}",
        fig(f.tier1_recall),
        fig(f.safety_recall),
        fig(f.false_escalation),
        fig(f.review_load),
        cases.len()
    );
    if fails.is_empty() {
        let _ = writeln!(s, "\nPASS {summary}");
    } else {
        let which: Vec<String> = fails
            .iter()
            .map(|(n, v, b)| format!("{n} {v:.3} vs {b}"))
            .collect();
        let _ = writeln!(s, "\nFAIL ({}) {summary}", which.join(", "));
    }
    s
}

fn line(s: &mut String, c: &Scored) {
    let _ = writeln!(
        s,
        "  {:<8} label={:<8} outcome={:<8} rule={} event={} tags={}",
        c.id,
        c.label.as_str(),
        c.verdict.outcome.as_str(),
        c.verdict.rule.as_deref().unwrap_or("-"),
        c.verdict.event.map_or("-".to_string(), |e| e.to_string()),
        c.tags.join(",")
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(label: Outcome, outcome: Outcome) -> Scored {
        Scored {
            id: "x".into(),
            label,
            tags: vec!["t".into()],
            verdict: Verdict {
                outcome,
                rule: None,
                event: None,
            },
        }
    }

    #[test]
    fn figures_count_as_the_readme_says() {
        use Outcome::*;
        let cases = vec![
            case(Escalate, Escalate),
            case(Escalate, Review),
            case(Review, Escalate),
            case(Review, None),
            case(None, None),
            case(None, Review),
            case(None, Escalate),
            case(None, None),
        ];
        let f = figures(&cases);
        assert_eq!(f.tier1_recall, Some(0.5));
        assert_eq!(f.safety_recall, Some(0.75));
        assert_eq!(f.false_escalation, Some(0.25));
        assert_eq!(f.review_load, Some(0.25));
        let fails: Vec<&str> = f
            .failures(&Thresholds::default())
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(
            fails,
            vec![
                "tier1-recall",
                "safety-recall",
                "false-escalation",
                "review-load"
            ]
        );
        assert!(
            report(&cases, &Thresholds::default())
                .lines()
                .last()
                .unwrap()
                .starts_with("FAIL")
        );
    }

    #[test]
    fn empty_classes_do_not_fail() {
        let f = figures(&[case(Outcome::None, Outcome::None)]);
        assert_eq!(f.tier1_recall, Option::None);
        assert!(f.failures(&Thresholds::default()).is_empty());
    }
}
