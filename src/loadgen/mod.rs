//! The load generator: many concurrent `StreamTranscript` calls and a rate
//! of `SubmitMessage` texts against a server, reporting throughput,
//! utterance → directive latency percentiles, errors and the server's RSS.
//!
//! Each stream plays calls back to back: `call_len` utterances, the last a
//! crisis one when `crisis_every` asks for it, then `call_ended`; every call
//! has its own patient, so every crisis utterance opens an escalation and
//! gets a directive (one page per patient would otherwise attach them).
//! Latency needs no shared state: an utterance id carries its send time in
//! microseconds since the run began, and the directive names the utterance.
//!
//! Utterances are paced per stream (open loop) at `rate` in total, or sent
//! as fast as the transport takes them when `rate` is 0 (closed loop, for
//! the maximum). The echo service in [`echo`] is the same proto with
//! nothing behind it: the ceiling crisisd is measured against.

pub mod echo;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use thiserror::Error;
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::api::pb;
use crate::api::pb::crisis_detection_client::CrisisDetectionClient;

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("connecting to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("target {0}: not a URL")]
    Target(String),
}

/// Benign patient lines, 60-120 bytes, as a receptionist call has them.
pub const BENIGN: &[&str] = &[
    "Hi, I'm calling to move my appointment to next Tuesday if possible",
    "Yes, the afternoon works better for me because of work and the kids",
    "My insurance changed last month, do you need the new card number?",
    "Can you tell me whether Dr. Ortiz has anything open on Thursday morning?",
    "I think I left my umbrella in the waiting room last week, a blue one",
    "Sorry, could you repeat that? The line cut out for a second there",
];

/// The crisis line: Tier 1 escalates it at once (and the echo service
/// answers it), so its directive is the latency measured.
pub const CRISIS: &str = "honestly I just want to kill myself, I can't keep doing this";

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `http://host:port`.
    pub target: String,
    pub token: Option<String>,
    pub streams: usize,
    /// HTTP/2 connections the streams are spread over.
    pub connections: usize,
    /// Utterances per second over all streams; 0: as fast as possible.
    pub rate: f64,
    pub duration: Duration,
    /// Utterances per call; the last is a crisis one when `crisis` is set.
    pub call_len: usize,
    pub crisis: bool,
    /// Texts per second (`SubmitMessage`), one in `call_len` a crisis one.
    pub messages_per_sec: f64,
    /// Open the streams, start a call on each, then only hold them.
    pub idle: bool,
    pub practice: String,
    /// Read this process's resident memory at the end.
    pub server_pid: Option<u32>,
    /// Print progress to stderr every second.
    pub progress: bool,
    /// Distinguishes this run's call, patient and message ids.
    pub run_id: String,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            target: "http://127.0.0.1:50051".to_string(),
            token: None,
            streams: 100,
            connections: 4,
            rate: 1000.0,
            duration: Duration::from_secs(10),
            call_len: 20,
            crisis: true,
            messages_per_sec: 0.0,
            idle: false,
            practice: "loadgen".to_string(),
            server_pid: None,
            progress: true,
            run_id: uuid::Uuid::now_v7().simple().to_string()[..12].to_string(),
        }
    }
}

/// Percentiles of one latency distribution, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |us: u64| us as f64 / 1000.0;
        write!(
            f,
            "n={} p50={:.2}ms p99={:.2}ms p999={:.2}ms max={:.2}ms",
            self.count,
            ms(self.p50_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us)
        )
    }
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub elapsed: Duration,
    pub utterances: u64,
    pub directives: u64,
    /// Crisis utterances sent: each should have had exactly one directive.
    pub crisis_utterances: u64,
    pub messages: u64,
    pub errors: u64,
    /// Errors by gRPC status code.
    pub error_codes: std::collections::BTreeMap<String, u64>,
    /// Streams open at the end (idle runs).
    pub streams_open: u64,
    pub utterance_rate: f64,
    pub directive_latency: Latency,
    pub message_latency: Latency,
    pub server_rss_kib: Option<u64>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "elapsed {:.1}s: {} utterances ({:.0}/s), {} directives for {} crisis utterances, {} messages, {} errors",
            self.elapsed.as_secs_f64(),
            self.utterances,
            self.utterance_rate,
            self.directives,
            self.crisis_utterances,
            self.messages,
            self.errors
        )?;
        if !self.error_codes.is_empty() {
            let codes: Vec<String> = self
                .error_codes
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect();
            writeln!(f, "errors by code: {}", codes.join(", "))?;
        }
        writeln!(f, "utterance -> directive: {}", self.directive_latency)?;
        if self.message_latency.count > 0 {
            writeln!(f, "message round trip:     {}", self.message_latency)?;
        }
        if self.streams_open > 0 {
            writeln!(f, "streams held open: {}", self.streams_open)?;
        }
        if let Some(kib) = self.server_rss_kib {
            writeln!(f, "server RSS: {:.1} MiB", kib as f64 / 1024.0)?;
        }
        Ok(())
    }
}

