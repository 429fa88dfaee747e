//! The gRPC service over real sockets: a tonic client against a server on
//! an ephemeral port, each test with its own server and database.

mod common;

use std::time::Duration;

use common::*;
use crisisd::api::pb;
use crisisd::config::Config;
use tonic::Code;

fn msg(id: &str, thread: &str, text: &str) -> pb::InboundMessage {
    pb::InboundMessage {
        message_id: id.into(),
        patient_id: "patient-7".into(),
        practice_id: "p1".into(),
        thread_id: thread.into(),
        text: text.into(),
        language: "en".into(),
    }
}

#[tokio::test]
async fn call_outcomes_table() {
    let server = TestServer::start(Config::default()).await;
    let mut client = server.client().await;
    use pb::Speaker::{Agent, Patient};
    // (what, events after call_started, directives expected)
    let cases: Vec<(&str, Vec<pb::TranscriptEvent>, usize)> = vec![
        ("explicit", vec![patient("u1", "I want to kill myself")], 1),
        (
            "benign",
            vec![
                patient("u1", "Hi, can I move my Thursday appointment?"),
                patient("u2", "This week has been killing me, work is brutal"),
            ],
            0,
        ),
        (
            "agent speech",
            vec![said(
                "a1",
                Agent,
                "If you are thinking about killing yourself, call 988.",
                true,
            )],
            0,
        ),
        (
            "split across utterances",
            vec![
                patient("u1", "honestly I just want to"),
                patient("u2", "end my life"),
            ],
            1,
        ),
        (
            "partials then final",
            vec![
                said("u1", Patient, "I want to kill", false),
                said("u1", Patient, "I want to kill myself", false),
                said("u1", Patient, "I want to kill myself tonight", false),
                said("u1", Patient, "I want to kill myself tonight", true),
            ],
            1,
        ),
        (
            "repeated final",
            vec![
                patient("u1", "I want to kill myself"),
                patient("u1", "I want to kill myself"),
            ],
            1,
        ),
        (
            "more triggers attach",
            vec![
                patient("u1", "I want to kill myself"),
                patient("u2", "I really want to kill myself"),
            ],
            1,
        ),
        (
            "severity rises",
            vec![
                patient("u1", "sometimes I wish I was dead"),
                patient(
                    "u2",
                    "I have the pills saved up and I'm going to take them all tonight",
                ),
            ],
            2,
        ),
    ];
    for (n, (what, events, want)) in cases.into_iter().enumerate() {
        let mut all = vec![started(&format!("call-{n}"), "patient-1", "p1", "en")];
        all.extend(events);
        all.push(ended());
        let (ds, status) = play(&mut client, None, all).await;
        assert!(status.is_none(), "{what}: {status:?}");
        assert_eq!(ds.len(), want, "{what}: {ds:#?}");
        for d in &ds {
            assert_eq!(d.kind, pb::DirectiveKind::CrisisReferral as i32, "{what}");
            assert!(d.referral_text.contains("988"), "{what}");
            assert!(
                !d.utterance_id.is_empty() && !d.reason_code.is_empty(),
                "{what}"
            );
        }
        if ds.len() == 2 {
            assert_eq!(
                ds[0].escalation_id, ds[1].escalation_id,
                "{what}: one escalation"
            );
            assert!(ds[1].severity > ds[0].severity, "{what}: severity rose");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn directive_arrives_while_the_call_goes_on_and_in_its_language() {
    let server = TestServer::start(Config::default()).await;
    let mut client = server.client().await;
    let mut call = LiveCall::open(&mut client, None).await.expect("open");
    call.send(started("call-es", "patient-2", "p1", "es-MX"))
        .await;
    call.send(patient("u1", "ya no quiero vivir, me quiero matar"))
        .await;
    let d = call
        .next(Duration::from_secs(5))
        .await
        .expect("a directive before the call ends")
        .expect("ok");
    assert_eq!(d.tier, pb::Tier::Phrase as i32);
    assert!(d.referral_text.contains("988") && d.referral_text.contains("Llame"));
    assert_eq!(d.utterance_id, "u1");
    // The escalation was committed before the directive was sent.
    let mut admin = server.client().await;
    let e = admin
        .get_escalation(authed(
            pb::GetEscalationRequest {
                escalation_id: d.escalation_id.clone(),
            },
            None,
        ))
        .await
        .expect("recorded")
        .into_inner();
    assert_eq!(e.conversation_id, "call-es");
    assert_eq!(e.patient_id, "patient-2");
    assert_eq!(e.state, pb::EscalationState::Open as i32);
    call.send(ended()).await;
    let (rest, status) = call.finish().await;
    assert!(rest.is_empty() && status.is_none());
    server.stop().await;
}

#[tokio::test]
async fn texts_of_a_thread_share_a_window_and_repeats_change_nothing() {
    let server = TestServer::start(Config::default()).await;
    let mut c = server.client().await;
    let submit = |c: &mut pb::crisis_detection_client::CrisisDetectionClient<_>, m| {
        let mut c = c.clone();
        async move {
            c.submit_message(authed(m, None))
                .await
                .map(|r| r.into_inner())
        }
    };
    let first = submit(&mut c, msg("m1", "t1", "i think i want to"))
        .await
        .expect("ok");
    assert_eq!(first.outcome, pb::Outcome::None as i32);
    let second = submit(&mut c, msg("m2", "t1", "die")).await.expect("ok");
    assert_eq!(second.outcome, pb::Outcome::Escalated as i32);
    let d = second.directive.clone().expect("directive");
    assert_eq!(d.escalation_id, second.escalation_id);
    assert_eq!(d.utterance_id, "m2");
    // The same id again: the first verdict, and no second escalation.
    let again = submit(&mut c, msg("m2", "t1", "die")).await.expect("ok");
    assert_eq!(again, second);
    // Another thread does not share t1's window.
    let other = submit(&mut c, msg("m3", "t2", "die")).await.expect("ok");
    assert_eq!(other.outcome, pb::Outcome::None as i32);
    // A later trigger in t1 attaches: escalated, same id, no new directive.
    let more = submit(&mut c, msg("m4", "t1", "I want to die"))
        .await
        .expect("ok");
    assert_eq!(more.outcome, pb::Outcome::Escalated as i32);
    assert_eq!(more.escalation_id, second.escalation_id);
    assert!(more.directive.is_none());
    let list = c
        .list_escalations(authed(pb::ListEscalationsRequest::default(), None))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.escalations.len(), 1, "{list:#?}");
    server.stop().await;
}

#[tokio::test]
async fn bad_input_gets_its_status_and_harms_no_other_stream() {
    let mut config = secured(Config::default());
    config.limits.utterances_per_second = 5;
    config.limits.utterance_burst = 5;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let voice = Some("tok-voice");

    // A good call stays open through everything below.
    let mut good = LiveCall::open(&mut client, voice).await.expect("open");
    good.send(started("good-call", "patient-9", "p1", "en"))
        .await;

    let canary = "CANARY-phrase-Zq9";
    let long = format!("{canary} {}", "x".repeat(4096));
    use pb::Speaker::Patient;
    let ok_start = || started("bad-call", "patient-3", "p1", "en");
    let cases: Vec<(&str, Option<&str>, Vec<pb::TranscriptEvent>, Code)> = vec![
        (
            "no call_started first",
            voice,
            vec![patient("u1", canary)],
            Code::InvalidArgument,
        ),
        (
            "call_started twice",
            voice,
            vec![ok_start(), ok_start()],
            Code::InvalidArgument,
        ),
        (
            "empty event",
            voice,
            vec![ok_start(), pb::TranscriptEvent { event: None }],
            Code::InvalidArgument,
        ),
        (
            "unknown speaker",
            voice,
            vec![
                ok_start(),
                pb::TranscriptEvent {
                    event: Some(pb::transcript_event::Event::Utterance(pb::Utterance {
                        utterance_id: "u1".into(),
                        speaker: 42,
                        text: canary.into(),
                        is_final: true,
                    })),
                },
            ],
            Code::InvalidArgument,
        ),
        (
            "unspecified speaker",
            voice,
            vec![
                ok_start(),
                said("u1", pb::Speaker::Unspecified, canary, true),
            ],
            Code::InvalidArgument,
        ),
        (
            "empty text",
            voice,
            vec![ok_start(), said("u1", Patient, "   ", true)],
            Code::InvalidArgument,
        ),
        (
            "oversized text",
            voice,
            vec![ok_start(), said("u1", Patient, &long, true)],
            Code::InvalidArgument,
        ),
        (
            "invalid call id",
            voice,
            vec![started("bad id!", "patient-3", "p1", "en")],
            Code::InvalidArgument,
        ),
        (
            "invalid patient id",
            voice,
            vec![started("c1", canary.replace('-', " ").as_str(), "p1", "en")],
            Code::InvalidArgument,
        ),
        (
            "invalid utterance id",
            voice,
            vec![ok_start(), said("", Patient, "hello", true)],
            Code::InvalidArgument,
        ),
        (
            "bad language",
            voice,
            vec![started("c1", "patient-3", "p1", "klingon!")],
            Code::InvalidArgument,
        ),
        (
            "missing token",
            None,
            vec![ok_start()],
            Code::Unauthenticated,
        ),
        (
            "wrong token",
            Some("tok-nope"),
            vec![ok_start()],
            Code::Unauthenticated,
        ),
        (
            "wrong role",
            Some("tok-messaging"),
            vec![ok_start()],
            Code::PermissionDenied,
        ),
        (
            "too many utterances per second",
            voice,
            std::iter::once(ok_start())
                .chain((0..20).map(|i| patient(&format!("u{i}"), "just checking in about my bill")))
                .collect(),
            Code::ResourceExhausted,
        ),
    ];
    for (what, token, events, want) in cases {
        let (ds, status) = play(&mut client, token, events).await;
        let status = status.unwrap_or_else(|| panic!("{what}: no error"));
        assert_eq!(status.code(), want, "{what}: {}", status.message());
        assert!(ds.is_empty(), "{what}");
        assert!(
            !status.message().contains("CANARY") && !status.message().contains("patient-3"),
            "{what}: {}",
            status.message()
        );
    }

    // Messages: size, emptiness, role.
    let messaging = Some("tok-messaging");
    let mut big = msg(
        "m-big",
        "t1",
        &format!("{canary} {}", "y".repeat(16 * 1024)),
    );
    big.patient_id = "patient-5".into();
    let msg_cases: Vec<(&str, Option<&str>, pb::InboundMessage, Code)> = vec![
        ("oversized message", messaging, big, Code::InvalidArgument),
        (
            "empty message",
            messaging,
            msg("m-empty", "t1", ""),
            Code::InvalidArgument,
        ),
        (
            "bad thread id",
            messaging,
            msg("m-x", "t 1", canary),
            Code::InvalidArgument,
        ),
        (
            "voice may not text",
            voice,
            msg("m-v", "t1", canary),
            Code::PermissionDenied,
        ),
        (
            "no token",
            None,
            msg("m-n", "t1", canary),
            Code::Unauthenticated,
        ),
    ];
    for (what, token, m, want) in msg_cases {
        let s = client
            .submit_message(authed(m, token))
            .await
            .expect_err(what);
        assert_eq!(s.code(), want, "{what}: {}", s.message());
        assert!(!s.message().contains("CANARY"), "{what}");
    }

    // The good call is unharmed: it still detects and answers.
    good.send(patient("u1", "I am going to kill myself")).await;
    let d = good
        .next(Duration::from_secs(5))
        .await
        .expect("directive")
        .expect("ok");
    assert!(d.referral_text.contains("988"));
    good.send(ended()).await;
    let (_, status) = good.finish().await;
    assert!(status.is_none());
    server.stop().await;
}

#[tokio::test]
async fn idle_streams_close_and_the_stream_count_is_capped() {
    let mut config = Config::default();
    config.limits.max_streams = 6;
    config.limits.idle_timeout_secs = 1;
    let server = TestServer::start(config).await;
    let mut client = server.client().await;
    let ok_start = || started("bad-call", "patient-3", "p1", "en");
    // A good call, kept busy, stays open through everything below.
    let mut good = LiveCall::open(&mut client, None).await.expect("open");
    good.send(started("good-call", "patient-9", "p1", "en"))
        .await;
    let keepalive = {
        let tx = good.tx.clone();
        tokio::spawn(async move {
            for i in 0.. {
                let ev = patient(&format!("k{i}"), "still here, just checking my bill");
                if tx.send(ev).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    // Idle past the timeout.
    let mut idle = LiveCall::open(&mut client, None).await.expect("open");
    idle.send(ok_start()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = idle
        .next(Duration::from_secs(5))
        .await
        .expect("ends")
        .expect_err("idle error");
    assert_eq!(s.code(), Code::DeadlineExceeded);
    drop(idle);

    // The good one plus five more fill the server.
    let mut held = Vec::new();
    for i in 0..5 {
        let c = LiveCall::open(&mut client, None).await.expect("open");
        c.send(started(&format!("hold-{i}"), "patient-4", "p1", "en"))
            .await;
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, status) = play(&mut client, None, vec![ok_start()]).await;
    assert_eq!(status.expect("refused").code(), Code::ResourceExhausted);
    drop(held);

    keepalive.abort();
    good.send(patient("u1", "I am going to kill myself")).await;
    let d = good
        .next(Duration::from_secs(5))
        .await
        .expect("directive")
        .expect("ok");
    assert!(d.referral_text.contains("988"));
    server.stop().await;
}

#[tokio::test]
async fn responders_read_their_own_practice_and_admins_all() {
    let server = TestServer::start(secured(Config::default())).await;
    let mut c = server.client().await;
    for (i, practice) in ["p1", "p1", "p1", "p2"].iter().enumerate() {
        let mut m = msg(&format!("m{i}"), &format!("t{i}"), "I want to end my life");
        m.practice_id = practice.to_string();
        // Distinct patients: one patient's escalations would merge.
        m.patient_id = format!("patient-{i}");
        let v = c
            .submit_message(authed(m, Some("tok-messaging")))
            .await
            .expect("ok")
            .into_inner();
        assert_eq!(v.outcome, pb::Outcome::Escalated as i32);
    }
    let list = |token: &'static str, practice: &str, page_size: u32, page_token: String| {
        let mut c = c.clone();
        let req = pb::ListEscalationsRequest {
            practice_id: practice.into(),
            page_size,
            page_token,
            ..Default::default()
        };
        async move {
            c.list_escalations(authed(req, Some(token)))
                .await
                .map(|r| r.into_inner())
        }
    };
    // A responder defaults to, and is held to, its own practice.
    let own = list("tok-responder-p1", "", 0, String::new())
        .await
        .expect("ok");
    assert_eq!(own.escalations.len(), 3);
    assert!(own.escalations.iter().all(|e| e.practice_id == "p1"));
    let s = list("tok-responder-p1", "p2", 0, String::new())
        .await
        .expect_err("other practice");
    assert_eq!(s.code(), Code::PermissionDenied);
    // Pages of two, newest first, then the rest.
    let page1 = list("tok-responder-p1", "p1", 2, String::new())
        .await
        .expect("ok");
    assert_eq!(page1.escalations.len(), 2);
    assert!(!page1.next_page_token.is_empty());
    let page2 = list("tok-responder-p1", "p1", 2, page1.next_page_token.clone())
        .await
        .expect("ok");
    assert_eq!(page2.escalations.len(), 1);
    assert!(page2.next_page_token.is_empty());
    assert!(page1.escalations[0].created_at_ms >= page2.escalations[0].created_at_ms);
    let s = list("tok-responder-p1", "p1", 2, "forged".into())
        .await
        .expect_err("bad token");
    assert_eq!(s.code(), Code::InvalidArgument);
    // Admin sees every practice.
    let all = list("tok-admin", "", 0, String::new()).await.expect("ok");
    assert_eq!(all.escalations.len(), 4);
    // Another practice's escalation is as if absent to a responder.
    let p2 = all
        .escalations
        .iter()
        .find(|e| e.practice_id == "p2")
        .expect("p2");
    let get = |token: &'static str, id: String| {
        let mut c = c.clone();
        async move {
            c.get_escalation(authed(
                pb::GetEscalationRequest { escalation_id: id },
                Some(token),
            ))
            .await
            .map(|r| r.into_inner())
        }
    };
    assert_eq!(
        get("tok-responder-p1", p2.escalation_id.clone())
            .await
            .expect_err("hidden")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        get("tok-responder-p2", p2.escalation_id.clone())
            .await
            .expect("own")
            .practice_id,
        "p2"
    );
    assert_eq!(
        get("tok-voice", p2.escalation_id.clone())
            .await
            .expect_err("role")
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        get("tok-admin", "not-an-id".into())
            .await
            .expect_err("bad id")
            .code(),
        Code::InvalidArgument
    );
    server.stop().await;
}

#[tokio::test]
async fn health_and_reflection_answer() {
    let server = TestServer::start(Config::default()).await;
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "crisis.v1.CrisisDetection".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}

#[tokio::test]
async fn acknowledging_and_resolving() {
    let server = TestServer::start(secured(Config::default())).await;
    let mut c = server.client().await;
    let v = c
        .submit_message(authed(
            msg("m1", "t1", "I want to end my life"),
            Some("tok-messaging"),
        ))
        .await
        .expect("ok")
        .into_inner();
    let id = v.escalation_id.clone();
    let ack = |token: &'static str, id: String, responder: &str| {
        let mut c = c.clone();
        let req = pb::AcknowledgeEscalationRequest {
            escalation_id: id,
            responder_id: responder.into(),
        };
        async move {
            c.acknowledge_escalation(authed(req, Some(token)))
                .await
                .map(|r| r.into_inner())
        }
    };
    let resolve = |token: &'static str, id: String, disposition: pb::Disposition| {
        let mut c = c.clone();
        let req = pb::ResolveEscalationRequest {
            escalation_id: id,
            responder_id: "dr-ortiz".into(),
            disposition: disposition as i32,
        };
        async move {
            c.resolve_escalation(authed(req, Some(token)))
                .await
                .map(|r| r.into_inner())
        }
    };
    let unknown = crisisd::ids::EscalationId::new().to_string();
    for (what, got, want) in [
        (
            "voice may not",
            ack("tok-voice", id.clone(), "dr-ortiz").await.map(|_| ()),
            Code::PermissionDenied,
        ),
        (
            "other practice",
            ack("tok-responder-p2", id.clone(), "dr-ortiz")
                .await
                .map(|_| ()),
            Code::NotFound,
        ),
        (
            "unknown id",
            ack("tok-responder-p1", unknown.clone(), "dr-ortiz")
                .await
                .map(|_| ()),
            Code::NotFound,
        ),
        (
            "bad id",
            ack("tok-responder-p1", "nope".into(), "dr-ortiz")
                .await
                .map(|_| ()),
            Code::InvalidArgument,
        ),
        (
            "bad responder",
            ack("tok-responder-p1", id.clone(), "dr ortiz!")
                .await
                .map(|_| ()),
            Code::InvalidArgument,
        ),
        (
            "no disposition",
            resolve("tok-responder-p1", id.clone(), pb::Disposition::Unspecified)
                .await
                .map(|_| ()),
            Code::InvalidArgument,
        ),
    ] {
        assert_eq!(got.expect_err(what).code(), want, "{what}");
    }
    let first = ack("tok-responder-p1", id.clone(), "dr-ortiz")
        .await
        .expect("ack");
    assert_eq!(first.state, pb::EscalationState::Acknowledged as i32);
    assert!(first.acknowledged_at_ms > 0);
    let second = ack("tok-responder-p1", id.clone(), "dr-lee")
        .await
        .expect("ack again");
    assert_eq!(second, first, "the first acknowledgement stands");
    let done = resolve("tok-admin", id.clone(), pb::Disposition::PatientSafe)
        .await
        .expect("resolve");
    assert_eq!(done.state, pb::EscalationState::Resolved as i32);
    assert_eq!(done.disposition, pb::Disposition::PatientSafe as i32);
    let again = resolve("tok-responder-p1", id.clone(), pb::Disposition::FalseAlarm)
        .await
        .expect("again");
    assert_eq!(again, done, "the first resolution stands");
    // Acknowledging a resolved escalation changes nothing either.
    assert_eq!(
        ack("tok-responder-p1", id.clone(), "dr-ortiz")
            .await
            .expect("ack"),
        done
    );

    let dir = server.stop().await;
    let store = crisisd::store::sqlite::SqliteStore::open(&dir.join("crisisd.db"))
        .await
        .expect("open");
    let rows = crisisd::store::Store::audit_rows(&store, 0)
        .await
        .expect("rows");
    let count = |a: &str| rows.iter().filter(|r| r.action == a).count();
    assert_eq!(
        (count("escalation.acknowledge"), count("escalation.resolve")),
        (1, 1)
    );
    assert_eq!(crisisd::audit::verify(&rows), vec![]);
}

/// Per-stream buffers start at 1 KiB (src/api/codec.rs) and grow: messages
/// right at the size limits still arrive whole and are judged.
#[tokio::test]
async fn messages_at_the_size_limits_are_judged_whole() {
    let config = Config::default();
    let (max_utt, max_msg) = (
        config.limits.max_utterance_bytes,
        config.limits.max_message_bytes,
    );
    let server = TestServer::start(config).await;
    let mut c = server.client().await;
    let tail = " and i want to kill myself";
    let utterance = format!("{}{tail}", "a ".repeat((max_utt - tail.len()) / 2));
    assert!(utterance.len() <= max_utt && utterance.len() > max_utt - 2);
    let (ds, status) = play(
        &mut c,
        None,
        vec![
            started("call-big", "patient-big", "p1", "en"),
            patient("u1", &utterance),
            ended(),
        ],
    )
    .await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(ds.len(), 1, "the crisis words at the end were read");
    let text = format!("{}{tail}", "b ".repeat((max_msg - tail.len()) / 2));
    assert!(text.len() <= max_msg && text.len() > max_msg - 2);
    let v = c
        .submit_message(authed(msg("m-big", "t-big", &text), None))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(v.outcome, pb::Outcome::Escalated as i32);
    server.stop().await;
}
