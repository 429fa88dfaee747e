//! The page's text: the minimum a clinician needs to act, in one SMS.
//!
//! A template with a closed set of placeholders; none of them can carry
//! transcript text or a name, because no such placeholder exists. Checked
//! at start-up: every placeholder known, only GSM-7 characters (so the
//! message is not sent as UCS-2 at 70 characters a part), and at most 160
//! characters with every placeholder at its longest.

use sha2::{Digest, Sha256};
use thiserror::Error;

/// The template used when the config gives none.
pub const DEFAULT_TEMPLATE: &str = "crisisd: {severity} risk ({tier}), escalation {id}, patient ref {patient}, practice {practice}. Follow the crisis protocol now and acknowledge.";

/// The page's facts, already reduced to what may leave the building.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageFacts {
    /// `IMMINENT`, `HIGH`, `MODERATE` or `LOW`.
    pub severity: String,
    /// `phrase`, `context` or `behavior`.
    pub tier: String,
    /// The escalation id's last 8 hex digits.
    pub id: String,
    /// An opaque 8-hex-digit reference to the patient (see [`patient_ref`]).
    pub patient: String,
    /// The practice id, cut to 16 characters.
    pub practice: String,
}

const PLACEHOLDERS: &[(&str, usize)] = &[
    ("severity", 8),
    ("tier", 8),
    ("id", 8),
    ("patient", 8),
    ("practice", 16),
];

/// The longest text a single SMS carries in GSM-7.
pub const SMS_MAX: usize = 160;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TemplateError {
    #[error("unknown placeholder {{{0}}} (known: severity, tier, id, patient, practice)")]
    Unknown(String),
    #[error("an unclosed {{")]
    Unclosed,
    #[error("character {0:?} is not in the GSM-7 alphabet")]
    NotGsm7(char),
    #[error("up to {0} characters with every placeholder at its longest; one SMS holds {SMS_MAX}")]
    TooLong(usize),
}

/// GSM 03.38 basic characters that are also ASCII, plus the extension
/// characters that cost two.
fn gsm7_cost(c: char) -> Option<usize> {
    match c {
        'A'..='Z' | 'a'..='z' | '0'..='9' | ' ' | '\n' | '\r' => Some(1),
        '@' | '$' | '_' | '!' | '"' | '#' | '%' | '&' | '\'' | '(' | ')' | '*' | '+' | ','
        | '-' | '.' | '/' | ':' | ';' | '<' | '=' | '>' | '?' => Some(1),
        '^' | '{' | '}' | '\\' | '[' | '~' | ']' | '|' => Some(2),
        _ => None,
    }
}

/// Splits a template into literal text and placeholder names.
fn parts(template: &str) -> Result<Vec<(bool, &str)>, TemplateError> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push((false, &rest[..open]));
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or(TemplateError::Unclosed)?;
        let name = &after[..close];
        if !PLACEHOLDERS.iter().any(|(p, _)| *p == name) {
            return Err(TemplateError::Unknown(name.to_string()));
        }
        out.push((true, name));
        rest = &after[close + 1..];
    }
    out.push((false, rest));
    Ok(out)
}

/// Checks a template; returns its longest rendered length.
pub fn check(template: &str) -> Result<usize, TemplateError> {
    let mut len = 0;
    for (is_placeholder, s) in parts(template)? {
        if is_placeholder {
            len += PLACEHOLDERS
                .iter()
                .find(|(p, _)| *p == s)
                .map_or(0, |(_, n)| *n);
        } else {
            for c in s.chars() {
                len += gsm7_cost(c).ok_or(TemplateError::NotGsm7(c))?;
            }
        }
    }
    if len > SMS_MAX {
        return Err(TemplateError::TooLong(len));
    }
    Ok(len)
}

/// Keeps only characters that are safe in GSM-7 and in a page: a practice
/// id is `[A-Za-z0-9._:-]` already, but the text must hold whatever it is.
fn clean(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
        .take(max)
        .collect()
}

/// Renders a template checked by [`check`].
pub fn render(template: &str, f: &PageFacts) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(SMS_MAX);
    for (is_placeholder, s) in parts(template)? {
        if !is_placeholder {
            out.push_str(s);
            continue;
        }
        let (value, max) = match s {
            "severity" => (&f.severity, 8),
            "tier" => (&f.tier, 8),
            "id" => (&f.id, 8),
            "patient" => (&f.patient, 8),
            _ => (&f.practice, 16),
        };
        out.push_str(&clean(value, max));
    }
    Ok(out)
}

/// An opaque patient reference: the first 8 hex digits of SHA-256 over a
/// deployment secret and the patient id. Stable for a patient, so a
/// clinician can tell two pages about one patient apart from two patients,
/// and meaningless without the secret and the practice's records.
pub fn patient_ref(secret: &[u8], patient_id: &str) -> String {
    let mut h = Sha256::new();
    h.update((secret.len() as u64).to_le_bytes());
    h.update(secret);
    h.update(patient_id.as_bytes());
    hex::encode(&h.finalize()[..4])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> PageFacts {
        PageFacts {
            severity: "IMMINENT".into(),
            tier: "phrase".into(),
            id: "9f3c2a17".into(),
            patient: "a1b2c3d4".into(),
            practice: "riverside-counseling-group".into(),
        }
    }

    #[test]
    fn default_template_fits_one_sms() {
        let max = check(DEFAULT_TEMPLATE).expect("valid");
        assert!(max <= SMS_MAX, "{max}");
        let text = render(DEFAULT_TEMPLATE, &facts()).expect("renders");
        assert!(text.len() <= SMS_MAX, "{} > {SMS_MAX}: {text}", text.len());
        assert!(
            text.contains("IMMINENT") && text.contains("9f3c2a17") && text.contains("a1b2c3d4")
        );
        assert!(text.contains("riverside-couns") && !text.contains("riverside-counseling-group"));
    }

    #[test]
    fn template_table() {
        let cases: &[(&str, Result<(), TemplateError>)] = &[
            ("{severity} {id}", Ok(())),
            (
                "{transcript}",
                Err(TemplateError::Unknown("transcript".into())),
            ),
            ("{name}", Err(TemplateError::Unknown("name".into()))),
            ("{severity", Err(TemplateError::Unclosed)),
            (
                "Risiko {severity} – jetzt",
                Err(TemplateError::NotGsm7('–')),
            ),
            ("⚠ {severity}", Err(TemplateError::NotGsm7('⚠'))),
            (&"x".repeat(161), Err(TemplateError::TooLong(161))),
            (
                &format!("{}{{practice}}", "x".repeat(150)),
                Err(TemplateError::TooLong(166)),
            ),
        ];
        for (t, want) in cases {
            assert_eq!(check(t).map(|_| ()), *want, "{t:?}");
        }
    }

    #[test]
    fn patient_refs_are_stable_opaque_and_keyed() {
        let a = patient_ref(b"secret-1", "MRN-0042");
        assert_eq!(a.len(), 8);
        assert_eq!(a, patient_ref(b"secret-1", "MRN-0042"));
        assert_ne!(a, patient_ref(b"secret-2", "MRN-0042"));
        assert_ne!(a, patient_ref(b"secret-1", "MRN-0043"));
        assert!(!a.contains("0042"));
    }
}
