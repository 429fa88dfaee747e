//! The `CrisisDetection` service: thin. It authenticates, validates,
//! limits, and hands domain values to Tier 1 and the escalation module; it
//! writes through the store before it answers.
//!
//! Status codes: a malformed or out-of-order event is `INVALID_ARGUMENT`; a
//! missing or unknown token `UNAUTHENTICATED`; the wrong role
//! `PERMISSION_DENIED`; too many streams or utterances `RESOURCE_EXHAUSTED`;
//! an idle stream `DEADLINE_EXCEEDED`; a store that cannot be written
//! `UNAVAILABLE`. An error ends only its own stream.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::auth::principal;
use super::convert;
use super::pb;
use super::pb::crisis_detection_server::CrisisDetection;
use crate::audit::AuditEvent;
use crate::config::{Config, Role};
use crate::conversation::{Call, CallShared, Threads};
use crate::domain::Tier;
use crate::domain::{EscalationState, Speaker};
use crate::escalation::{self, Directive, Escalation, Open, Origin, Step, Trigger, now_ms};
use crate::ids::EscalationId;
use crate::store::{Escalated, EscalationQuery, EscalationWrite, MessageVerdict, Recorded, Store};
use crate::tier1::{Action, Detection, Matcher};
use crate::tier2::{Classifier, Decision, Turn};

/// Directives waiting to go out on one stream. A client that does not read
/// them stops being read from in turn (the send waits): back-pressure, not
/// loss.
const DIRECTIVE_QUEUE: usize = 16;
/// Attempts at recording an escalation before the directive goes anyway.
const RECORD_ATTEMPTS: u32 = 3;

/// Everything the service shares across requests.
pub struct Core {
    pub matcher: Arc<Matcher>,
    pub store: Arc<dyn Store>,
    pub config: Arc<Config>,
    pub streams: Arc<Semaphore>,
    pub threads: Threads,
    /// The contextual classifier, if one is configured.
    pub classifier: Option<Arc<dyn Classifier>>,
    /// Model requests in flight across the service.
    pub tier2_slots: Arc<Semaphore>,
    pub circuit: std::sync::Mutex<crate::tier2::Circuit>,
    /// Tier 3's pattern rules.
    pub behavior: Arc<crate::tier3::BehaviorRules>,
    /// One appointment event of a patient judged at a time.
    pub patient_locks: Vec<tokio::sync::Mutex<()>>,
    /// Turns true when the server starts to shut down: streams that would
    /// otherwise never end (subscriptions) end then.
    pub closing: tokio::sync::watch::Receiver<bool>,
    /// False while the store cannot be written (the readiness probe says
    /// so): new streams and texts are refused with `UNAVAILABLE`.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

/// A review waiting for Tier 2.
struct Review {
    turns: Vec<Turn>,
    trigger: Trigger,
    utterance_id: String,
    received: Instant,
}

/// Whether a directive went out.
enum Sent {
    Yes,
    Nothing,
    ClientGone,
    /// The store would not take the escalation: no directive was sent.
    Unrecorded,
}

/// Ends a stream whose escalation the store would not take. No directive
/// goes out for an escalation that is not recorded (it would name one the
/// store does not have); the client must fail safe on this status.
fn unrecorded() -> Status {
    Status::unavailable(
        "an escalation could not be recorded: give the caller the crisis referral and reconnect",
    )
}

/// A call's Tier 2 worker: one request in flight per call; reviews that
/// arrive meanwhile replace the waiting one, so the next request carries
/// the newest context.
struct Tier2Worker {
    slot: Arc<std::sync::Mutex<(Option<Review>, bool)>>,
    wake: Arc<tokio::sync::Notify>,
}

impl Tier2Worker {
    fn submit(&self, r: Review) {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).0 = Some(r);
        self.wake.notify_one();
    }

    /// The stream is over: finish what is waiting, then stop.
    fn close(&self) {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.wake.notify_one();
    }
}

