//! The service-side commands of the CLI: serve, stream, oncall, audit, token.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio_stream::StreamExt;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crisisd::api::auth::{new_token, token_hash};
use crisisd::api::pb;
use crisisd::api::pb::crisis_detection_client::CrisisDetectionClient;
use crisisd::audit;
use crisisd::config::{CONFIG_VAR, Config};
use crisisd::corpus::{self, Conversation};
use crisisd::domain::{Channel as Chan, Speaker};
use crisisd::roster::{Clinician, Roster};
use crisisd::store::Store;
use crisisd::store::sqlite::SqliteStore;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn load_config(path: Option<PathBuf>) -> Result<Config> {
    let path = path.or_else(|| std::env::var_os(CONFIG_VAR).map(PathBuf::from));
    Ok(Config::load(path.as_deref(), std::env::vars())?)
}

pub fn serve(
    config: Option<PathBuf>,
    listen: Option<String>,
    metrics_listen: Option<String>,
) -> Result<ExitCode> {
    let mut config = load_config(config)?;
    if let Some(l) = listen {
        config.listen = l;
    }
    if let Some(m) = metrics_listen {
        config.metrics_listen = m;
    }
    config.validate()?;
    let rt = runtime()?;
    rt.block_on(async move {
        crisisd::telemetry::init_logging(&config.log)?;
        if let Some(addr) = config.metrics_addr()? {
            crisisd::telemetry::init_metrics(addr)?;
        }
        let addr = config.listen_addr()?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("config key listen: binding {addr}"))?;
        crisisd::server::serve(config, listener, shutdown_signal(), Default::default()).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("signal received: stopping");
}

fn with_token<T>(msg: T, token: Option<&str>) -> Result<Request<T>> {
    let mut req = Request::new(msg);
    if let Some(t) = token {
        let v: MetadataValue<_> = format!("Bearer {t}")
            .parse()
            .map_err(|_| anyhow!("the token has characters not allowed in a header"))?;
        req.metadata_mut().insert("authorization", v);
    }
    Ok(req)
}

fn speaker(s: Speaker) -> i32 {
    match s {
        Speaker::Patient => pb::Speaker::Patient as i32,
        Speaker::Agent => pb::Speaker::Agent as i32,
        Speaker::Clinician => pb::Speaker::Clinician as i32,
    }
}

fn print_directive(conv: &str, d: &pb::Directive) {
    let tier = pb::Tier::try_from(d.tier).map_or("?", |t| t.as_str_name());
    let sev = pb::Severity::try_from(d.severity).map_or("?", |s| s.as_str_name());
    println!(
        "{conv}: DIRECTIVE escalation={} {tier} {sev} reason={} after utterance {}\n  say: {}",
        d.escalation_id, d.reason_code, d.utterance_id, d.referral_text
    );
}

/// Reads FILE as a corpus if it holds JSON lines, else as one call of
/// patient utterances, one per line.
fn read_conversations(file: &Path) -> Result<Vec<Conversation>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    if first.trim_start().starts_with('{') {
        let (convs, errors) = corpus::read(text.as_bytes());
        for e in &errors {
            eprintln!("crisisd: {}: {e}", file.display());
        }
        return Ok(convs);
    }
    let id = file
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| crisisd::ids::CallId::parse(s).is_ok())
        .unwrap_or("demo-call")
        .to_string();
    Ok(vec![Conversation {
        line: 1,
        id,
        channel: Chan::Voice,
        events: text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| corpus::Event {
                speaker: Speaker::Patient,
                text: l.to_string(),
                is_final: true,
            })
            .collect(),
        label: None,
        tags: Vec::new(),
    }])
}