/// The resident memory of a process, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[derive(Default)]
struct Counters {
    utterances: AtomicU64,
    directives: AtomicU64,
    crisis: AtomicU64,
    messages: AtomicU64,
    errors: AtomicU64,
    open: AtomicU64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 100 s, three significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).expect("hdr"))
}

fn authed<T>(msg: T, token: &Option<String>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token
        && let Ok(v) = format!("Bearer {t}").parse()
    {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

fn event(e: pb::transcript_event::Event) -> pb::TranscriptEvent {
    pb::TranscriptEvent { event: Some(e) }
}

async fn connect(target: &str, n: usize) -> Result<Vec<Channel>, LoadError> {
    let endpoint = Endpoint::from_shared(target.to_string())
        .map_err(|_| LoadError::Target(target.to_string()))?
        .tcp_nodelay(true);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(
            endpoint
                .connect()
                .await
                .map_err(|source| LoadError::Connect {
                    target: target.to_string(),
                    source,
                })?,
        );
    }
    Ok(out)
}

struct Shared {
    opts: LoadOptions,
    start: Instant,
    deadline: Instant,
    counters: Counters,
    latency: Mutex<Histogram<u64>>,
    message_latency: Mutex<Histogram<u64>>,
    error_codes: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Shared {
    fn error(&self, status: &tonic::Status) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        let mut codes = self.error_codes.lock().unwrap_or_else(|e| e.into_inner());
        *codes.entry(format!("{:?}", status.code())).or_default() += 1;
    }
}

/// Runs the load and reports.
pub async fn run(opts: LoadOptions) -> Result<Report, LoadError> {
    let channels = connect(&opts.target, opts.connections).await?;
    let start = Instant::now();
    let shared = Arc::new(Shared {
        deadline: start + opts.duration,
        start,
        counters: Counters::default(),
        latency: Mutex::new(histogram()),
        message_latency: Mutex::new(histogram()),
        error_codes: Default::default(),
        opts,
    });
    let progress = shared.opts.progress.then(|| {
        let s = shared.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let u = s.counters.utterances.load(Ordering::Relaxed);
                eprintln!(
                    "[{:>4.0}s] {} utterances (+{}/s), {} directives, {} messages, {} errors, {} streams open",
                    s.start.elapsed().as_secs_f64(),
                    u,
                    u - last,
                    s.counters.directives.load(Ordering::Relaxed),
                    s.counters.messages.load(Ordering::Relaxed),
                    s.counters.errors.load(Ordering::Relaxed),
                    s.counters.open.load(Ordering::Relaxed),
                );
                last = u;
            }
        })
    });
    let mut tasks = Vec::new();
    for i in 0..shared.opts.streams {
        let client = CrisisDetectionClient::new(channels[i % channels.len()].clone());
        tasks.push(tokio::spawn(stream_task(shared.clone(), client, i)));
    }
    if shared.opts.messages_per_sec > 0.0 {
        let client = CrisisDetectionClient::new(channels[0].clone());
        tasks.push(tokio::spawn(message_task(shared.clone(), client)));
    }
    let streams_open = if shared.opts.idle {
        tokio::time::sleep_until(shared.deadline.into()).await;
        shared.counters.open.load(Ordering::Relaxed)
    } else {
        0
    };
    let server_rss_kib = if shared.opts.idle {
        shared.opts.server_pid.and_then(rss_kib)
    } else {
        None
    };
    for t in tasks {
        let _ = t.await;
    }
    if let Some(p) = progress {
        p.abort();
    }
    let elapsed = start.elapsed();
    let c = &shared.counters;
    let utterances = c.utterances.load(Ordering::Relaxed);
    let error_codes = shared
        .error_codes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(Report {
        elapsed,
        utterances,
        directives: c.directives.load(Ordering::Relaxed),
        crisis_utterances: c.crisis.load(Ordering::Relaxed),
        messages: c.messages.load(Ordering::Relaxed),
        errors: c.errors.load(Ordering::Relaxed),
        error_codes,
        streams_open,
        utterance_rate: utterances as f64 / shared.opts.duration.as_secs_f64(),
        directive_latency: Latency::of(&*shared.latency.lock().await),
        message_latency: Latency::of(&*shared.message_latency.lock().await),
        server_rss_kib: server_rss_kib.or_else(|| shared.opts.server_pid.and_then(rss_kib)),
    })
}

