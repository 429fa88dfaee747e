//! The store, on both backends: every test here runs against SQLite and
//! against PostgreSQL (a schema of its own on the test server; see
//! common/pg.rs). Group commits keep every write's answer its own, the
//! audit chain stays whole under concurrent writers (on PostgreSQL, two
//! store instances on one database, as two replicas), what was answered is
//! there after a reopen, one patient makes one escalation however many
//! write at once, and page claims are exclusive until their lease runs out.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use crisisd::audit::{self, AuditEvent};
use crisisd::domain::{EscalationState, Severity, Tier};
use crisisd::escalation::{Directive, Escalation, Origin, now_ms};
use crisisd::ids::{EscalationId, MessageId, PatientId, PracticeId};
use crisisd::store::postgres::PgStore;
use crisisd::store::sqlite::SqliteStore;
use crisisd::store::{
    Escalated, EscalationQuery, EscalationWrite, MessageVerdict, Recorded, RepagePolicy, Store,
};

/// Where a test's store lives.
enum Backend {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Backend {
    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite(dir) => Arc::new(
                SqliteStore::open(&dir.join("crisisd.db"))
                    .await
                    .expect("open"),
            ),
            Backend::Postgres(url) => Arc::new(
                PgStore::open(&common::pg::store_config(url))
                    .await
                    .expect("open"),
            ),
        }
    }

    /// A second handle on the same data, as another replica would have;
    /// SQLite has one writer per file, so there it is the same store.
    async fn replica(&self, store: &Arc<dyn Store>) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite(_) => store.clone(),
            Backend::Postgres(_) => self.open().await,
        }
    }

    fn cleanup(&self) {
        if let Backend::Sqlite(dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Each test, once per backend.
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let b = super::Backend::Sqlite(super::common::temp_dir("store"));
                    super::$name(&b).await;
                    b.cleanup();
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(url) = super::common::pg::database(concat!("store::", stringify!($name))) else {
                        return;
                    };
                    super::$name(&super::Backend::Postgres(url)).await;
                }
            )*
        }
    };
}

both_backends!(
    concurrent_writers_one_failure_and_a_whole_chain,
    messages_are_recorded_once_and_everything_survives_a_reopen,
    one_patient_escalated_at_once_makes_one_escalation_and_one_page,
    a_message_attached_to_another_conversation_records_that_escalation,
    claims_are_exclusive_until_delivered_failed_or_expired,
    repaging_from_two_replicas_at_once_queues_each_round_once,
    acknowledgement_on_one_replica_stops_pages_on_both,
    replicas_starting_together_migrate_once,
);

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

fn create_event(id: EscalationId) -> AuditEvent {
    AuditEvent {
        actor: "test".into(),
        request_id: "r".into(),
        action: "escalation.create".into(),
        subject: format!("escalation:{id}"),
        detail: serde_json::json!({}),
    }
}

/// A new escalation for patient `n` unless one is open since an hour ago.
fn unless_open(n: usize, severity: Severity) -> (EscalationId, EscalationWrite) {
    let id = EscalationId::new();
    let mut e = escalation(id, n);
    e.severity = severity;
    (
        id,
        EscalationWrite::CreateUnlessOpen {
            escalation: Box::new(e),
            since_ms: now_ms() - 3_600_000,
        },
    )
}

async fn chain_is_whole(store: &Arc<dyn Store>) -> usize {
    let rows = store.audit_rows(0).await.expect("rows");
    assert_eq!(audit::verify(&rows), vec![]);
    let (seq, hash) = store.audit_head().await.expect("head");
    if let Some(last) = rows.last() {
        assert_eq!((seq, hash.as_str()), (last.seq, last.hash.as_str()));
    }
    rows.len()
}