impl Core {
    pub fn new(
        matcher: Arc<Matcher>,
        store: Arc<dyn Store>,
        config: Arc<Config>,
        classifier: Option<Arc<dyn Classifier>>,
        behavior: Arc<crate::tier3::BehaviorRules>,
        closing: tokio::sync::watch::Receiver<bool>,
    ) -> Core {
        Core {
            behavior,
            closing,
            ready: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            patient_locks: (0..super::schedule::PATIENT_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            streams: Arc::new(Semaphore::new(config.limits.max_streams)),
            threads: Threads::new(config.limits.max_threads, config.limits.thread_window_secs),
            tier2_slots: Arc::new(Semaphore::new(config.tier2.max_in_flight)),
            circuit: Default::default(),
            classifier,
            matcher,
            store,
            config,
        }
    }

    /// Asks Tier 2 about a review and judges the answer. A full queue, like
    /// any failure, escalates. One audit row per model call: conversation,
    /// model, outcome, latency; never the text.
    async fn tier2(
        &self,
        subject: &str,
        review_turns: &[Turn],
        trigger: &Trigger,
    ) -> Option<Trigger> {
        let classifier = self.classifier.as_ref()?;
        let started = Instant::now();
        let allowed = self
            .circuit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .allow(std::time::Instant::now());
        let result = if !allowed {
            Err(crate::tier2::ClassifyError::CircuitOpen)
        } else {
            match self.tier2_slots.clone().try_acquire_owned() {
                Ok(_slot) => classifier.classify(review_turns).await,
                Err(_) => Err(crate::tier2::ClassifyError::QueueFull),
            }
        };
        let failed = result.is_err();
        if allowed {
            let now = std::time::Instant::now();
            let mut c = self.circuit.lock().unwrap_or_else(|e| e.into_inner());
            c.record(failed, now);
            metrics::gauge!("crisisd_tier2_error_rate").set(c.error_rate());
            metrics::gauge!("crisisd_tier2_circuit_open").set(if c.is_open(now) {
                1.0
            } else {
                0.0
            });
        }
        let decision = crate::tier2::judge(result, trigger.severity);
        let latency_ms = started.elapsed().as_millis() as u64;
        let outcome = match &decision {
            Decision::Dismiss { reason_code } => format!("dismiss.{reason_code}"),
            Decision::Escalate { reason_code, .. } => format!("escalate.{reason_code}"),
        };
        metrics::counter!("crisisd_tier2_calls_total", "outcome" => if failed { "failed" } else { "answered" }).increment(1);
        metrics::histogram!("crisisd_tier2_latency_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::info!(subject, model = classifier.model(), outcome = %outcome, latency_ms, "tier 2 decided");
        let audit = AuditEvent {
            actor: "crisisd".to_string(),
            request_id: uuid::Uuid::now_v7().to_string(),
            action: "tier2.call".to_string(),
            subject: subject.to_string(),
            detail: serde_json::json!({
                "model": classifier.model(),
                "outcome": outcome,
                "latency_ms": latency_ms,
                "rule": trigger.rule_id,
            }),
        };
        if let Err(e) = self.store.audit(audit).await {
            tracing::error!(subject, error = %e, "audit write failed");
        }
        match decision {
            Decision::Dismiss { .. } => None,
            Decision::Escalate {
                severity,
                reason_code,
            } => Some(Trigger {
                tier: crate::domain::Tier::Context,
                severity,
                rule_id: trigger.rule_id.clone(),
                reason_code,
            }),
        }
    }

    /// Applies a trigger to a call: a new escalation or a rise is recorded
    /// and its directive sent; a lesser one attaches. Called by the stream's
    /// loop and by its Tier 2 worker, hence every part passed in.
    #[allow(clippy::too_many_arguments)]
    async fn escalate_call(
        &self,
        start: &crate::conversation::CallStart,
        shared: &tokio::sync::Mutex<CallShared>,
        trigger: Trigger,
        utterance_id: &str,
        actor: &str,
        request_id: &str,
        tx: &DirectiveTx,
        received: Instant,
    ) -> Sent {
        let mut sh = shared.lock().await;
        let origin = Origin::Call(start.call.to_string());
        let (id, write, action) = match escalation::step(sh.open, &trigger) {
            Step::Attach(o) => {
                tracing::debug!(call_id = %start.call, escalation_id = %o.id, "trigger attached to open escalation");
                return Sent::Nothing;
            }
            Step::New => {
                let e = self.new_escalation(
                    &trigger,
                    &start.practice,
                    &start.patient,
                    origin.clone(),
                    utterance_id,
                );
                let id = e.id;
                // Another call or thread of this patient (on any replica)
                // may have one open: the store decides in the write's
                // transaction, with no read before it.
                (
                    id,
                    EscalationWrite::CreateUnlessOpen {
                        escalation: Box::new(e),
                        since_ms: self.dedup_since(),
                    },
                    "escalation.create",
                )
            }
            Step::Raise(o) => (
                o.id,
                EscalationWrite::Raise {
                    id: o.id,
                    severity: trigger.severity,
                },
                "escalation.raise",
            ),
        };
        let audit = Self::escalation_audit(actor, request_id, action, id, &origin, &trigger);
        let (id, action) = match self.record(write, audit, id).await {
            Some(Escalated::Attached(o)) if action == "escalation.create" => {
                // The clinician already has this patient's page; this call
                // still gets its referral.
                tracing::info!(call_id = %start.call, escalation_id = %o.id, "trigger attached to the patient's open escalation from another conversation");
                sh.open = Some(o);
                let d = self.directive(
                    o.id,
                    &trigger,
                    start.practice.as_str(),
                    start.language.as_str(),
                    utterance_id,
                );
                if tx.send(Box::new(Ok(convert::directive(&d)))).await.is_err() {
                    return Sent::ClientGone;
                }
                sh.directives += 1;
                metrics::histogram!("crisisd_directive_latency_seconds")
                    .record(received.elapsed().as_secs_f64());
                return Sent::Yes;
            }
            // Raised the patient's escalation from another conversation.
            Some(Escalated::Raised(o)) => (o.id, "escalation.raise"),
            Some(_) => (id, action),
            None => return Sent::Unrecorded,
        };
        sh.open = Some(Open {
            id,
            severity: trigger.severity,
        });
        sh.escalations += u64::from(action == "escalation.create");
        let d = self.directive(
            id,
            &trigger,
            start.practice.as_str(),
            start.language.as_str(),
            utterance_id,
        );
        tracing::info!(call_id = %start.call, escalation_id = %id, tier = trigger.tier.as_str(), severity = trigger.severity.as_str(), rule = %trigger.rule_id, "escalation");
        metrics::counter!("crisisd_escalations_total", "tier" => trigger.tier.as_str(), "severity" => trigger.severity.as_str()).increment(1);
        if tx.send(Box::new(Ok(convert::directive(&d)))).await.is_err() {
            return Sent::ClientGone;
        }
        sh.directives += 1;
        metrics::histogram!("crisisd_directive_latency_seconds")
            .record(received.elapsed().as_secs_f64());
        Sent::Yes
    }

    /// Tells the store about a call for Tier 3, off the stream's path: a
    /// lost record costs a behavior signal, never a directive.
    fn remember_call(&self, start: &crate::conversation::CallStart, review: bool) {
        let store = self.store.clone();
        let contact = crate::store::CallContact {
            practice: start.practice.clone(),
            patient: start.patient.clone(),
            call: start.call.clone(),
            started_at_ms: now_ms(),
            language: start.language.as_str().to_string(),
            review,
        };
        let call_id = start.call.to_string();
        tokio::spawn(async move {
            if let Err(e) = store.record_call(contact).await {
                tracing::error!(%call_id, error = %e, "recording the call for Tier 3 failed");
            }
        });
    }

    /// Escalations of the patient created since this (the dedup window)
    /// take new triggers instead of paging again.
    pub(super) fn dedup_since(&self) -> i64 {
        let window = i64::try_from(self.config.paging.dedup_window_secs.saturating_mul(1000))
            .unwrap_or(i64::MAX);
        now_ms().saturating_sub(window)
    }

    /// Starts a call's Tier 2 worker, if a classifier is configured.
    fn tier2_worker(
        self: &Arc<Self>,
        start: &crate::conversation::CallStart,
        shared: &Arc<tokio::sync::Mutex<CallShared>>,
        actor: &str,
        request_id: &str,
        tx: &DirectiveTx,
    ) -> Option<(Tier2Worker, tokio::task::JoinHandle<()>)> {
        self.classifier.as_ref()?;
        let worker = Tier2Worker {
            slot: Arc::default(),
            wake: Arc::default(),
        };
        let (slot, wake) = (worker.slot.clone(), worker.wake.clone());
        let (core, start, shared, tx) = (self.clone(), start.clone(), shared.clone(), tx.clone());
        let (actor, request_id) = (actor.to_string(), request_id.to_string());
        let task = tokio::spawn(async move {
            let subject = format!("call:{}", start.call);
            loop {
                let (next, closed) = {
                    let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
                    (s.0.take(), s.1)
                };
                let Some(r) = next else {
                    if closed {
                        return;
                    }
                    wake.notified().await;
                    continue;
                };
                if let Some(t) = core.tier2(&subject, &r.turns, &r.trigger).await {
                    // The stream may be gone: the escalation is still recorded and paged.
                    let sent = core
                        .escalate_call(
                            &start,
                            &shared,
                            t,
                            &r.utterance_id,
                            &actor,
                            &request_id,
                            &tx,
                            r.received,
                        )
                        .await;
                    if matches!(sent, Sent::Unrecorded) {
                        let _ = tx.send(Box::new(Err(unrecorded()))).await;
                    }
                }
            }
        });
        Some((worker, task))
    }
}

#[derive(Clone)]
pub struct Service {
    core: Arc<Core>,
}

impl Service {
    pub fn new(core: Core) -> Service {
        Service {
            core: Arc::new(core),
        }
    }
}

fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::ids::MessageId::parse(v).is_ok())
        .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_string)
}

