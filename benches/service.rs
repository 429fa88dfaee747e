//! Utterance received → directive sent, server side, at moderate load.
//!
//! Starts the real server in-process on an ephemeral port (SQLite in a
//! temp dir, WAL, synchronous=FULL), opens CALLS concurrent calls over real
//! gRPC sockets, and has each speak at about SPEECH_HZ utterances a second,
//! one in ten a crisis phrase that escalates (a new call per escalation).
//! The server records the latency of every directive it sends
//! (`crisisd_directive_latency_seconds`); this reads the quantiles back from
//! the metrics recorder and also times the round trip at the client.
//!
//! `cargo bench --bench service` (release). Exits 1 if p99 is 5 ms or more.

use std::time::{Duration, Instant};

use crisisd::api::pb;
use crisisd::api::pb::crisis_detection_client::CrisisDetectionClient;
use crisisd::config::Config;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CALLS: usize = 32;
const SPEECH_HZ: u64 = 10;
const ROUNDS: usize = 40;
const P99_LIMIT: Duration = Duration::from_millis(5);

fn ev(e: pb::transcript_event::Event) -> pb::TranscriptEvent {
    pb::TranscriptEvent { event: Some(e) }
}

fn utterance(i: usize, text: &str) -> pb::TranscriptEvent {
    ev(pb::transcript_event::Event::Utterance(pb::Utterance {
        utterance_id: format!("u{i}"),
        speaker: pb::Speaker::Patient as i32,
        text: text.into(),
        is_final: true,
    }))
}

/// One caller: ROUNDS calls, each nine benign utterances then a crisis one.
async fn caller(addr: std::net::SocketAddr, n: usize) -> Vec<Duration> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = CrisisDetectionClient::new(ch);
    let benign = [
        "Hi, I'm calling to move my appointment to next Tuesday if possible",
        "Yes, the afternoon works better for me because of work",
        "My insurance changed last month, do you need the new card?",
    ];
    let mut round_trips = Vec::new();
    let pace = Duration::from_millis(1000 / SPEECH_HZ);
    for round in 0..ROUNDS {
        let (tx, rx) = mpsc::channel(16);
        let mut directives = client
            .stream_transcript(ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        tx.send(ev(pb::transcript_event::Event::CallStarted(
            pb::CallStarted {
                call_id: format!("bench-{n}-{round}"),
                // A patient per call: each call is a new escalation, committed.
                patient_id: format!("patient-{n}-{round}"),
                practice_id: "bench".into(),
                language: "en".into(),
            },
        )))
        .await
        .expect("send");
        for i in 0..9 {
            tx.send(utterance(i, benign[i % benign.len()]))
                .await
                .expect("send");
            tokio::time::sleep(pace).await;
        }
        let sent = Instant::now();
        tx.send(utterance(9, "honestly I just want to kill myself"))
            .await
            .expect("send");
        let d = directives
            .message()
            .await
            .expect("ok")
            .expect("a directive");
        round_trips.push(sent.elapsed());
        assert!(d.referral_text.contains("988"));
        tx.send(ev(pb::transcript_event::Event::CallEnded(pb::CallEnded {})))
            .await
            .expect("send");
        drop(tx);
        while directives.message().await.ok().flatten().is_some() {}
        tokio::time::sleep(pace).await;
    }
    round_trips
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn server_quantile(rendered: &str, q: &str) -> Option<f64> {
    rendered.lines().find_map(|l| {
        l.strip_prefix(&format!(
            "crisisd_directive_latency_seconds{{quantile=\"{q}\"}} "
        ))
        .and_then(|v| v.trim().parse().ok())
    })
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to filter here.
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_quantiles(&[0.5, 0.9, 0.99, 1.0])
        .expect("quantiles")
        .install_recorder()
        .expect("recorder");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("crisisd-bench-{}", uuid::Uuid::now_v7().simple()));
    let result = rt.block_on(async {
        let config = Config {
            data_dir: dir.display().to_string(),
            ..Default::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crisisd::server::serve(
            config,
            listener,
            async {
                let _ = stopped.await;
            },
            Default::default(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let callers: Vec<_> = (0..CALLS).map(|n| tokio::spawn(caller(addr, n))).collect();
        let mut all = Vec::new();
        for c in callers {
            all.extend(c.await.expect("caller"));
        }
        let elapsed = started.elapsed();
        let _ = stop.send(());
        let _ = server.await;
        (all, elapsed)
    });
    let _ = std::fs::remove_dir_all(&dir);
    let (mut rts, elapsed) = result;
    rts.sort();
    let utterances = CALLS * ROUNDS * 10;
    let rendered = recorder.render();
    let sp50 = server_quantile(&rendered, "0.5").unwrap_or(f64::NAN);
    let sp99 = server_quantile(&rendered, "0.99").unwrap_or(f64::NAN);
    let smax = server_quantile(&rendered, "1").unwrap_or(f64::NAN);
    println!(
        "service/directive_latency: {CALLS} concurrent calls at ~{SPEECH_HZ} utterances/s each; {utterances} utterances, {} directives in {:.1} s ({:.0} utterances/s)",
        rts.len(),
        elapsed.as_secs_f64(),
        utterances as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  server side (utterance received -> directive sent, escalation committed): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        sp50 * 1e3,
        sp99 * 1e3,
        smax * 1e3
    );
    println!(
        "  client round trip (send -> directive read): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        quantile(&rts, 0.5).as_secs_f64() * 1e3,
        quantile(&rts, 0.99).as_secs_f64() * 1e3,
        rts.last().map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
    // NaN (no samples) fails too.
    if sp99.is_nan() || sp99 >= P99_LIMIT.as_secs_f64() {
        println!(
            "FAIL: server-side p99 is not under {} ms",
            P99_LIMIT.as_millis()
        );
        std::process::exit(1);
    }
    println!("PASS: server-side p99 under {} ms", P99_LIMIT.as_millis());
}
