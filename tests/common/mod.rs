//! A real server on an ephemeral port, and clients for it.

#![allow(dead_code)]

pub mod moto;
pub mod pg;
pub mod process;

use std::path::PathBuf;
use std::time::Duration;

use crisisd::api::auth::token_hash;
use crisisd::api::pb;
use crisisd::api::pb::crisis_detection_client::CrisisDetectionClient;
use crisisd::config::{Config, Role, Token};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "crisisd-test-{tag}-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Tokens every secured test server knows: (token, name, role, practice).
pub const TOKENS: &[(&str, &str, Role, &str)] = &[
    ("tok-voice", "voice-runtime", Role::Voice, ""),
    ("tok-messaging", "sms-gateway", Role::Messaging, ""),
    ("tok-responder-p1", "oncall-p1", Role::Responder, "p1"),
    ("tok-responder-p2", "oncall-p2", Role::Responder, "p2"),
    ("tok-admin", "admin", Role::Admin, ""),
    ("tok-scheduling", "scheduler", Role::Scheduling, ""),
    ("tok-scheduling-p2", "scheduler-p2", Role::Scheduling, "p2"),
    ("tok-messaging-p2", "sms-gateway-p2", Role::Messaging, "p2"),
];

pub fn secured(mut c: Config) -> Config {
    c.tokens = TOKENS
        .iter()
        .map(|(tok, name, role, practice)| Token {
            name: name.to_string(),
            role: *role,
            sha256: token_hash(tok),
            practice: practice.to_string(),
        })
        .collect();
    c
}

impl TestServer {
    pub async fn start(config: Config) -> TestServer {
        Self::start_with(config, Default::default()).await
    }

    pub async fn start_with(config: Config, seams: crisisd::server::Seams) -> TestServer {
        Self::start_in(config, temp_dir("server"), seams).await
    }

    /// Starts on the data left by an earlier server (a restart).
    pub async fn start_in(
        mut config: Config,
        data_dir: PathBuf,
        seams: crisisd::server::Seams,
    ) -> TestServer {
        config.data_dir = data_dir.display().to_string();
        config.validate().expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            crisisd::server::serve(
                config,
                listener,
                async {
                    let _ = stopped.await;
                },
                seams,
            )
            .await
            .expect("server runs");
        });
        let s = TestServer {
            addr,
            data_dir,
            stop: Some(stop),
            handle: Some(handle),
        };
        s.wait_until_serving().await;
        s
    }

    /// Waits until the server reads its connections. A TCP connect is not
    /// enough: the listener is bound before the server builds its matcher
    /// and opens its store, which in a debug build on a slow machine takes
    /// seconds, and a test that times its own load must not count that
    /// start-up. Until it serves, a connection sits in the backlog and
    /// nothing answers; once it does, the HTTP/2 preface gets a reply (or,
    /// from a TLS server, a close).
    async fn wait_until_serving(&self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut c) = tokio::net::TcpStream::connect(self.addr).await
                && c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                    .await
                    .is_ok()
            {
                let mut b = [0u8; 64];
                if tokio::time::timeout(Duration::from_secs(1), c.read(&mut b))
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the test server did not serve within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn client(&self) -> CrisisDetectionClient<Channel> {
        let ch = Channel::from_shared(format!("http://{}", self.addr))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        CrisisDetectionClient::new(ch)
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) -> PathBuf {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
        self.data_dir.clone()
    }
}

pub fn authed<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("ascii"),
        );
    }
    r
}

pub fn started(call: &str, patient: &str, practice: &str, language: &str) -> pb::TranscriptEvent {
    pb::TranscriptEvent {
        event: Some(pb::transcript_event::Event::CallStarted(pb::CallStarted {
            call_id: call.into(),
            patient_id: patient.into(),
            practice_id: practice.into(),
            language: language.into(),
        })),
    }
}

pub fn said(id: &str, speaker: pb::Speaker, text: &str, is_final: bool) -> pb::TranscriptEvent {
    pb::TranscriptEvent {
        event: Some(pb::transcript_event::Event::Utterance(pb::Utterance {
            utterance_id: id.into(),
            speaker: speaker as i32,
            text: text.into(),
            is_final,
        })),
    }
}

pub fn patient(id: &str, text: &str) -> pb::TranscriptEvent {
    said(id, pb::Speaker::Patient, text, true)
}

pub fn ended() -> pb::TranscriptEvent {
    pb::TranscriptEvent {
        event: Some(pb::transcript_event::Event::CallEnded(pb::CallEnded {})),
    }
}

/// A live call: send events one at a time, read directives as they come.
pub struct LiveCall {
    pub tx: mpsc::Sender<pb::TranscriptEvent>,
    pub rx: Streaming<pb::Directive>,
}

impl LiveCall {
    pub async fn open(
        client: &mut CrisisDetectionClient<Channel>,
        token: Option<&str>,
    ) -> Result<LiveCall, Status> {
        let (tx, rx) = mpsc::channel(64);
        let resp = client
            .stream_transcript(authed(ReceiverStream::new(rx), token))
            .await?;
        Ok(LiveCall {
            tx,
            rx: resp.into_inner(),
        })
    }

    pub async fn send(&self, ev: pb::TranscriptEvent) {
        self.tx.send(ev).await.expect("stream open");
    }

    /// The next directive, or None if none comes within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Result<pb::Directive, Status>> {
        match tokio::time::timeout(wait, self.rx.message()).await {
            Err(_) => None,
            Ok(Ok(Some(d))) => Some(Ok(d)),
            Ok(Ok(None)) => None,
            Ok(Err(s)) => Some(Err(s)),
        }
    }

    /// Closes the sending side and collects everything until the end.
    pub async fn finish(mut self) -> (Vec<pb::Directive>, Option<Status>) {
        drop(self.tx);
        let mut out = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), self.rx.message()).await {
                Ok(Ok(Some(d))) => out.push(d),
                Ok(Ok(None)) => return (out, None),
                Ok(Err(s)) => return (out, Some(s)),
                Err(_) => panic!("stream did not end"),
            }
        }
    }
}

/// Plays `events` as one call and returns its directives and final status.
pub async fn play(
    client: &mut CrisisDetectionClient<Channel>,
    token: Option<&str>,
    events: Vec<pb::TranscriptEvent>,
) -> (Vec<pb::Directive>, Option<Status>) {
    let call = match LiveCall::open(client, token).await {
        Ok(c) => c,
        Err(s) => return (Vec::new(), Some(s)),
    };
    for e in events {
        if call.tx.send(e).await.is_err() {
            break;
        }
    }
    call.finish().await
}
