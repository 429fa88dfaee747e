//! Several replicas on one PostgreSQL database: real `crisisd serve`
//! processes sharing a schema of their own on the test server (see
//! common/pg.rs), paging through moto's SNS. One patient escalated on two
//! replicas at once is one escalation and one SMS; many escalations spread
//! over both are as many SMS, none twice; a replica SIGKILLed while holding
//! page claims has its pages sent by the other once the lease runs out; and
//! an escalation made on one replica is re-paged once per round, not once
//! per replica, and an acknowledgement on the other stops it; and the
//! audit chain both wrote stays one valid chain.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::moto::{Moto, ROSTER_P1};
use common::process::{Serve, free_port};
use common::*;
use crisisd::api::pb::crisis_detection_client::CrisisDetectionClient;

/// A lease short enough for a test to wait out (longer than twice the
/// SNS timeout below, as the config requires).
const LEASE_SECS: &str = "3";
const SNS_TIMEOUT_MS: &str = "1400";

/// The environment every replica and the CLI share: the database and the
/// patient reference key.
fn shared_env(cmd: &mut Command, url: &str) {
    cmd.env_remove("CRISISD_CONFIG")
        .env("CRISISD_STORE_URL", url)
        .env("CRISISD_STORE_MAX_CONNECTIONS", "8")
        .env("CRISISD_PAGING_PATIENT_REF_SECRET", "replica-test-key");
}

/// One `crisisd serve` on the shared database, paging through SNS at
/// `sns_port`.
fn replica(dir: &Path, url: &str, sns_port: u16) -> Serve {
    replica_with(dir, url, sns_port, &[])
}

fn replica_with(dir: &Path, url: &str, sns_port: u16, env: &[(&str, &str)]) -> Serve {
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(dir.join("roster.toml"), ROSTER_P1).expect("roster");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crisisd"));
    shared_env(&mut cmd, url);
    cmd.current_dir(dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("CRISISD_DATA_DIR", dir.join("data"))
        .env("CRISISD_PAGING_NOTIFIER", "sns")
        .env("CRISISD_PAGING_ROSTER", dir.join("roster.toml"))
        .env("CRISISD_PAGING_CLAIM_LEASE_SECS", LEASE_SECS)
        .env("CRISISD_SNS_TIMEOUT_MS", SNS_TIMEOUT_MS)
        .env(
            "CRISISD_SNS_ENDPOINT_URL",
            format!("http://127.0.0.1:{sns_port}"),
        )
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().copied());
    Serve::spawn(cmd)
}

