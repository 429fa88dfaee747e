//! `crisisd serve`: the wiring. Tier 1 is compiled before the first
//! connection is accepted, and nothing on the detection path waits for a
//! cloud credential or endpoint.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::api::auth::Auth;
use crate::api::pb;
use crate::api::pb::crisis_detection_server::CrisisDetectionServer;
use crate::api::service::{Core, Service};
use crate::config::{Config, NotifierKind};
use crate::pager::{self, Notifier, Pager};
use crate::roster::{Roster, RosterError};
use crate::store::Store;
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::tier1::Matcher;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("the shipped rules do not compile: {0}")]
    Rules(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("config key {key}: reading {path}: {source}")]
    TlsFile {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("listener: {0}")]
    Listener(std::io::Error),
    #[error("config key paging.roster: {0}")]
    Roster(RosterError),
    #[error("config key tier3.rules: the behavior rules do not load:\n{0}")]
    BehaviorRules(String),
    #[error("the patient reference key at {path}: {source}")]
    RefKey {
        path: String,
        source: std::io::Error,
    },
}

/// How often the store is probed with a write.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Health follows the store: a write that cannot reach the disk (full,
/// read-only, gone) makes the service not-ready until one can again.
async fn readiness_loop(
    store: Arc<dyn Store>,
    health: tonic_health::server::HealthReporter,
    ready: Arc<std::sync::atomic::AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use std::sync::atomic::Ordering;
    use tonic_health::ServingStatus;
    loop {
        let ok = match tokio::time::timeout(PROBE_EVERY * 3, store.probe()).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                if ready.load(Ordering::Relaxed) {
                    tracing::error!(error = %e, "the store cannot be written: not ready");
                }
                false
            }
            Err(_) => {
                if ready.load(Ordering::Relaxed) {
                    tracing::error!("a store write did not finish in time: not ready");
                }
                false
            }
        };
        if ok && !ready.load(Ordering::Relaxed) {
            tracing::info!("the store can be written again: ready");
        }
        ready.store(ok, Ordering::Relaxed);
        metrics::gauge!("crisisd_ready").set(if ok { 1.0 } else { 0.0 });
        let status = if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health
            .set_service_status(
                <CrisisDetectionServer<Service> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        health.set_service_status("", status).await;
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Tier 3's rules: the configured file, else the shipped one. A rule that
/// cannot be evaluated stops the start, named.
fn behavior_rules(config: &Config) -> Result<crate::tier3::BehaviorRules, ServeError> {
    let loaded = match config.tier3.rules.as_str() {
        "" => crate::tier3::BehaviorRules::builtin(),
        path => crate::tier3::BehaviorRules::load(std::path::Path::new(path)),
    };
    loaded.map_err(|es| {
        ServeError::BehaviorRules(
            es.iter()
                .map(|e| format!("  {e}"))
                .collect::<Vec<_>>()
                .join("\n"),
        )
    })
}

/// The key for opaque patient references: from the config, else kept in
/// the data directory (made once, readable by the service's user only).
async fn patient_ref_secret(config: &Config) -> Result<Vec<u8>, ServeError> {
    if !config.paging.patient_ref_secret.is_empty() {
        return Ok(config.paging.patient_ref_secret.as_bytes().to_vec());
    }
    let path = std::path::Path::new(&config.data_dir).join("patient-ref.key");
    let err = |source| ServeError::RefKey {
        path: path.display().to_string(),
        source,
    };
    match tokio::fs::read(&path).await {
        Ok(k) if !k.is_empty() => return Ok(k),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let key =
        crate::api::auth::new_token().map_err(|e| err(std::io::Error::other(e.to_string())))?;
    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .map_err(err)?;
    tokio::fs::write(&path, &key).await.map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tokio::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .await
            .map_err(err)?;
    }
    Ok(key.into_bytes())
}

/// What the server runs with, printed at start.
pub fn describe(config: &Config, addr: SocketAddr, matcher: &Matcher) -> String {
    let tls = match (config.tls.enabled(), config.tls.client_ca.is_empty()) {
        (false, _) => "plaintext (loopback only)",
        (true, true) => "TLS",
        (true, false) => "mutual TLS",
    };
    let tokens = if config.tokens.is_empty() {
        "none: every call is allowed (loopback only)".to_string()
    } else {
        format!("{}", config.tokens.len())
    };
    let metrics = if config.metrics_listen.is_empty() {
        "off".to_string()
    } else {
        format!("http://{}/metrics", config.metrics_listen)
    };
    let (rules, exclusions) = (
        matcher.rules().rules.len(),
        matcher.rules().exclusions.len(),
    );
    format!(
        "crisisd {version} listening on {addr}\n  transport: {tls}\n  tokens: {tokens}\n  store: {db}\n  tier 1: {rules} rules, {exclusions} exclusions, {patterns} patterns\n  tier 2: {tier2}\n  pager: {pager}\n  metrics: {metrics}",
        version = env!("CARGO_PKG_VERSION"),
        // Never the URL: it may carry a password.
        db = if config.store.is_postgres() {
            "PostgreSQL (store.url), shared with any other replica".to_string()
        } else {
            format!("SQLite at {}", config.database_path().display())
        },
        patterns = matcher.pattern_count(),
        tier2 = if config.tier2.model_id.is_empty() {
            "no classifier configured: a review escalates by the fail-safe rule".to_string()
        } else {
            format!(
                "{} on Bedrock in {} (deadline {} ms; a failure escalates)",
                config.tier2.model_id, config.tier2.region, config.tier2.deadline_ms
            )
        },
        pager = match (config.paging.notifier, config.paging.roster.is_empty()) {
            (NotifierKind::Console, true) =>
                "console (prints the page it would send), no roster".to_string(),
            (NotifierKind::Console, false) => format!(
                "console (prints the page it would send), roster {}",
                config.paging.roster
            ),
            (NotifierKind::Sns, _) => format!(
                "SMS through SNS in {}, roster {}",
                config.sns.region, config.paging.roster
            ),
        },
    )
}

async fn tls(config: &Config) -> Result<Option<ServerTlsConfig>, ServeError> {
    if !config.tls.enabled() {
        return Ok(None);
    }
    let read = |key: &'static str, path: String| async move {
        tokio::fs::read(&path)
            .await
            .map_err(|source| ServeError::TlsFile { key, path, source })
    };
    let cert = read("tls.cert", config.tls.cert.clone()).await?;
    let key = read("tls.key", config.tls.key.clone()).await?;
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if !config.tls.client_ca.is_empty() {
        let ca = read("tls.client_ca", config.tls.client_ca.clone()).await?;
        tls = tls.client_ca_root(Certificate::from_pem(ca));
    }
    Ok(Some(tls))
}