/// One stream: calls back to back until the deadline. A call's teardown
/// (the server closing it, its last directive arriving) is waited for
/// during the next call, not before it, as a voice runtime does: the pace
/// is the generator's, not the server's end-of-call work. At most one call
/// per stream is closing, so a slow server cannot pile up open calls.
async fn stream_task(s: Arc<Shared>, mut client: CrisisDetectionClient<Channel>, i: usize) {
    let o = &s.opts;
    let mut closing: Option<tokio::task::JoinHandle<()>> = None;
    let pace = (o.rate > 0.0).then(|| Duration::from_secs_f64(o.streams as f64 / o.rate));
    // Spread the streams' first sends over one interval.
    let mut next =
        Instant::now() + pace.map_or(Duration::ZERO, |p| p.mul_f64((i % 97) as f64 / 97.0));
    let mut call = 0usize;
    while Instant::now() < s.deadline {
        let (tx, rx) = mpsc::channel(64);
        let start = event(pb::transcript_event::Event::CallStarted(pb::CallStarted {
            call_id: format!("lg-{}-{i}-{call}", o.run_id),
            patient_id: format!("lg-pat-{}-{i}-{call}", o.run_id),
            practice_id: o.practice.clone(),
            language: "en".into(),
        }));
        call += 1;
        if tx.send(start).await.is_err() {
            return;
        }
        let response = client
            .stream_transcript(authed(ReceiverStream::new(rx), &o.token))
            .await;
        let mut inbound = match response {
            Ok(r) => r.into_inner(),
            Err(status) => {
                s.error(&status);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        s.counters.open.fetch_add(1, Ordering::Relaxed);
        let reader = {
            let s = s.clone();
            tokio::spawn(async move {
                loop {
                    match inbound.message().await {
                        Ok(Some(d)) => {
                            let now = s.start.elapsed().as_micros() as u64;
                            if let Some(sent) = d
                                .utterance_id
                                .strip_prefix('u')
                                .and_then(|t| t.split('-').next())
                                .and_then(|t| t.parse::<u64>().ok())
                            {
                                let _ = s
                                    .latency
                                    .lock()
                                    .await
                                    .record(now.saturating_sub(sent).max(1));
                            }
                            s.counters.directives.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(None) => return,
                        Err(status) => {
                            s.error(&status);
                            return;
                        }
                    }
                }
            })
        };
        if o.idle {
            tokio::time::sleep_until(s.deadline.into()).await;
            drop(tx);
            let _ = reader.await;
            s.counters.open.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        // The first call of each stream is cut short by a different amount,
        // so that the streams' crisis utterances do not all fall together.
        let first = if call == 1 { i % o.call_len.max(1) } else { 0 };
        for j in first..o.call_len {
            if let Some(p) = pace {
                tokio::time::sleep_until(next.into()).await;
                next += p;
            }
            if Instant::now() >= s.deadline {
                break;
            }
            let crisis = o.crisis && j + 1 == o.call_len;
            let text = if crisis {
                CRISIS
            } else {
                BENIGN[(i + j) % BENIGN.len()]
            };
            let sent = s.start.elapsed().as_micros();
            let u = event(pb::transcript_event::Event::Utterance(pb::Utterance {
                utterance_id: format!("u{sent}-{j}"),
                speaker: pb::Speaker::Patient as i32,
                text: text.to_string(),
                is_final: true,
            }));
            if tx.send(u).await.is_err() {
                break;
            }
            s.counters.utterances.fetch_add(1, Ordering::Relaxed);
            if crisis {
                s.counters.crisis.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = tx
            .send(event(pb::transcript_event::Event::CallEnded(
                pb::CallEnded {},
            )))
            .await;
        drop(tx);
        if let Some(previous) = closing.take() {
            let _ = previous.await;
        }
        let counters = s.clone();
        closing = Some(tokio::spawn(async move {
            let _ = reader.await;
            counters.counters.open.fetch_sub(1, Ordering::Relaxed);
        }));
    }
    // Every directive is counted before the report.
    if let Some(last) = closing {
        let _ = last.await;
    }
}

/// Texts at `messages_per_sec`, each its own patient and thread.
async fn message_task(s: Arc<Shared>, client: CrisisDetectionClient<Channel>) {
    let o = &s.opts;
    let pace = Duration::from_secs_f64(1.0 / o.messages_per_sec);
    let mut next = Instant::now();
    let mut n = 0usize;
    let mut inflight = tokio::task::JoinSet::new();
    while Instant::now() < s.deadline {
        tokio::time::sleep_until(next.into()).await;
        next += pace;
        let crisis = o.crisis && n.is_multiple_of(o.call_len.max(1));
        let m = pb::InboundMessage {
            message_id: format!("lg-m-{}-{n}", o.run_id),
            patient_id: format!("lg-mpat-{}-{n}", o.run_id),
            practice_id: o.practice.clone(),
            thread_id: format!("lg-t-{}-{n}", o.run_id),
            text: if crisis {
                CRISIS
            } else {
                BENIGN[n % BENIGN.len()]
            }
            .to_string(),
            language: "en".into(),
        };
        n += 1;
        let (s, mut client) = (s.clone(), client.clone());
        inflight.spawn(async move {
            let started = Instant::now();
            match client.submit_message(authed(m, &s.opts.token)).await {
                Ok(_) => {
                    s.counters.messages.fetch_add(1, Ordering::Relaxed);
                    let us = started.elapsed().as_micros() as u64;
                    let _ = s.message_latency.lock().await.record(us.max(1));
                }
                Err(status) => {
                    s.error(&status);
                }
            }
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}
