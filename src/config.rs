//! The service's one configuration: a TOML file (`--config`), then
//! `CRISISD_*` environment variables over it, validated at start-up.
//!
//! Every key has a default, so `crisisd serve` runs with no file at all.
//! Each leaf key `a.b_c` can be set from the environment as `CRISISD_A_B_C`;
//! lists (tokens, practices) only from the file. An unknown `CRISISD_*`
//! variable is an error, not a silent typo. Errors name the key, never the
//! value: a value may be a secret.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::ID_MAX;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The voice runtime: `StreamTranscript`.
    Voice,
    /// The messaging gateway: `SubmitMessage`.
    Messaging,
    /// The scheduling system (Tier 3, a later issue).
    Scheduling,
    /// On-call clinicians and their tools: read escalations.
    Responder,
    /// Everything a responder may, across practices.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Voice => "voice",
            Role::Messaging => "messaging",
            Role::Scheduling => "scheduling",
            Role::Responder => "responder",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// Who holds it; the actor in the audit log.
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the token (`crisisd token new` prints both).
    pub sha256: String,
    /// For a responder: the practice it may read (empty: none). For a
    /// messaging or scheduling token: the only practice it may act for
    /// (empty: any).
    #[serde(default)]
    pub practice: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM certificate chain and key. Both or neither.
    pub cert: String,
    pub key: String,
    /// PEM CA for client certificates: set it to require mutual TLS.
    pub client_ca: String,
}

