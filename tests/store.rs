//! The SQLite store: group commits keep every write's answer its own, the
//! audit chain stays whole under concurrent writers, and what was answered
//! is there after a reopen.

mod common;

use std::sync::Arc;

use crisisd::audit::{self, AuditEvent};
use crisisd::domain::{EscalationState, Severity, Tier};
use crisisd::escalation::{Escalation, Origin, now_ms};
use crisisd::ids::{EscalationId, MessageId, PatientId, PracticeId};
use crisisd::store::sqlite::SqliteStore;
use crisisd::store::{EscalationQuery, EscalationWrite, MessageVerdict, Recorded, Store};

fn escalation(id: EscalationId, n: usize) -> Escalation {
    Escalation {
        id,
        practice: PracticeId::parse("p1").expect("id"),
        patient: PatientId::parse(&format!("patient-{n}")).expect("id"),
        origin: Origin::Call(format!("call-{n}")),
        tier: Tier::Phrase,
        rule_id: "en.active.kill_self".into(),
        reason_code: "en.active.kill_self".into(),
        severity: Severity::High,
        state: EscalationState::Open,
        utterance_id: "u1".into(),
        created_at_ms: now_ms(),
        handling: Default::default(),
    }
}

fn event(action: &str, n: usize) -> AuditEvent {
    AuditEvent {
        actor: "test".into(),
        request_id: format!("r{n}"),
        action: action.into(),
        subject: format!("call:call-{n}"),
        detail: serde_json::json!({ "n": n }),
    }
}

async fn open(dir: &std::path::Path) -> Arc<SqliteStore> {
    Arc::new(
        SqliteStore::open(&dir.join("crisisd.db"))
            .await
            .expect("open"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_one_failure_and_a_whole_chain() {
    let dir = common::temp_dir("store");
    let store = open(&dir).await;
    let taken = EscalationId::new();
    store
        .escalate(
            EscalationWrite::Create(Box::new(escalation(taken, 0))),
            event("escalation.create", 0),
        )
        .await
        .expect("first");
    let mut tasks = Vec::new();
    for n in 1..=200usize {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            match n % 4 {
                0 => s.audit(event("stream.open", n)).await,
                // Every 50th reuses an id: that write alone must fail.
                _ if n % 50 == 1 => {
                    s.escalate(
                        EscalationWrite::Create(Box::new(escalation(taken, n))),
                        event("escalation.create", n),
                    )
                    .await
                }
                _ => {
                    s.escalate(
                        EscalationWrite::Create(Box::new(escalation(EscalationId::new(), n))),
                        event("escalation.create", n),
                    )
                    .await
                }
            }
        }));
    }
    let mut failed = 0;
    for t in tasks {
        if t.await.expect("task").is_err() {
            failed += 1;
        }
    }
    assert_eq!(failed, 4, "only the reused ids fail");
    let rows = store.audit_rows(0).await.expect("rows");
    assert_eq!(rows.len(), 1 + 200 - 4);
    assert_eq!(audit::verify(&rows), vec![]);
    let (seq, hash) = store.audit_head().await.expect("head");
    assert_eq!(
        (seq, hash.as_str()),
        (rows.len() as i64, rows[rows.len() - 1].hash.as_str())
    );
    let listed = store
        .list_escalations(&EscalationQuery {
            limit: 500,
            ..Default::default()
        })
        .await
        .expect("list");
    // 1 + 150 escalating tasks - 4 refused.
    assert_eq!(listed.len(), 1 + 150 - 4);
    let pages = store.due_pages(now_ms() + 1, 500).await.expect("pages");
    assert_eq!(
        pages.len(),
        listed.len(),
        "every escalation has its page, no failed one has"
    );
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn messages_are_recorded_once_and_everything_survives_a_reopen() {
    let dir = common::temp_dir("store");
    let store = open(&dir).await;
    let id = EscalationId::new();
    let m = MessageId::parse("m1").expect("id");
    let v = MessageVerdict {
        escalation_id: Some(id),
        directive: None,
    };
    let write = || Some(EscalationWrite::Create(Box::new(escalation(id, 1))));
    assert_eq!(
        store
            .record_message(&m, &v, write(), vec![event("message", 1)])
            .await
            .expect("first"),
        Recorded::New
    );
    assert_eq!(
        store
            .record_message(&m, &v, write(), vec![event("message", 1)])
            .await
            .expect("again"),
        Recorded::Duplicate
    );
    store
        .escalate(
            EscalationWrite::Raise {
                id,
                severity: Severity::Imminent,
            },
            event("escalation.raise", 1),
        )
        .await
        .expect("raise");
    store.close().await;

    let store = open(&dir).await;
    assert_eq!(store.message_verdict(&m).await.expect("read"), Some(v));
    let e = store
        .get_escalation(id)
        .await
        .expect("read")
        .expect("there");
    assert_eq!(e.severity, Severity::Imminent);
    // A page for the escalation and one for the rise, both still due.
    assert_eq!(
        store
            .due_pages(now_ms() + 1, 10)
            .await
            .expect("pages")
            .len(),
        2
    );
    let rows = store.audit_rows(0).await.expect("rows");
    assert_eq!(rows.len(), 2, "the duplicate wrote nothing");
    assert_eq!(audit::verify(&rows), vec![]);
    store.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}
