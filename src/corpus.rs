//! The labeled detection corpus format (JSON lines), read leniently: a bad
//! line is reported with its number and the rest is still read.
//!
//! ```json
//! {"id": "s001", "channel": "voice", "events": [{"speaker": "patient", "text": "…", "final": true}], "label": "escalate", "tags": ["explicit"]}
//! ```
//!
//! Lines are validated by hand rather than by `serde` derive so that an error
//! names the field and never echoes a value: corpus text is patient-like
//! language and stays out of error output.

use std::io::BufRead;

use serde_json::Value;
use thiserror::Error;

use crate::domain::{Channel, Speaker};

/// A conversation's outcome, and the label it should have had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    None,
    Review,
    Escalate,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Escalate, Outcome::Review, Outcome::None];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::None => "none",
            Outcome::Review => "review",
            Outcome::Escalate => "escalate",
        }
    }

    fn parse(s: &str) -> Option<Outcome> {
        match s {
            "none" => Some(Outcome::None),
            "review" => Some(Outcome::Review),
            "escalate" => Some(Outcome::Escalate),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub speaker: Speaker,
    pub text: String,
    pub is_final: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// Line number in the input, from 1.
    pub line: usize,
    pub id: String,
    pub channel: Channel,
    pub events: Vec<Event>,
    pub label: Option<Outcome>,
    pub tags: Vec<String>,
}

/// Why a line was skipped. Names the field, never its value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("line {line}: {problem}")]
pub struct LineError {
    pub line: usize,
    pub problem: String,
}

/// Reads every line of `input`: the conversations that parsed, and an error
/// for each line that did not.
pub fn read(input: impl BufRead) -> (Vec<Conversation>, Vec<LineError>) {
    let mut convs = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line_no = i + 1;
        let line = match line {
            Ok(l) => l,
            Err(_) => {
                errors.push(LineError {
                    line: line_no,
                    problem: "not valid UTF-8 or unreadable".into(),
                });
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(&line) {
            Ok(mut c) => {
                c.line = line_no;
                convs.push(c)
            }
            Err(problem) => errors.push(LineError {
                line: line_no,
                problem,
            }),
        }
    }
    (convs, errors)
}

/// Parses one corpus line.
pub fn parse_line(line: &str) -> Result<Conversation, String> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON at column {}", e.column()))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let id = str_field(obj, "id")?.to_string();
    let channel = match str_field(obj, "channel")? {
        "voice" => Channel::Voice,
        "sms" => Channel::Sms,
        _ => return Err("unknown channel (expected voice or sms)".into()),
    };
    let events = obj
        .get("events")
        .ok_or("missing field `events`")?
        .as_array()
        .ok_or("field `events` must be an array")?;
    if events.is_empty() {
        return Err("field `events` is empty".into());
    }
    let mut out = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let e = e
            .as_object()
            .ok_or_else(|| format!("event {i}: not an object"))?;
        let speaker = match str_field(e, "speaker").map_err(|m| format!("event {i}: {m}"))? {
            "patient" => Speaker::Patient,
            "agent" => Speaker::Agent,
            "clinician" => Speaker::Clinician,
            _ => {
                return Err(format!(
                    "event {i}: unknown speaker (expected patient, agent or clinician)"
                ));
            }
        };
        let text = str_field(e, "text")
            .map_err(|m| format!("event {i}: {m}"))?
            .to_string();
        let is_final = e
            .get("final")
            .ok_or_else(|| format!("event {i}: missing field `final`"))?
            .as_bool()
            .ok_or_else(|| format!("event {i}: field `final` must be true or false"))?;
        out.push(Event {
            speaker,
            text,
            is_final,
        });
    }
    let label = match obj.get("label") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            Some(Outcome::parse(s).ok_or("unknown label (expected escalate, review or none)")?)
        }
        Some(_) => return Err("field `label` must be a string".into()),
    };
    let tags = match obj.get("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or("field `tags` must be an array of strings")?,
        Some(_) => return Err("field `tags` must be an array of strings".into()),
    };
    Ok(Conversation {
        line: 0,
        id,
        channel,
        events: out,
        label,
        tags,
    })
}

fn str_field<'a>(obj: &'a serde_json::Map<String, Value>, name: &str) -> Result<&'a str, String> {
    obj.get(name)
        .ok_or_else(|| format!("missing field `{name}`"))?
        .as_str()
        .ok_or_else(|| format!("field `{name}` must be a string"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_line_table() {
        let cases: &[(&str, &str)] = &[
            ("{not json", "invalid JSON at column 2"),
            ("[]", "not a JSON object"),
            (r#"{"channel":"sms","events":[]}"#, "missing field `id`"),
            (
                r#"{"id":"a","channel":"fax","events":[]}"#,
                "unknown channel (expected voice or sms)",
            ),
            (r#"{"id":"a","channel":"sms"}"#, "missing field `events`"),
            (
                r#"{"id":"a","channel":"sms","events":[]}"#,
                "field `events` is empty",
            ),
            (
                r#"{"id":"a","channel":"sms","events":[{"speaker":"doctor","text":"secret words","final":true}]}"#,
                "event 0: unknown speaker (expected patient, agent or clinician)",
            ),
            (
                r#"{"id":"a","channel":"sms","events":[{"speaker":"patient","final":true}]}"#,
                "event 0: missing field `text`",
            ),
            (
                r#"{"id":"a","channel":"sms","events":[{"speaker":"patient","text":"x"}]}"#,
                "event 0: missing field `final`",
            ),
            (
                r#"{"id":"a","channel":"sms","events":[{"speaker":"patient","text":"x","final":"secret words"}]}"#,
                "event 0: field `final` must be true or false",
            ),
            (
                r#"{"id":"a","channel":"sms","events":[{"speaker":"patient","text":"x","final":true}],"label":"maybe"}"#,
                "unknown label (expected escalate, review or none)",
            ),
        ];
        for (line, want) in cases {
            let got = parse_line(line).unwrap_err();
            assert_eq!(&got, want, "{line}");
            assert!(!got.contains("secret"));
        }
    }

    #[test]
    fn reads_around_bad_lines() {
        let input = "{\"id\":\"a\",\"channel\":\"sms\",\"events\":[{\"speaker\":\"patient\",\"text\":\"hi\",\"final\":true}]}\n\nnope\n{\"id\":\"b\",\"channel\":\"voice\",\"events\":[{\"speaker\":\"agent\",\"text\":\"hi\",\"final\":false}],\"label\":\"none\",\"tags\":[\"x\"]}\n";
        let (convs, errors) = read(input.as_bytes());
        assert_eq!(convs.len(), 2);
        assert_eq!(
            errors,
            vec![LineError {
                line: 3,
                problem: "invalid JSON at column 2".into()
            }]
        );
        assert_eq!(convs[1].label, Some(Outcome::None));
        assert_eq!(convs[1].tags, vec!["x"]);
        assert!(!convs[1].events[0].is_final);
    }
}
