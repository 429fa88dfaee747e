//! The transport ceiling: the same `CrisisDetection` proto served by a
//! tonic service that does nothing but read. It answers a crisis utterance
//! (one carrying [`CRISIS_MARK`]) with a directive the size of crisisd's,
//! so the load generator sees the same messages both ways; everything else
//! is read and dropped. crisisd's throughput over this one's, on the same
//! machine, in the same run, is what crisisd's own work costs.

use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::api::pb;
use crate::api::pb::crisis_detection_server::{CrisisDetection, CrisisDetectionServer};

/// What makes an utterance a crisis one, to the echo service.
pub const CRISIS_MARK: &str = "kill myself";

type DirectiveStream = Pin<Box<dyn Stream<Item = Result<pb::Directive, Status>> + Send>>;

#[derive(Default)]
pub struct Echo;

fn directive(utterance_id: String) -> pb::Directive {
    pb::Directive {
        escalation_id: uuid::Uuid::now_v7().to_string(),
        tier: pb::Tier::Phrase as i32,
        kind: pb::DirectiveKind::CrisisReferral as i32,
        referral_text: crate::config::REFERRAL_EN.to_string(),
        utterance_id,
        severity: pb::Severity::High as i32,
        reason_code: "en.active.kill_self".to_string(),
        ..Default::default()
    }
}

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("the echo service only reads"))
}

#[tonic::async_trait]
impl CrisisDetection for Echo {
    type StreamTranscriptStream = DirectiveStream;
    type SubscribeDirectivesStream = DirectiveStream;

    async fn stream_transcript(
        &self,
        req: Request<Streaming<pb::TranscriptEvent>>,
    ) -> Result<Response<DirectiveStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(Ok(ev)) = inbound.next().await {
                let crisis = match ev.event {
                    Some(pb::transcript_event::Event::Utterance(u))
                        if u.text.contains(CRISIS_MARK) =>
                    {
                        u.utterance_id
                    }
                    Some(pb::transcript_event::Event::CallEnded(_)) => return,
                    _ => continue,
                };
                if tx.send(Ok(directive(crisis))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn submit_message(
        &self,
        req: Request<pb::InboundMessage>,
    ) -> Result<Response<pb::MessageVerdict>, Status> {
        let m = req.into_inner();
        let crisis = m.text.contains(CRISIS_MARK);
        Ok(Response::new(pb::MessageVerdict {
            outcome: if crisis {
                pb::Outcome::Escalated
            } else {
                pb::Outcome::None
            } as i32,
            directive: crisis.then(|| directive(m.message_id)),
            escalation_id: String::new(),
        }))
    }

    async fn get_escalation(
        &self,
        _: Request<pb::GetEscalationRequest>,
    ) -> Result<Response<pb::Escalation>, Status> {
        unimplemented()
    }

    async fn list_escalations(
        &self,
        _: Request<pb::ListEscalationsRequest>,
    ) -> Result<Response<pb::ListEscalationsResponse>, Status> {
        unimplemented()
    }

    async fn acknowledge_escalation(
        &self,
        _: Request<pb::AcknowledgeEscalationRequest>,
    ) -> Result<Response<pb::Escalation>, Status> {
        unimplemented()
    }

    async fn resolve_escalation(
        &self,
        _: Request<pb::ResolveEscalationRequest>,
    ) -> Result<Response<pb::Escalation>, Status> {
        unimplemented()
    }

    async fn record_appointment_event(
        &self,
        _: Request<pb::AppointmentEvent>,
    ) -> Result<Response<pb::AppointmentEventAck>, Status> {
        unimplemented()
    }

    async fn subscribe_directives(
        &self,
        _: Request<pb::SubscribeDirectivesRequest>,
    ) -> Result<Response<DirectiveStream>, Status> {
        unimplemented()
    }

    async fn acknowledge_directive(
        &self,
        _: Request<pb::AcknowledgeDirectiveRequest>,
    ) -> Result<Response<pb::AcknowledgeDirectiveResponse>, Status> {
        unimplemented()
    }
}

/// Serves the echo service on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(CrisisDetectionServer::new(Echo))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
}