impl Tls {
    pub fn enabled(&self) -> bool {
        !self.cert.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_utterance_bytes: usize,
    pub max_message_bytes: usize,
    /// Open transcript streams, server-wide.
    pub max_streams: usize,
    /// Sustained utterances per second on one stream, and the burst above it.
    pub utterances_per_second: u32,
    pub utterance_burst: u32,
    /// A stream with no event for this long is closed.
    pub idle_timeout_secs: u64,
    /// Message threads whose windows are kept in memory; the least recently
    /// used goes first.
    pub max_threads: usize,
    /// A thread's window is forgotten after this long without a message.
    pub thread_window_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_utterance_bytes: 4096,
            max_message_bytes: 16384,
            max_streams: 10_000,
            utterances_per_second: 20,
            utterance_burst: 40,
            idle_timeout_secs: 300,
            max_threads: 100_000,
            thread_window_secs: 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Referral {
    pub en: String,
    pub es: String,
}

pub const REFERRAL_EN: &str = "You don't have to go through this alone. Please call or text 988 \
to reach the 988 Suicide & Crisis Lifeline, any time, day or night. If you are in immediate \
danger, call 911.";
pub const REFERRAL_ES: &str = "No tiene que pasar por esto solo. Llame al 988 (oprima 2 para \
español) o envíe AYUDA por mensaje de texto al 988 para hablar con la Línea 988 de Prevención \
del Suicidio y Crisis, a cualquier hora. Si está en peligro inmediato, llame al 911.";

impl Default for Referral {
    fn default() -> Self {
        Referral {
            en: REFERRAL_EN.to_string(),
            es: REFERRAL_ES.to_string(),
        }
    }
}

/// A practice's own referral wording; empty fields use the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Practice {
    pub id: String,
    #[serde(default)]
    pub referral_en: String,
    #[serde(default)]
    pub referral_es: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    /// A tracing filter: `info`, `crisisd=debug`, …
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

/// Who delivers pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifierKind {
    /// Print the page on stdout (no PHI); the embedded default.
    Console,
    /// SMS through AWS SNS.
    Sns,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Paging {
    pub notifier: NotifierKind,
    /// The on-call roster file (TOML); empty: no roster.
    pub roster: String,
    /// The SMS text; placeholders {severity} {tier} {id} {patient} {practice}.
    pub sms_template: String,
    /// Keys the opaque patient reference in a page. Empty: a random one is
    /// made and kept in the data directory.
    pub patient_ref_secret: String,
    /// Not acknowledged within this long: page the on-call clinician again
    /// and the backup.
    pub ack_timeout_secs: u64,
    /// Rounds of pages at most, the first included.
    pub max_rounds: u32,
    /// A page still failing after this many attempts, or this long, is
    /// sent to the backup as well.
    pub backup_after_failures: u32,
    pub backup_after_secs: u64,
    /// A patient's escalation open (or acknowledged) and younger than this
    /// takes new triggers from any call or thread: one page per patient.
    pub dedup_window_secs: u64,
    /// A pager claims a page for this long before sending it; no other
    /// pager (replica) sends it meanwhile, and when a replica dies holding
    /// a claim another takes the page over after this. Longer than a send
    /// can take (twice sns.timeout_ms), or a slow send could be repeated.
    pub claim_lease_secs: u64,
}

impl Default for Paging {
    fn default() -> Self {
        Paging {
            notifier: NotifierKind::Console,
            roster: String::new(),
            sms_template: crate::pager::sms::DEFAULT_TEMPLATE.to_string(),
            patient_ref_secret: String::new(),
            ack_timeout_secs: 300,
            max_rounds: 3,
            backup_after_failures: 3,
            backup_after_secs: 120,
            dedup_window_secs: 3600,
            claim_lease_secs: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sns {
    pub region: String,
    /// Any SNS-compatible endpoint; empty: AWS's own for the region.
    pub endpoint_url: String,
    /// Optional sender id and origination number for the SMS.
    pub sender_id: String,
    pub origination_number: String,
    /// Connect and per-attempt timeout, in milliseconds.
    pub timeout_ms: u64,
}

impl Default for Sns {
    fn default() -> Self {
        Sns {
            region: "us-east-1".to_string(),
            endpoint_url: String::new(),
            sender_id: String::new(),
            origination_number: String::new(),
            timeout_ms: 3000,
        }
    }
}

/// The contextual classifier (Tier 2).
/// Behavioral signals from the schedule (Tier 3).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tier3 {
    /// A behavior rule file; empty: the shipped `rules/behavior.toml`.
    pub rules: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tier2 {
    /// Bedrock model id or inference profile; empty: no classifier, and
    /// every review escalates by the fail-safe rule.
    pub model_id: String,
    pub region: String,
    /// Any Converse-compatible endpoint; empty: Bedrock's own.
    pub endpoint_url: String,
    /// The whole decision, retries included, in milliseconds.
    pub deadline_ms: u64,
    /// The window sent: at most this many turns and characters.
    pub max_turns: usize,
    pub max_chars: usize,
    /// Model requests in flight across the service.
    pub max_in_flight: usize,
}

impl Default for Tier2 {
    fn default() -> Self {
        Tier2 {
            model_id: String::new(),
            region: "us-east-1".to_string(),
            endpoint_url: String::new(),
            deadline_ms: 4000,
            max_turns: 12,
            max_chars: 4000,
            max_in_flight: 32,
        }
    }
}

/// Where escalations, the outbox and the audit log live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Empty: the embedded SQLite database in data_dir, for one process. A
    /// postgres:// URL: PostgreSQL, shared by every replica (TLS as its
    /// sslmode and sslrootcert parameters say).
    pub url: String,
    /// PostgreSQL connections this process keeps, at most and at least.
    pub max_connections: u32,
    pub min_connections: u32,
    /// Waiting for a free connection longer than this fails the write
    /// (and the service retries, then answers without it).
    pub acquire_timeout_ms: u64,
    /// A statement running longer than this is cancelled by the server.
    pub statement_timeout_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: String::new(),
            max_connections: 16,
            min_connections: 1,
            acquire_timeout_ms: 2000,
            statement_timeout_ms: 5000,
        }
    }
}

impl StoreConfig {
    /// PostgreSQL rather than the embedded SQLite database.
    pub fn is_postgres(&self) -> bool {
        !self.url.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC address.
    pub listen: String,
    /// Prometheus metrics address; empty: no metrics endpoint.
    pub metrics_listen: String,
    /// A plaintext gRPC health endpoint on loopback (for a container's
    /// health check, which has no client certificate); empty: off.
    pub health_listen: String,
    /// Where the embedded SQLite database lives.
    pub data_dir: String,
    pub store: StoreConfig,
    pub log: Log,
    pub limits: Limits,
    pub referral: Referral,
    pub tls: Tls,
    pub paging: Paging,
    pub sns: Sns,
    pub tier2: Tier2,
    pub tier3: Tier3,
    pub tokens: Vec<Token>,
    pub practices: Vec<Practice>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:50051".to_string(),
            metrics_listen: String::new(),
            health_listen: String::new(),
            data_dir: "./crisisd-data".to_string(),
            store: StoreConfig::default(),
            log: Log::default(),
            limits: Limits::default(),
            referral: Referral::default(),
            tls: Tls::default(),
            paging: Paging::default(),
            sns: Sns::default(),
            tier2: Tier2::default(),
            tier3: Tier3::default(),
            tokens: Vec::new(),
            practices: Vec::new(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The variable that names the config file, when `--config` is not given.
pub const CONFIG_VAR: &str = "CRISISD_CONFIG";

impl Config {
    /// Reads `path` (if any), applies `env` (the process environment, or a
    /// test's), and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => String::new(),
        };
        let file = path.map_or("(none)".to_string(), |p| p.display().to_string());
        let mut value: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: file.clone(),
            message: e.message().to_string(),
        })?;
        apply_env(&mut value, env)?;
        let config: Config =
            toml::Value::Table(value)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: file,
                    message: e.message().to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen
            .parse()
            .map_err(|_| invalid("listen", "not a socket address (host:port)"))
    }

    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.metrics_listen.is_empty() {
            return Ok(None);
        }
        self.metrics_listen
            .parse()
            .map(Some)
            .map_err(|_| invalid("metrics_listen", "not a socket address (host:port)"))
    }

