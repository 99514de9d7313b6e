//! The fates of streams, the clients that play them, and the plan of a
//! round's connections.

use std::{io, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    net::UnixStream,
    sync::{mpsc, watch},
    task::JoinSet,
};
use tokio_rustls::rustls;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Request,
    transport::{Channel, Endpoint},
};
use tower_stream_guard::{EndReason, IdleDirection, StreamCap};

use crate::{
    BUSY_INTERVAL_MS, CAP, HELD_IDLE, MAX_PER_CONNECTION, MAX_PER_PEER, SCARCE, TICKS,
    common::echo::{EchoRequest, StreamRequest, echo_client::EchoClient},
    server::{Server, Ticker},
    transport::{ProxyAddr, ProxyMode, Tie, Transport, tls},
};

/// What happens to one stream, and so why it must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Fate {
    Completes,
    Cancels,
    Silent,
    OutlivesLifetime,
    StalledReader,
    HalfOpen,
    Vanishes,
    /// Holds a slot of the capped route until the drain cuts it.
    CapHolder,
    /// Refused by the capped route's per-connection cap ([`CAP`]).
    Rejected,
    Drained,
    /// Holds its slots, silent, until the drain cuts it (route `held`, no
    /// idle timeout of note): the connection that fills the layer's
    /// per-connection cap.
    Held,
    /// Refused by the layer's per-connection cap ([`MAX_PER_CONNECTION`]),
    /// which the [`Fate::Held`] streams before it on its connection fill.
    OverConnection,
    /// [`Fate::Held`] on route `held-peer`, with a per-peer cap
    /// ([`MAX_PER_PEER`]) that two connections' streams fill.
    HeldByPeer,
    /// Refused by the `held-peer` route's per-peer cap.
    OverPeer,
    /// [`Fate::Held`] on route `scarce`, whose total cap ([`SCARCE`]) the
    /// round's scarce holders fill.
    ScarceHolder,
    /// Refused by the scarce route's total cap, which the round's
    /// [`Fate::ScarceHolder`]s fill.
    OverTotal,
    /// The handler panics before answering (in [`ChaosLayer`]).
    Panics,
    /// The response body panics after a few frames (in [`ChaosLayer`]).
    BodyPanics,
    /// A `GET` with no body to the [`Ticker`], whose route has a request
    /// idle timeout shorter than the response.
    Bodyless,
    /// A busy stream served on the doomed runtime, which is shut down while
    /// it is open: its task is dropped, which ends it as cancelled.
    RuntimeDies,
    /// The stream ends (its handle cancels it) while the service's future
    /// is polled to its answer, a trailers-only `OK` (in [`ChaosLayer`]):
    /// the end won, so the peer must read the guard's `CANCELLED`, not the
    /// answer.
    AnswerAfterEnd,
    /// The stream ends while the response body produces its last data
    /// frame (in [`ChaosLayer`]): the frame lost, so the guard's trailers
    /// must go out in its place.
    LastFrameAfterEnd,
}

impl Fate {
    pub(crate) fn reason(self) -> EndReason {
        match self {
            Fate::Completes | Fate::Bodyless => EndReason::Completed,
            Fate::Cancels
            | Fate::Vanishes
            | Fate::RuntimeDies
            | Fate::AnswerAfterEnd
            | Fate::LastFrameAfterEnd => EndReason::Cancelled,
            Fate::Silent | Fate::StalledReader | Fate::HalfOpen => {
                EndReason::IdleTimeout(IdleDirection::Both)
            }
            Fate::OutlivesLifetime => EndReason::LifetimeExceeded,
            Fate::CapHolder
            | Fate::Drained
            | Fate::Held
            | Fate::HeldByPeer
            | Fate::ScarceHolder => EndReason::Drained,
            Fate::Rejected | Fate::OverConnection => EndReason::Rejected(StreamCap::PerConnection),
            Fate::OverPeer => EndReason::Rejected(StreamCap::PerPeer),
            Fate::OverTotal => EndReason::Rejected(StreamCap::Total),
            Fate::Panics | Fate::BodyPanics => EndReason::Panicked,
        }
    }