fn not_ready() -> Status {
    Status::unavailable("not ready: the store cannot be written")
}

impl Core {
    fn check_ready(&self) -> Result<(), Status> {
        if self.ready.load(std::sync::atomic::Ordering::Relaxed) {
            Ok(())
        } else {
            metrics::counter!("crisisd_rejections_total", "code" => "Unavailable").increment(1);
            Err(not_ready())
        }
    }
}

fn count_detections(ds: &[Detection]) {
    for d in ds {
        let action = match d.action {
            Action::Escalate => "escalate",
            Action::Review => "review",
        };
        metrics::counter!("crisisd_detections_total", "tier" => "phrase", "action" => action)
            .increment(1);
    }
}

/// A token bucket: `rate` per second, up to `burst` at once.
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How a stream ended, for its audit row and log.
#[derive(Debug, Clone, Copy)]
enum End {
    CallEnded,
    ClientClosed,
    Rejected,
    Idle,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::CallEnded => "call_ended",
            End::ClientClosed => "client_closed",
            End::Rejected => "rejected",
            End::Idle => "idle",
        }
    }
}

/// What a call's directive channel carries, boxed: a channel allocates
/// its slots up front, and unboxed (a directive and a status side by side,
/// some 200 bytes) they cost an idle call about 6 KiB; boxed, 256 bytes.
type DirectiveItem = Box<Result<pb::Directive, Status>>;
type DirectiveTx = mpsc::Sender<DirectiveItem>;

impl Core {
    pub(super) fn directive(
        &self,
        id: EscalationId,
        trigger: &Trigger,
        practice: &str,
        language: &str,
        utterance: &str,
    ) -> Directive {
        Directive {
            escalation_id: id.to_string(),
            tier: trigger.tier,
            severity: trigger.severity,
            referral_text: self.config.referral(practice, language).to_string(),
            utterance_id: utterance.to_string(),
            reason_code: trigger.reason_code.clone(),
        }
    }