    pub fn health_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.health_listen.is_empty() {
            return Ok(None);
        }
        let addr: SocketAddr = self
            .health_listen
            .parse()
            .map_err(|_| invalid("health_listen", "not a socket address (host:port)"))?;
        if !addr.ip().is_loopback() {
            return Err(invalid(
                "health_listen",
                "must be a loopback address: it is plaintext and unauthenticated",
            ));
        }
        Ok(Some(addr))
    }

    pub fn database_path(&self) -> PathBuf {
        Path::new(&self.data_dir).join("crisisd.db")
    }

    /// The referral text for a practice and language ("en", "es", …).
    pub fn referral(&self, practice: &str, language: &str) -> &str {
        let spanish = language == "es" || language.starts_with("es-");
        let own = self.practices.iter().find(|p| p.id == practice);
        match (spanish, own) {
            (true, Some(p)) if !p.referral_es.is_empty() => &p.referral_es,
            (false, Some(p)) if !p.referral_en.is_empty() => &p.referral_en,
            (true, _) => &self.referral.es,
            (false, _) => &self.referral.en,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let listen = self.listen_addr()?;
        self.metrics_addr()?;
        self.health_addr()?;
        if self.data_dir.is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if self.log.level.is_empty() {
            return Err(invalid("log.level", "must not be empty"));
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_utterance_bytes", l.max_utterance_bytes as u64),
            ("limits.max_message_bytes", l.max_message_bytes as u64),
            ("limits.max_streams", l.max_streams as u64),
            (
                "limits.utterances_per_second",
                u64::from(l.utterances_per_second),
            ),
            ("limits.utterance_burst", u64::from(l.utterance_burst)),
            ("limits.idle_timeout_secs", l.idle_timeout_secs),
            ("limits.max_threads", l.max_threads as u64),
            ("limits.thread_window_secs", l.thread_window_secs),
            ("paging.ack_timeout_secs", self.paging.ack_timeout_secs),
            ("paging.max_rounds", u64::from(self.paging.max_rounds)),
            (
                "paging.backup_after_failures",
                u64::from(self.paging.backup_after_failures),
            ),
            ("paging.backup_after_secs", self.paging.backup_after_secs),
            ("paging.claim_lease_secs", self.paging.claim_lease_secs),
            (
                "store.max_connections",
                u64::from(self.store.max_connections),
            ),
            ("store.acquire_timeout_ms", self.store.acquire_timeout_ms),
            (
                "store.statement_timeout_ms",
                self.store.statement_timeout_ms,
            ),
            ("tier2.deadline_ms", self.tier2.deadline_ms),
            ("tier2.max_turns", self.tier2.max_turns as u64),
            ("tier2.max_chars", self.tier2.max_chars as u64),
            ("tier2.max_in_flight", self.tier2.max_in_flight as u64),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        // The gRPC frame limit is derived from these; keep it sane.
        if l.max_utterance_bytes > 1 << 20 || l.max_message_bytes > 1 << 20 {
            return Err(invalid(
                "limits",
                "text limits above 1 MiB are not supported",
            ));
        }
        for (key, text) in [
            ("referral.en", &self.referral.en),
            ("referral.es", &self.referral.es),
        ] {
            check_referral(key, text)?;
        }
        crate::pager::sms::check(&self.paging.sms_template)
            .map_err(|e| invalid("paging.sms_template", e.to_string()))?;
        if self.paging.notifier == NotifierKind::Sns && self.paging.roster.is_empty() {
            return Err(invalid(
                "paging.roster",
                "the sns notifier needs a roster to know whom to page",
            ));
        }
        if self.sns.region.is_empty() {
            return Err(invalid("sns.region", "must not be empty"));
        }
        if self.sns.timeout_ms == 0 {
            return Err(invalid("sns.timeout_ms", "must be at least 1"));
        }
        if self.paging.notifier == NotifierKind::Sns
            && self.paging.claim_lease_secs.saturating_mul(1000)
                <= self.sns.timeout_ms.saturating_mul(2)
        {
            return Err(invalid(
                "paging.claim_lease_secs",
                "must be longer than a send can take (twice sns.timeout_ms)",
            ));
        }
        self.validate_store()?;
        let url = &self.sns.endpoint_url;
        if !url.is_empty() && !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(invalid(
                "sns.endpoint_url",
                "must be an http:// or https:// URL",
            ));
        }
        let tls = &self.tls;
        if tls.cert.is_empty() != tls.key.is_empty() {
            return Err(invalid("tls", "cert and key must be set together"));
        }
        if !tls.client_ca.is_empty() && tls.cert.is_empty() {
            return Err(invalid(
                "tls.client_ca",
                "mutual TLS needs tls.cert and tls.key",
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let key = format!("tokens[{i}]");
            if t.name.is_empty() || t.name.len() > ID_MAX {
                return Err(invalid(format!("{key}.name"), "must be 1-128 characters"));
            }
            if !names.insert(&t.name) {
                return Err(invalid(format!("{key}.name"), "is used by another token"));
            }
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    format!("{key}.sha256"),
                    "must be 64 hex digits (crisisd token new prints it)",
                ));
            }
            if !hashes.insert(t.sha256.to_ascii_lowercase()) {
                return Err(invalid(
                    format!("{key}.sha256"),
                    "is the same as another token's",
                ));
            }
            if t.role == Role::Responder && t.practice.is_empty() {
                return Err(invalid(
                    format!("{key}.practice"),
                    "a responder token must name the practice it reads",
                ));
            }
        }
        let mut ids = std::collections::HashSet::new();
        for (i, p) in self.practices.iter().enumerate() {
            let key = format!("practices[{i}]");
            if crate::ids::PracticeId::parse(&p.id).is_err() {
                return Err(invalid(format!("{key}.id"), "not a valid id"));
            }
            if !ids.insert(&p.id) {
                return Err(invalid(format!("{key}.id"), "appears twice"));
            }
            for (f, text) in [
                ("referral_en", &p.referral_en),
                ("referral_es", &p.referral_es),
            ] {
                if !text.is_empty() {
                    check_referral(&format!("{key}.{f}"), text)?;
                }
            }
        }
        // Plaintext and open doors only where nobody else can reach them.
        if !listen.ip().is_loopback() && (!tls.enabled() || self.tokens.is_empty()) {
            return Err(invalid(
                "listen",
                "a non-loopback address needs TLS (tls.cert, tls.key) and at least one token",
            ));
        }
        Ok(())
    }
}

