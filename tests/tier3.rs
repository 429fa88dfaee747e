//! Tier 3 over real gRPC: appointment events in, behavior escalations out,
//! their pages, and their directives on a practice's subscription.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{LiveCall, TestServer, authed, ended, patient, secured, started};
use crisisd::api::pb;
use crisisd::api::pb::crisis_detection_client::CrisisDetectionClient;
use crisisd::config::Config;
use crisisd::pager::{Notifier, NotifyError};
use crisisd::roster::Clinician;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

const DAY: i64 = 86_400;
const SCHED: Option<&str> = Some("tok-scheduling");
const GATEWAY: Option<&str> = Some("tok-messaging");

/// Every page the server sends, by text.
#[derive(Default)]
struct Pages(Mutex<Vec<String>>);

#[async_trait]
impl Notifier for Pages {
    async fn send(&self, _to: Option<&Clinician>, text: &str) -> Result<String, NotifyError> {
        let mut p = self.0.lock().expect("pages");
        p.push(text.to_string());
        Ok(format!("msg-{}", p.len()))
    }
}

impl Pages {
    fn count(&self) -> usize {
        self.0.lock().expect("pages").len()
    }

    /// Waits until `n` pages went out, then a little longer to see that no
    /// more follow.
    async fn settle(&self, n: usize) -> usize {
        for _ in 0..100 {
            if self.count() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        self.count()
    }
}

async fn start(pages: &Arc<Pages>) -> TestServer {
    start_in(pages, common::temp_dir("tier3")).await
}

async fn start_in(pages: &Arc<Pages>, dir: std::path::PathBuf) -> TestServer {
    let notifier: Arc<dyn Notifier> = pages.clone();
    TestServer::start_in(
        secured(Config::default()),
        dir,
        crisisd::server::Seams {
            notifier: Some(notifier),
            classifier: None,
        },
    )
    .await
}

fn now() -> i64 {
    crisisd::escalation::now_ms() / 1000
}

fn ts(secs: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

/// A patient-initiated cancellation (`c`), a no-show (`n`), an attended
/// session (`a`) or a practice's cancellation (`p`), `days_ago` days ago,
/// for a session three days after it.
fn event(id: &str, patient: &str, kind: char, days_ago: i64) -> pb::AppointmentEvent {
    use pb::{AppointmentEventKind as K, Initiator as I};
    let (kind, initiator) = match kind {
        'c' => (K::Cancelled, I::Patient),
        'p' => (K::Cancelled, I::Practice),
        'n' => (K::NoShow, I::Unspecified),
        'a' => (K::Attended, I::Unspecified),
        _ => unreachable!("test table"),
    };
    let at = now() - days_ago * DAY;
    pb::AppointmentEvent {
        event_id: id.into(),
        appointment_id: format!("appt-{id}"),
        patient_id: patient.into(),
        practice_id: "p1".into(),
        kind: kind as i32,
        occurred_at: ts(at),
        scheduled_for: ts(at + 3 * DAY),
        initiator: initiator as i32,
    }
}

async fn record(
    c: &mut CrisisDetectionClient<Channel>,
    e: pb::AppointmentEvent,
) -> pb::AppointmentEventAck {
    c.record_appointment_event(authed(e, SCHED))
        .await
        .expect("event accepted")
        .into_inner()
}

fn escalated(a: &pb::AppointmentEventAck) -> bool {
    a.outcome == pb::Outcome::Escalated as i32
}

async fn subscribe(
    c: &mut CrisisDetectionClient<Channel>,
    token: Option<&str>,
) -> Streaming<pb::Directive> {
    c.subscribe_directives(authed(
        pb::SubscribeDirectivesRequest {
            practice_id: "p1".into(),
        },
        token,
    ))
    .await
    .expect("subscribed")
    .into_inner()
}

/// Directives that arrive within `wait`.
async fn drain(s: &mut Streaming<pb::Directive>, wait: Duration) -> Vec<pb::Directive> {
    let mut out = Vec::new();
    while let Ok(Ok(Some(d))) = tokio::time::timeout(wait, s.message()).await {
        out.push(d);
    }
    out
}

#[tokio::test]
async fn a_streak_pages_once_and_its_directive_waits_for_a_subscriber() {
    let pages = Arc::new(Pages::default());
    let server = start(&pages).await;
    let mut c = server.client().await;
    let first = record(&mut c, event("e1", "pat-1", 'c', 30)).await;
    let second = record(&mut c, event("e2", "pat-1", 'n', 20)).await;
    assert!(
        !escalated(&first) && !escalated(&second),
        "two are not a streak"
    );
    let third = record(&mut c, event("e3", "pat-1", 'c', 10)).await;
    assert!(escalated(&third));
    assert_eq!(third.rule_ids, vec!["behavior.cancellation_streak"]);
    assert_eq!(pages.settle(1).await, 1, "one page");
    let text = pages.0.lock().expect("pages")[0].clone();
    assert!(!text.contains("pat-1"), "the page names no patient: {text}");

    let e = c
        .get_escalation(authed(
            pb::GetEscalationRequest {
                escalation_id: third.escalation_id.clone(),
            },
            Some("tok-admin"),
        ))
        .await
        .expect("recorded")
        .into_inner();
    assert_eq!(e.tier, pb::Tier::Behavior as i32);
    assert_eq!(e.conversation_id, "appt-e3");
    assert_eq!(e.utterance_id, "e3");
    assert_eq!(e.rule_id, "behavior.cancellation_streak");

    // No gateway was connected: the directive waited. A subscription
    // opened now gets it, once.
    let mut sub = subscribe(&mut c, GATEWAY).await;
    let got = drain(&mut sub, Duration::from_millis(1500)).await;
    assert_eq!(got.len(), 1, "one directive: {got:?}");
    let d = &got[0];
    assert_eq!(d.escalation_id, third.escalation_id);
    assert_eq!(d.tier, pb::Tier::Behavior as i32);
    assert_eq!(d.patient_id, "pat-1");
    assert_eq!(d.practice_id, "p1");
    assert_eq!(d.utterance_id, "e3");
    assert!(d.referral_text.contains("988"));
    assert!(!d.directive_id.is_empty());

    // Not acknowledged: a new subscription (the gateway reconnected) gets
    // it again. Acknowledged: never again.
    drop(sub);
    let mut again = subscribe(&mut c, GATEWAY).await;
    let got = drain(&mut again, Duration::from_millis(1500)).await;
    assert_eq!(
        got.iter().map(|d| &d.directive_id).collect::<Vec<_>>(),
        vec![&d.directive_id]
    );
    c.acknowledge_directive(authed(
        pb::AcknowledgeDirectiveRequest {
            directive_id: d.directive_id.clone(),
        },
        GATEWAY,
    ))
    .await
    .expect("acknowledged");
    // Idempotent.
    c.acknowledge_directive(authed(
        pb::AcknowledgeDirectiveRequest {
            directive_id: d.directive_id.clone(),
        },
        GATEWAY,
    ))
    .await
    .expect("acknowledged again");
    drop(again);
    let mut after = subscribe(&mut c, GATEWAY).await;
    assert!(
        drain(&mut after, Duration::from_millis(1500))
            .await
            .is_empty()
    );

    // A fourth cancellation is inside the cooldown: no second page.
    let fourth = record(&mut c, event("e4", "pat-1", 'c', 5)).await;
    assert!(!escalated(&fourth), "cooldown");
    assert_eq!(pages.settle(1).await, 1);
    server.stop().await;
}

#[tokio::test]
async fn an_open_subscription_gets_directives_as_they_happen_and_other_practices_do_not() {
    let pages = Arc::new(Pages::default());
    let server = start(&pages).await;
    let mut c = server.client().await;
    let mut sub = subscribe(&mut c, GATEWAY).await;
    // A gateway bound to p2 may not subscribe to p1.
    let denied = c
        .subscribe_directives(authed(
            pb::SubscribeDirectivesRequest {
                practice_id: "p1".into(),
            },
            Some("tok-messaging-p2"),
        ))
        .await
        .expect_err("another practice");
    assert_eq!(denied.code(), Code::PermissionDenied);
    for (i, days) in [40, 30, 20].into_iter().enumerate() {
        record(&mut c, event(&format!("s{i}"), "pat-2", 'c', days)).await;
    }
    let got = drain(&mut sub, Duration::from_millis(1500)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].patient_id, "pat-2");
    // The gateway bound to p2 cannot acknowledge p1's directive: as if it
    // did not exist.
    let other = c
        .acknowledge_directive(authed(
            pb::AcknowledgeDirectiveRequest {
                directive_id: got[0].directive_id.clone(),
            },
            Some("tok-messaging-p2"),
        ))
        .await
        .expect_err("not its practice");
    assert_eq!(other.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test]
async fn arrival_order_and_repeats_do_not_change_the_answer() {
    let pages = Arc::new(Pages::default());
    let server = start(&pages).await;
    let mut c = server.client().await;
    // The same three cancellations for three patients, arriving in three
    // orders: each patient escalates once, on whichever arrives last.
    let orders: &[&[usize]] = &[&[0, 1, 2], &[2, 0, 1], &[1, 2, 0]];
    let days = [30, 20, 10];
    for (p, order) in orders.iter().enumerate() {
        let mut answers = Vec::new();
        for &i in *order {
            answers.push(
                record(
                    &mut c,
                    event(&format!("o{p}-{i}"), &format!("pat-o{p}"), 'c', days[i]),
                )
                .await,
            );
        }
        let fired: Vec<bool> = answers.iter().map(escalated).collect();
        assert_eq!(fired, vec![false, false, true], "order {order:?}");
    }
    assert_eq!(pages.settle(3).await, 3, "one page per patient");

    // A repeated event id returns the first answer and changes nothing,
    // even when the repeat says something else.
    let first = record(&mut c, event("o0-2", "pat-o0", 'c', 10)).await;
    let mut changed = event("o0-2", "pat-o0", 'a', 1);
    changed.appointment_id = "appt-other".into();
    let repeat = record(&mut c, changed).await;
    assert!(escalated(&first));
    assert_eq!(first, repeat);
    assert_eq!(pages.settle(3).await, 3, "no page for a repeat");
    server.stop().await;
}

#[tokio::test]
async fn attended_sessions_reset_and_old_events_fall_outside_the_window() {
    let pages = Arc::new(Pages::default());
    let server = start(&pages).await;
    let mut c = server.client().await;
    /// (what, events as (kind, days ago), whether it escalates).
    type Case<'a> = (&'a str, &'a [(char, i64)], bool);
    let cases: &[Case] = &[
        (
            "attended in between",
            &[('c', 30), ('a', 25), ('c', 20), ('c', 10)],
            false,
        ),
        ("outside 45 days", &[('c', 50), ('c', 20), ('c', 4)], false),
        (
            "practice cancellations do not count",
            &[('c', 30), ('p', 20), ('p', 10)],
            false,
        ),
        (
            "practice cancellations do not reset",
            &[('c', 30), ('p', 25), ('c', 20), ('n', 10)],
            true,
        ),
    ];
    for (p, (name, seq, want)) in cases.iter().enumerate() {
        let mut any = false;
        for (i, (kind, days)) in seq.iter().enumerate() {
            let a = record(
                &mut c,
                event(&format!("w{p}-{i}"), &format!("pat-w{p}"), *kind, *days),
            )
            .await;
            any |= escalated(&a);
        }
        assert_eq!(any, *want, "{name}");
    }
    assert_eq!(pages.settle(1).await, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_no_show_after_a_phrase_escalation_attaches_to_it() {
    let pages = Arc::new(Pages::default());
    let server = start(&pages).await;
    let mut c = server.client().await;
    let mut call = LiveCall::open(&mut c, Some("tok-voice"))
        .await
        .expect("call");
    call.send(started("call-1", "pat-3", "p1", "en")).await;
    call.send(patient("u1", "i want to kill myself")).await;
    let d = call
        .next(Duration::from_secs(5))
        .await
        .expect("directive")
        .expect("ok");
    call.send(ended()).await;
    call.finish().await;
    assert_eq!(pages.settle(1).await, 1);
    // The no-show is a day later: Tier 3 sees it, and the patient's page is
    // already out, so it attaches (one page per patient).
    let mut e = event("n1", "pat-3", 'n', 0);
    e.occurred_at = ts(now() + 60);
    let a = record(&mut c, e).await;
    assert!(escalated(&a));
    assert_eq!(a.rule_ids, vec!["behavior.no_show_after_escalation"]);
    assert_eq!(a.escalation_id, d.escalation_id);
    assert_eq!(pages.settle(1).await, 1, "no second page");
    server.stop().await;
}

#[tokio::test]
async fn a_late_cancellation_after_a_review_in_the_last_call() {
    let pages = Arc::new(Pages::default());
    let server = start(&pages).await;
    let mut c = server.client().await;
    // No classifier: the review escalates by the fail-safe. Resolve it, so
    // that what Tier 3 does next stands on its own.
    let mut call = LiveCall::open(&mut c, Some("tok-voice"))
        .await
        .expect("call");
    call.send(started("call-r", "pat-4", "p1", "es")).await;
    call.send(patient("u1", "i cant do this anymore")).await;
    let d = call
        .next(Duration::from_secs(5))
        .await
        .expect("directive")
        .expect("ok");
    assert_eq!(d.tier, pb::Tier::Context as i32);
    call.send(ended()).await;
    call.finish().await;
    // Its page first: resolving cancels a page not yet sent, and the count
    // below is of both escalations' pages.
    assert_eq!(pages.settle(1).await, 1, "the review's page");
    c.resolve_escalation(authed(
        pb::ResolveEscalationRequest {
            escalation_id: d.escalation_id.clone(),
            responder_id: "dr-ortiz".into(),
            disposition: pb::Disposition::PatientSafe as i32,
        },
        Some("tok-admin"),
    ))
    .await
    .expect("resolved");
    // A cancellation with two days' notice: not late.
    let mut early = event("l1", "pat-4", 'c', 0);
    early.occurred_at = ts(now() + 1);
    early.scheduled_for = ts(now() + 2 * DAY);
    assert!(!escalated(&record(&mut c, early).await));
    // Twelve hours before the session: late.
    let mut late = event("l2", "pat-4", 'c', 0);
    late.occurred_at = ts(now() + 2);
    late.scheduled_for = ts(now() + DAY / 2);
    let a = record(&mut c, late).await;
    assert!(escalated(&a));
    assert_eq!(a.rule_ids, vec!["behavior.late_cancellation_after_review"]);
    assert_ne!(a.escalation_id, d.escalation_id, "a new escalation");
    assert_eq!(pages.settle(2).await, 2);
    // The referral is in the language of the patient's last call.
    let mut sub = subscribe(&mut c, GATEWAY).await;
    let got = drain(&mut sub, Duration::from_millis(1500)).await;
    assert_eq!(got.len(), 1);
    assert!(got[0].referral_text.contains("988"));
    assert_ne!(got[0].referral_text, crisisd::config::REFERRAL_EN);
    server.stop().await;
}

#[tokio::test]
async fn directives_survive_a_restart_until_acknowledged() {
    let pages = Arc::new(Pages::default());
    let server = start(&pages).await;
    let mut c = server.client().await;
    for (i, days) in [30, 20, 10].into_iter().enumerate() {
        record(&mut c, event(&format!("r{i}"), "pat-5", 'c', days)).await;
    }
    let dir = server.stop().await;
    let server = start_in(&pages, dir).await;
    let mut c = server.client().await;
    let mut sub = subscribe(&mut c, GATEWAY).await;
    let got = drain(&mut sub, Duration::from_millis(1500)).await;
    assert_eq!(got.len(), 1, "kept across the restart");
    assert_eq!(got[0].patient_id, "pat-5");
    assert_eq!(pages.settle(1).await, 1, "paged once across the restart");
    server.stop().await;
}

#[tokio::test]
async fn bad_events_get_their_status_and_change_nothing() {
    let pages = Arc::new(Pages::default());
    let server = start(&pages).await;
    let mut c = server.client().await;
    let good = || event("b1", "pat-6", 'c', 1);
    type Edit = fn(&mut pb::AppointmentEvent);
    let cases: &[(&str, Edit, Option<&str>, Code, &str)] = &[
        ("no token", |_| {}, None, Code::Unauthenticated, ""),
        (
            "voice role",
            |_| {},
            Some("tok-voice"),
            Code::PermissionDenied,
            "the voice role may not call this method",
        ),
        (
            "another practice's token",
            |_| {},
            Some("tok-scheduling-p2"),
            Code::PermissionDenied,
            "this token may not act for that practice_id",
        ),
        (
            "empty event id",
            |e| e.event_id.clear(),
            SCHED,
            Code::InvalidArgument,
            "event_id must be 1-128 characters",
        ),
        (
            "bad patient id",
            |e| e.patient_id = "has space".into(),
            SCHED,
            Code::InvalidArgument,
            "patient_id must be",
        ),
        (
            "no kind",
            |e| e.kind = 0,
            SCHED,
            Code::InvalidArgument,
            "kind must be one of",
        ),
        (
            "unknown kind",
            |e| e.kind = 99,
            SCHED,
            Code::InvalidArgument,
            "kind must be one of",
        ),
        (
            "cancellation without initiator",
            |e| e.initiator = 0,
            SCHED,
            Code::InvalidArgument,
            "initiator is required",
        ),
        (
            "no occurred_at",
            |e| e.occurred_at = None,
            SCHED,
            Code::InvalidArgument,
            "occurred_at is required",
        ),
        (
            "no scheduled_for",
            |e| e.scheduled_for = None,
            SCHED,
            Code::InvalidArgument,
            "scheduled_for is required",
        ),
        (
            "bad timestamp",
            |e| {
                e.occurred_at = Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: -1,
                })
            },
            SCHED,
            Code::InvalidArgument,
            "occurred_at is not a valid timestamp",
        ),
        (
            "in the future",
            |e| e.occurred_at = ts(now() + 3600),
            SCHED,
            Code::InvalidArgument,
            "occurred_at is more than 5 minutes in the future",
        ),
    ];
    for (name, edit, token, code, message) in cases {
        let mut e = good();
        edit(&mut e);
        let s = c
            .record_appointment_event(authed(e, *token))
            .await
            .expect_err(name);
        assert_eq!(s.code(), *code, "{name}: {}", s.message());
        assert!(s.message().starts_with(message), "{name}: {}", s.message());
        assert!(!s.message().contains("pat-6"), "{name}: no PHI in errors");
    }
    // Nothing was recorded: the good event is new, not a repeat, and the
    // streak counts it as the first.
    for (i, days) in [30, 20].into_iter().enumerate() {
        assert!(!escalated(
            &record(&mut c, event(&format!("b{}", i + 2), "pat-6", 'c', days)).await
        ));
    }
    assert!(escalated(&record(&mut c, good()).await));
    for (id, code) in [
        ("not-a-uuid", Code::InvalidArgument),
        ("0190b5e0-0000-7000-8000-000000000000", Code::NotFound),
    ] {
        let s = c
            .acknowledge_directive(authed(
                pb::AcknowledgeDirectiveRequest {
                    directive_id: id.into(),
                },
                GATEWAY,
            ))
            .await
            .expect_err(id);
        assert_eq!(s.code(), code, "{id}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_behavior_rule_that_cannot_be_evaluated_stops_the_start_by_name() {
    let dir = common::temp_dir("tier3-rules");
    let file = dir.join("behavior.toml");
    std::fs::write(
        &file,
        "[[rule]]\nid = \"behavior.one\"\nseverity = \"low\"\ncooldown = \"1d\"\non = { kinds = [\"no_show\"] }\nstreak = { count = 1, within = \"10d\" }\n",
    )
    .expect("write");
    let config = Config {
        data_dir: dir.display().to_string(),
        tier3: crisisd::config::Tier3 {
            rules: file.display().to_string(),
        },
        ..Config::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = crisisd::server::serve(config, listener, async {}, Default::default())
        .await
        .expect_err("refused");
    let msg = err.to_string();
    assert!(msg.contains("tier3.rules"), "{msg}");
    assert!(
        msg.contains("rule `behavior.one`: `streak.count` must be 2-32, not 1"),
        "{msg}"
    );
}
