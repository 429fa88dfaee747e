//! Protobuf in, validated domain values out, and back. Every error names
//! the field and the rule it broke; none repeats what the client sent.

use tonic::Status;

use super::pb;
use crate::conversation::{CallStart, Language, LanguageError};
use crate::domain::{Disposition, EscalationState, Severity, Speaker, Tier};
use crate::escalation::{Directive, Escalation};
use crate::ids::{
    AppointmentEventId, AppointmentId, CallId, IdError, MessageId, PatientId, PracticeId, ThreadId,
    UtteranceId,
};

fn bad_id(e: IdError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn language(field: &'static str, s: &str) -> Result<Language, Status> {
    Language::parse(s).map_err(|LanguageError| {
        Status::invalid_argument(format!(
            "{field} must be a language tag such as en or es-MX"
        ))
    })
}

pub fn call_started(c: pb::CallStarted) -> Result<CallStart, Status> {
    Ok(CallStart {
        call: CallId::parse(&c.call_id).map_err(bad_id)?,
        patient: PatientId::parse(&c.patient_id).map_err(bad_id)?,
        practice: PracticeId::parse(&c.practice_id).map_err(bad_id)?,
        language: language("call_started.language", &c.language)?,
    })
}

#[derive(Debug, Clone)]
pub struct UtteranceIn {
    pub id: UtteranceId,
    pub speaker: Speaker,
    pub text: String,
    pub is_final: bool,
}

fn check_text(field: &str, text: &str, max: usize) -> Result<(), Status> {
    if text.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{field} is empty")));
    }
    if text.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is longer than {max} bytes"
        )));
    }
    Ok(())
}

pub fn utterance(u: pb::Utterance, max_bytes: usize) -> Result<UtteranceIn, Status> {
    let id = UtteranceId::parse(&u.utterance_id).map_err(bad_id)?;
    let speaker = match pb::Speaker::try_from(u.speaker) {
        Ok(pb::Speaker::Patient) => Speaker::Patient,
        Ok(pb::Speaker::Agent) => Speaker::Agent,
        Ok(pb::Speaker::Clinician) => Speaker::Clinician,
        Ok(pb::Speaker::Unspecified) | Err(_) => {
            return Err(Status::invalid_argument(
                "utterance.speaker must be SPEAKER_PATIENT, SPEAKER_AGENT or SPEAKER_CLINICIAN",
            ));
        }
    };
    check_text("utterance.text", &u.text, max_bytes)?;
    Ok(UtteranceIn {
        id,
        speaker,
        text: u.text,
        is_final: u.is_final,
    })
}

#[derive(Debug, Clone)]
pub struct MessageIn {
    pub id: MessageId,
    pub patient: PatientId,
    pub practice: PracticeId,
    pub thread: ThreadId,
    pub text: String,
    pub language: Language,
}

pub fn message(m: pb::InboundMessage, max_bytes: usize) -> Result<MessageIn, Status> {
    let msg = MessageIn {
        id: MessageId::parse(&m.message_id).map_err(bad_id)?,
        patient: PatientId::parse(&m.patient_id).map_err(bad_id)?,
        practice: PracticeId::parse(&m.practice_id).map_err(bad_id)?,
        thread: ThreadId::parse(&m.thread_id).map_err(bad_id)?,
        language: language("language", &m.language)?,
        text: String::new(),
    };
    check_text("text", &m.text, max_bytes)?;
    Ok(MessageIn {
        text: m.text,
        ..msg
    })
}

pub fn tier(t: Tier) -> pb::Tier {
    match t {
        Tier::Phrase => pb::Tier::Phrase,
        Tier::Context => pb::Tier::Context,
        Tier::Behavior => pb::Tier::Behavior,
    }
}

pub fn severity(s: Severity) -> pb::Severity {
    match s {
        Severity::Low => pb::Severity::Low,
        Severity::Moderate => pb::Severity::Moderate,
        Severity::High => pb::Severity::High,
        Severity::Imminent => pb::Severity::Imminent,
    }
}

pub fn state(s: EscalationState) -> pb::EscalationState {
    match s {
        EscalationState::Open => pb::EscalationState::Open,
        EscalationState::Acknowledged => pb::EscalationState::Acknowledged,
        EscalationState::Resolved => pb::EscalationState::Resolved,
    }
}