pub fn stream(
    file: &Path,
    server: &str,
    token: Option<String>,
    practice: &str,
) -> Result<ExitCode> {
    let convs = read_conversations(file)?;
    let token = token.or_else(|| std::env::var("CRISISD_TOKEN").ok());
    crisisd::server::install_crypto_provider();
    let rt = runtime()?;
    rt.block_on(async move {
        let channel = Channel::from_shared(server.to_string())
            .context("--server must be a URL such as http://127.0.0.1:50051")?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to {server}"))?;
        let mut client = CrisisDetectionClient::new(channel);
        let run = uuid::Uuid::now_v7().simple().to_string();
        let mut directives = 0;
        for (n, c) in convs.iter().enumerate() {
            let conv_id = format!("{}-{}", c.id, &run[run.len() - 8..]);
            let conv_id = if crisisd::ids::CallId::parse(&conv_id).is_ok() {
                conv_id
            } else {
                format!("conv-{n}-{}", &run[run.len() - 8..])
            };
            match c.channel {
                Chan::Voice => {
                    let mut events = vec![pb::TranscriptEvent {
                        event: Some(pb::transcript_event::Event::CallStarted(pb::CallStarted {
                            call_id: conv_id.clone(),
                            patient_id: format!("demo-patient-{n}"),
                            practice_id: practice.to_string(),
                            language: String::new(),
                        })),
                    }];
                    for (i, e) in c.events.iter().enumerate() {
                        events.push(pb::TranscriptEvent {
                            event: Some(pb::transcript_event::Event::Utterance(pb::Utterance {
                                utterance_id: format!("u{i}"),
                                speaker: speaker(e.speaker),
                                text: e.text.clone(),
                                is_final: e.is_final,
                            })),
                        });
                    }
                    events.push(pb::TranscriptEvent {
                        event: Some(pb::transcript_event::Event::CallEnded(pb::CallEnded {})),
                    });
                    let req = with_token(tokio_stream::iter(events), token.as_deref())?;
                    let mut out = client
                        .stream_transcript(req)
                        .await
                        .map_err(|s| anyhow!("{}: {:?}: {}", c.id, s.code(), s.message()))?
                        .into_inner();
                    while let Some(d) = out.next().await {
                        let d =
                            d.map_err(|s| anyhow!("{}: {:?}: {}", c.id, s.code(), s.message()))?;
                        print_directive(&c.id, &d);
                        directives += 1;
                    }
                }
                Chan::Sms => {
                    for (i, e) in c.events.iter().enumerate() {
                        if e.speaker != Speaker::Patient {
                            continue;
                        }
                        let msg = pb::InboundMessage {
                            message_id: format!("{conv_id}-m{i}"),
                            patient_id: format!("demo-patient-{n}"),
                            practice_id: practice.to_string(),
                            thread_id: conv_id.clone(),
                            text: e.text.clone(),
                            language: String::new(),
                        };
                        let v = client
                            .submit_message(with_token(msg, token.as_deref())?)
                            .await
                            .map_err(|s| anyhow!("{}: {:?}: {}", c.id, s.code(), s.message()))?
                            .into_inner();
                        if let Some(d) = &v.directive {
                            print_directive(&c.id, d);
                            directives += 1;
                        }
                    }
                }
            }
            println!("{}: done", c.id);
        }
        println!("{} conversations, {directives} directives", convs.len());
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the primary (or that nobody is on call) and the backup, with
/// names and numbers: this is the operator's own check of the roster.
pub fn oncall(roster_file: &Path, practice: &str, at: Option<&str>) -> Result<ExitCode> {
    let at = match at {
        Some(s) => s.parse::<jiff::Timestamp>().map_err(|_| {
            anyhow!(
                "--at must be RFC 3339 with an offset, such as 2026-11-23T15:00:00-05:00 \
                 or 2026-11-23T20:00:00Z"
            )
        })?,
        None => jiff::Timestamp::now(),
    };
    let roster = Roster::load(roster_file)?;
    let Some(on_call) = roster.on_call(practice, at) else {
        bail!(
            "practice {practice:?} is not in the roster {} (its practices: {})",
            roster_file.display(),
            roster.practice_ids().collect::<Vec<_>>().join(", ")
        );
    };
    let show = |c: &Clinician| format!("{} {} {}", c.id, c.name, c.phone.expose());
    match on_call.primary {
        Some(c) => println!("primary: {}", show(c)),
        None => println!("primary: nobody on call (the backup is paged)"),
    }
    println!("backup: {}", show(on_call.backup));
    Ok(ExitCode::SUCCESS)
}

async fn open_store(config: Option<PathBuf>) -> Result<std::sync::Arc<dyn Store>> {
    let config = load_config(config)?;
    if config.store.is_postgres() {
        return Ok(std::sync::Arc::new(
            crisisd::store::postgres::PgStore::open(&config.store).await?,
        ));
    }
    let path = config.database_path();
    if !path.exists() {
        bail!("no database at {} (config key data_dir)", path.display());
    }
    Ok(std::sync::Arc::new(SqliteStore::open(&path).await?))
}

pub fn audit_verify(config: Option<PathBuf>) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let store = open_store(config).await?;
        let rows = store.audit_rows(0).await?;
        let (head_seq, head_hash) = store.audit_head().await?;
        store.close().await;
        let mut problems: Vec<String> =
            audit::verify(&rows).iter().map(|p| p.to_string()).collect();
        let (last_seq, last_hash) = rows
            .last()
            .map_or((0, audit::GENESIS.to_string()), |r| (r.seq, r.hash.clone()));
        if last_seq < head_seq {
            problems.push(format!(
                "rows {}..{head_seq} are missing from the end (the head records {head_seq})",
                last_seq + 1
            ));
        } else if last_seq != head_seq || last_hash != head_hash {
            problems.push(format!(
                "the head (row {head_seq}) does not match the last row ({last_seq})"
            ));
        }
        if problems.is_empty() {
            println!("audit log intact: {} rows, head {head_hash}", rows.len());
            Ok(ExitCode::SUCCESS)
        } else {
            for p in &problems {
                println!("{p}");
            }
            println!(
                "audit log NOT intact: {} problems in {} rows",
                problems.len(),
                rows.len()
            );
            Ok(ExitCode::FAILURE)
        }
    })
}

