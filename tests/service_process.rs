//! The real `crisisd serve` process: PHI never reaches its output, SIGTERM
//! shuts it down cleanly, and the audit log it leaves verifies, and stops
//! verifying when tampered with.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{Serve, free_port, http};
use common::*;
use crisisd::api::pb;
use crisisd::api::pb::crisis_detection_client::CrisisDetectionClient;
use sqlx::Connection;

fn crisisd(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_crisisd"));
    c.current_dir(dir)
        .env("CRISISD_DATA_DIR", dir.join("data"))
        .env_remove("CRISISD_CONFIG");
    c
}

/// GET http://127.0.0.1:port/metrics.
fn scrape(port: u16) -> String {
    http(port, "GET", "/metrics").expect("metrics listener")
}

/// The server and the folder it runs in.
struct Server {
    serve: Serve,
    dir: PathBuf,
    health: String,
}

fn start(metrics_port: u16) -> Server {
    let dir = temp_dir("process");
    let health = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{metrics_port}");
    let mut cmd = crisisd(&dir);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        &metrics,
    ])
    .env("CRISISD_LOG_LEVEL", "debug")
    .env("CRISISD_LOG_FORMAT", "json")
    .env("CRISISD_HEALTH_LISTEN", &health);
    Server {
        serve: Serve::spawn(cmd),
        dir,
        health,
    }
}