pub fn state_filter(s: i32) -> Result<Option<EscalationState>, Status> {
    match pb::EscalationState::try_from(s) {
        Ok(pb::EscalationState::Unspecified) => Ok(None),
        Ok(pb::EscalationState::Open) => Ok(Some(EscalationState::Open)),
        Ok(pb::EscalationState::Acknowledged) => Ok(Some(EscalationState::Acknowledged)),
        Ok(pb::EscalationState::Resolved) => Ok(Some(EscalationState::Resolved)),
        Err(_) => Err(Status::invalid_argument(
            "state is not a known escalation state",
        )),
    }
}

pub fn directive(d: &Directive) -> pb::Directive {
    pb::Directive {
        escalation_id: d.escalation_id.clone(),
        tier: tier(d.tier) as i32,
        kind: pb::DirectiveKind::CrisisReferral as i32,
        referral_text: d.referral_text.clone(),
        utterance_id: d.utterance_id.clone(),
        severity: severity(d.severity) as i32,
        reason_code: d.reason_code.clone(),
        directive_id: String::new(),
        patient_id: String::new(),
        practice_id: String::new(),
    }
}

/// A directive for a practice's gateway: it names whom to text.
pub fn queued_directive(q: &crate::store::QueuedDirective) -> pb::Directive {
    pb::Directive {
        directive_id: q.directive_id.clone(),
        patient_id: q.patient.expose().to_string(),
        practice_id: q.practice.as_str().to_string(),
        ..directive(&q.directive)
    }
}

/// How far ahead of the server's clock an event may say it happened.
pub const FUTURE_SKEW_MS: i64 = 5 * 60 * 1000;

