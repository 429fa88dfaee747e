//! The load generator measures what it says: every utterance it counts was
//! sent, every crisis utterance gets its directive (from crisisd and from
//! the echo service alike), and idle streams are held.

mod common;

use std::time::Duration;

use common::TestServer;
use crisisd::config::Config;
use crisisd::loadgen::{self, LoadOptions};

fn opts(target: String) -> LoadOptions {
    LoadOptions {
        target,
        // 25 utterances a second each: a call of 10 leaves 400 ms, room for
        // its set-up and teardown when fsyncs are slow (a CI machine just
        // after its build), so the pace is the generator's, not the disk's.
        streams: 16,
        connections: 2,
        rate: 400.0,
        duration: Duration::from_secs(2),
        call_len: 10,
        progress: false,
        ..LoadOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_latencies_and_idle_streams_against_crisisd_and_the_echo_service() {
    let mut config = Config::default();
    config.limits.utterances_per_second = 1000;
    config.limits.utterance_burst = 1000;
    let server = TestServer::start(config).await;
    let r = loadgen::run(opts(format!("http://{}", server.addr)))
        .await
        .expect("runs");
    assert_eq!(r.errors, 0, "{r}");
    assert!(r.utterances >= 600, "about 400/s for 2 s: {r}");
    // One crisis utterance closes each call (the first call of each stream
    // is shortened, and the last may be cut by the deadline), and each gets
    // exactly one directive.
    assert!(r.crisis_utterances >= r.utterances / 10 - 16, "{r}");
    assert_eq!(r.directives, r.crisis_utterances, "{r}");
    assert_eq!(r.directive_latency.count, r.directives);
    assert!(r.directive_latency.p99_us > 0);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(loadgen::echo::serve(listener));
    let e = loadgen::run(opts(format!("http://{addr}")))
        .await
        .expect("runs");
    assert_eq!(e.errors, 0, "{e}");
    assert!(e.crisis_utterances >= e.utterances / 10 - 16, "{e}");
    assert_eq!(e.directives, e.crisis_utterances, "{e}");

    let held = loadgen::run(LoadOptions {
        streams: 50,
        idle: true,
        server_pid: Some(std::process::id()),
        ..opts(format!("http://{}", server.addr))
    })
    .await
    .expect("runs");
    assert_eq!(held.streams_open, 50, "{held}");
    assert!(held.server_rss_kib.is_some_and(|k| k > 0));
    server.stop().await;
}