/// Sends SIGTERM and waits for a clean exit.
fn terminate(s: &mut Server) {
    let status = Command::new("kill")
        .args(["-TERM", &s.serve.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = s.serve.child.try_wait().expect("wait") {
            assert!(st.success(), "crisisd exited with {st}");
            return;
        }
        assert!(Instant::now() < deadline, "crisisd did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// The canary: what a patient might say and who they are.
const NAME: &str = "Zebulon Quixote";
const PHONE: &str = "+15555550199";
const PATIENT: &str = "CANARYPATIENT-4242";

/// Sends the canary through every RPC and every rejection; returns the
/// status messages the client got back, which must not hold it either.
async fn send_canary_everywhere(addr: &str) -> Vec<String> {
    let mut errors: Vec<String> = Vec::new();
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut c = CrisisDetectionClient::new(ch);
    let sentence = format!("this is {NAME}, call me at {PHONE}, I want to kill myself");
    use pb::Speaker::{Agent, Patient};
    // A call: partials, final, agent speech, a severity rise.
    let (ds, status) = play(
        &mut c,
        None,
        vec![
            started("canary-call", PATIENT, "p1", "en"),
            said("a1", Agent, &format!("Hello {NAME}, how can I help?"), true),
            said("u1", Patient, &sentence[..30], false),
            said("u1", Patient, &sentence, true),
            said(
                "u2",
                Patient,
                &format!(
                    "I have the pills saved up and I'm going to take them all tonight. {PHONE}"
                ),
                true,
            ),
            ended(),
        ],
    )
    .await;
    assert!(status.is_none(), "{status:?}");
    assert!(!ds.is_empty());
    // Bad streams carrying the canary.
    for events in [
        vec![patient("u1", &sentence)],
        vec![
            started("canary-bad", PATIENT, "p1", "en"),
            said(
                "u1",
                Patient,
                &format!("{sentence} {}", "z".repeat(5000)),
                true,
            ),
        ],
        vec![
            started("canary-bad2", PATIENT, "p1", "en"),
            said("u1", pb::Speaker::Unspecified, &sentence, true),
        ],
        vec![started(&format!("{PATIENT} {NAME}"), PATIENT, "p1", "en")],
    ] {
        let (_, status) = play(&mut c, None, events).await;
        errors.push(status.expect("rejected").message().to_string());
    }
    // Texts: escalating, repeated, invalid.
    let m = |id: &str, thread: &str, text: &str| pb::InboundMessage {
        message_id: id.into(),
        patient_id: PATIENT.into(),
        practice_id: "p1".into(),
        thread_id: thread.into(),
        text: text.into(),
        language: "en".into(),
    };
    let v = c
        .submit_message(authed(m("canary-m1", "canary-t1", &sentence), None))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(v.outcome, pb::Outcome::Escalated as i32);
    c.submit_message(authed(m("canary-m1", "canary-t1", &sentence), None))
        .await
        .expect("repeat");
    errors.push(
        c.submit_message(authed(
            m("canary-m2", &format!("t {PHONE}"), &sentence),
            None,
        ))
        .await
        .expect_err("rejected")
        .message()
        .to_string(),
    );
    errors.push(
        c.submit_message(authed(
            m("canary-m3", "canary-t1", &sentence.repeat(600)),
            None,
        ))
        .await
        .expect_err("rejected")
        .message()
        .to_string(),
    );
    // Reads.
    let e = c
        .get_escalation(authed(
            pb::GetEscalationRequest {
                escalation_id: v.escalation_id.clone(),
            },
            None,
        ))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        e.patient_id, PATIENT,
        "the API returns PHI to an authorized reader"
    );
    c.list_escalations(authed(pb::ListEscalationsRequest::default(), None))
        .await
        .expect("list");
    // Tier 3: a streak that fires (it attaches to the open escalation),
    // repeats, bad events, a subscription and its acknowledgement.
    let now = crisisd::escalation::now_ms() / 1000;
    let ts = |s: i64| {
        Some(prost_types::Timestamp {
            seconds: s,
            nanos: 0,
        })
    };
    let appt = |id: &str, days_ago: i64| pb::AppointmentEvent {
        event_id: id.into(),
        appointment_id: format!("canary-appt-{id}"),
        patient_id: PATIENT.into(),
        practice_id: "p1".into(),
        kind: pb::AppointmentEventKind::Cancelled as i32,
        occurred_at: ts(now - days_ago * 86_400),
        scheduled_for: ts(now - days_ago * 86_400 + 3600),
        initiator: pb::Initiator::Patient as i32,
    };
    for (id, days) in [("ce1", 20), ("ce2", 10), ("ce3", 1), ("ce3", 1)] {
        c.record_appointment_event(authed(appt(id, days), None))
            .await
            .expect("event");
    }
    let mut bad = appt("ce4", 1);
    bad.patient_id = format!("{PATIENT} {NAME}");
    errors.push(
        c.record_appointment_event(authed(bad, None))
            .await
            .expect_err("rejected")
            .message()
            .to_string(),
    );
    let mut bad = appt(PHONE, 1);
    bad.initiator = 0;
    errors.push(
        c.record_appointment_event(authed(bad, None))
            .await
            .expect_err("rejected")
            .message()
            .to_string(),
    );
    // A patient without an open escalation: a directive is queued.
    for (id, days) in [("cf1", 20), ("cf2", 10), ("cf3", 1)] {
        let mut e = appt(id, days);
        e.patient_id = format!("{PATIENT}-2");
        c.record_appointment_event(authed(e, None))
            .await
            .expect("event");
    }
    let mut sub = c
        .subscribe_directives(authed(
            pb::SubscribeDirectivesRequest {
                practice_id: "p1".into(),
            },
            None,
        ))
        .await
        .expect("subscribe")
        .into_inner();
    let d = tokio::time::timeout(Duration::from_secs(5), sub.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("a directive");
    assert!(d.patient_id.starts_with(PATIENT));
    c.acknowledge_directive(authed(
        pb::AcknowledgeDirectiveRequest {
            directive_id: d.directive_id,
        },
        None,
    ))
    .await
    .expect("ack");
    errors.push(
        c.acknowledge_directive(authed(
            pb::AcknowledgeDirectiveRequest {
                directive_id: PATIENT.into(),
            },
            None,
        ))
        .await
        .expect_err("rejected")
        .message()
        .to_string(),
    );
    // Responder paths with the canary where an id or a name goes.
    let unknown = crisisd::ids::EscalationId::new().to_string();
    for id in [PATIENT.to_string(), unknown.clone()] {
        errors.push(
            c.get_escalation(authed(
                pb::GetEscalationRequest {
                    escalation_id: id.clone(),
                },
                None,
            ))
            .await
            .expect_err("rejected")
            .message()
            .to_string(),
        );
        errors.push(
            c.acknowledge_escalation(authed(
                pb::AcknowledgeEscalationRequest {
                    escalation_id: id.clone(),
                    responder_id: NAME.into(),
                },
                None,
            ))
            .await
            .expect_err("rejected")
            .message()
            .to_string(),
        );
    }
    let ack = c
        .acknowledge_escalation(authed(
            pb::AcknowledgeEscalationRequest {
                escalation_id: v.escalation_id.clone(),
                responder_id: format!("{PHONE} {NAME}"),
            },
            None,
        ))
        .await;
    if let Err(s) = ack {
        errors.push(s.message().to_string());
    }
    c.resolve_escalation(authed(
        pb::ResolveEscalationRequest {
            escalation_id: v.escalation_id.clone(),
            responder_id: "dr-canary".into(),
            disposition: pb::Disposition::PatientSafe as i32,
        },
        None,
    ))
    .await
    .expect("resolve");
    errors.push(
        c.list_escalations(authed(
            pb::ListEscalationsRequest {
                practice_id: PATIENT.into(),
                page_token: format!("{PATIENT}{NAME}"),
                ..Default::default()
            },
            None,
        ))
        .await
        .expect_err("rejected")
        .message()
        .to_string(),
    );
    errors
}

fn run_cli(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = crisisd(dir).args(args).output().expect("run crisisd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn sql(dir: &Path, statements: &str) -> Result<(), sqlx::Error> {
    let url = format!("sqlite://{}", dir.join("data").join("crisisd.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(statements.to_string()))
        .execute(&mut conn)
        .await?;
    conn.close().await
}

#[test]
fn no_phi_in_output_clean_shutdown_and_a_verifiable_audit_log() {
    let metrics_port = free_port();
    let mut server = start(metrics_port);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let errors = rt.block_on(send_canary_everywhere(&server.serve.addr));
    assert!(errors.len() >= 12, "{errors:?}");
    for e in &errors {
        for canary in [NAME, PHONE, PATIENT, "kill myself", "Zebulon", "4242"] {
            assert!(!e.contains(canary), "an error string holds {canary:?}: {e}");
        }
    }
    // The container's health check: the loopback health endpoint.
    let (ok, text) = run_cli(&server.dir, &["health", "--addr", &server.health]);
    assert!(ok && text.trim() == "SERVING", "{text}");
    // The README's "try it": `crisisd stream FILE` against the server.
    let call = server.dir.join("call.txt");
    std::fs::write(
        &call,
        "hi, can I move my appointment?\nhonestly I just want to\nend my life\n",
    )
    .expect("write");
    let (ok, text) = run_cli(
        &server.dir,
        &[
            "stream",
            "call.txt",
            "--server",
            &format!("http://{}", server.serve.addr),
        ],
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("DIRECTIVE")
            && text.contains("988")
            && text.contains("1 conversations, 1 directives"),
        "{text}"
    );
    let metrics = scrape(metrics_port);
    for name in [
        "crisisd_streams_total",
        "crisisd_utterances_total",
        "crisisd_messages_total",
        "crisisd_detections_total",
        "crisisd_escalations_total",
        "crisisd_rejections_total",
        "crisisd_directive_latency_seconds",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }
    for canary in [NAME, PHONE, PATIENT, "canary-call"] {
        assert!(!metrics.contains(canary), "metrics hold {canary:?}");
    }
    terminate(&mut server);
    let all = server.serve.output();
    // The capture is real: ids and events are there...
    for expected in [
        "canary-call",
        "canary-t1",
        "escalation",
        "stream closed",
        "store closed",
        "PAGE",
    ] {
        assert!(all.contains(expected), "output lacks {expected:?}:\n{all}");
    }
    // ...and nothing of the patient is.
    for canary in [
        NAME,
        "Zebulon",
        "Quixote",
        PHONE,
        "5555550199",
        PATIENT,
        "kill myself",
        "pills",
    ] {
        assert!(!all.contains(canary), "output contains {canary:?}:\n{all}");
    }

    let dir = server.dir.clone();
    let (ok, text) = run_cli(&dir, &["audit", "verify"]);
    assert!(ok && text.contains("audit log intact"), "{text}");
    let (ok, export) = run_cli(&dir, &["audit", "export"]);
    assert!(ok);
    let rows = export.lines().count();
    assert!(rows >= 10, "{export}");
    for canary in [NAME, PHONE, PATIENT, "kill myself"] {
        assert!(!export.contains(canary), "audit holds {canary:?}");
    }
    for action in [
        "stream.open",
        "stream.close",
        "message",
        "escalation.create",
        "escalation.raise",
        "escalation.get",
        "escalation.list",
    ] {
        assert!(
            export.contains(&format!("\"action\":\"{action}\"")),
            "no {action} row"
        );
    }
    let (ok, since) = run_cli(
        &dir,
        &["audit", "export", "--since", "2999-01-01T00:00:00Z"],
    );
    assert!(ok && since.trim().is_empty());

    rt.block_on(async {
        // The database itself refuses to change or remove audit rows.
        let e = sql(&dir, "UPDATE audit SET actor = 'x' WHERE seq = 2")
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("append-only"), "{e}");
        let e = sql(&dir, "DELETE FROM audit WHERE seq = 2")
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("append-only"), "{e}");
        // Someone with the file drops the guard and edits a row.
        sql(
            &dir,
            "DROP TRIGGER audit_no_update; UPDATE audit SET detail = '{}' WHERE seq = 2",
        )
        .await
        .expect("tamper");
    });
    let (ok, text) = run_cli(&dir, &["audit", "verify"]);
    assert!(!ok, "{text}");
    assert!(text.contains("row 2: altered"), "{text}");

    rt.block_on(async {
        sql(
            &dir,
            &format!(
                "DROP TRIGGER audit_no_delete; DELETE FROM audit WHERE seq = 4 OR seq = {rows}"
            ),
        )
        .await
        .expect("tamper");
    });
    let (ok, text) = run_cli(&dir, &["audit", "verify"]);
    assert!(!ok);
    assert!(text.contains("row 5: rows 4..4 are missing"), "{text}");
    assert!(
        text.contains(&format!("rows {rows}..{rows} are missing from the end")),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
