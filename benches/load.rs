//! crisisd against the transport ceiling, on this machine, in one run.
//!
//! Starts the release `crisisd serve` (SQLite in a temp dir, console pager)
//! and the echo service (`crisisd echo-server`: the same proto, nothing
//! behind it) as processes of their own, and drives both with the load
//! generator from this process (`crisisd::loadgen`; `crisisd loadgen` is
//! the same code on the command line). Client and servers share the
//! machine's cores, as the targets ask.
//!
//! Phases: the maximum rate of each (closed loop), their ratio; crisisd at
//! the target rate; directive latency at half of crisisd's maximum; then
//! idle streams held open and the server's resident memory.
//!
//! `cargo bench --bench load` (release). Env: LOAD_STREAMS (1000),
//! LOAD_SECS (10), LOAD_IDLE (10000), LOAD_CALL_LEN (100).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crisisd::loadgen::{self, LoadOptions, Report};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(port: u16) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {port}");
}

fn crisisd(port: u16, dir: &std::path::Path) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_crisisd"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir)
        .env("CRISISD_DATA_DIR", dir.join("data"))
        .env("CRISISD_LOG_LEVEL", "warn")
        .env("CRISISD_LIMITS_MAX_STREAMS", "20000")
        .env("CRISISD_LIMITS_UTTERANCES_PER_SECOND", "1000000")
        .env("CRISISD_LIMITS_UTTERANCE_BURST", "1000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("crisisd serve");
    wait_for(port);
    Proc(child)
}

fn echo(port: u16) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_crisisd"))
        .args(["echo-server", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .spawn()
        .expect("echo server");
    wait_for(port);
    Proc(child)
}

fn load(rt: &tokio::runtime::Runtime, what: &str, opts: LoadOptions) -> Report {
    eprintln!("\n== {what}");
    let r = rt.block_on(loadgen::run(opts)).expect("load runs");
    eprint!("{r}");
    r
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let streams = env("LOAD_STREAMS", 1000) as usize;
    let secs = env("LOAD_SECS", 10);
    let idle = env("LOAD_IDLE", 10_000) as usize;
    let call_len = env("LOAD_CALL_LEN", 100) as usize;
    crisisd::server::install_crypto_provider();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = std::env::temp_dir().join(format!("crisisd-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (cp, ep) = (free_port(), free_port());
    let server = crisisd(cp, &dir);
    let _echo = echo(ep);
    let base = |port: u16| LoadOptions {
        target: format!("http://127.0.0.1:{port}"),
        streams,
        connections: streams.div_ceil(100),
        duration: Duration::from_secs(secs),
        call_len,
        progress: true,
        ..LoadOptions::default()
    };

    let ceiling = load(
        &rt,
        "echo service, maximum rate",
        LoadOptions {
            rate: 0.0,
            ..base(ep)
        },
    );
    let max = load(
        &rt,
        "crisisd, maximum rate",
        LoadOptions {
            rate: 0.0,
            ..base(cp)
        },
    );
    let ratio = max.utterance_rate / ceiling.utterance_rate;
    let target = load(
        &rt,
        "crisisd at 50,000 utterances/s",
        LoadOptions {
            rate: 50_000.0,
            ..base(cp)
        },
    );
    let half = max.utterance_rate / 2.0;
    let at_half = load(
        &rt,
        &format!("crisisd at half its maximum ({half:.0}/s)"),
        LoadOptions {
            rate: half,
            ..base(cp)
        },
    );
    // Idle streams on a fresh server: what they cost, not what the load
    // phases left in the allocator.
    drop(server);
    let server = crisisd(cp, &dir);
    let rss_before = loadgen::rss_kib(server.0.id());
    let held = load(
        &rt,
        &format!("{idle} idle streams"),
        LoadOptions {
            streams: idle,
            connections: idle.div_ceil(100),
            idle: true,
            duration: Duration::from_secs(secs.max(5)),
            server_pid: Some(server.0.id()),
            ..base(cp)
        },
    );

    let mib = |k: Option<u64>| k.map_or(f64::NAN, |k| k as f64 / 1024.0);
    println!("\nload bench ({streams} streams, one crisis utterance in {call_len}, {secs} s each)");
    println!("| measure | result | target |");
    println!("|---|---|---|");
    println!(
        "| echo ceiling | {:.0} utterances/s | |",
        ceiling.utterance_rate
    );
    println!(
        "| crisisd maximum | {:.0} utterances/s | |",
        max.utterance_rate
    );
    println!("| ratio | {ratio:.2} | >= 0.8 |");
    println!(
        "| crisisd at a 50,000/s target | {:.0} utterances/s, {} errors | >= 50,000 |",
        target.utterance_rate, target.errors
    );
    println!(
        "| directive p50/p99/p999 at half max ({half:.0}/s, client side) | {:.2} / {:.2} / {:.2} ms | p99 < 5 ms |",
        at_half.directive_latency.p50_us as f64 / 1000.0,
        at_half.directive_latency.p99_us as f64 / 1000.0,
        at_half.directive_latency.p999_us as f64 / 1000.0
    );
    println!("| idle streams held | {} | {idle} |", held.streams_open);
    println!(
        "| fresh server RSS before / holding them | {:.1} / {:.1} MiB | < 200 MiB |",
        mib(rss_before),
        mib(held.server_rss_kib)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
