//! TLS (rustls) and mutual TLS, with certificates made for the test by a
//! test CA.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use crisisd::api::pb::crisis_detection_client::CrisisDetectionClient;
use crisisd::config::Config;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
    other_client: (String, String),
}

fn pki() -> Pki {
    let ca_params = {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p
    };
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let leaf = |names: Vec<String>, issuer: &CertifiedIssuer<'_, KeyPair>| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, issuer)
            .expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    // A client certificate from a CA the server does not trust.
    let rogue = CertifiedIssuer::self_signed(
        {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p
        },
        KeyPair::generate().expect("key"),
    )
    .expect("rogue ca");
    Pki {
        ca: ca.pem(),
        server: leaf(vec!["localhost".into()], &ca),
        client: leaf(vec!["voice-runtime".into()], &ca),
        other_client: leaf(vec!["voice-runtime".into()], &rogue),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p.display().to_string()
}

async fn connect(
    addr: std::net::SocketAddr,
    tls: Option<ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let mut ep = Channel::from_shared(format!(
        "{}://localhost:{}",
        if tls.is_some() { "https" } else { "http" },
        addr.port()
    ))
    .expect("url")
    .connect_timeout(Duration::from_secs(5));
    if let Some(t) = tls {
        ep = ep.tls_config(t)?;
    }
    ep.connect().await
}

async fn explicit_call(ch: Channel) -> Result<usize, tonic::Status> {
    let mut c = CrisisDetectionClient::new(ch);
    let (ds, status) = play(
        &mut c,
        Some("tok-voice"),
        vec![
            started("tls-call", "patient-1", "p1", "en"),
            patient("u1", "I want to kill myself"),
            ended(),
        ],
    )
    .await;
    match status {
        Some(s) => Err(s),
        None => Ok(ds.len()),
    }
}

#[tokio::test]
async fn tls_and_mutual_tls() {
    let pki = pki();
    let dir = temp_dir("tls");
    let mut config = secured(Config::default());
    config.tls.cert = write(&dir, "server.pem", &pki.server.0);
    config.tls.key = write(&dir, "server.key", &pki.server.1);
    let server = TestServer::start(config.clone()).await;
    let trust = || {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca))
            .domain_name("localhost")
    };

    // TLS: a client that trusts the CA gets its directive.
    let ch = connect(server.addr, Some(trust()))
        .await
        .expect("tls connect");
    assert_eq!(explicit_call(ch).await.expect("call"), 1);
    // Plaintext against a TLS listener fails.
    let plain = match connect(server.addr, None).await {
        Err(_) => true,
        Ok(ch) => explicit_call(ch).await.is_err(),
    };
    assert!(plain, "plaintext must not work against TLS");
    server.stop().await;

    // Mutual TLS: only clients with a certificate from the configured CA.
    config.tls.client_ca = write(&dir, "ca.pem", &pki.ca);
    let server = TestServer::start(config).await;
    let with = |(cert, key): &(String, String)| trust().identity(Identity::from_pem(cert, key));
    let ch = connect(server.addr, Some(with(&pki.client)))
        .await
        .expect("mtls connect");
    assert_eq!(explicit_call(ch).await.expect("call"), 1);
    for (what, tls) in [
        ("no client certificate", trust()),
        ("untrusted client certificate", with(&pki.other_client)),
    ] {
        let refused = match connect(server.addr, Some(tls)).await {
            Err(_) => true,
            Ok(ch) => explicit_call(ch).await.is_err(),
        };
        assert!(refused, "{what} must be refused");
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let server = TestServer::start(Config::default()).await;
    let ch = connect(server.addr, None).await.expect("connect");
    let mut c = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let msg = resp.message().await.expect("ok").expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"crisis.v1.CrisisDetection".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    server.stop().await;
}