async fn concurrent_writers_one_failure_and_a_whole_chain(b: &Backend) {
    let store = b.open().await;
    let other = b.replica(&store).await;
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
        // Half through each replica: one chain whoever appends.
        let s = if n % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            match n % 4 {
                0 => s.audit(event("stream.open", n)).await.map(|_| ()),
                // Every 50th reuses an id: that write alone must fail.
                _ if n % 50 == 1 => s
                    .escalate(
                        EscalationWrite::Create(Box::new(escalation(taken, n))),
                        event("escalation.create", n),
                    )
                    .await
                    .map(|_| ()),
                _ => s
                    .escalate(
                        EscalationWrite::Create(Box::new(escalation(EscalationId::new(), n))),
                        event("escalation.create", n),
                    )
                    .await
                    .map(|_| ()),
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
    other.close().await;
    store.close().await;
}

async fn messages_are_recorded_once_and_everything_survives_a_reopen(b: &Backend) {
    let store = b.open().await;
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
        (
            Recorded::New,
            Some(Escalated::Created(crisisd::escalation::Open {
                id,
                severity: Severity::High
            }))
        )
    );
    assert_eq!(
        store
            .record_message(&m, &v, write(), vec![event("message", 1)])
            .await
            .expect("again"),
        (Recorded::Duplicate, None)
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

    let store = b.open().await;
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
}

async fn one_patient_escalated_at_once_makes_one_escalation_and_one_page(b: &Backend) {
    let store = b.open().await;
    let other = b.replica(&store).await;
    // Twenty conversations of patient 7, half on each replica, at once.
    let mut tasks = Vec::new();
    for n in 0..20usize {
        let s = if n % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            let (id, write) = unless_open(7, Severity::High);
            s.escalate(write, create_event(id)).await.expect("escalate")
        }));
    }
    let mut created = Vec::new();
    let mut attached = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            Escalated::Created(o) => created.push(o),
            Escalated::Attached(o) => attached.push(o),
            Escalated::Raised(o) => panic!("nothing to raise: {o:?}"),
        }
    }
    assert_eq!(created.len(), 1, "one escalation for the patient");
    assert_eq!(attached.len(), 19);
    assert!(attached.iter().all(|o| *o == created[0]), "all on that one");
    let open = created[0];
    assert_eq!(
        store
            .due_pages(now_ms() + 1, 100)
            .await
            .expect("pages")
            .len(),
        1
    );
    assert_eq!(chain_is_whole(&store).await, 1, "attaching writes nothing");

    // Higher: raised and paged again, the audit row naming that escalation.
    let (id, write) = unless_open(7, Severity::Imminent);
    let raised = other
        .escalate(write, create_event(id))
        .await
        .expect("raise");
    assert_eq!(
        raised,
        Escalated::Raised(crisisd::escalation::Open {
            id: open.id,
            severity: Severity::Imminent
        })
    );
    assert_eq!(
        store
            .due_pages(now_ms() + 1, 100)
            .await
            .expect("pages")
            .len(),
        2
    );
    let rows = store.audit_rows(0).await.expect("rows");
    let last = rows.last().expect("a row");
    assert_eq!(last.action, "escalation.raise");
    assert_eq!(last.subject, format!("escalation:{}", open.id));
    // Lower: attached.
    let (id, write) = unless_open(7, Severity::Moderate);
    assert!(matches!(
        store.escalate(write, create_event(id)).await.expect("attach"),
        Escalated::Attached(o) if o.id == open.id
    ));
    // Outside the window (the open one is older than `since`): a new one.
    let id = EscalationId::new();
    let later = EscalationWrite::CreateUnlessOpen {
        escalation: Box::new(escalation(id, 7)),
        since_ms: now_ms() + 1,
    };
    assert!(matches!(
        store.escalate(later, create_event(id)).await.expect("new"),
        Escalated::Created(o) if o.id == id
    ));
    // Another patient is not held up by this one.
    let (id, write) = unless_open(8, Severity::High);
    assert!(matches!(
        other
            .escalate(write, create_event(id))
            .await
            .expect("other patient"),
        Escalated::Created(_)
    ));
    assert_eq!(chain_is_whole(&store).await, 4);
    other.close().await;
    store.close().await;
}

