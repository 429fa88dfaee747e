//! Tier 3's state in the store: bounded per patient, pruned past the
//! longest window, repeated event ids answered once, and durable.

mod common;

use std::sync::Arc;

use crisisd::audit::AuditEvent;
use crisisd::escalation::now_ms;
use crisisd::ids::{AppointmentEventId, AppointmentId, CallId, PatientId, PracticeId};
use crisisd::store::sqlite::SqliteStore;
use crisisd::store::{
    AppointmentAnswer, AppointmentRecord, CALLS_PER_PATIENT, CallContact, FiringRecord, Recorded,
    Store,
};
use crisisd::tier3::{Event, Initiator, Kind};

const DAY: i64 = 86_400_000;

fn practice() -> PracticeId {
    PracticeId::parse("p1").expect("id")
}

fn patient() -> PatientId {
    PatientId::parse("pat-1").expect("id")
}

fn record(n: usize, at_ms: i64, horizon_ms: i64, max_events: u32) -> AppointmentRecord {
    AppointmentRecord {
        practice: practice(),
        patient: patient(),
        event: Event {
            id: AppointmentEventId::parse(&format!("e{n}")).expect("id"),
            appointment: AppointmentId::parse(&format!("a{n}")).expect("id"),
            kind: Kind::Cancelled,
            initiator: Some(Initiator::Patient),
            occurred_at_ms: at_ms,
            scheduled_for_ms: at_ms + DAY,
        },
        answer: AppointmentAnswer {
            escalation_id: None,
            rule_ids: vec![format!("r{n}")],
        },
        firings: vec![FiringRecord {
            rule_id: "r".into(),
            anchor_event: format!("e{n}"),
            anchor_at_ms: at_ms,
        }],
        write: None,
        directive: None,
        audit: vec![AuditEvent {
            actor: "test".into(),
            request_id: format!("r{n}"),
            action: "appointment.event".into(),
            subject: format!("appointment:a{n}"),
            detail: serde_json::json!({}),
        }],
        prune_events_before_ms: horizon_ms,
        max_events,
        prune_firings_before_ms: horizon_ms,
    }
}

#[tokio::test]
async fn a_patients_history_stays_bounded_and_pruned() {
    let dir = common::temp_dir("store-tier3");
    let store = Arc::new(
        SqliteStore::open(&dir.join("crisisd.db"))
            .await
            .expect("open"),
    );
    let now = now_ms();
    let horizon = now - 45 * DAY;
    // 100 events, one every day back from today: half are past the window.
    for n in 0..100 {
        let r = record(n, now - n as i64 * DAY, horizon, 24);
        assert_eq!(
            store.record_appointment(r).await.expect("recorded").0,
            Recorded::New
        );
    }
    let (h, _) = store
        .behavior_history(&practice(), &patient(), 0, 0)
        .await
        .expect("history");
    assert_eq!(h.events.len(), 24, "at most max_events per patient");
    assert!(h.events.iter().all(|e| e.occurred_at_ms >= horizon));
    assert!(h.firings.iter().all(|f| f.anchor_at_ms >= horizon));
    assert!(h.firings.len() <= 46);
    // The newest are the ones kept.
    let newest = h.events.iter().map(|e| e.occurred_at_ms).max();
    assert_eq!(newest, Some(now));

    // A repeated event id: nothing written, the first answer stands.
    let mut again = record(3, now, horizon, 24);
    again.answer.rule_ids = vec!["other".into()];
    let (recorded, answer) = store.record_appointment(again).await.expect("ok");
    assert_eq!(recorded, Recorded::Duplicate);
    assert_eq!(answer.rule_ids, vec!["r3".to_string()], "the first answer");
    let first = store
        .appointment_answer(&practice(), &AppointmentEventId::parse("e3").expect("id"))
        .await
        .expect("read");
    assert_eq!(first.map(|a| a.rule_ids), Some(vec!["r3".to_string()]));

    // Calls: the last few per patient; a review once set stays set.
    for n in 0..20 {
        let call = CallContact {
            practice: practice(),
            patient: patient(),
            call: CallId::parse(&format!("c{n}")).expect("id"),
            started_at_ms: now - (20 - n as i64) * DAY,
            language: "es".into(),
            review: n == 19,
        };
        store.record_call(call).await.expect("call");
    }
    let mut last = CallContact {
        practice: practice(),
        patient: patient(),
        call: CallId::parse("c19").expect("id"),
        started_at_ms: now - DAY,
        language: "es".into(),
        review: false,
    };
    store.record_call(last.clone()).await.expect("call");
    let (h, language) = store
        .behavior_history(&practice(), &patient(), 0, 0)
        .await
        .expect("history");
    assert_eq!(h.calls.len() as i64, CALLS_PER_PATIENT);
    assert_eq!(language.as_deref(), Some("es"));
    let newest = h
        .calls
        .iter()
        .max_by_key(|c| c.started_at_ms)
        .expect("calls");
    assert!(newest.review, "a review stays set");
    last.review = true;

    // Everything is there after a reopen.
    store.close().await;
    let store = SqliteStore::open(&dir.join("crisisd.db"))
        .await
        .expect("reopen");
    let (h, _) = store
        .behavior_history(&practice(), &patient(), 0, 0)
        .await
        .expect("history");
    assert_eq!(h.events.len(), 24);
    assert_eq!(h.calls.len() as i64, CALLS_PER_PATIENT);
    store.close().await;
}
