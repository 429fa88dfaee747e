//! Paging through a real SNS implementation: moto's server, installed by
//! this test into a virtualenv under `target/` (PyPI the first time), on a
//! loopback port. The real `crisisd serve` publishes through `aws-sdk-sns`;
//! the tests read back what moto accepted (`GET /moto-api/data.json`,
//! `sns.SMS`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::moto::{BACKUP, Moto, ON_CALL, ROSTER_P1};
use common::process::{Serve, free_port, http};
use common::*;
use crisisd::api::pb::crisis_detection_client::CrisisDetectionClient;

/// Practice p1 (`ROSTER_P1`), and p2 where nobody is ever on call: every
/// page goes to the backup.
const ROSTER_P2: &str = r#"
# Nobody on call, ever: every page goes to the backup.
[[practice]]
id = "p2"
time_zone = "America/Chicago"
backup = "dr-kim"
[[practice.clinician]]
id = "dr-kim"
name = "Dr. Jo Kim"
phone = "+15555550103"
"#;
const P2_BACKUP: &str = "+15555550103";

/// `crisisd serve` paging through SNS at `sns_port`, with its data in `dir`.
fn serve(dir: &Path, sns_port: u16) -> Serve {
    serve_with(dir, sns_port, &[])
}

fn serve_with(dir: &Path, sns_port: u16, env: &[(&str, &str)]) -> Serve {
    std::fs::write(dir.join("roster.toml"), format!("{ROSTER_P1}{ROSTER_P2}")).expect("roster");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crisisd"));
    cmd.current_dir(dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("CRISISD_CONFIG")
        .env("CRISISD_DATA_DIR", dir.join("data"))
        .env("CRISISD_PAGING_NOTIFIER", "sns")
        .env("CRISISD_PAGING_ROSTER", dir.join("roster.toml"))
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

/// The latency test measures milliseconds: it runs with no other test of
/// this binary beside it (they share the disk's fsyncs and both cores, and
/// each starts its own moto and server), so it takes this exclusively and
/// every other test takes it shared. With only the load tests taking it,
/// the others' start-ups beside it once pushed its p99 to 100 ms on a slow
/// day (2026-12-02), where alone it passed three times in three.
static TIMING: std::sync::RwLock<()> = std::sync::RwLock::new(());

const SENTENCE: &str = "My name is Zebulon Quixote and I want to kill myself";

/// One call with one explicit utterance; returns once its directive (and
/// so its committed escalation) is back.
fn escalate(addr: &str, call: &str) -> String {
    escalate_in(addr, call, "p1")
}

fn escalate_in(addr: &str, call: &str, practice: &str) -> String {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
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
                started(call, &format!("patient-{call}"), practice, "en"),
                patient("u1", SENTENCE),
                ended(),
            ],
        )
        .await;
        assert!(status.is_none(), "{status:?}");
        assert_eq!(ds.len(), 1);
        ds[0].escalation_id.clone()
    })
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

fn short(id: &str) -> &str {
    &id[id.len() - 8..]
}