async fn a_message_attached_to_another_conversation_records_that_escalation(b: &Backend) {
    let store = b.open().await;
    let other = b.replica(&store).await;
    let (first, write) = unless_open(3, Severity::High);
    store
        .escalate(write, create_event(first))
        .await
        .expect("escalate");
    // A text from the same patient, through the other replica, prepared as
    // a new escalation: it attaches, and the verdict kept says so.
    let (id, write) = unless_open(3, Severity::High);
    let directive = Directive {
        escalation_id: id.to_string(),
        tier: Tier::Phrase,
        severity: Severity::High,
        referral_text: "call or text 988".into(),
        utterance_id: "m9".into(),
        reason_code: "r".into(),
    };
    let v = MessageVerdict {
        escalation_id: Some(id),
        directive: Some(directive),
    };
    let m = MessageId::parse("m9").expect("id");
    let (rec, done) = other
        .record_message(
            &m,
            &v,
            Some(write),
            vec![event("message", 9), create_event(id)],
        )
        .await
        .expect("record");
    assert_eq!(rec, Recorded::New);
    assert!(matches!(done, Some(Escalated::Attached(o)) if o.id == first));
    let kept = store
        .message_verdict(&m)
        .await
        .expect("read")
        .expect("kept");
    assert_eq!(kept.escalation_id, Some(first));
    assert_eq!(
        kept.directive.expect("directive").escalation_id,
        first.to_string()
    );
    assert!(store.get_escalation(id).await.expect("read").is_none());
    // The message's row, not the creation that did not happen.
    assert_eq!(chain_is_whole(&store).await, 2);
    other.close().await;
    store.close().await;
}

async fn claims_are_exclusive_until_delivered_failed_or_expired(b: &Backend) {
    let store = b.open().await;
    let other = b.replica(&store).await;
    for n in 0..40usize {
        let id = EscalationId::new();
        store
            .escalate(
                EscalationWrite::Create(Box::new(escalation(id, n))),
                create_event(id),
            )
            .await
            .expect("escalate");
    }
    let now = now_ms() + 1;
    let lease = 60_000;
    // Both replicas claim at once, in small bites.
    let claim = |s: Arc<dyn Store>| {
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = s.claim_pages(now, lease, 3).await.expect("claim");
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|p| p.id));
            }
        })
    };
    let (a, c) = (claim(store.clone()), claim(other.clone()));
    let (a, c) = (a.await.expect("task"), c.await.expect("task"));
    let all: HashSet<i64> = a.iter().chain(&c).copied().collect();
    assert_eq!(a.len() + c.len(), 40, "every page claimed once");
    assert_eq!(all.len(), 40, "by one replica only");
    // Held: nobody gets them until the lease runs out.
    assert!(
        other
            .claim_pages(now + 1000, lease, 100)
            .await
            .expect("claim")
            .is_empty()
    );
    // A failed page goes back, due at its retry time, claimable again.
    let failed = a.first().or(c.first()).copied().expect("a claim");
    store.page_failed(failed, now + 10).await.expect("failed");
    let again = other
        .claim_pages(now + 20, lease, 100)
        .await
        .expect("claim");
    assert_eq!(again.iter().map(|p| p.id).collect::<Vec<_>>(), vec![failed]);
    assert_eq!(again[0].attempts, 1);
    // A delivered one never comes back.
    store
        .page_delivered(
            crisisd::store::Delivery {
                page: failed,
                at_ms: now,
                clinician_id: "c1".into(),
                provider_message_id: "m1".into(),
            },
            event("page.sent", 1),
        )
        .await
        .expect("delivered");
    // Past the lease: a dead replica's claims are taken over.
    let taken = store
        .claim_pages(now + lease + 1, lease, 100)
        .await
        .expect("claim");
    assert_eq!(taken.len(), 39);
    assert!(taken.iter().all(|p| p.id != failed));
    other.close().await;
    store.close().await;
}