fn parse_since(s: &str) -> Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|_| {
        anyhow!("--since must be RFC 3339 (2026-11-23T10:00:00Z) or epoch milliseconds")
    })?;
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| anyhow!("--since is before 1970"))?;
    Ok(i64::try_from(d.as_millis())?)
}

pub fn audit_export(config: Option<PathBuf>, since: Option<&str>) -> Result<ExitCode> {
    let since = since.map(parse_since).transpose()?.unwrap_or(0);
    runtime()?.block_on(async move {
        let store = open_store(config).await?;
        let rows = store.audit_rows(since).await?;
        store.close().await;
        let stdout = io::stdout();
        let mut out = stdout.lock();
        for r in rows {
            let at =
                std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(r.at_ms).unwrap_or(0));
            let detail: serde_json::Value = serde_json::from_str(&r.detail)
                .unwrap_or(serde_json::Value::String(r.detail.clone()));
            let line = serde_json::json!({
                "seq": r.seq,
                "at": humantime::format_rfc3339_millis(at).to_string(),
                "actor": r.actor,
                "request_id": r.request_id,
                "action": r.action,
                "subject": r.subject,
                "detail": detail,
                "prev_hash": r.prev_hash,
                "hash": r.hash,
            });
            writeln!(out, "{line}")?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn token_new(role: &str, name: &str, practice: &str) -> Result<ExitCode> {
    let role: crisisd::config::Role = toml::Value::String(role.to_string())
        .try_into()
        .map_err(|_| anyhow!("role must be voice, messaging, scheduling, responder or admin"))?;
    let token = new_token().map_err(|e| anyhow!("no randomness available: {e}"))?;
    println!("# The token (give it to the client; it is not stored anywhere):");
    println!("# {token}");
    println!("[[tokens]]");
    println!("name = {}", toml::Value::String(name.to_string()));
    println!("role = \"{}\"", role.as_str());
    if !practice.is_empty() {
        println!("practice = {}", toml::Value::String(practice.to_string()));
    }
    println!("sha256 = \"{}\"", token_hash(&token));
    Ok(ExitCode::SUCCESS)
}

/// `replay --tier2 bedrock`: Tier 1, then the configured model for each
/// review, judged as the service judges it. One line per conversation, as
/// `replay` prints, with `"tier": 2` where the model (or the fail-safe)
/// decided.
pub fn replay_tier2(
    matcher: &crisisd::tier1::Matcher,
    convs: &[Conversation],
    config: Option<PathBuf>,
) -> Result<()> {
    use crisisd::corpus::Outcome;
    use crisisd::tier2::{Classifier, Decision, Turn, judge};
    let config = load_config(config)?;
    if config.tier2.model_id.is_empty() {
        bail!("config key tier2.model_id: --tier2 bedrock needs a model");
    }
    let rt = runtime()?;
    rt.block_on(async {
        let classifier = crisisd::tier2::bedrock::BedrockClassifier::new(&config.tier2, None).await;
        let stdout = io::stdout();
        for c in convs {
            let v = crisisd::replay::replay(matcher, c);
            let mut line = serde_json::to_value(crisisd::replay::ReplayLine::new(&c.id, &v))?;
            if v.outcome == Outcome::Review {
                let upto = v.event.unwrap_or(0);
                let window: Vec<Turn> = c.events[..=upto.min(c.events.len().saturating_sub(1))]
                    .iter()
                    .filter(|e| e.is_final || e.speaker == Speaker::Patient)
                    .map(|e| Turn {
                        speaker: e.speaker,
                        text: e.text.clone(),
                    })
                    .collect();
                let result = classifier.classify(&window).await;
                let (outcome, reason) = match judge(result, crisisd::domain::Severity::Low) {
                    Decision::Dismiss { reason_code } => ("none", reason_code.to_string()),
                    Decision::Escalate { reason_code, .. } => ("escalate", reason_code),
                };
                line["outcome"] = serde_json::json!(outcome);
                line["tier"] = serde_json::json!(2);
                line["reason"] = serde_json::json!(reason);
            }
            let mut out = stdout.lock();
            writeln!(out, "{line}")?;
        }
        Ok::<_, anyhow::Error>(())
    })
}

pub fn loadgen(opts: crisisd::loadgen::LoadOptions) -> Result<ExitCode> {
    crisisd::server::install_crypto_provider();
    let rt = runtime()?;
    let report = rt.block_on(crisisd::loadgen::run(opts))?;
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

pub fn echo_server(listen: &str) -> Result<ExitCode> {
    let rt = runtime()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        println!("echo service on {}", listener.local_addr()?);
        crisisd::loadgen::echo::serve(listener).await?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn health(addr: &str) -> Result<ExitCode> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let rt = runtime()?;
    rt.block_on(async {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .context("--addr must be host:port")?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(3))
            .connect()
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "crisis.v1.CrisisDetection".to_string(),
            })
            .await
            .context("health check")?
            .into_inner()
            .status();
        println!("{}", status.as_str_name());
        Ok(if status == ServingStatus::Serving {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}