impl Config {
    fn validate_store(&self) -> Result<(), ConfigError> {
        let s = &self.store;
        if s.min_connections > s.max_connections {
            return Err(invalid(
                "store.min_connections",
                "must not exceed store.max_connections",
            ));
        }
        if s.max_connections > 10_000 {
            return Err(invalid("store.max_connections", "must be at most 10000"));
        }
        if !s.is_postgres() {
            return Ok(());
        }
        // Never the value: it may carry a password.
        if !s.url.starts_with("postgres://") && !s.url.starts_with("postgresql://") {
            return Err(invalid(
                "store.url",
                "must be a postgres:// URL (or empty for SQLite in data_dir)",
            ));
        }
        // A key made in one replica's data directory would give each
        // replica its own patient references for the same patient.
        if self.paging.patient_ref_secret.is_empty() {
            return Err(invalid(
                "paging.patient_ref_secret",
                "must be set with store.url: every replica must use the same key",
            ));
        }
        Ok(())
    }
}

fn check_referral(key: &str, text: &str) -> Result<(), ConfigError> {
    if text.trim().is_empty() || text.len() > 1000 {
        return Err(invalid(key, "must be 1-1000 bytes"));
    }
    if !text.contains("988") {
        return Err(invalid(key, "must give the 988 Lifeline number"));
    }
    Ok(())
}

