//! A small gRPC echo service shared by the examples and the integration tests.
//!
//! Examples use it with `mod common;`, tests with
//! `#[path = "../examples/common/mod.rs"] mod common;`.
//!
//! The service works with and without `tower-stream-guard` in front of it:
//! when the guard is present its [`StreamHandle`] (found in the request
//! extensions) is used to stop background work as soon as a stream ends.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tower_stream_guard::StreamHandle;

use self::echo::echo_server::Echo;
use self::echo::{EchoReply, EchoRequest, StreamRequest};

/// Code generated from `proto/echo.proto` (see `tests/codegen.rs`).
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    dead_code
)]
pub mod echo {
    include!("../../proto/echo.rs");
}

/// Capacity of the channels feeding the response streams.
const CHANNEL_CAPACITY: usize = 4;

/// Echo service implementation; see `proto/echo.proto` for the RPC semantics.
///
/// Clones share their counters, so a test can keep a clone and watch
/// [`EchoService::live_producers`] / [`EchoService::live_handlers`] while the
/// server owns another.
#[allow(dead_code)]
#[derive(Debug, Clone, Default)]
pub struct EchoService {
    live_producers: Arc<AtomicUsize>,
    live_handlers: Arc<AtomicUsize>,
    /// Whether its tasks stop only on the guard's handle (see
    /// [`EchoService::stopping_only_on_the_handle`]).
    handle_only: bool,
}

#[allow(dead_code)]
impl EchoService {
    /// Creates a service with both counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A service for tests whose point is that the guard's [`StreamHandle`]
    /// stopped the work: its `ServerStream` producers and `Bidi` echo tasks
    /// ignore their channel closing and the request body failing, and wait
    /// for the handle instead. The guard lets go of a response body when it
    /// ends a stream, which closes the channel at the same moment: with
    /// [`EchoService::new`] a handle whose `cancelled()` never resolved would
    /// go unnoticed. They still finish by themselves (a `count` reached, a
    /// half-close). Without a guard in front, such a task that lost its
    /// reader never stops.
    pub fn stopping_only_on_the_handle() -> Self {
        Self {
            handle_only: true,
            ..Self::default()
        }
    }

    /// Number of `ServerStream` producer tasks that have not finished yet.
    pub fn live_producers(&self) -> usize {
        self.live_producers.load(Ordering::SeqCst)
    }

    /// Number of `ClientStream` handlers and `Bidi` echo tasks that have not
    /// finished yet.
    pub fn live_handlers(&self) -> usize {
        self.live_handlers.load(Ordering::SeqCst)
    }
}

/// Increments a counter on creation and decrements it when dropped, so the
/// count stays right however a task ends (return, panic, abort, runtime
/// shutdown).
struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(counter))
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The guard's handle for this request, if the service runs behind the guard.
fn stream_handle<T>(request: &Request<T>) -> Option<StreamHandle> {
    request.extensions().get::<StreamHandle>().cloned()
}

/// Runs a task's whole work until the guarded stream ends (for any reason),
/// even while it waits in a `send` on a channel that a stalled reader keeps
/// full; without a guard it runs to its own end and relies on its channel
/// closing instead.
async fn until_stream_ends(handle: Option<StreamHandle>, work: impl Future<Output = ()>) {
    match handle {
        Some(handle) => {
            let _ = handle.run_until_cancelled(work).await;
        }
        None => work.await,
    }
}

type ReplySender = mpsc::Sender<Result<EchoReply, Status>>;

/// What a task does when its stream is gone from under it (its channel
/// closed, its request body failed): stops, or with `handle_only` waits for
/// the guard's handle to stop it (see [`EchoService::stopping_only_on_the_handle`]).
async fn lost_stream(handle_only: bool) {
    if handle_only {
        std::future::pending::<()>().await;
    }
}

/// Resolves when `tx`'s receiver is dropped; never with `handle_only`.
async fn channel_closed(tx: &ReplySender, handle_only: bool) {
    if handle_only {
        std::future::pending::<()>().await;
    }
    tx.closed().await;
}

/// Body of the `ServerStream` producer task: the whole loop, waits for the
/// next tick and sends alike, stops when the stream ends.
async fn produce(
    tx: ReplySender,
    request: StreamRequest,
    handle: Option<StreamHandle>,
    handle_only: bool,
    _live: LiveGuard,
) {
    until_stream_ends(handle, async move {
        // The first reply goes out at once, the following ones every `interval_ms`.
        let mut ticker = (request.interval_ms > 0).then(|| {
            let mut ticker =
                tokio::time::interval(Duration::from_millis(request.interval_ms.into()));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker
        });
        let payload = vec![0_u8; request.size as usize];
        let mut index: u64 = 0;

        while request.count == 0 || index < u64::from(request.count) {
            if let Some(ticker) = ticker.as_mut() {
                tokio::select! {
                    biased;
                    // The response stream was dropped (client gone, server shut down).
                    () = channel_closed(&tx, handle_only) => return,
                    _ = ticker.tick() => {}
                }
            }
            let reply = EchoReply {
                message: index.to_string(),
                payload: payload.clone(),
            };
            if tx.send(Ok(reply)).await.is_err() {
                lost_stream(handle_only).await;
                return;
            }
            index += 1;
        }
    })
    .await;
}

/// Body of the `Bidi` echo task: like [`produce`], the whole loop stops when
/// the stream ends.
async fn echo_each(
    mut inbound: Streaming<EchoRequest>,
    tx: ReplySender,
    handle: Option<StreamHandle>,
    handle_only: bool,
    _live: LiveGuard,
) {
    until_stream_ends(handle, async move {
        loop {
            let next = tokio::select! {
                biased;
                () = channel_closed(&tx, handle_only) => return,
                next = inbound.message() => next,
            };
            let item = match next {
                Ok(Some(request)) => Ok(EchoReply {
                    message: request.message,
                    payload: Vec::new(),
                }),
                Ok(None) => return,
                Err(status) => Err(status),
            };
            let is_err = item.is_err();
            if tx.send(item).await.is_err() || is_err {
                lost_stream(handle_only).await;
                return;
            }
        }
    })
    .await;
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply {
            message: request.into_inner().message,
            payload: Vec::new(),
        }))
    }

    type ServerStreamStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn server_stream(
        &self,
        request: Request<StreamRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let handle = stream_handle(&request);
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        // Counted before spawning so that the count is never observed as 0
        // between the handler returning and the task starting.
        let live = LiveGuard::enter(&self.live_producers);
        tokio::spawn(produce(
            tx,
            request.into_inner(),
            handle,
            self.handle_only,
            live,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let _live = LiveGuard::enter(&self.live_handlers);
        let mut inbound = request.into_inner();
        let mut count: u64 = 0;
        // An error (e.g. a guard's DEADLINE_EXCEEDED) is returned as is.
        while inbound.message().await?.is_some() {
            count += 1;
        }
        Ok(Response::new(EchoReply {
            message: count.to_string(),
            payload: Vec::new(),
        }))
    }

    type BidiStream = ReceiverStream<Result<EchoReply, Status>>;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let handle = stream_handle(&request);
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let live = LiveGuard::enter(&self.live_handlers);
        tokio::spawn(echo_each(
            request.into_inner(),
            tx,
            handle,
            self.handle_only,
            live,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