    /// Records an escalation, retrying briefly; what the store made of it.
    /// None when the store cannot take it: the caller sends no directive
    /// and ends the stream with [`unrecorded`]. The failure is logged and
    /// counted.
    async fn record(
        &self,
        write: EscalationWrite,
        audit: AuditEvent,
        escalation_id: EscalationId,
    ) -> Option<Escalated> {
        for attempt in 1..=RECORD_ATTEMPTS {
            match self.store.escalate(write.clone(), audit.clone()).await {
                Ok(done) => return Some(done),
                Err(e) => {
                    tracing::error!(%escalation_id, attempt, error = %e, "recording an escalation failed");
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                }
            }
        }
        metrics::counter!("crisisd_escalations_unrecorded_total").increment(1);
        None
    }

    pub(super) fn new_escalation(
        &self,
        trigger: &Trigger,
        practice: &crate::ids::PracticeId,
        patient: &crate::ids::PatientId,
        origin: Origin,
        utterance: &str,
    ) -> Escalation {
        Escalation {
            id: EscalationId::new(),
            practice: practice.clone(),
            patient: patient.clone(),
            origin,
            tier: trigger.tier,
            rule_id: trigger.rule_id.clone(),
            reason_code: trigger.reason_code.clone(),
            severity: trigger.severity,
            state: EscalationState::Open,
            utterance_id: utterance.to_string(),
            created_at_ms: now_ms(),
            handling: Default::default(),
        }
    }

    pub(super) fn escalation_audit(
        actor: &str,
        request_id: &str,
        action: &str,
        id: EscalationId,
        origin: &Origin,
        trigger: &Trigger,
    ) -> AuditEvent {
        AuditEvent {
            actor: actor.to_string(),
            request_id: request_id.to_string(),
            action: action.to_string(),
            subject: format!("escalation:{id}"),
            detail: serde_json::json!({
                "origin": format!("{}:{}", origin.channel(), origin.id()),
                "tier": trigger.tier.as_str(),
                "severity": trigger.severity.as_str(),
                "rule": trigger.rule_id,
                "reason": trigger.reason_code,
            }),
        }
    }

    async fn run_call(
        self: Arc<Self>,
        inbound: &mut Streaming<pb::TranscriptEvent>,
        tx: &DirectiveTx,
        actor: &str,
        request_id: &str,
    ) -> Result<(), Status> {
        let idle = Duration::from_secs(self.config.limits.idle_timeout_secs);
        let first = match next_event(inbound, idle).await {
            Err(_) => return Err(idle_status(idle)),
            Ok(None) => return Ok(()),
            Ok(Some(Err(status))) => return Err(status),
            Ok(Some(Ok(ev))) => ev,
        };
        let start = match first.event {
            Some(pb::transcript_event::Event::CallStarted(c)) => convert::call_started(c)?,
            _ => {
                return Err(Status::invalid_argument(
                    "the first event of a stream must be call_started",
                ));
            }
        };
        let call_id = start.call.to_string();
        self.store
            .audit(AuditEvent {
                actor: actor.to_string(),
                request_id: request_id.to_string(),
                action: "stream.open".to_string(),
                subject: format!("call:{call_id}"),
                detail: serde_json::json!({ "practice": start.practice.as_str() }),
            })
            .await
            .map_err(|e| {
                tracing::error!(%call_id, error = %e, "audit write failed");
                Status::unavailable("the store is unavailable")
            })?;
        tracing::info!(%call_id, %request_id, "stream opened");
        metrics::counter!("crisisd_streams_total").increment(1);
        self.remember_call(&start, false);
        let mut call = Call::new(start);
        let worker = self.tier2_worker(&call.start, &call.shared, actor, request_id, tx);
        let result = self
            .call_events(
                inbound,
                tx,
                actor,
                request_id,
                &mut call,
                idle,
                worker.as_ref().map(|w| &w.0),
            )
            .await;
        if let Some((w, task)) = worker {
            // Reviews still waiting are decided, and escalate if they must,
            // before the stream is closed.
            w.close();
            let _ = task.await;
        }
        let (escalations, directives) = {
            let sh = call.shared.lock().await;
            (sh.escalations, sh.directives)
        };
        let end = match &result {
            Ok(end) => *end,
            Err(_) => End::Rejected,
        };
        let close = AuditEvent {
            actor: actor.to_string(),
            request_id: request_id.to_string(),
            action: "stream.close".to_string(),
            subject: format!("call:{call_id}"),
            detail: serde_json::json!({
                "end": end.as_str(),
                "utterances": call.utterances,
                "escalations": escalations,
                "directives": directives,
            }),
        };
        if let Err(e) = self.store.audit(close).await {
            tracing::error!(%call_id, error = %e, "audit write failed");
        }
        tracing::info!(%call_id, end = end.as_str(), utterances = call.utterances, escalations, "stream closed");
        match (result, end) {
            (Err(s), _) => Err(s),
            (Ok(_), End::Idle) => Err(idle_status(idle)),
            (Ok(_), _) => Ok(()),
        }
    }