/// Every leaf key of the default config, by its environment variable.
fn env_keys() -> BTreeMap<String, (Vec<String>, toml::Value)> {
    let mut out = BTreeMap::new();
    let Ok(toml::Value::Table(t)) = toml::Value::try_from(Config::default()) else {
        return out;
    };
    fn walk(
        t: &toml::Table,
        path: &mut Vec<String>,
        out: &mut BTreeMap<String, (Vec<String>, toml::Value)>,
    ) {
        for (k, v) in t {
            path.push(k.clone());
            match v {
                toml::Value::Table(inner) => walk(inner, path, out),
                toml::Value::Array(_) => {}
                leaf => {
                    let var = format!("CRISISD_{}", path.join("_").to_ascii_uppercase());
                    out.insert(var, (path.clone(), leaf.clone()));
                }
            }
            path.pop();
        }
    }
    walk(&t, &mut Vec::new(), &mut out);
    out
}

/// The environment variables that set config keys, for `config example`.
pub fn env_vars() -> Vec<String> {
    env_keys().into_keys().collect()
}

fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let keys = env_keys();
    for (var, raw) in env {
        if !var.starts_with("CRISISD_") || var == CONFIG_VAR || var.starts_with("CRISISD_TEST_") {
            continue;
        }
        let Some((path, default)) = keys.get(&var) else {
            return Err(ConfigError::Env {
                var,
                message: "not a setting crisisd knows (crisisd config example lists them)"
                    .to_string(),
            });
        };
        let value = match default {
            toml::Value::Integer(_) => raw
                .trim()
                .parse::<i64>()
                .map(toml::Value::Integer)
                .map_err(|_| ConfigError::Env {
                    var: var.clone(),
                    message: "must be a whole number".to_string(),
                })?,
            toml::Value::Boolean(_) => raw
                .trim()
                .parse::<bool>()
                .map(toml::Value::Boolean)
                .map_err(|_| ConfigError::Env {
                    var: var.clone(),
                    message: "must be true or false".to_string(),
                })?,
            _ => toml::Value::String(raw),
        };
        let mut t = &mut *table;
        for k in &path[..path.len() - 1] {
            let entry = t
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(inner) = entry else {
                return Err(ConfigError::Env {
                    var,
                    message: format!("the config file sets {k} to something other than a table"),
                });
            };
            t = inner;
        }
        if let Some(last) = path.last() {
            t.insert(last.clone(), value);
        }
    }
    Ok(())
}