    /// The limit of the cap that refuses a stream of this fate, as its end
    /// event must report it.
    pub(crate) fn cap_limit(self) -> Option<usize> {
        match self {
            Fate::Rejected => Some(CAP),
            Fate::OverConnection => Some(MAX_PER_CONNECTION),
            Fate::OverPeer => Some(MAX_PER_PEER),
            Fate::OverTotal => Some(SCARCE),
            _ => None,
        }
    }

    /// What the end event of a stream of this fate must say: its reason
    /// and the refusing cap's limit.
    pub(crate) fn end(self) -> String {
        end_of(self.reason(), self.cap_limit())
    }

    /// Refused by a cap: never holds a slot.
    pub(crate) fn is_refused(self) -> bool {
        self.cap_limit().is_some()
    }

    /// Whether `code` is what the client must see, where it reads to the
    /// end.
    pub(crate) fn client_sees(self, code: Code) -> bool {
        match self {
            Fate::Completes | Fate::Bodyless => code == Code::Ok,
            // What the event says (cancelled), not the service's answer.
            Fate::AnswerAfterEnd | Fate::LastFrameAfterEnd => code == Code::Cancelled,
            Fate::Silent | Fate::OutlivesLifetime => code == Code::DeadlineExceeded,
            Fate::CapHolder
            | Fate::Drained
            | Fate::Held
            | Fate::HeldByPeer
            | Fate::ScarceHolder => code == Code::Unavailable,
            Fate::Rejected | Fate::OverConnection | Fate::OverPeer | Fate::OverTotal => {
                code == Code::ResourceExhausted
            }
            // A reset stream: whatever tonic makes of it, but not a success.
            Fate::Panics | Fate::BodyPanics | Fate::RuntimeDies => code != Code::Ok,
            Fate::Cancels | Fate::StalledReader | Fate::HalfOpen | Fate::Vanishes => true,
        }
    }

    /// Ends before the drain starts.
    pub(crate) fn ends_early(self) -> bool {
        !matches!(
            self,
            Fate::CapHolder | Fate::Drained | Fate::Held | Fate::HeldByPeer | Fate::ScarceHolder
        )
    }
}

/// An end event's reason and cap limit, as [`Fate::end`] writes them.
pub(crate) fn end_of(reason: EndReason, cap_limit: Option<usize>) -> String {
    match cap_limit {
        Some(limit) => format!("{reason} (limit {limit})"),
        None => reason.to_string(),
    }
}

/// splitmix64: seeded, good enough to pick fates.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One connection's client: tonic for the gRPC fates, a bare hyper HTTP/2
/// client for the bodyless requests.
#[derive(Clone)]
pub(crate) enum Client {
    Grpc(EchoClient<Channel>),
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Client {
    /// Connects to the proxy at `addr` (with TLS on [`Transport::Tls`]);
    /// the kind follows the fates.
    pub(crate) async fn connect(
        addr: &ProxyAddr,
        transport: Transport,
        fates: &[Fate],
        tasks: &mut JoinSet<()>,
    ) -> Client {
        if fates.first() == Some(&Fate::Bodyless) {
            let mut io = addr.dial().await;
            if transport == Transport::Tls {
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
                io = Box::new(
                    tls()
                        .connector
                        .connect(name, io)
                        .await
                        .expect("TLS handshake"),
                );
            }
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                    .await
                    .expect("HTTP/2 handshake");
            tasks.spawn(async move {
                let _ = connection.await;
            });
            return Client::Http2(sender);
        }
        let channel = match addr {
            ProxyAddr::Tcp(addr) if transport == Transport::Tls => {
                Endpoint::from_shared(format!("https://{addr}"))
                    .expect("endpoint")
                    .tls_config(tls().client.clone())
                    .expect("client TLS")
                    .connect()
                    .await
            }
            ProxyAddr::Tcp(addr) => {
                Endpoint::from_shared(format!("http://{addr}"))
                    .expect("endpoint")
                    .connect()
                    .await
            }
            ProxyAddr::Unix(path) => {
                let path = path.clone();
                Endpoint::from_static("http://[::]:50051")
                    .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                        }
                    }))
                    .await
            }
        };
        Client::Grpc(EchoClient::new(channel.expect("connect through the proxy")))
    }

    pub(crate) fn grpc(&self) -> EchoClient<Channel> {
        match self {
            Client::Grpc(client) => client.clone(),
            Client::Http2(_) => panic!("a gRPC fate on an HTTP/2 connection"),
        }
    }
}

