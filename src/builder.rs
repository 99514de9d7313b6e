//! Guards in a `tower::ServiceBuilder` chain, in the style of tower-http's
//! `ServiceBuilderExt`.

use tower::ServiceBuilder;
use tower_layer::Stack;

use crate::{IdleTimeoutLayer, MaxLifetimeLayer, StreamGuardLayer};

/// Adds the guard layers to [`ServiceBuilder`] by name.
///
/// ```
/// use std::time::Duration;
/// use tower::ServiceBuilder;
/// use tower_stream_guard::{RequestBody, ServiceBuilderExt, StreamGuardLayer};
///
/// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
/// let guard = StreamGuardLayer::builder()
///     .idle_timeout(Duration::from_secs(30))
///     .build()?;
/// let service = ServiceBuilder::new()
///     .stream_guard(guard)
///     .service_fn(|_: http::Request<RequestBody<String>>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
///     });
/// # drop(service);
/// # Ok(())
/// # }
/// ```
pub trait ServiceBuilderExt<L>: sealed::Sealed + Sized {
    /// Adds a [`StreamGuardLayer`].
    fn stream_guard<W>(
        self,
        guard: StreamGuardLayer<W>,
    ) -> ServiceBuilder<Stack<StreamGuardLayer<W>, L>>;

    /// Adds an [`IdleTimeoutLayer`].
    fn idle_timeout_guard<W>(
        self,
        layer: IdleTimeoutLayer<W>,
    ) -> ServiceBuilder<Stack<IdleTimeoutLayer<W>, L>>;

    /// Adds a [`MaxLifetimeLayer`].
    fn max_lifetime_guard<W>(
        self,
        layer: MaxLifetimeLayer<W>,
    ) -> ServiceBuilder<Stack<MaxLifetimeLayer<W>, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn stream_guard<W>(
        self,
        guard: StreamGuardLayer<W>,
    ) -> ServiceBuilder<Stack<StreamGuardLayer<W>, L>> {
        self.layer(guard)
    }

    fn idle_timeout_guard<W>(
        self,
        layer: IdleTimeoutLayer<W>,
    ) -> ServiceBuilder<Stack<IdleTimeoutLayer<W>, L>> {
        self.layer(layer)
    }

    fn max_lifetime_guard<W>(
        self,
        layer: MaxLifetimeLayer<W>,
    ) -> ServiceBuilder<Stack<MaxLifetimeLayer<W>, L>> {
        self.layer(layer)
    }
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}
