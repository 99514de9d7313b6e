//! A service harness for paused-time tests of the guard (`caps_timing.rs`,
//! `drain.rs`): the test drives each response body through a channel and
//! counts the handlers that ran.

#![allow(dead_code, unreachable_pub)]

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::Empty;
use tokio::sync::{broadcast, mpsc};
use tower::{Service, ServiceExt};
use tower_stream_guard::{
    ConnectionKey, EndEvent, StreamGuardBuilder, StreamGuardLayer, StreamHandle,
};

pub const SECOND: Duration = Duration::from_secs(1);
pub const TICK: Duration = Duration::from_millis(10);

/// A response body fed by the test; dropping the sender ends it.
pub struct Feed(pub mpsc::Receiver<Bytes>);

impl Body for Feed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|d| d.map(|d| Ok(Frame::data(d))))
    }
}

/// The service behind the guard: counts the handlers that ran and hands the
/// test the feeder of each response body.
#[derive(Clone)]
pub struct App {
    pub handled: Arc<AtomicUsize>,
    pub feeders: mpsc::UnboundedSender<mpsc::Sender<Bytes>>,
    last_handle: Arc<Mutex<Option<StreamHandle>>>,
}

impl App {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>) {
        let (feeders, rx) = mpsc::unbounded_channel();
        let app = App {
            handled: Arc::new(AtomicUsize::new(0)),
            feeders,
            last_handle: Arc::default(),
        };
        (app, rx)
    }

    /// The handle the last request called with carried.
    pub fn last_handle(&self) -> Option<StreamHandle> {
        self.last_handle.lock().unwrap().clone()
    }

    /// The service, for whatever request body the guard layers hand it.
    pub fn service<B>(
        &self,
    ) -> impl Service<
        Request<B>,
        Response = Response<Feed>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Feed>, Infallible>> + Send + use<B>,
    > + Clone
    + use<B> {
        let app = self.clone();
        tower::service_fn(move |request: Request<B>| {
            let app = app.clone();
            let content_type = request.headers().get("content-type").cloned();
            *app.last_handle.lock().unwrap() = request.extensions().get::<StreamHandle>().cloned();
            async move {
                app.handled.fetch_add(1, Ordering::SeqCst);
                let (tx, rx) = mpsc::channel(4);
                let _ = app.feeders.send(tx);
                let mut response = Response::new(Feed(rx));
                if let Some(ct) = content_type {
                    response.headers_mut().insert("content-type", ct);
                }
                Ok(response)
            }
        })
    }
}

pub fn request(path: &str, connection: u64, grpc: bool) -> Request<Empty<Bytes>> {
    let mut request = Request::post(path)
        .extension(ConnectionKey::from_id(connection))
        .body(Empty::new())
        .unwrap();
    if grpc {
        request
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
    }
    request
}

pub async fn call<S, B>(svc: &mut S, request: Request<Empty<Bytes>>) -> Response<B>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
{
    svc.ready().await.unwrap().call(request).await.unwrap()
}

pub async fn next_event(events: &mut broadcast::Receiver<EndEvent>) -> EndEvent {
    tokio::time::timeout(Duration::from_secs(3600), events.recv())
        .await
        .expect("an end event within an hour of paused time")
        .expect("no events missed")
}

pub fn guard(builder: StreamGuardBuilder) -> StreamGuardLayer {
    builder.build().expect("valid configuration")
}