    // The stream's parts are borrowed separately so the worker and the
    // loop can share what they must; bundling them would only hide that.
    #[allow(clippy::too_many_arguments)]
    async fn call_events(
        &self,
        inbound: &mut Streaming<pb::TranscriptEvent>,
        tx: &DirectiveTx,
        actor: &str,
        request_id: &str,
        call: &mut Call,
        idle: Duration,
        tier2: Option<&Tier2Worker>,
    ) -> Result<End, Status> {
        let limits = &self.config.limits;
        let shared = call.shared.clone();
        let mut bucket = Bucket::new(limits.utterances_per_second, limits.utterance_burst);
        let mut reviewed = false;
        loop {
            let ev = match next_event(inbound, idle).await {
                Err(_) => return Ok(End::Idle),
                Ok(None) => return Ok(End::ClientClosed),
                Ok(Some(Err(status))) => {
                    tracing::debug!(call_id = %call.start.call, code = ?status.code(), "stream broke");
                    return Ok(End::ClientClosed);
                }
                Ok(Some(Ok(ev))) => ev,
            };
            let received = Instant::now();
            match ev.event {
                None => {
                    return Err(Status::invalid_argument(
                        "a transcript event must set one of call_started, utterance, call_ended",
                    ));
                }
                Some(pb::transcript_event::Event::CallStarted(_)) => {
                    return Err(Status::invalid_argument(
                        "call_started may come only once, first",
                    ));
                }
                Some(pb::transcript_event::Event::CallEnded(_)) => return Ok(End::CallEnded),
                Some(pb::transcript_event::Event::Utterance(u)) => {
                    if !bucket.take() {
                        return Err(Status::resource_exhausted(format!(
                            "more than {} utterances per second on one stream (limits.utterances_per_second)",
                            limits.utterances_per_second
                        )));
                    }
                    let u = convert::utterance(u, limits.max_utterance_bytes)?;
                    call.utterances += 1;
                    metrics::counter!("crisisd_utterances_total").increment(1);
                    if u.is_final && call.repeated_final(&u.id) {
                        tracing::debug!(call_id = %call.start.call, utterance_id = %u.id, "repeated final ignored");
                        continue;
                    }
                    let detections =
                        self.matcher
                            .feed(&mut call.stream, u.speaker, &u.text, u.is_final);
                    count_detections(&detections);
                    if u.is_final {
                        let turn = Turn {
                            speaker: u.speaker,
                            text: u.text.clone(),
                        };
                        call.remember(turn, self.config.tier2.max_turns);
                    }
                    let Some(trigger) = escalation::decide(&self.matcher, &detections) else {
                        continue;
                    };
                    if u.speaker != Speaker::Patient {
                        continue;
                    }
                    if !reviewed && detections.iter().any(|d| d.action == Action::Review) {
                        // Tier 3 reads whether the patient's last call had one.
                        reviewed = true;
                        self.remember_call(&call.start, true);
                    }
                    if trigger.tier == Tier::Context
                        && let Some(t2) = &tier2
                    {
                        // Tier 2 decides, off the stream's path: the
                        // utterances behind this one keep flowing.
                        let mut turns: Vec<Turn> = call.turns.iter().cloned().collect();
                        if !u.is_final {
                            turns.push(Turn {
                                speaker: u.speaker,
                                text: u.text.clone(),
                            });
                        }
                        t2.submit(Review {
                            turns,
                            trigger,
                            utterance_id: u.id.to_string(),
                            received,
                        });
                        continue;
                    }
                    // Boxed: an escalation is rare in a call, and inline its
                    // state would be carried by every idle call's task.
                    match Box::pin(self.escalate_call(
                        &call.start,
                        &shared,
                        trigger,
                        u.id.as_str(),
                        actor,
                        request_id,
                        tx,
                        received,
                    ))
                    .await
                    {
                        Sent::Yes | Sent::Nothing => {}
                        Sent::ClientGone => return Ok(End::ClientClosed),
                        Sent::Unrecorded => return Err(unrecorded()),
                    }
                }
            }
        }
    }
}

/// The next event, or `Err` when none came within `idle`.
async fn next_event(
    inbound: &mut Streaming<pb::TranscriptEvent>,
    idle: Duration,
) -> Result<Option<Result<pb::TranscriptEvent, Status>>, tokio::time::error::Elapsed> {
    tokio::time::timeout(idle, inbound.next()).await
}

fn idle_status(idle: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "no event for {} s (limits.idle_timeout_secs)",
        idle.as_secs()
    ))
}

type DirectiveStream = Pin<Box<dyn Stream<Item = Result<pb::Directive, Status>> + Send>>;

#[tonic::async_trait]
impl CrisisDetection for Service {
    type StreamTranscriptStream = DirectiveStream;
    type SubscribeDirectivesStream = DirectiveStream;

    async fn record_appointment_event(
        &self,
        req: Request<pb::AppointmentEvent>,
    ) -> Result<Response<pb::AppointmentEventAck>, Status> {
        let who = principal(&req)?;
        who.require(&[Role::Scheduling])?;
        self.core.check_ready()?;
        let request_id = request_id(&req);
        let input = convert::appointment_event(req.into_inner(), now_ms()).inspect_err(|s| {
            metrics::counter!("crisisd_rejections_total", "code" => format!("{:?}", s.code()))
                .increment(1);
        })?;
        let event_id = input.event.id.to_string();
        let answer = self
            .core
            .appointment_event(&who, &request_id, input)
            .await?;
        Ok(Response::new(super::schedule::ack(&event_id, &answer)))
    }