/// One connection of a round: its proxy and the fates of its streams.
pub(crate) struct Connection {
    pub(crate) client: Client,
    pub(crate) mode: watch::Sender<ProxyMode>,
    /// Ties the server's end events to this connection.
    pub(crate) tie: Tie,
    pub(crate) fates: Vec<Fate>,
    pub(crate) server: Server,
    pub(crate) transport: Transport,
}

impl Connection {
    /// Names the connection in a failure: its first fate, server and
    /// transport.
    pub(crate) fn describe(&self) -> String {
        format!(
            "the connection of {:?} ({:?} server, {:?})",
            self.fates[0], self.server, self.transport
        )
    }
}

/// Tags a request with its fate's route (`x-fate`) and, for the panics, what
/// [`ChaosLayer`] must do (`x-chaos`).
pub(crate) fn tagged<T>(message: T, fate: Fate, transport: Transport) -> Request<T> {
    let mut request = Request::new(message);
    let tag = match fate {
        Fate::OutlivesLifetime => "lifetime",
        Fate::CapHolder | Fate::Rejected => "capped",
        Fate::ScarceHolder | Fate::OverTotal => "scarce",
        Fate::Held | Fate::OverConnection => "held",
        Fate::HeldByPeer | Fate::OverPeer => "held-peer",
        // A per-peer cap refuses streams with no peer address: the plain
        // route has one, so Unix sockets stay off it.
        _ if transport == Transport::Uds => "plain-unix",
        _ => "plain",
    };
    request
        .metadata_mut()
        .insert("x-fate", tag.parse().expect("ascii"));
    let chaos = match fate {
        Fate::Panics => Some("panic"),
        Fate::BodyPanics => Some("body-panic"),
        Fate::AnswerAfterEnd => Some("answer-after-end"),
        Fate::LastFrameAfterEnd => Some("last-frame-after-end"),
        _ => None,
    };
    if let Some(chaos) = chaos {
        request
            .metadata_mut()
            .insert("x-chaos", chaos.parse().expect("ascii"));
    }
    request
}
pub(crate) fn busy(count: u32) -> StreamRequest {
    StreamRequest {
        count,
        interval_ms: BUSY_INTERVAL_MS,
        size: 8,
    }
}

/// Reads a stream to its end; the status code it ended with.
pub(crate) async fn read_to_end(
    mut stream: tonic::Streaming<crate::common::echo::EchoReply>,
) -> Code {
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Code::Ok,
            Err(status) => return status.code(),
        }
    }
}

