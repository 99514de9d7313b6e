//! The GOAWAY notice under TLS: the client's connector does the TLS
//! (tokio-rustls, ALPN `h2`) *inside* `GoawayNotice::connector`, so the
//! notice reads the decrypted HTTP/2 frames. A tonic server with its own
//! `tls_config` drains; the client stream is told while it still runs.
//! Wrapping the other way round (the notice outside the TLS) sees only TLS
//! records: the notice switches itself off and tells nothing.

#[path = "../../examples/common/mod.rs"]
mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::{
    EchoService,
    echo::{StreamRequest, echo_client::EchoClient, echo_server::EchoServer},
};
use http::Uri;
use tokio::{
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_rustls::{TlsConnector, rustls};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, ServerTlsConfig};
use tower_stream_guard::{
    Drain, StreamGuardLayer, StreamHandle,
    connection::{GoawayNotice, NoticeEvent},
};

const PATIENCE: Duration = Duration::from_secs(10);

/// A tonic server with TLS for `localhost`, draining with `drain`; the
/// address and the certificate the client must trust (DER, and PEM for
/// tonic's own TLS).
async fn serve(
    drain: &Drain,
) -> (
    SocketAddr,
    rustls::pki_types::CertificateDer<'static>,
    String,
) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let identity = Identity::from_pem(made.cert.pem(), made.signing_key.serialize_pem());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let guard = StreamGuardLayer::builder().drain(drain).build().unwrap();
    let router = tonic::transport::Server::builder()
        .tls_config(ServerTlsConfig::new().identity(identity))
        .expect("server TLS")
        .layer(guard)
        .add_service(EchoServer::new(EchoService::new()));
    tokio::spawn(
        router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain.started()),
    );
    (addr, made.cert.der().clone(), made.cert.pem())
}

fn tls_connector(cert: rustls::pki_types::CertificateDer<'static>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// The notice wraps what the TLS connector decrypted: it sees HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notice_inside_tls_tells_the_stream() {
    let drain = Drain::new();
    let (addr, cert, _) = serve(&drain).await;
    let tls = tls_connector(cert);
    let notice = GoawayNotice::new();
    let mut events = notice.subscribe();
    let connector = notice.connector(tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        async move {
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            tls.connect(name, tcp).await
        }
    }));
    // `http`: the TLS is the connector's, not tonic's.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("connect over TLS");
    let guard = StreamGuardLayer::builder()
        .response_handle(true)
        .goaway_notice(&notice)
        .build()
        .unwrap();
    let mut client = EchoClient::new(tower::Layer::layer(&guard.for_tonic_channel(), channel));
    let response = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 10,
            size: 8,
        })
        .await
        .expect("call");
    let handle = response
        .extensions()
        .get::<StreamHandle>()
        .cloned()
        .unwrap();
    let mut stream = response.into_inner();
    stream.message().await.unwrap().expect("a message");

    let _report = drain.start(Duration::from_secs(5));
    timeout(PATIENCE, handle.draining())
        .await
        .expect("told over TLS");
    stream
        .message()
        .await
        .expect("still streaming")
        .expect("a message");
    loop {
        match timeout(PATIENCE, events.recv()).await.unwrap().unwrap() {
            NoticeEvent::Goaway { goaway, .. } => {
                assert!(goaway.is_graceful());
                break;
            }
            NoticeEvent::Opened { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(notice.unfollowed(), 0, "plain HTTP/2 is followed");
}

/// The notice outside the TLS sees encrypted records, never mistakes them
/// for frames, and switches off: no GOAWAY is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notice_outside_tls_reports_nothing() {
    let drain = Drain::new();
    let (addr, cert, _) = serve(&drain).await;
    let tls = tls_connector(cert);
    let notice = GoawayNotice::new();
    let wrapper = notice.clone();
    let connector = tower::service_fn(move |uri: Uri| {
        let (tls, wrapper) = (tls.clone(), wrapper.clone());
        async move {
            let port = uri.port_u16().unwrap_or(443);
            let tcp = wrapper.wrap(TcpStream::connect(("127.0.0.1", port)).await?);
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let tls = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("connect over TLS");
    let mut client = EchoClient::new(channel);
    let mut stream = client
        .server_stream(StreamRequest {
            count: 0,
            interval_ms: 10,
            size: 8,
        })
        .await
        .expect("call")
        .into_inner();
    stream.message().await.unwrap().expect("a message");
    let report = drain.start(Duration::from_millis(200));
    // The stream is cut at the end of the grace; by then the GOAWAY has
    // long been read (encrypted).
    while let Ok(Some(_)) = stream.message().await {}
    timeout(PATIENCE, report).await.expect("drained");
    assert_eq!(notice.goaways(), 0);
    // And it says so: counted (and logged at WARN).
    assert_eq!(notice.unfollowed(), 1);
}

/// tonic's own client TLS (`Endpoint::tls_config`) runs around the
/// connector: the notice under it reads ciphertext. It cannot follow the
/// connection, and says so (`unfollowed`, a WARN log) instead of staying
/// silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_tonics_tls_config_the_notice_says_it_cannot_follow() {
    let drain = Drain::new();
    let (addr, _, pem) = serve(&drain).await;
    let notice = GoawayNotice::new();
    let connector = notice.connector(tower::service_fn(|uri: Uri| async move {
        let port = uri.port_u16().unwrap_or(443);
        TcpStream::connect(("127.0.0.1", port)).await
    }));
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
        .domain_name("localhost");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
            .unwrap()
            .tls_config(tls)
            .expect("client TLS")
            .connect_with_connector(connector)
            .await
            .expect("connect over tonic's TLS");
    let mut client = EchoClient::new(channel);
    let mut stream = client
        .server_stream(StreamRequest {
            count: 1,
            interval_ms: 0,
            size: 8,
        })
        .await
        .expect("call")
        .into_inner();
    while let Some(_reply) = stream.message().await.expect("reply") {}
    assert_eq!(notice.unfollowed(), 1, "the notice stayed silent");
}