    async fn subscribe_directives(
        &self,
        req: Request<pb::SubscribeDirectivesRequest>,
    ) -> Result<Response<Self::SubscribeDirectivesStream>, Status> {
        let who = principal(&req)?;
        who.require(&[Role::Messaging])?;
        let practice = crate::ids::PracticeId::parse(&req.get_ref().practice_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        who.may_act_for(&practice)?;
        let permit = self.core.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("too many concurrent streams (limits.max_streams)")
        })?;
        let (tx, rx) = mpsc::channel(DIRECTIVE_QUEUE);
        let core = self.core.clone();
        tracing::info!(subscriber = %who.name, "directive subscription opened");
        tokio::spawn(async move {
            let _permit = permit;
            metrics::gauge!("crisisd_subscriptions_open").increment(1.0);
            core.follow_directives(practice, tx).await;
            metrics::gauge!("crisisd_subscriptions_open").decrement(1.0);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn acknowledge_directive(
        &self,
        req: Request<pb::AcknowledgeDirectiveRequest>,
    ) -> Result<Response<pb::AcknowledgeDirectiveResponse>, Status> {
        let who = principal(&req)?;
        who.require(&[Role::Messaging])?;
        let request_id = request_id(&req);
        self.core
            .acknowledge_directive(&who, &request_id, &req.get_ref().directive_id)
            .await?;
        Ok(Response::new(pb::AcknowledgeDirectiveResponse {}))
    }

    async fn stream_transcript(
        &self,
        req: Request<Streaming<pb::TranscriptEvent>>,
    ) -> Result<Response<Self::StreamTranscriptStream>, Status> {
        let who = principal(&req)?;
        who.require(&[Role::Voice])?;
        self.core.check_ready()?;
        let permit = self.core.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(
                "too many concurrent transcript streams (limits.max_streams)",
            )
        })?;
        let request_id = request_id(&req);
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel::<DirectiveItem>(DIRECTIVE_QUEUE);
        let core = self.core.clone();
        // Every open call holds this task: its size is much of what an idle
        // call costs, so rare paths inside it are boxed.
        tokio::spawn(async move {
            let _permit = permit;
            metrics::gauge!("crisisd_streams_open").increment(1.0);
            if let Err(status) = core
                .clone()
                .run_call(&mut inbound, &tx, &who.name, &request_id)
                .await
            {
                metrics::counter!("crisisd_rejections_total", "code" => format!("{:?}", status.code())).increment(1);
                let _ = tx.send(Box::new(Err(status))).await;
            }
            metrics::gauge!("crisisd_streams_open").decrement(1.0);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(|d| *d))))
    }

    async fn submit_message(
        &self,
        req: Request<pb::InboundMessage>,
    ) -> Result<Response<pb::MessageVerdict>, Status> {
        let who = principal(&req)?;
        who.require(&[Role::Messaging])?;
        let request_id = request_id(&req);
        let core = &self.core;
        core.check_ready()?;
        let m = convert::message(req.into_inner(), core.config.limits.max_message_bytes)
            .inspect_err(|s| {
                metrics::counter!("crisisd_rejections_total", "code" => format!("{:?}", s.code()))
                    .increment(1);
            })?;
        who.may_act_for(&m.practice)?;
        metrics::counter!("crisisd_messages_total").increment(1);
        let unavailable = |e: crate::store::StoreError| {
            tracing::error!(message_id = %m.id, error = %e, "store failed");
            Status::unavailable("the store is unavailable")
        };
        if let Some(v) = core
            .store
            .message_verdict(&m.id)
            .await
            .map_err(unavailable)?
        {
            tracing::debug!(message_id = %m.id, "repeated message: first verdict returned");
            return Ok(Response::new(verdict(&v)));
        }
        let thread = core.threads.get(m.practice.as_str(), m.thread.as_str());
        let mut th = thread.lock().await;
        let now = now_ms();
        th.fresh(now, core.threads.window_ms());
        // Work on a copy: if the store refuses, the thread is as it was.
        let mut stream = th.stream.clone();
        let detections = core
            .matcher
            .feed(&mut stream, Speaker::Patient, &m.text, true);
        count_detections(&detections);
        let mut trigger = escalation::decide(&core.matcher, &detections);
        let mut turns = th.turns.clone();
        if turns.len() >= core.config.tier2.max_turns.max(1) {
            turns.pop_front();
        }
        turns.push_back(Turn {
            speaker: Speaker::Patient,
            text: m.text.clone(),
        });
        // A review waits for Tier 2 (bounded by its deadline); the thread's
        // lock keeps it to one request per thread.
        if let Some(t) = &trigger
            && t.tier == Tier::Context
            && core.classifier.is_some()
        {
            let window: Vec<Turn> = turns.iter().cloned().collect();
            trigger = core
                .tier2(&format!("thread:{}", m.thread), &window, t)
                .await;
        }
        let origin = Origin::Thread(m.thread.to_string());
        let mut audit = vec![AuditEvent {
            actor: who.name.clone(),
            request_id: request_id.clone(),
            action: "message".to_string(),
            subject: format!("message:{}", m.id),
            detail: serde_json::json!({
                "thread": m.thread.as_str(),
                "practice": m.practice.as_str(),
                "escalated": trigger.is_some(),
            }),
        }];
        let mut open = th.open;
        // A new escalation or a rise sends a directive; a trigger that
        // attaches to the thread's open escalation reports it, and the
        // referral already sent stands.
        let (write, escalation_id, directive) = match &trigger {
            None => (None, None, None),
            // Another conversation's open escalation for the patient is the
            // store's to find, in the write's transaction (see below).
            Some(t) => match escalation::step(th.open, t) {
                // Attached to this thread's escalation: its referral stands.
                Step::Attach(o) => (None, Some(o.id), None),
                step => {
                    let (id, write, action) = match step {
                        Step::Raise(o) => (
                            o.id,
                            EscalationWrite::Raise {
                                id: o.id,
                                severity: t.severity,
                            },
                            "escalation.raise",
                        ),
                        _ => {
                            let e = core.new_escalation(
                                t,
                                &m.practice,
                                &m.patient,
                                origin.clone(),
                                m.id.as_str(),
                            );
                            (
                                e.id,
                                EscalationWrite::CreateUnlessOpen {
                                    escalation: Box::new(e),
                                    since_ms: core.dedup_since(),
                                },
                                "escalation.create",
                            )
                        }
                    };
                    audit.push(Core::escalation_audit(
                        &who.name,
                        &request_id,
                        action,
                        id,
                        &origin,
                        t,
                    ));
                    open = Some(Open {
                        id,
                        severity: t.severity,
                    });
                    let d = core.directive(
                        id,
                        t,
                        m.practice.as_str(),
                        m.language.as_str(),
                        m.id.as_str(),
                    );
                    (Some(write), Some(id), Some(d))
                }
            },
        };
        let mut v = MessageVerdict {
            escalation_id,
            directive,
        };
        let (recorded, done) = core
            .store
            .record_message(&m.id, &v, write, audit)
            .await
            .map_err(unavailable)?;
        // Attached to (or raised) the patient's escalation from another
        // conversation: no new page, and this thread's referral names that
        // escalation, as the store recorded it.
        if let Some(o) = done.map(Escalated::open)
            && v.escalation_id != Some(o.id)
        {
            open = Some(o);
            v.escalation_id = Some(o.id);
            if let Some(d) = v.directive.as_mut() {
                d.escalation_id = o.id.to_string();
            }
        }
        match recorded {
            Recorded::Duplicate => {
                // Another request with this id won the race: its verdict stands.
                let first = core
                    .store
                    .message_verdict(&m.id)
                    .await
                    .map_err(unavailable)?;
                return Ok(Response::new(
                    first.as_ref().map_or_else(|| verdict(&v), verdict),
                ));
            }
            Recorded::New => {}
        }
        th.stream = stream;
        th.open = open;
        th.last_ms = now;
        th.turns = turns;
        if let (Some(d), Some(t)) = (&v.directive, &trigger) {
            let id = &d.escalation_id;
            tracing::info!(thread_id = %m.thread, message_id = %m.id, escalation_id = %id, tier = t.tier.as_str(), severity = t.severity.as_str(), rule = %t.rule_id, "escalation");
            metrics::counter!("crisisd_escalations_total", "tier" => t.tier.as_str(), "severity" => t.severity.as_str()).increment(1);
        }
        Ok(Response::new(verdict(&v)))
    }

    async fn get_escalation(
        &self,
        req: Request<pb::GetEscalationRequest>,
    ) -> Result<Response<pb::Escalation>, Status> {
        let who = principal(&req)?;
        who.require(&[Role::Responder, Role::Admin])?;
        let request_id = request_id(&req);
        let id = EscalationId::parse(&req.get_ref().escalation_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let core = &self.core;
        let e = core
            .store
            .get_escalation(id)
            .await
            .map_err(|e| {
                tracing::error!(escalation_id = %id, error = %e, "store failed");
                Status::unavailable("the store is unavailable")
            })?
            // A responder sees its own practice only; others' escalations
            // are as if absent.
            .filter(|e| who.is_admin() || e.practice.as_str() == who.practice)
            .ok_or_else(|| Status::not_found("no such escalation"))?;
        core.store
            .audit(AuditEvent {
                actor: who.name.clone(),
                request_id,
                action: "escalation.get".to_string(),
                subject: format!("escalation:{id}"),
                detail: serde_json::json!({}),
            })
            .await
            .map_err(|_| Status::unavailable("the store is unavailable"))?;
        Ok(Response::new(convert::escalation(&e)))
    }

    async fn acknowledge_escalation(
        &self,
        req: Request<pb::AcknowledgeEscalationRequest>,
    ) -> Result<Response<pb::Escalation>, Status> {
        let who = principal(&req)?;
        who.require(&[Role::Responder, Role::Admin])?;
        let request_id = request_id(&req);
        let r = req.into_inner();
        let e = self
            .handle(&who, request_id, &r.escalation_id, &r.responder_id, None)
            .await?;
        Ok(Response::new(e))
    }

    async fn resolve_escalation(
        &self,
        req: Request<pb::ResolveEscalationRequest>,
    ) -> Result<Response<pb::Escalation>, Status> {
        let who = principal(&req)?;
        who.require(&[Role::Responder, Role::Admin])?;
        let request_id = request_id(&req);
        let r = req.into_inner();
        let d = convert::disposition_in(r.disposition)?;
        let e = self
            .handle(&who, request_id, &r.escalation_id, &r.responder_id, Some(d))
            .await?;
        Ok(Response::new(e))
    }

    async fn list_escalations(
        &self,
        req: Request<pb::ListEscalationsRequest>,
    ) -> Result<Response<pb::ListEscalationsResponse>, Status> {
        let who = principal(&req)?;
        who.require(&[Role::Responder, Role::Admin])?;
        let request_id = request_id(&req);
        let r = req.into_inner();
        let practice = match (r.practice_id.as_str(), who.is_admin()) {
            ("", true) => None,
            ("", false) => Some(who.practice.clone()),
            (p, admin) => {
                if !admin && p != who.practice {
                    return Err(Status::permission_denied(
                        "a responder reads its own practice only",
                    ));
                }
                Some(p.to_string())
            }
        };
        let practice = practice
            .map(|p| {
                crate::ids::PracticeId::parse(&p)
                    .map_err(|e| Status::invalid_argument(e.to_string()))
            })
            .transpose()?;
        let limit = match r.page_size {
            0 => 50,
            n @ 1..=500 => n,
            _ => return Err(Status::invalid_argument("page_size must be 0-500")),
        };
        if r.since_ms < 0 || r.until_ms < 0 {
            return Err(Status::invalid_argument(
                "since_ms and until_ms must not be negative",
            ));
        }
        let after = if r.page_token.is_empty() {
            None
        } else {
            Some(parse_page_token(&r.page_token)?)
        };
        let q = EscalationQuery {
            practice,
            state: convert::state_filter(r.state)?,
            since_ms: (r.since_ms > 0).then_some(r.since_ms),
            until_ms: (r.until_ms > 0).then_some(r.until_ms),
            limit: limit + 1,
            after,
        };
        let core = &self.core;
        let mut rows = core.store.list_escalations(&q).await.map_err(|e| {
            tracing::error!(error = %e, "store failed");
            Status::unavailable("the store is unavailable")
        })?;
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let next_page_token = match rows.last() {
            Some(last) if more => format!("{}.{}", last.created_at_ms, last.id),
            _ => String::new(),
        };
        core.store
            .audit(AuditEvent {
                actor: who.name.clone(),
                request_id,
                action: "escalation.list".to_string(),
                subject: format!(
                    "practice:{}",
                    q.practice.as_ref().map_or("*", |p| p.as_str())
                ),
                detail: serde_json::json!({ "returned": rows.len() }),
            })
            .await
            .map_err(|_| Status::unavailable("the store is unavailable"))?;
        Ok(Response::new(pb::ListEscalationsResponse {
            escalations: rows.iter().map(convert::escalation).collect(),
            next_page_token,
        }))
    }
}