/// Picks rustls's crypto provider for the process. Two are linked (ring
/// for tonic, aws-lc-rs for the AWS SDK's client), and rustls will not
/// choose between them by itself. Calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The store the config names: PostgreSQL when `store.url` is set, else
/// SQLite in the data directory.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, crate::store::StoreError> {
    if config.store.is_postgres() {
        return Ok(Arc::new(PgStore::open(&config.store).await?));
    }
    Ok(Arc::new(SqliteStore::open(&config.database_path()).await?))
}

/// Implementations to use instead of those the config names: tests and
/// embedders plug theirs in here.
#[derive(Default)]
pub struct Seams {
    pub notifier: Option<Arc<dyn Notifier>>,
    pub classifier: Option<Arc<dyn crate::tier2::Classifier>>,
}

/// Serves on `listener` until `shutdown` completes, then finishes what is
/// in flight and closes the store.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    seams: Seams,
) -> Result<(), ServeError> {
    let Seams {
        notifier,
        classifier,
    } = seams;
    install_crypto_provider();
    let addr = listener.local_addr().map_err(ServeError::Listener)?;
    let matcher = Arc::new(Matcher::builtin().map_err(ServeError::Rules)?);
    let behavior = Arc::new(behavior_rules(&config)?);
    let store = open_store(&config).await?;
    let tls = tls(&config).await?;
    println!("{}", describe(&config, addr, &matcher));
    let auth = Auth::new(&config);
    if auth.is_open() {
        tracing::warn!("no tokens configured: every call is allowed; loopback only");
    }
    let frame_limit = config
        .limits
        .max_utterance_bytes
        .max(config.limits.max_message_bytes)
        + 64 * 1024;
    let config = Arc::new(config);

    let roster = match config.paging.roster.as_str() {
        "" => None,
        path => Some(Arc::new(
            Roster::load(std::path::Path::new(path)).map_err(ServeError::Roster)?,
        )),
    };
    let patient_ref_secret = patient_ref_secret(&config).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The notifier is built in the pager's own task: nothing that serves
    // detection waits for AWS configuration.
    let pager = {
        let store = store.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let notifier: Arc<dyn Notifier> = match (notifier, config.paging.notifier) {
                (Some(n), _) => n,
                (None, NotifierKind::Console) => Arc::new(pager::console::Console),
                (None, NotifierKind::Sns) => {
                    Arc::new(pager::sns::SnsNotifier::new(&config.sns).await)
                }
            };
            let wake = store.pages_signal();
            Pager {
                store,
                notifier,
                roster,
                template: config.paging.sms_template.clone(),
                patient_ref_secret,
                repage: crate::store::RepagePolicy {
                    ack_timeout_ms: i64::try_from(
                        config.paging.ack_timeout_secs.saturating_mul(1000),
                    )
                    .unwrap_or(i64::MAX),
                    max_rounds: config.paging.max_rounds,
                },
                claim_lease_ms: i64::try_from(config.paging.claim_lease_secs.saturating_mul(1000))
                    .unwrap_or(i64::MAX),
                backup_after_failures: i64::from(config.paging.backup_after_failures),
                backup_after_ms: i64::try_from(
                    config.paging.backup_after_secs.saturating_mul(1000),
                )
                .unwrap_or(i64::MAX),
            }
            .run(wake, stop_rx)
            .await;
        })
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CrisisDetectionServer<Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;
    // Building the client reads configuration only; credentials are looked
    // up with the first request.
    let classifier: Option<Arc<dyn crate::tier2::Classifier>> = match classifier {
        Some(c) => Some(c),
        None if config.tier2.model_id.is_empty() => None,
        None => Some(Arc::new(
            crate::tier2::bedrock::BedrockClassifier::new(&config.tier2, None).await,
        )),
    };
    // Subscriptions never end on their own; they are told when shutdown
    // begins, so that it can finish.
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = closing_tx.send(true);
    };
    let core = Core::new(
        matcher,
        store.clone(),
        config.clone(),
        classifier,
        behavior,
        closing,
    );
    let readiness = tokio::spawn(readiness_loop(
        store.clone(),
        health.clone(),
        core.ready.clone(),
        stop_tx.subscribe(),
    ));
    let service = Service::new(core);
    let crisis = InterceptedService::new(
        CrisisDetectionServer::new(service)
            .max_decoding_message_size(frame_limit)
            .max_encoding_message_size(frame_limit),
        move |req| auth.intercept(req),
    );
    let health_task = match config.health_addr() {
        Ok(Some(addr)) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(ServeError::Listener)?;
            let only_health = health_service.clone();
            Some(tokio::spawn(async move {
                let _ = Server::builder()
                    .add_service(only_health)
                    .serve_with_incoming(TcpListenerStream::new(listener))
                    .await;
            }))
        }
        _ => None,
    };
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let result = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(crisis)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    if let Some(t) = health_task {
        t.abort();
    }
    tracing::info!("shutting down: in-flight requests finished");
    let _ = stop_tx.send(true);
    let _ = pager.await;
    let _ = readiness.await;
    store.close().await;
    tracing::info!("store closed");
    result.map_err(ServeError::from)
}