#[test]
fn an_explicit_utterance_pages_the_on_call_clinician_once_without_the_transcript() {
    let _beside = TIMING.read().unwrap_or_else(|e| e.into_inner());
    let moto = Moto::start(free_port());
    let dir = temp_dir("paging");
    let server = serve(&dir, moto.port);
    let id = escalate(&server.addr, "call-page-1");
    let sms = moto.wait_for(1, Duration::from_secs(10));
    // Nothing more arrives.
    std::thread::sleep(Duration::from_millis(1500));
    let sms_after = moto.sms();
    assert_eq!(sms_after.len(), 1, "{sms_after:?}");
    let (to, text) = &sms[0];
    assert_eq!(to, ON_CALL);
    assert!(text.len() <= 160, "{text}");
    assert!(text.contains(short(&id)) && text.contains("HIGH"), "{text}");
    for secret in ["Zebulon", "Quixote", "kill", "patient-call-page-1"] {
        assert!(!text.contains(secret), "the SMS holds {secret:?}: {text}");
    }
    let out = server.output();
    assert!(!out.contains(ON_CALL) && !out.contains("Ortiz"), "{out}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sns_down_then_back_and_a_kill_between_commit_and_send_lose_nothing() {
    let _beside = TIMING.read().unwrap_or_else(|e| e.into_inner());
    let port = free_port();
    let dir = temp_dir("paging");
    // SNS is down: the escalation is recorded, the page waits.
    let mut server = serve(&dir, port);
    let first = escalate(&server.addr, "call-down-1");
    std::thread::sleep(Duration::from_millis(1200));
    // SIGKILL with the second page committed and not sent.
    let second = escalate(&server.addr, "call-down-2");
    let _ = Command::new("kill")
        .args(["-KILL", &server.child.id().to_string()])
        .status();
    let _ = server.child.wait();
    drop(server);
    // SNS comes back; the restarted service sends both, once each.
    let moto = Moto::start(port);
    let server = serve(&dir, port);
    let sms = moto.wait_for(2, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(1500));
    let sms = if moto.sms().len() > sms.len() {
        moto.sms()
    } else {
        sms
    };
    assert_eq!(sms.len(), 2, "{sms:?}");
    for id in [&first, &second] {
        assert_eq!(
            sms.iter().filter(|(_, t)| t.contains(short(id))).count(),
            1,
            "{id}: {sms:?}"
        );
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unacknowledged_pages_repeat_to_primary_and_backup_and_an_acknowledgement_stops_them() {
    let _beside = TIMING.read().unwrap_or_else(|e| e.into_inner());
    let moto = Moto::start(free_port());
    let dir = temp_dir("paging");
    let env = [
        ("CRISISD_PAGING_ACK_TIMEOUT_SECS", "1"),
        ("CRISISD_PAGING_MAX_ROUNDS", "3"),
    ];
    let server = serve_with(&dir, moto.port, &env);

    // Nobody acknowledges: round 1 to the on-call clinician, rounds 2 and
    // 3 to them and the backup, a second apart, then no more.
    let id = escalate(&server.addr, "call-repage");
    let sms = moto.wait_for(5, Duration::from_secs(15));
    std::thread::sleep(Duration::from_millis(2500));
    let sms_after = moto.sms();
    assert_eq!(sms_after.len(), 5, "{sms_after:?}");
    assert!(sms.iter().all(|(_, t)| t.contains(short(&id))));
    let to = |n: &str| sms.iter().filter(|(p, _)| p == n).count();
    assert_eq!((to(ON_CALL), to(BACKUP)), (3, 2), "{sms:?}");
    assert_eq!(sms[0].0, ON_CALL, "round 1 goes to the on-call clinician");

    // Acknowledged after the first page: no second round, also after a
    // restart.
    let _ = http(moto.port, "POST", "/moto-api/reset");
    let id = escalate(&server.addr, "call-ack");
    assert_eq!(moto.wait_for(1, Duration::from_secs(10)).len(), 1);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let e = rt.block_on(acknowledge(&server.addr, &id));
    assert_eq!(
        e.state,
        crisisd::api::pb::EscalationState::Acknowledged as i32
    );
    assert_eq!(e.acknowledged_by, "dr-ortiz");
    let again = rt.block_on(acknowledge(&server.addr, &id));
    assert_eq!(again, e, "acknowledging twice returns the same state");
    drop(server);
    let server = serve_with(&dir, moto.port, &env);
    std::thread::sleep(Duration::from_millis(3000));
    let sms = moto.sms();
    assert_eq!(sms.len(), 1, "{sms:?}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

fn scrape(port: u16) -> String {
    http(port, "GET", "/metrics").unwrap_or_default()
}

fn quantile(metrics: &str, name: &str, q: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(&format!("{name}{{quantile=\"{q}\"}} "))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[test]
fn page_requests_leave_within_50_ms_of_the_escalation() {
    let _quiet = TIMING.write().unwrap_or_else(|e| e.into_inner());
    let moto = Moto::start(free_port());
    let dir = temp_dir("paging");
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let server = serve_with(
        &dir,
        moto.port,
        &[("CRISISD_METRICS_LISTEN", metrics.as_str())],
    );
    let n = 40;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut tasks = Vec::new();
        for caller in 0..4 {
            let addr = server.addr.clone();
            tasks.push(tokio::spawn(async move {
                let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .expect("url")
                    .connect()
                    .await
                    .expect("connect");
                let mut c = CrisisDetectionClient::new(ch);
                for i in 0..n / 4 {
                    let (ds, status) = play(
                        &mut c,
                        None,
                        vec![
                            started(
                                &format!("lat-{caller}-{i}"),
                                &format!("patient-{caller}-{i}"),
                                "p1",
                                "en",
                            ),
                            patient("u1", "I want to kill myself"),
                            ended(),
                        ],
                    )
                    .await;
                    assert!(status.is_none() && ds.len() == 1);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }));
        }
        for t in tasks {
            t.await.expect("caller");
        }
    });
    assert_eq!(moto.wait_for(n, Duration::from_secs(30)).len(), n);
    let m = scrape(metrics_port);
    let name = "crisisd_page_request_latency_seconds";
    let p50 = quantile(&m, name, "0.5").expect("p50");
    let p99 = quantile(&m, name, "0.99").expect("p99");
    let max = quantile(&m, name, "1").expect("max");
    println!(
        "escalation committed -> SNS request, {n} pages: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        p50 * 1e3,
        p99 * 1e3,
        max * 1e3
    );
    assert!(p99 < 0.050, "p99 {p99} s");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nobody_on_call_pages_the_backup_and_a_failing_page_reaches_the_backup_too() {
    let _beside = TIMING.read().unwrap_or_else(|e| e.into_inner());
    let port = free_port();
    let dir = temp_dir("paging");
    let env = [("CRISISD_PAGING_BACKUP_AFTER_FAILURES", "2")];
    // SNS down: the page to p1's on-call clinician fails twice, and the
    // backup is queued as well.
    let server = serve_with(&dir, port, &env);
    let id = escalate(&server.addr, "call-failing");
    std::thread::sleep(Duration::from_millis(3500));
    let moto = Moto::start(port);
    let sms = moto.wait_for(2, Duration::from_secs(20));
    assert_eq!(sms.len(), 2, "{sms:?}");
    let mut to: Vec<&str> = sms.iter().map(|(p, _)| p.as_str()).collect();
    to.sort_unstable();
    assert_eq!(to, [ON_CALL, BACKUP]);
    assert!(sms.iter().all(|(_, t)| t.contains(short(&id))));

    // Practice p2 has nobody on call: its backup is paged, and the output
    // says so by ids only.
    let _ = http(moto.port, "POST", "/moto-api/reset");
    escalate_in(&server.addr, "call-p2", "p2");
    let sms = moto.wait_for(1, Duration::from_secs(10));
    assert_eq!(sms.len(), 1, "{sms:?}");
    assert_eq!(sms[0].0, P2_BACKUP);
    let out = server.output();
    assert!(out.contains("nobody on call"), "{out}");
    assert!(!out.contains(P2_BACKUP) && !out.contains("Kim"), "{out}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_credentials_or_instance_metadata_the_service_still_starts_and_detects() {
    let _beside = TIMING.read().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("paging");
    std::fs::write(dir.join("roster.toml"), format!("{ROSTER_P1}{ROSTER_P2}")).expect("roster");
    let started_at = Instant::now();
    // No AWS variables at all, and instance metadata left enabled: the
    // credential chain would try 169.254.169.254, which answers nothing here.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crisisd"));
    cmd.current_dir(&dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &dir)
        .env("CRISISD_DATA_DIR", dir.join("data"))
        .env("CRISISD_PAGING_NOTIFIER", "sns")
        .env("CRISISD_PAGING_ROSTER", dir.join("roster.toml"));
    let server = Serve::spawn(cmd);
    assert!(started_at.elapsed() < Duration::from_secs(10), "slow start");
    let addr = server.addr.clone();
    let t = Instant::now();
    escalate(&addr, "call-no-aws");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "detection waited {:?}",
        t.elapsed()
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_page_per_patient_while_the_escalation_is_open() {
    let _beside = TIMING.read().unwrap_or_else(|e| e.into_inner());
    let moto = Moto::start(free_port());
    let dir = temp_dir("paging");
    let server = serve(&dir, moto.port);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // The same patient on two calls: each call gets its referral, the
    // clinician one page.
    let ids: Vec<String> = rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut c = CrisisDetectionClient::new(ch);
        let mut ids = Vec::new();
        for call in ["dedup-1", "dedup-2"] {
            let (ds, status) = play(
                &mut c,
                None,
                vec![
                    started(call, "patient-same", "p1", "en"),
                    patient("u1", SENTENCE),
                    ended(),
                ],
            )
            .await;
            assert!(status.is_none());
            assert_eq!(ds.len(), 1, "{call} gets its referral");
            ids.push(ds[0].escalation_id.clone());
        }
        ids
    });
    assert_eq!(ids[0], ids[1], "one escalation");
    let sms = moto.wait_for(1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(moto.sms().len(), 1, "{sms:?}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Plays calls back to back on `callers` concurrent streams, each call one
/// crisis utterance from a patient of its own, until `stop`; returns the
/// escalation ids of every directive that came back. Errors (a killed
/// server) end a caller.
async fn calls_until(
    addr: String,
    callers: usize,
    pause: Duration,
    tag: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<String> {
    let mut tasks = Vec::new();
    for n in 0..callers {
        let (addr, tag, stop) = (addr.clone(), tag.to_string(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let Ok(ch) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .expect("url")
                .connect()
                .await
            else {
                return ids;
            };
            let mut c = CrisisDetectionClient::new(ch);
            for k in 0.. {
                if *stop.borrow() {
                    break;
                }
                let call = format!("{tag}-{n}-{k}");
                let (ds, status) = play(
                    &mut c,
                    None,
                    vec![
                        started(&call, &format!("patient-{call}"), "p1", "en"),
                        patient("u1", SENTENCE),
                        ended(),
                    ],
                )
                .await;
                ids.extend(ds.into_iter().map(|d| d.escalation_id));
                if status.is_some() {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all
}

/// Every id has exactly `per_id` SMS, and there are no others.
fn each_paged(sms: &[(String, String)], ids: &[String], per_id: usize) -> Result<(), String> {
    for id in ids {
        let n = sms.iter().filter(|(_, t)| t.contains(short(id))).count();
        if n != per_id {
            return Err(format!("{id}: {n} SMS, want {per_id}"));
        }
    }
    if sms.len() != ids.len() * per_id {
        return Err(format!("{} SMS for {} escalations", sms.len(), ids.len()));
    }
    Ok(())
}

#[test]
fn sns_down_for_a_minute_under_load_then_every_page_once() {
    let _load = TIMING.read().unwrap_or_else(|e| e.into_inner());
    let port = free_port();
    let dir = temp_dir("paging");
    let server = serve(&dir, port);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // A minute of calls, each escalating, with SNS refusing connections.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let load = rt.spawn(calls_until(
        server.addr.clone(),
        4,
        // About five escalations a second: moto, in Python, then delivers
        // the backlog in well under the wait below.
        Duration::from_millis(800),
        "down".into(),
        stop,
    ));
    std::thread::sleep(Duration::from_secs(60));
    let _ = stop_tx.send(true);
    let ids = rt.block_on(load).expect("load");
    assert!(
        ids.len() >= 100,
        "only {} escalations in a minute",
        ids.len()
    );
    // SNS is back. Every page is sent once; a page that failed three times
    // went to the backup as well, once; none twice. The third failure
    // comes 3-3.75 s after the first (backoff with jitter), later when the
    // machine is busy: escalations older than 15 s certainly had it.
    let back_at_ms = crisisd::escalation::now_ms();
    let moto = Moto::start(port);
    let started = Instant::now();
    moto.wait_for(2 * ids.len(), Duration::from_secs(90));
    let all_in = started.elapsed();
    // Nothing more arrives.
    std::thread::sleep(Duration::from_secs(2));
    let sms = moto.sms();
    let (to_primary, to_backup): (Vec<_>, Vec<_>) =
        sms.iter().cloned().partition(|(to, _)| to == ON_CALL);
    assert!(to_backup.iter().all(|(to, _)| to == BACKUP));
    each_paged(&to_primary, &ids, 1).unwrap_or_else(|e| {
        let missing = ids
            .iter()
            .filter(|id| !to_primary.iter().any(|(_, t)| t.contains(short(id))))
            .count();
        panic!(
            "primary pages: {e}; {missing} of {} escalations unpaged, {} SMS in {:.1}s",
            ids.len(),
            sms.len(),
            all_in.as_secs_f64()
        )
    });
    // A UUIDv7 starts with its creation time in milliseconds.
    let created_ms =
        |id: &str| i64::from_str_radix(&id.replace('-', "")[..12], 16).expect("a UUIDv7");
    let old: Vec<String> = ids
        .iter()
        .filter(|id| back_at_ms - created_ms(id) > 15_000)
        .cloned()
        .collect();
    assert!(
        old.len() * 10 >= ids.len() * 6,
        "{} of {}",
        old.len(),
        ids.len()
    );
    let wrong: Vec<String> = ids
        .iter()
        .filter_map(|id| {
            let n = to_backup
                .iter()
                .filter(|(_, t)| t.contains(short(id)))
                .count();
            let want = if old.contains(id) { 1..=1 } else { 0..=1 };
            (!want.contains(&n)).then(|| {
                format!(
                    "{id} ({} ms before SNS was back): {n}",
                    back_at_ms - created_ms(id)
                )
            })
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} escalations with the wrong number of backup SMS:\n{}\n{}",
        wrong.len(),
        ids.len(),
        wrong.join("\n"),
        server
            .output()
            .lines()
            .filter(|l| l.contains("backup") || l.contains("ERROR"))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        to_backup
            .iter()
            .all(|(_, t)| ids.iter().any(|id| t.contains(short(id)))),
        "a backup SMS for no escalation"
    );
    eprintln!(
        "{} escalations during the outage: {} SMS within {:.1}s of SNS coming back",
        ids.len(),
        sms.len(),
        all_in.as_secs_f64()
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigkill_at_twenty_random_moments_loses_no_acknowledged_escalation() {
    let _load = TIMING.read().unwrap_or_else(|e| e.into_inner());
    let moto = Moto::start(free_port());
    let dir = temp_dir("paging");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Moments from a seed printed here, so a failure can be replayed.
    let seed = std::env::var("CRISISD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| crisisd::escalation::now_ms() as u64);
    eprintln!("seed {seed} (CRISISD_TEST_SEED to replay)");
    let mut x = seed | 1;
    let mut moments = Vec::new();
    let mut ids = Vec::new();
    for round in 0..20 {
        // xorshift: 100-1500 ms into the load.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = Duration::from_millis(100 + x % 1400);
        moments.push(at.as_millis());
        let mut server = serve(&dir, moto.port);
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let load = rt.spawn(calls_until(
            server.addr.clone(),
            4,
            Duration::ZERO,
            format!("k{round}"),
            stop,
        ));
        std::thread::sleep(at);
        let _ = Command::new("kill")
            .args(["-KILL", &server.child.id().to_string()])
            .status();
        let _ = server.child.wait();
        let _ = stop_tx.send(true);
        ids.extend(rt.block_on(load).expect("load"));
    }
    assert!(
        ids.len() >= 20,
        "only {} directives over 20 rounds",
        ids.len()
    );
    // After a last restart, every escalation a client heard of is in the
    // store and paged (at least once: a kill between SNS's answer and the
    // commit that records it sends that page again).
    let server = serve(&dir, moto.port);
    let deadline = Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let sms = moto.sms();
        let missing: Vec<&String> = ids
            .iter()
            .filter(|id| {
                !sms.iter()
                    .any(|(to, t)| to == ON_CALL && t.contains(short(id)))
            })
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        missing.is_empty(),
        "not paged: {missing:?} (kills at {moments:?} ms)"
    );
    rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut c = CrisisDetectionClient::new(ch);
        for id in &ids {
            c.get_escalation(authed(
                crisisd::api::pb::GetEscalationRequest {
                    escalation_id: id.clone(),
                },
                None,
            ))
            .await
            .unwrap_or_else(|s| panic!("{id} not in the store: {s:?}"));
        }
    });
    let sms = moto.sms();
    let repeats = sms.len() - ids.len();
    eprintln!(
        "20 kills at {moments:?} ms: {} escalations acknowledged to clients, all stored and paged; {repeats} page(s) sent twice",
        ids.len()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_crisisd"))
        .current_dir(&dir)
        .args(["audit", "verify"])
        .env_remove("CRISISD_CONFIG")
        .env("CRISISD_DATA_DIR", dir.join("data"))
        .output()
        .expect("audit verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