/// Opens one stream with its fate. Returns once the server has the stream
/// (response headers, or a refusal, are back) with a task that plays the
/// rest of the fate and yields the code the client saw, if it reads to the
/// end.
pub(crate) async fn open(
    client: &Client,
    transport: Transport,
    fate: Fate,
    streams: &mut JoinSet<(Fate, Option<Code>)>,
) {
    if fate == Fate::Bodyless {
        return open_bodyless(client, streams).await;
    }
    let mut client = client.grpc();
    match fate {
        Fate::Completes => {
            let request = StreamRequest {
                count: 3,
                interval_ms: 0,
                size: 8,
            };
            let stream = client
                .server_stream(tagged(request, fate, transport))
                .await
                .expect("stream opens")
                .into_inner();
            streams.spawn(async move { (fate, Some(read_to_end(stream).await)) });
        }
        Fate::Cancels | Fate::Vanishes => {
            let mut stream = client
                .server_stream(tagged(busy(0), fate, transport))
                .await
                .expect("stream opens")
                .into_inner();
            stream.message().await.expect("first reply").expect("reply");
            if fate == Fate::Cancels {
                drop(stream);
                streams.spawn(async move { (fate, None) });
            } else {
                streams.spawn(async move {
                    // The proxy vanishes: whatever the client sees, it ends.
                    let _ = read_to_end(stream).await;
                    (fate, None)
                });
            }
        }
        Fate::Silent | Fate::HalfOpen => {
            let (tx, rx) = mpsc::channel::<EchoRequest>(4);
            let stream = client
                .bidi(tagged(ReceiverStream::new(rx), fate, transport))
                .await
                .expect("stream opens")
                .into_inner();
            streams.spawn(async move {
                if fate == Fate::Silent {
                    let code = read_to_end(stream).await;
                    drop(tx);
                    return (fate, Some(code));
                }
                // Half-open: talks every interval until the proxy freezes;
                // then nothing moves and this task waits until aborted.
                let talk = async {
                    loop {
                        let message = EchoRequest {
                            message: "ping".into(),
                        };
                        if tx.send(message).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(BUSY_INTERVAL_MS.into())).await;
                    }
                };
                tokio::join!(talk, read_to_end(stream));
                (fate, None)
            });
        }
        Fate::OutlivesLifetime
        | Fate::CapHolder
        | Fate::Drained
        | Fate::Held
        | Fate::HeldByPeer
        | Fate::ScarceHolder
        | Fate::RuntimeDies => {
            // Holders on the routes without an idle timeout of note are
            // silent after their first reply: holding costs no traffic.
            let request = match fate {
                Fate::Held | Fate::HeldByPeer | Fate::ScarceHolder => StreamRequest {
                    count: 0,
                    interval_ms: u32::try_from(HELD_IDLE.as_millis()).unwrap_or(u32::MAX),
                    size: 8,
                },
                _ => busy(0),
            };
            let stream = client
                .server_stream(tagged(request, fate, transport))
                .await
                .expect("stream opens")
                .into_inner();
            streams.spawn(async move { (fate, Some(read_to_end(stream).await)) });
        }
        Fate::StalledReader => {
            let request = StreamRequest {
                count: 0,
                interval_ms: 0,
                size: 16 * 1024,
            };
            let stream = client
                .server_stream(tagged(request, fate, transport))
                .await
                .expect("stream opens")
                .into_inner();
            // Never read: kept until the round ends.
            streams.spawn(async move {
                std::future::pending::<()>().await;
                drop(stream);
                (fate, None)
            });
        }
        Fate::BodyPanics | Fate::LastFrameAfterEnd => {
            let stream = client
                .server_stream(tagged(busy(0), fate, transport))
                .await
                .expect("stream opens")
                .into_inner();
            streams.spawn(async move { (fate, Some(read_to_end(stream).await)) });
        }
        Fate::Bodyless => unreachable!("opened above"),
        Fate::Rejected
        | Fate::OverConnection
        | Fate::OverPeer
        | Fate::OverTotal
        | Fate::Panics
        | Fate::AnswerAfterEnd => {
            let refused = client.server_stream(tagged(busy(0), fate, transport)).await;
            let code = match refused {
                Ok(_) => Code::Ok,
                Err(status) => status.code(),
            };
            streams.spawn(async move { (fate, Some(code)) });
        }
    }
}

/// Opens a bodyless `GET` to the [`Ticker`]: returns once its response
/// headers are back, with a task that reads every tick and yields `Ok` if
/// all came and the body ended cleanly.
pub(crate) async fn open_bodyless(client: &Client, streams: &mut JoinSet<(Fate, Option<Code>)>) {
    let Client::Http2(sender) = client else {
        panic!("a bodyless fate on a gRPC connection");
    };
    let request = http::Request::get(format!("http://chaos{}", Ticker::PATH))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = sender
        .clone()
        .send_request(request)
        .await
        .expect("response headers");
    assert_eq!(response.status(), http::StatusCode::OK);
    streams.spawn(async move {
        let mut body = response.into_body();
        let mut ticks = 0;
        let code = loop {
            match body.frame().await {
                None if ticks == TICKS => break Code::Ok,
                // Cut short (an early end or a reset): not what the
                // Ticker sent.
                None | Some(Err(_)) => break Code::Aborted,
                // The body's end comes as an empty DATA frame with
                // END_STREAM.
                Some(Ok(frame)) => {
                    ticks += u32::from(frame.data_ref().is_some_and(|d| !d.is_empty()));
                }
            }
        };
        (Fate::Bodyless, Some(code))
    });
}
