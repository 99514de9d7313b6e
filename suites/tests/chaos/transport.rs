//! How a connection reaches its server: TCP, TLS or a Unix socket, through
//! a one-connection proxy that can forward, freeze or vanish.

use std::{
    io,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{oneshot, watch},
    task::JoinSet,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, rustls};
use tonic::transport::{Certificate, ClientTlsConfig};
use tower_stream_guard::{ConnectionEvent, ConnectionKey, EndEvent};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProxyMode {
    Forward,
    Freeze,
    Vanish,
}

/// A socket of the proxy's or of a client's.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// How a connection reaches its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Transport {
    Tcp,
    /// TCP with TLS end to end between the tonic (or hyper) client and the
    /// application's own tokio-rustls acceptor in front of the server (the
    /// proxy forwards the encrypted bytes); the connection guard wraps the
    /// TCP stream under the TLS.
    Tls,
    /// A Unix socket from the client to the proxy and from the proxy to the
    /// server's `UnixListener`; the connection guard gives the identity.
    Uds,
}

/// The certificate of `localhost` the TLS listeners present, made once, and
/// the client configurations that trust it.
pub(crate) struct Tls {
    pub(crate) acceptor: TlsAcceptor,
    /// For tonic clients.
    pub(crate) client: ClientTlsConfig,
    /// For the bare hyper clients of bodyless requests.
    pub(crate) connector: TlsConnector,
}

pub(crate) fn tls() -> &'static Tls {
    static TLS: OnceLock<Tls> = OnceLock::new();
    TLS.get_or_init(|| {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a self-signed certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![made.cert.der().clone()], key.into())
            .expect("server certificate");
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(made.cert.der().clone()).expect("a root");
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        Tls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            client: ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(made.cert.pem()))
                .domain_name("localhost"),
            connector: TlsConnector::from(Arc::new(client)),
        }
    })
}

/// A round's directory of Unix sockets, removed when dropped.
pub(crate) struct SocketDir {
    pub(crate) path: PathBuf,
    pub(crate) next: std::sync::atomic::AtomicU32,
}