impl Service {
    /// Acknowledge (no disposition) or resolve, for a responder of the
    /// escalation's practice or an admin.
    async fn handle(
        &self,
        who: &crate::api::auth::Principal,
        request_id: String,
        escalation_id: &str,
        responder_id: &str,
        disposition: Option<crate::domain::Disposition>,
    ) -> Result<pb::Escalation, Status> {
        let id = EscalationId::parse(escalation_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let responder = crate::ids::ClinicianId::parse(responder_id).map_err(|_| {
            Status::invalid_argument("responder_id must be 1-128 characters of A-Z a-z 0-9 . _ : -")
        })?;
        let core = &self.core;
        let unavailable = |e: crate::store::StoreError| {
            tracing::error!(escalation_id = %id, error = %e, "store failed");
            Status::unavailable("the store is unavailable")
        };
        // Another practice's escalation is as if absent.
        let e = core.store.get_escalation(id).await.map_err(unavailable)?;
        if !e
            .as_ref()
            .is_some_and(|e| who.is_admin() || e.practice.as_str() == who.practice)
        {
            return Err(Status::not_found("no such escalation"));
        }
        let action = if disposition.is_some() {
            "escalation.resolve"
        } else {
            "escalation.acknowledge"
        };
        let audit = AuditEvent {
            actor: who.name.clone(),
            request_id,
            action: action.to_string(),
            subject: format!("escalation:{id}"),
            detail: serde_json::json!({
                "responder": responder.as_str(),
                "disposition": disposition.map(|d| d.as_str()),
            }),
        };
        let after = match disposition {
            None => core.store.acknowledge(id, responder.as_str(), audit).await,
            Some(d) => core.store.resolve(id, responder.as_str(), d, audit).await,
        }
        .map_err(unavailable)?
        .ok_or_else(|| Status::not_found("no such escalation"))?;
        tracing::info!(escalation_id = %id, state = after.state.as_str(), "escalation handled");
        Ok(convert::escalation(&after))
    }
}

fn parse_page_token(t: &str) -> Result<(i64, String), Status> {
    let bad = || Status::invalid_argument("page_token is not one this server issued");
    let (ms, id) = t.split_once('.').ok_or_else(bad)?;
    let ms: i64 = ms.parse().map_err(|_| bad())?;
    let id = EscalationId::parse(id).map_err(|_| bad())?;
    Ok((ms, id.to_string()))
}

fn verdict(v: &MessageVerdict) -> pb::MessageVerdict {
    match v.escalation_id {
        Some(id) => pb::MessageVerdict {
            outcome: pb::Outcome::Escalated as i32,
            directive: v.directive.as_ref().map(convert::directive),
            escalation_id: id.to_string(),
        },
        None => pb::MessageVerdict {
            outcome: pb::Outcome::None as i32,
            directive: None,
            escalation_id: String::new(),
        },
    }
}