/// `crisisd audit verify` on the shared database passes.
fn audit_verifies(url: &str) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crisisd"));
    shared_env(&mut cmd, url);
    let out = cmd.args(["audit", "verify"]).output().expect("run");
    assert!(
        out.status.success(),
        "audit verify failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const SENTENCE: &str = "I want to kill myself";

/// One call of `patient` on the replica at `addr`; the escalation id of its
/// one directive.
async fn call(addr: &str, call: &str, patient_id: &str) -> String {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut c = CrisisDetectionClient::new(ch);
    let (ds, status) = play(
        &mut c,
        None,
        vec![
            started(call, patient_id, "p1", "en"),
            patient("u1", SENTENCE),
            ended(),
        ],
    )
    .await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(ds.len(), 1, "one directive");
    ds[0].escalation_id.clone()
}

fn short(id: &str) -> &str {
    &id[id.len() - 8..]
}

/// The short escalation ids in the SMS moto accepted.
fn paged(moto: &Moto) -> Vec<String> {
    moto.sms()
        .iter()
        .filter_map(|(_, text)| {
            text.split("escalation ")
                .nth(1)
                .and_then(|t| t.split(',').next())
                .map(str::to_string)
        })
        .collect()
}

/// Waits for `n` SMS, then a moment more for any extra one.
fn settle(moto: &Moto, n: usize, within: Duration) -> Vec<String> {
    moto.wait_for(n, within);
    std::thread::sleep(Duration::from_millis(1500));
    paged(moto)
}

#[test]
fn one_patient_escalated_on_two_replicas_at_once_is_one_escalation_and_one_sms() {
    let Some(url) = common::pg::database("replicas::one_patient") else {
        return;
    };
    let moto = Moto::start(free_port());
    let dir = temp_dir("replicas");
    let a = replica(&dir.join("a"), &url, moto.port);
    let b = replica(&dir.join("b"), &url, moto.port);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Ten patients, each calling both replicas at the same moment.
    let pairs: Vec<(String, String)> = rt.block_on(async {
        let mut tasks = Vec::new();
        for n in 0..10 {
            let (x, y) = (a.addr.clone(), b.addr.clone());
            let p = format!("patient-{n}");
            tasks.push(tokio::spawn(async move {
                let (call_a, call_b) = (format!("a-{n}"), format!("b-{n}"));
                tokio::join!(call(&x, &call_a, &p), call(&y, &call_b, &p))
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    for (x, y) in &pairs {
        assert_eq!(x, y, "both calls got the one escalation");
    }
    let sms = settle(&moto, 10, Duration::from_secs(20));
    assert_eq!(sms.len(), 10, "one SMS per patient: {sms:?}");
    let want: HashSet<&str> = pairs.iter().map(|(x, _)| short(x)).collect();
    let got: HashSet<&str> = sms.iter().map(String::as_str).collect();
    assert_eq!(got, want);
    drop((a, b));
    audit_verifies(&url);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_hundred_escalations_over_two_replicas_are_two_hundred_sms_none_twice() {
    let Some(url) = common::pg::database("replicas::two_hundred") else {
        return;
    };
    let moto = Moto::start(free_port());
    let dir = temp_dir("replicas");
    let a = replica(&dir.join("a"), &url, moto.port);
    let b = replica(&dir.join("b"), &url, moto.port);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ids: Vec<String> = rt.block_on(async {
        let mut tasks = Vec::new();
        for n in 0..200 {
            let addr = if n % 2 == 0 { &a.addr } else { &b.addr }.clone();
            tasks.push(tokio::spawn(async move {
                call(&addr, &format!("call-{n}"), &format!("patient-{n}")).await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    let want: HashSet<&str> = ids.iter().map(|i| short(i)).collect();
    assert_eq!(want.len(), 200, "200 escalations");
    let sms = settle(&moto, 200, Duration::from_secs(60));
    let got: HashSet<&str> = sms.iter().map(String::as_str).collect();
    assert_eq!(sms.len(), 200, "no SMS twice, none lost");
    assert_eq!(got, want);
    // Whichever pager sent each page, it was sent once.
    let sent = |s: &Serve| s.output().matches("page sent").count();
    let (by_a, by_b) = (sent(&a), sent(&b));
    assert_eq!(by_a + by_b, 200, "sent by A {by_a}, by B {by_b}");
    drop((a, b));
    audit_verifies(&url);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `f` on the shared database, from a thread of its own.
fn query<T: Send + 'static>(
    url: &str,
    f: impl AsyncFnOnce(&sqlx::PgPool) -> T + Send + 'static,
) -> T {
    let url = url.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async move {
            let pool = sqlx::PgPool::connect(&url).await.expect("connect");
            let r = f(&pool).await;
            pool.close().await;
            r
        })
    })
    .join()
    .expect("thread")
}

/// Each undelivered page with its live claim's end, if any.
fn claims(url: &str) -> Vec<(i64, Option<i64>)> {
    query(url, async |pool| {
        sqlx::query_as(
            "SELECT id, CASE WHEN claimed_until_ms > $1 THEN claimed_until_ms END
             FROM outbox WHERE delivered_at_ms IS NULL",
        )
        .bind(crisisd::escalation::now_ms())
        .fetch_all(pool)
        .await
        .expect("query")
    })
}

/// Each delivered page with when it was delivered.
fn deliveries(url: &str) -> Vec<(i64, i64)> {
    query(url, async |pool| {
        sqlx::query_as("SELECT id, delivered_at_ms FROM outbox WHERE delivered_at_ms IS NOT NULL")
            .fetch_all(pool)
            .await
            .expect("query")
    })
}

#[test]
fn a_replica_killed_holding_claims_has_its_pages_sent_by_the_other_after_the_lease() {
    let Some(url) = common::pg::database("replicas::killed") else {
        return;
    };
    // Replica A's SNS accepts connections and never answers: its sends
    // hang, holding their claims, until it is killed.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hole_port = hole.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hole.incoming().flatten() {
            held.push(s);
        }
    });
    let dir = temp_dir("replicas");
    let mut a = replica(&dir.join("a"), &url, hole_port);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ids: Vec<String> = rt.block_on(async {
        let mut out = Vec::new();
        for n in 0..5 {
            out.push(call(&a.addr, &format!("call-{n}"), &format!("patient-{n}")).await);
        }
        out
    });
    // Kill A while it holds every page's claim.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = claims(&url).iter().filter(|c| c.1.is_some()).count();
        if held == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A never held the claims ({held})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    a.child.kill().expect("SIGKILL");
    let _ = a.child.wait();
    // What A held when it died (a send may have failed and let one go).
    let held = claims(&url);
    assert_eq!(held.len(), 5);
    assert!(held.iter().any(|c| c.1.is_some()), "A died holding claims");

    let moto = Moto::start(free_port());
    let b = replica(&dir.join("b"), &url, moto.port);
    let sms = settle(&moto, 5, Duration::from_secs(20));
    assert_eq!(sms.len(), 5, "each page sent once: {sms:?}");
    let want: HashSet<&str> = ids.iter().map(|i| short(i)).collect();
    let got: HashSet<&str> = sms.iter().map(String::as_str).collect();
    assert_eq!(got, want);
    // B took over each page A held only once its lease ran out.
    let delivered = deliveries(&url);
    assert_eq!(delivered.len(), 5);
    for (page, until) in held {
        let at = delivered.iter().find(|d| d.0 == page).expect("delivered").1;
        if let Some(until) = until {
            assert!(
                at >= until,
                "page {page} sent at {at}, its lease ran to {until}"
            );
        }
    }
    drop(b);
    audit_verifies(&url);
    let _ = std::fs::remove_dir_all(&dir);
}

async fn acknowledge(addr: &str, id: &str) -> crisisd::api::pb::Escalation {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    CrisisDetectionClient::new(ch)
        .acknowledge_escalation(authed(
            crisisd::api::pb::AcknowledgeEscalationRequest {
                escalation_id: id.to_string(),
                responder_id: "dr-ortiz".into(),
            },
            None,
        ))
        .await
        .expect("acknowledged")
        .into_inner()
}

#[test]
fn re_paging_is_once_per_round_across_replicas_and_either_takes_the_acknowledgement() {
    let Some(url) = common::pg::database("replicas::repage") else {
        return;
    };
    let moto = Moto::start(free_port());
    let dir = temp_dir("replicas");
    let env = [("CRISISD_PAGING_ACK_TIMEOUT_SECS", "2")];
    let a = replica_with(&dir.join("a"), &url, moto.port, &env);
    let b = replica_with(&dir.join("b"), &url, moto.port, &env);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let id = rt.block_on(call(&a.addr, "call-1", "patient-1"));
    // The first page, then one round (primary and backup) after the
    // timeout: both replicas re-page, the round is queued once.
    assert_eq!(moto.wait_for(3, Duration::from_secs(15)).len(), 3);
    let acked = rt.block_on(acknowledge(&b.addr, &id));
    assert_eq!(
        acked.state,
        crisisd::api::pb::EscalationState::Acknowledged as i32
    );
    // Past another timeout: acknowledged on B, A does not page again.
    std::thread::sleep(Duration::from_secs(4));
    let sms = paged(&moto);
    assert_eq!(sms.len(), 3, "one page and one round: {sms:?}");
    assert!(sms.iter().all(|s| s == short(&id)));
    drop((a, b));
    audit_verifies(&url);
    let _ = std::fs::remove_dir_all(&dir);
}