fn timestamp_ms(field: &'static str, t: Option<prost_types::Timestamp>) -> Result<i64, Status> {
    let t = t.ok_or_else(|| Status::invalid_argument(format!("{field} is required")))?;
    // 0001-01-01 to 9999-12-31, as google.protobuf.Timestamp defines.
    if !(-62_135_596_800..=253_402_300_799).contains(&t.seconds)
        || !(0..1_000_000_000).contains(&t.nanos)
    {
        return Err(Status::invalid_argument(format!(
            "{field} is not a valid timestamp"
        )));
    }
    Ok(t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// A validated appointment event, with whose it is.
#[derive(Debug)]
pub struct AppointmentIn {
    pub practice: PracticeId,
    pub patient: PatientId,
    pub event: crate::tier3::Event,
}

pub fn appointment_event(e: pb::AppointmentEvent, now_ms: i64) -> Result<AppointmentIn, Status> {
    use crate::tier3::{Initiator, Kind};
    let kind = match pb::AppointmentEventKind::try_from(e.kind) {
        Ok(pb::AppointmentEventKind::Booked) => Kind::Booked,
        Ok(pb::AppointmentEventKind::Cancelled) => Kind::Cancelled,
        Ok(pb::AppointmentEventKind::Rescheduled) => Kind::Rescheduled,
        Ok(pb::AppointmentEventKind::NoShow) => Kind::NoShow,
        Ok(pb::AppointmentEventKind::Attended) => Kind::Attended,
        Ok(pb::AppointmentEventKind::Unspecified) | Err(_) => {
            return Err(Status::invalid_argument(
                "kind must be one of booked, cancelled, rescheduled, no_show, attended",
            ));
        }
    };
    let initiator = match pb::Initiator::try_from(e.initiator) {
        Ok(pb::Initiator::Patient) => Some(Initiator::Patient),
        Ok(pb::Initiator::Practice) => Some(Initiator::Practice),
        Ok(pb::Initiator::Unspecified) => None,
        Err(_) => return Err(Status::invalid_argument("initiator is not a known value")),
    };
    if initiator.is_none() && matches!(kind, Kind::Cancelled | Kind::Rescheduled) {
        return Err(Status::invalid_argument(
            "initiator is required for cancellations and reschedules",
        ));
    }
    let occurred_at_ms = timestamp_ms("occurred_at", e.occurred_at)?;
    if occurred_at_ms > now_ms.saturating_add(FUTURE_SKEW_MS) {
        return Err(Status::invalid_argument(
            "occurred_at is more than 5 minutes in the future",
        ));
    }
    Ok(AppointmentIn {
        practice: PracticeId::parse(&e.practice_id).map_err(bad_id)?,
        patient: PatientId::parse(&e.patient_id).map_err(bad_id)?,
        event: crate::tier3::Event {
            id: AppointmentEventId::parse(&e.event_id).map_err(bad_id)?,
            appointment: AppointmentId::parse(&e.appointment_id).map_err(bad_id)?,
            kind,
            initiator,
            occurred_at_ms,
            scheduled_for_ms: timestamp_ms("scheduled_for", e.scheduled_for)?,
        },
    })
}

pub fn escalation(e: &Escalation) -> pb::Escalation {
    pb::Escalation {
        escalation_id: e.id.to_string(),
        practice_id: e.practice.as_str().to_string(),
        patient_id: e.patient.expose().to_string(),
        conversation_id: e.origin.id().to_string(),
        tier: tier(e.tier) as i32,
        rule_id: e.rule_id.clone(),
        severity: severity(e.severity) as i32,
        state: state(e.state) as i32,
        created_at_ms: e.created_at_ms,
        utterance_id: e.utterance_id.clone(),
        reason_code: e.reason_code.clone(),
        acknowledged_by: e.handling.acknowledged_by.clone().unwrap_or_default(),
        acknowledged_at_ms: e.handling.acknowledged_at_ms.unwrap_or_default(),
        disposition: e
            .handling
            .disposition
            .map_or(pb::Disposition::Unspecified, disposition) as i32,
        resolved_at_ms: e.handling.resolved_at_ms.unwrap_or_default(),
        page_rounds: e.handling.page_rounds,
    }
}

pub fn disposition(d: Disposition) -> pb::Disposition {
    match d {
        Disposition::PatientSafe => pb::Disposition::PatientSafe,
        Disposition::EmergencyServices => pb::Disposition::EmergencyServices,
        Disposition::Referred => pb::Disposition::Referred,
        Disposition::FalseAlarm => pb::Disposition::FalseAlarm,
        Disposition::Unreachable => pb::Disposition::Unreachable,
    }
}

pub fn disposition_in(d: i32) -> Result<Disposition, Status> {
    match pb::Disposition::try_from(d) {
        Ok(pb::Disposition::PatientSafe) => Ok(Disposition::PatientSafe),
        Ok(pb::Disposition::EmergencyServices) => Ok(Disposition::EmergencyServices),
        Ok(pb::Disposition::Referred) => Ok(Disposition::Referred),
        Ok(pb::Disposition::FalseAlarm) => Ok(Disposition::FalseAlarm),
        Ok(pb::Disposition::Unreachable) => Ok(Disposition::Unreachable),
        _ => Err(Status::invalid_argument(
            "disposition must be one of the DISPOSITION_ values",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("", Some("en")),
            ("en", Some("en")),
            ("es-MX", Some("es-mx")),
            ("es_419", Some("es-419")),
            ("e", None),
            ("english", None),
            ("en--US", None),
            ("en-US-x-verylongsubtag", None),
            ("<script>", None),
        ];
        for (tag, want) in cases {
            let got = language("language", tag);
            assert_eq!(got.as_ref().ok().map(|l| l.as_str()), *want, "{tag:?}");
            if let Err(s) = got {
                // One fixed message: nothing of the tag comes back.
                assert_eq!(
                    s.message(),
                    "language must be a language tag such as en or es-MX"
                );
            }
        }
    }

    #[test]
    fn utterance_table() {
        let u = |id: &str, speaker: i32, text: &str| pb::Utterance {
            utterance_id: id.into(),
            speaker,
            text: text.into(),
            is_final: true,
        };
        let cases: &[(pb::Utterance, Option<&str>)] = &[
            (u("u1", 1, "hello"), None),
            (u("", 1, "hello"), Some("utterance_id")),
            (u("u1", 0, "hello"), Some("utterance.speaker")),
            (u("u1", 9, "hello"), Some("utterance.speaker")),
            (u("u1", 1, "  "), Some("utterance.text is empty")),
            (u("u1", 1, &"x".repeat(11)), Some("longer than 10 bytes")),
        ];
        for (input, want) in cases {
            let got = utterance(input.clone(), 10);
            match (got, want) {
                (Ok(_), None) => {}
                (Err(s), Some(msg)) => {
                    assert_eq!(s.code(), tonic::Code::InvalidArgument);
                    assert!(s.message().contains(msg), "{:?} lacks {msg}", s.message());
                }
                (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