/// A commented config with every key at its default, for
/// `crisisd config example`.
pub const EXAMPLE: &str = include_str!("../crisisd.example.toml");

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn with_file(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "crisisd-config-test-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("c.toml");
        std::fs::write(&path, text).expect("write config");
        let r = Config::load(Some(&path), env(vars));
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn no_file_no_env_is_the_default() {
        let c = Config::load(None, env(&[])).expect("defaults are valid");
        assert_eq!(c, Config::default());
        assert_eq!(c.listen, "127.0.0.1:50051");
    }

    #[test]
    fn example_file_is_the_default_and_lists_every_key() {
        let c: Config = toml::from_str(EXAMPLE).expect("example parses");
        assert_eq!(c, Config::default());
        for var in env_vars() {
            let key = var.trim_start_matches("CRISISD_").to_ascii_lowercase();
            let leaf = key.rsplit('_').next().unwrap_or_default().to_string();
            assert!(EXAMPLE.contains(&leaf), "example lacks {key}");
            assert!(EXAMPLE.contains(&var), "example does not name {var}");
        }
    }

    #[test]
    fn env_overrides_file() {
        let c = with_file(
            "listen = \"127.0.0.1:1\"\n[limits]\nmax_streams = 5\n",
            &[
                ("CRISISD_LIMITS_MAX_STREAMS", "7"),
                ("CRISISD_LOG_FORMAT", "json"),
                ("PATH", "/bin"),
            ],
        )
        .expect("valid");
        assert_eq!(c.listen, "127.0.0.1:1");
        assert_eq!(c.limits.max_streams, 7);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn errors_name_the_key_and_never_the_value() {
        let secret = "s3cr3t-value";
        // (config file, environment, key the error must name)
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (
                "",
                &[("CRISISD_LIMITS_MAX_STREAMZ", secret)],
                "CRISISD_LIMITS_MAX_STREAMZ",
            ),
            (
                "",
                &[("CRISISD_LIMITS_MAX_STREAMS", secret)],
                "CRISISD_LIMITS_MAX_STREAMS",
            ),
            ("", &[("CRISISD_LISTEN", secret)], "listen"),
            (
                "",
                &[("CRISISD_LIMITS_MAX_STREAMS", "0")],
                "limits.max_streams",
            ),
            ("", &[("CRISISD_LISTEN", "0.0.0.0:50051")], "listen"),
            ("", &[("CRISISD_TLS_CERT", "/x.pem")], "tls"),
            (
                "",
                &[("CRISISD_REFERRAL_EN", "call someone")],
                "referral.en",
            ),
            (
                "[[tokens]]\nname = \"a\"\nrole = \"voice\"\nsha256 = \"s3cr3t-value\"\n",
                &[],
                "tokens[0].sha256",
            ),
            (
                "[[tokens]]\nname = \"a\"\nrole = \"responder\"\nsha256 = \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n",
                &[],
                "tokens[0].practice",
            ),
            ("[[practices]]\nid = \"bad id!\"\n", &[], "practices[0].id"),
            // A database URL may carry a password.
            (
                "",
                &[("CRISISD_STORE_URL", "mysql://u:s3cr3t-value@h/db")],
                "store.url",
            ),
            (
                "",
                &[("CRISISD_STORE_URL", "postgres://u:s3cr3t-value@h/db")],
                "paging.patient_ref_secret",
            ),
            (
                "",
                &[("CRISISD_STORE_MAX_CONNECTIONS", "0")],
                "store.max_connections",
            ),
            (
                "",
                &[("CRISISD_STORE_MIN_CONNECTIONS", "17")],
                "store.min_connections",
            ),
            (
                "",
                &[("CRISISD_STORE_STATEMENT_TIMEOUT_MS", "0")],
                "store.statement_timeout_ms",
            ),
            (
                "",
                &[("CRISISD_PAGING_CLAIM_LEASE_SECS", "0")],
                "paging.claim_lease_secs",
            ),
            (
                "[paging]\nnotifier = \"sns\"\nroster = \"r.toml\"\nclaim_lease_secs = 6\n",
                &[],
                "paging.claim_lease_secs",
            ),
        ];
        for (file, vars, key) in cases {
            let e = with_file(file, vars).expect_err("invalid").to_string();
            assert!(e.contains(key), "{e:?} should name {key}");
            assert!(!e.contains(secret), "{e:?} echoes the value");
        }
    }

    #[test]
    fn referral_by_practice_and_language() {
        let c = with_file(
            "[[practices]]\nid = \"p1\"\nreferral_en = \"Call or text 988 now.\"\n",
            &[],
        )
        .expect("valid");
        assert_eq!(c.referral("p1", "en"), "Call or text 988 now.");
        assert_eq!(c.referral("p1", "es-MX"), REFERRAL_ES);
        assert_eq!(c.referral("p2", "en-US"), REFERRAL_EN);
        assert_eq!(c.referral("p2", "es"), REFERRAL_ES);
    }
}