async fn repaging_from_two_replicas_at_once_queues_each_round_once(b: &Backend) {
    let store = b.open().await;
    let other = b.replica(&store).await;
    for n in 0..30usize {
        let id = EscalationId::new();
        store
            .escalate(
                EscalationWrite::Create(Box::new(escalation(id, n))),
                create_event(id),
            )
            .await
            .expect("escalate");
    }
    let policy = RepagePolicy {
        ack_timeout_ms: 1000,
        max_rounds: 3,
    };
    let later = now_ms() + 2000;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = if i % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            s.repage(later, policy).await.expect("repage")
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    assert_eq!(total, 30, "each escalation re-paged once");
    // One first page and a primary and backup for the round, each.
    let pages = store.due_pages(later + 1, 1000).await.expect("pages");
    assert_eq!(pages.len(), 30 * 3);
    let listed = store
        .list_escalations(&EscalationQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(listed.iter().all(|e| e.handling.page_rounds == 2));
    assert_eq!(chain_is_whole(&store).await, 60);
    other.close().await;
    store.close().await;
}

async fn acknowledgement_on_one_replica_stops_pages_on_both(b: &Backend) {
    let store = b.open().await;
    let other = b.replica(&store).await;
    let id = EscalationId::new();
    store
        .escalate(
            EscalationWrite::Create(Box::new(escalation(id, 1))),
            create_event(id),
        )
        .await
        .expect("escalate");
    let ack = |s: Arc<dyn Store>| {
        tokio::spawn(async move {
            s.acknowledge(id, "oncall", event("escalation.ack", 1))
                .await
                .expect("ack")
        })
    };
    // Both replicas see the acknowledgement at once: one records it.
    let (x, y) = (ack(store.clone()), ack(other.clone()));
    let (x, y) = (x.await.expect("task"), y.await.expect("task"));
    for e in [x, y] {
        assert_eq!(e.expect("found").state, EscalationState::Acknowledged);
    }
    assert!(
        store
            .claim_pages(now_ms() + 1, 1000, 10)
            .await
            .expect("claim")
            .is_empty()
    );
    assert!(
        other
            .claim_pages(now_ms() + 1, 1000, 10)
            .await
            .expect("claim")
            .is_empty()
    );
    let policy = RepagePolicy {
        ack_timeout_ms: 1,
        max_rounds: 3,
    };
    assert_eq!(
        other.repage(now_ms() + 10, policy).await.expect("repage"),
        0
    );
    assert_eq!(
        chain_is_whole(&store).await,
        2,
        "creation and one acknowledgement"
    );
    other.close().await;
    store.close().await;
}

async fn replicas_starting_together_migrate_once(b: &Backend) {
    // SQLite: one opener per file, so once here; PostgreSQL: four at once,
    // each migrating a fresh schema unless another got there first.
    let opened: Vec<Arc<dyn Store>> = match b {
        Backend::Sqlite(_) => vec![b.open().await],
        Backend::Postgres(url) => {
            let mut tasks = Vec::new();
            for _ in 0..4 {
                let config = common::pg::store_config(url);
                tasks.push(tokio::spawn(async move {
                    Arc::new(PgStore::open(&config).await.expect("open")) as Arc<dyn Store>
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("task"));
            }
            out
        }
    };
    for s in &opened {
        s.audit(event("start", 0)).await.expect("write");
    }
    let n = opened.len();
    assert_eq!(chain_is_whole(&opened[0]).await, n);
    for s in opened {
        s.close().await;
    }
    // And again: nothing left to migrate, the data kept.
    let s = b.open().await;
    assert_eq!(chain_is_whole(&s).await, n);
    s.close().await;
}

/// TLS to the database, verified against the server's CA (rustls with
/// ring; the process has two rustls providers linked, and the store picks
/// one). A CA that did not sign the server's certificate is refused.
#[tokio::test]
async fn postgres_over_tls_verifies_the_server() {
    let Some(url) = common::pg::database("store::postgres_over_tls_verifies_the_server") else {
        return;
    };
    let Some(ca) = common::pg::tls_root() else {
        // A server given by CRISISD_TEST_DATABASE_URL: its TLS is its own.
        return;
    };
    let tls = format!("{url}&sslmode=verify-full&sslrootcert={}", ca.display());
    let store = PgStore::open(&common::pg::store_config(&tls))
        .await
        .expect("open over TLS");
    store.audit(event("over.tls", 1)).await.expect("write");
    assert_eq!(store.audit_rows(0).await.expect("rows").len(), 1);
    store.close().await;

    // Another CA: the server's certificate does not verify.
    let dir = common::temp_dir("pgtls");
    let other = dir.join("other-ca.pem");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let rogue =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().expect("key"))
            .expect("ca");
    std::fs::write(&other, rogue.pem()).expect("write");
    let bad = format!("{url}&sslmode=verify-full&sslrootcert={}", other.display());
    let refused = PgStore::open(&common::pg::store_config(&bad)).await;
    assert!(
        matches!(refused, Err(crisisd::store::StoreError::Connect { .. })),
        "a server whose certificate does not verify is refused"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
