#!/usr/bin/env python3
"""An independent crisisd client, generated from the .proto by grpcio-tools.

It proves that a client built by another gRPC implementation (Python grpcio)
can use the service as the README and the .proto describe: a streamed call,
an inbound text (and its repeat), reading escalations back, and a bad stream.

Usage:
    client.py --server HOST:PORT --proto-dir DIR --out-dir DIR

The stubs are generated into --out-dir from <proto-dir>/crisis/v1/crisis.proto.
The server must run plaintext on loopback with no tokens configured. One line
is printed per check; the exit code is 1 on the first failed check, 2 when the
stubs cannot be generated or imported.
"""

import argparse
import os
import subprocess
import sys

PROTO = "crisis/v1/crisis.proto"
RPC_TIMEOUT_S = 30.0

PRACTICE = "py-practice"
PATIENT = "py-patient"
CALL = "py-call-1"


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def generate_stubs(proto_dir, out_dir):
    """Runs protoc from grpcio-tools and imports the generated modules."""
    os.makedirs(out_dir, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"protoc exited {done.returncode} on {os.path.join(proto_dir, PROTO)}:\n"
            f"{done.stdout}{done.stderr}"
        )
    # crisis_pb2_grpc imports `from crisis.v1 import crisis_pb2`: make both
    # folders regular packages and put out_dir first on the path.
    for pkg in ("crisis", os.path.join("crisis", "v1")):
        init = os.path.join(out_dir, pkg, "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()
    sys.path.insert(0, os.path.abspath(out_dir))
    from crisis.v1 import crisis_pb2, crisis_pb2_grpc

    return crisis_pb2, crisis_pb2_grpc


def run_checks(server, pb, pb_grpc):
    import grpc

    channel = grpc.insecure_channel(server)
    try:
        grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        raise CheckFailed(f"no connection to {server} within {RPC_TIMEOUT_S:.0f}s")
    stub = pb_grpc.CrisisDetectionStub(channel)

    # (a) A streamed call: one crisis utterance, one directive.
    def call_events():
        yield pb.TranscriptEvent(
            call_started=pb.CallStarted(
                call_id=CALL, patient_id=PATIENT, practice_id=PRACTICE, language="en"
            )
        )
        yield pb.TranscriptEvent(
            utterance=pb.Utterance(
                utterance_id="u1",
                speaker=pb.SPEAKER_PATIENT,
                text="hello, I need to reschedule",
                is_final=True,
            )
        )
        yield pb.TranscriptEvent(
            utterance=pb.Utterance(
                utterance_id="u2",
                speaker=pb.SPEAKER_PATIENT,
                text="I want to kill myself",
                is_final=True,
            )
        )
        yield pb.TranscriptEvent(call_ended=pb.CallEnded())

    try:
        directives = list(stub.StreamTranscript(call_events(), timeout=RPC_TIMEOUT_S))
    except grpc.RpcError as e:
        raise CheckFailed(f"StreamTranscript failed: {e.code()} {e.details()}")
    check(len(directives) == 1, f"StreamTranscript: expected 1 directive, got {len(directives)}")
    d = directives[0]
    check(
        d.kind == pb.DIRECTIVE_KIND_CRISIS_REFERRAL,
        f"StreamTranscript: kind {pb.DirectiveKind.Name(d.kind)}",
    )
    check(d.tier == pb.TIER_PHRASE, f"StreamTranscript: tier {pb.Tier.Name(d.tier)}")
    check(d.utterance_id == "u2", f"StreamTranscript: utterance_id {d.utterance_id!r}")
    check("988" in d.referral_text, "StreamTranscript: referral_text does not name 988")
    check(d.escalation_id != "", "StreamTranscript: empty escalation_id")
    call_escalation = d.escalation_id
    print(
        f"ok  StreamTranscript: 1 directive {pb.DirectiveKind.Name(d.kind)} "
        f"{pb.Tier.Name(d.tier)} {pb.Severity.Name(d.severity)} reason={d.reason_code} "
        f"after u2, escalation {call_escalation}"
    )

    # (b) An inbound text from another patient, then the same text again.
    # (From the same patient it would attach to the call's escalation: one
    # page per patient while it is open.)
    msg = pb.InboundMessage(
        message_id="py-m1",
        thread_id="py-t1",
        text="i want to end my life",
        practice_id=PRACTICE,
        patient_id=PATIENT + "-2",
    )
    try:
        first = stub.SubmitMessage(msg, timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as e:
        raise CheckFailed(f"SubmitMessage failed: {e.code()} {e.details()}")
    check(
        first.outcome == pb.OUTCOME_ESCALATED,
        f"SubmitMessage: outcome {pb.Outcome.Name(first.outcome)}",
    )
    check(first.HasField("directive"), "SubmitMessage: no directive")
    check(first.escalation_id != "", "SubmitMessage: empty escalation_id")
    check(
        first.directive.escalation_id == first.escalation_id,
        "SubmitMessage: directive and verdict name different escalations",
    )
    check(
        first.escalation_id != call_escalation,
        "SubmitMessage: the text reused the call's escalation",
    )
    check(
        "988" in first.directive.referral_text,
        "SubmitMessage: referral_text does not name 988",
    )
    print(
        f"ok  SubmitMessage: {pb.Outcome.Name(first.outcome)} with a directive, "
        f"escalation {first.escalation_id}"
    )
    try:
        again = stub.SubmitMessage(msg, timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as e:
        raise CheckFailed(f"SubmitMessage (repeat) failed: {e.code()} {e.details()}")
    check(again == first, f"SubmitMessage (repeat): verdict differs:\n{first}\nvs\n{again}")
    print("ok  SubmitMessage repeated: identical verdict")

    # (c) The call's escalation, read back.
    try:
        esc = stub.GetEscalation(
            pb.GetEscalationRequest(escalation_id=call_escalation), timeout=RPC_TIMEOUT_S
        )
    except grpc.RpcError as e:
        raise CheckFailed(f"GetEscalation failed: {e.code()} {e.details()}")
    check(esc.escalation_id == call_escalation, f"GetEscalation: id {esc.escalation_id!r}")
    check(esc.patient_id == PATIENT, f"GetEscalation: patient_id {esc.patient_id!r}")
    check(esc.conversation_id == CALL, f"GetEscalation: conversation_id {esc.conversation_id!r}")
    check(esc.practice_id == PRACTICE, f"GetEscalation: practice_id {esc.practice_id!r}")
    check(esc.utterance_id == "u2", f"GetEscalation: utterance_id {esc.utterance_id!r}")
    check(esc.tier == pb.TIER_PHRASE, f"GetEscalation: tier {pb.Tier.Name(esc.tier)}")
    check(esc.created_at_ms > 0, "GetEscalation: created_at_ms not set")
    print(
        f"ok  GetEscalation: patient {esc.patient_id}, conversation {esc.conversation_id}, "
        f"rule {esc.rule_id}, {pb.EscalationState.Name(esc.state)}"
    )

    # (d) The practice's escalations: the call's and the text's.
    try:
        listed = stub.ListEscalations(
            pb.ListEscalationsRequest(practice_id=PRACTICE), timeout=RPC_TIMEOUT_S
        )
    except grpc.RpcError as e:
        raise CheckFailed(f"ListEscalations failed: {e.code()} {e.details()}")
    ids = {e.escalation_id for e in listed.escalations}
    check(
        len(listed.escalations) == 2,
        f"ListEscalations: expected 2 escalations, got {len(listed.escalations)}",
    )
    check(
        ids == {call_escalation, first.escalation_id},
        "ListEscalations: not the call's and the text's escalations",
    )
    check(listed.next_page_token == "", "ListEscalations: unexpected next_page_token")
    print(f"ok  ListEscalations: {len(listed.escalations)} escalations for {PRACTICE}")

    # (e) A stream that does not start with call_started.
    def bad_events():
        yield pb.TranscriptEvent(
            utterance=pb.Utterance(
                utterance_id="u1",
                speaker=pb.SPEAKER_PATIENT,
                text="hello",
                is_final=True,
            )
        )

    try:
        got = list(stub.StreamTranscript(bad_events(), timeout=RPC_TIMEOUT_S))
    except grpc.RpcError as e:
        check(
            e.code() == grpc.StatusCode.INVALID_ARGUMENT,
            f"bad StreamTranscript: status {e.code()} ({e.details()}), "
            "expected INVALID_ARGUMENT",
        )
        print(f"ok  bad StreamTranscript: {e.code().name} ({e.details()})")
    else:
        raise CheckFailed(f"bad StreamTranscript: succeeded with {len(got)} directives")

    channel.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", required=True, help="HOST:PORT of a plaintext crisisd")
    ap.add_argument("--proto-dir", required=True, help="folder holding crisis/v1/crisis.proto")
    ap.add_argument("--out-dir", required=True, help="folder for the generated stubs")
    args = ap.parse_args()

    try:
        pb, pb_grpc = generate_stubs(args.proto_dir, args.out_dir)
    except Exception as e:  # noqa: BLE001: any failure here is fatal
        print(f"FAIL generating stubs: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"ok  stubs generated from {PROTO} into {args.out_dir}")

    try:
        run_checks(args.server, pb, pb_grpc)
    except CheckFailed as e:
        print(f"FAIL {e}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
