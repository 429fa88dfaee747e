//! Protobuf decoding into domain types: every request message the API
//! takes, decoded from arbitrary bytes and validated as the service does.
//! Nothing may panic; invalid input is an error, never a crash.
#![no_main]

use crisisd::api::{convert, pb};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = pb::TranscriptEvent::decode(data) {
        match ev.event {
            Some(pb::transcript_event::Event::CallStarted(c)) => {
                let _ = convert::call_started(c);
            }
            Some(pb::transcript_event::Event::Utterance(u)) => {
                let _ = convert::utterance(u, 4096);
            }
            _ => {}
        }
    }
    if let Ok(m) = pb::InboundMessage::decode(data) {
        let _ = convert::message(m, 16 * 1024);
    }
    if let Ok(a) = pb::AppointmentEvent::decode(data) {
        let _ = convert::appointment_event(a, 1_800_000_000_000);
    }
    if let Ok(r) = pb::ListEscalationsRequest::decode(data) {
        let _ = convert::state_filter(r.state);
    }
    if let Ok(r) = pb::ResolveEscalationRequest::decode(data) {
        let _ = convert::disposition_in(r.disposition);
    }
});
