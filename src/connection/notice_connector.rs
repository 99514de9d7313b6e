//! A client connector whose connections report GOAWAY to a
//! [`GoawayNotice`] ([`GoawayNotice::connector`]), with the dead-peer socket
//! options set on each: what tonic's `Endpoint::connect_with_connector` and
//! hyper-util's client take.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    PeerOf,
    notice::{GoawayNotice, NoticedIo},
};

/// hyper-util's client asks its connections what they are (HTTP/2
/// negotiated, proxied, ...): the wrapped IO answers.
#[cfg(feature = "hyper")]
impl<IO: hyper_util::client::legacy::connect::Connection>
    hyper_util::client::legacy::connect::Connection for NoticedIo<IO>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.get_ref().connected()
    }
}

/// A connector whose connections report GOAWAY to a [`GoawayNotice`]
/// ([`GoawayNotice::connector`]).
#[derive(Clone, Debug)]
pub struct NoticeConnector<C> {
    pub(super) inner: C,
    pub(super) notice: GoawayNotice,
}

impl<C> tower_service::Service<http::Uri> for NoticeConnector<C>
where
    C: tower_service::Service<http::Uri>,
    C::Response: AsyncRead + AsyncWrite + PeerOf + Unpin,
{
    type Response = hyper_util::rt::TokioIo<NoticedIo<C::Response>>;
    type Error = C::Error;
    type Future = NoticeConnecting<C::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        NoticeConnecting {
            future: self.inner.call(uri),
            notice: self.notice.clone(),
        }
    }
}

pin_project! {
    /// A connection being made by a [`NoticeConnector`].
    pub struct NoticeConnecting<F> {
        #[pin]
        future: F,
        notice: GoawayNotice,
    }
}

impl<F, IO, E> Future for NoticeConnecting<F>
where
    F: Future<Output = Result<IO, E>>,
    IO: PeerOf,
{
    type Output = Result<hyper_util::rt::TokioIo<NoticedIo<IO>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let io = ready!(this.future.poll(cx))?;
        if let (Some(timeout), Some(tcp)) = (this.notice.dead_peer, io.tcp_stream())
            && let Err(error) = crate::socket::set_dead_peer_timeout(tcp, timeout)
        {
            tracing::debug!(target: "tower_stream_guard", %error, "dead-peer socket options not set");
        }
        Poll::Ready(Ok(hyper_util::rt::TokioIo::new(this.notice.wrap(io))))
    }
}

impl<F> fmt::Debug for NoticeConnecting<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoticeConnecting").finish_non_exhaustive()
    }
}
