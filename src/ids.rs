//! Identifier types, parsed and validated at the edge.
//!
//! Ids are 1-128 characters of `[A-Za-z0-9._:-]`. A patient id is PHI: its
//! `Debug` and `Display` print nothing of it, so it cannot reach a log line
//! by accident; code that must store or compare it calls `expose`.

use std::fmt;

use thiserror::Error;

/// Longest id accepted, in bytes.
pub const ID_MAX: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field} must be 1-{ID_MAX} characters of A-Z a-z 0-9 . _ : -")]
pub struct IdError {
    pub field: &'static str,
}

fn valid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= ID_MAX
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `s`; the error names the field, never the value.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                if valid(s) {
                    Ok($name(s.to_string()))
                } else {
                    Err(IdError { field: $field })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// One call of the voice line.
    CallId,
    "call_id"
);
id_type!(
    /// One text thread.
    ThreadId,
    "thread_id"
);
id_type!(PracticeId, "practice_id");
id_type!(
    /// One utterance; partial hypotheses and their final share it.
    UtteranceId,
    "utterance_id"
);
id_type!(MessageId, "message_id");
id_type!(
    /// A clinician in the on-call roster. Not PHI, unlike their name and
    /// phone number: logs and errors may carry it.
    ClinicianId,
    "clinician_id"
);
id_type!(
    /// One appointment in the practice's schedule.
    AppointmentId,
    "appointment_id"
);
id_type!(
    /// One event from the scheduling system; unique within its practice.
    AppointmentEventId,
    "event_id"
);

/// A patient: PHI. Prints as `<patient>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PatientId(String);

impl PatientId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        if valid(s) {
            Ok(PatientId(s.to_string()))
        } else {
            Err(IdError {
                field: "patient_id",
            })
        }
    }

    /// The id itself, for the store and for comparisons. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PatientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PatientId(<redacted>)")
    }
}

impl fmt::Display for PatientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<patient>")
    }
}

/// An escalation: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EscalationId(uuid::Uuid);

impl EscalationId {
    pub fn new() -> Self {
        EscalationId(uuid::Uuid::now_v7())
    }

    pub fn parse(s: &str) -> Result<Self, IdError> {
        uuid::Uuid::parse_str(s)
            .ok()
            .filter(|u| u.get_version_num() == 7)
            .map(EscalationId)
            .ok_or(IdError {
                field: "escalation_id",
            })
    }
}

impl Default for EscalationId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EscalationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_table() {
        let cases: &[(&str, bool)] = &[
            ("call-1", true),
            ("a.b_c:d-E9", true),
            ("", false),
            ("has space", false),
            ("ünï", false),
            ("semi;colon", false),
            (&"x".repeat(128), true),
            (&"x".repeat(129), false),
        ];
        for (s, ok) in cases {
            assert_eq!(CallId::parse(s).is_ok(), *ok, "{s:?}");
        }
        assert_eq!(
            ThreadId::parse("bad id").unwrap_err().to_string(),
            "thread_id must be 1-128 characters of A-Z a-z 0-9 . _ : -"
        );
    }

    #[test]
    fn patient_ids_never_print() {
        let p = PatientId::parse("MRN-0042").expect("valid");
        assert_eq!(format!("{p} {p:?}"), "<patient> PatientId(<redacted>)");
        assert_eq!(p.expose(), "MRN-0042");
    }

    #[test]
    fn escalation_ids_are_v7_and_round_trip() {
        let e = EscalationId::new();
        assert_eq!(EscalationId::parse(&e.to_string()), Ok(e));
        assert!(EscalationId::parse("not-a-uuid").is_err());
        // A v4 UUID is not one of ours.
        assert!(EscalationId::parse("1b4e28ba-2fa1-41d2-883f-0016d3cca427").is_err());
    }
}