impl SocketDir {
    pub(crate) fn new(seed: u64) -> SocketDir {
        let path = std::env::temp_dir().join(format!(
            "tsg-chaos-{}-{}",
            std::process::id(),
            seed % 1_000_000
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("a socket directory");
        SocketDir {
            path,
            next: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// A fresh socket path in the directory.
    pub(crate) fn socket(&self) -> PathBuf {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.path.join(format!("{n}.sock"))
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A server's listening socket, served in [`serve`] and reached through
/// its [`Target`].
pub(crate) enum Listener {
    Tcp(TcpListener),
    /// TCP, with the application's TLS acceptor in front of the server.
    Tls(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub(crate) async fn bind(transport: Transport, dir: &SocketDir) -> Listener {
        match transport {
            Transport::Tcp | Transport::Tls => {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                if transport == Transport::Tls {
                    Listener::Tls(listener)
                } else {
                    Listener::Tcp(listener)
                }
            }
            Transport::Uds => {
                let path = dir.socket();
                let listener = UnixListener::bind(&path).expect("bind the Unix socket");
                Listener::Unix(listener, path)
            }
        }
    }

    /// Where the proxy reaches this listener.
    pub(crate) fn target(&self) -> Target {
        match self {
            Listener::Tcp(listener) | Listener::Tls(listener) => {
                Target::Tcp(listener.local_addr().expect("addr"))
            }
            Listener::Unix(_, path) => Target::Unix(path.clone()),
        }
    }
}

/// How the proxy reaches a server (TLS is the client's and the server's
/// business: the proxy sees TCP).
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Target {
    /// Connects the proxy to the server: the stream, and the peer address
    /// the server sees, if any.
    pub(crate) async fn dial(&self) -> (Box<dyn Io>, Option<SocketAddr>) {
        match self {
            Target::Tcp(addr) => {
                let outbound = TcpStream::connect(addr).await.expect("proxy connect");
                let _ = outbound.set_nodelay(true);
                let peer = outbound.local_addr().expect("outbound addr");
                (Box::new(outbound), Some(peer))
            }
            Target::Unix(path) => {
                let outbound = UnixStream::connect(path)
                    .await
                    .expect("proxy connect over the Unix socket");
                (Box::new(outbound), None)
            }
        }
    }
}

/// What ties an end event (and a connection event) to the connection its
/// stream came on: the connection guard's id for the connection, which the
/// guard layer uses as its connection key. (Not the peer address the server
/// sees, the proxy's outbound address: Linux gives one local port to two
/// connections at once when their destinations differ, so two servers can
/// see the same peer.)
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tie(pub(crate) u64);

impl Tie {
    pub(crate) fn owns(self, event: &EndEvent) -> bool {
        event.connection() == Some(ConnectionKey::from_id(self.0))
    }

    pub(crate) fn owns_connection(self, event: &ConnectionEvent) -> bool {
        event.id() == self.0
    }
}

/// Where a client reaches its proxy.
#[derive(Clone, Debug)]
pub(crate) enum ProxyAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ProxyAddr {
    pub(crate) async fn dial(&self) -> Box<dyn Io> {
        match self {
            ProxyAddr::Tcp(addr) => {
                let tcp = TcpStream::connect(addr)
                    .await
                    .expect("connect to the proxy");
                let _ = tcp.set_nodelay(true);
                Box::new(tcp)
            }
            ProxyAddr::Unix(path) => Box::new(
                UnixStream::connect(path)
                    .await
                    .expect("connect to the proxy's Unix socket"),
            ),
        }
    }
}

/// The proxy's listening socket, Unix for the [`Transport::Uds`]
/// connections (so that the client end is a Unix socket too).
pub(crate) enum ProxyListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl ProxyListener {
    pub(crate) async fn accept(&self) -> io::Result<Box<dyn Io>> {
        Ok(match self {
            ProxyListener::Tcp(listener) => {
                let (inbound, _) = listener.accept().await?;
                let _ = inbound.set_nodelay(true);
                Box::new(inbound)
            }
            ProxyListener::Unix(listener) => Box::new(listener.accept().await?.0),
        })
    }
}

/// A one-connection proxy in front of `server`. Returns the address to
/// connect to, the switch, and (once connected) the peer address the
/// server sees, if any.
pub(crate) async fn proxy(
    server: Target,
    transport: Transport,
    dir: &SocketDir,
    tasks: &mut JoinSet<()>,
) -> (
    ProxyAddr,
    watch::Sender<ProxyMode>,
    oneshot::Receiver<Option<SocketAddr>>,
) {
    let (listener, addr) = if transport == Transport::Uds {
        let path = dir.socket();
        let listener = UnixListener::bind(&path).expect("bind the proxy's Unix socket");
        (ProxyListener::Unix(listener), ProxyAddr::Unix(path))
    } else {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        (ProxyListener::Tcp(listener), ProxyAddr::Tcp(addr))
    };
    let (mode, watch_mode) = watch::channel(ProxyMode::Forward);
    let (peer_tx, peer_rx) = oneshot::channel();
    tasks.spawn(async move {
        let Ok(inbound) = listener.accept().await else {
            return;
        };
        drop(listener);
        let (outbound, peer) = server.dial().await;
        let _ = peer_tx.send(peer);
        let (in_read, in_write) = tokio::io::split(inbound);
        let (out_read, out_write) = tokio::io::split(outbound);
        // Both directions end together: when one side closes or the proxy
        // vanishes, every socket is dropped.
        tokio::select! {
            () = pipe(in_read, out_write, watch_mode.clone()) => {}
            () = pipe(out_read, in_write, watch_mode) => {}
        }
    });
    (addr, mode, peer_rx)
}

/// Copies `from` into `to` while the mode is `Forward`; stops moving bytes
/// (without closing) on `Freeze`; returns on `Vanish` or a closed socket.
pub(crate) async fn pipe(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let current = *mode.borrow_and_update();
        match current {
            ProxyMode::Vanish => return,
            ProxyMode::Freeze => {
                if mode.changed().await.is_err() {
                    return;
                }
            }
            ProxyMode::Forward => {
                let n = tokio::select! {
                    changed = mode.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        continue;
                    }
                    read = from.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    },
                };
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
