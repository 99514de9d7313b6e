//! The layers and their builder.

use std::{
    fmt,
    marker::PhantomData,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::sync::broadcast;
use tower_layer::Layer;

use crate::{
    event::{EndCallback, EndEvent, EventHub},
    policy::{ConfigError, DEFAULT_TIMER_RESOLUTION, IdleDirection, Policy},
    service::{PlainBody, StreamGuard},
    state::Core,
    timer::Sweeper,
};

/// The default capacity of the end-event channel: 1024 events.
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;

/// A layer that guards every stream passing through it: idle timeouts, a
/// maximum lifetime, a [`StreamHandle`](crate::StreamHandle) in the request
/// extensions and one [`EndEvent`] per stream.
///
/// Built with [`StreamGuardLayer::builder`]; configuration errors surface
/// there, not at the first request. Clones share everything: the timer, the
/// event channel and the active-stream count. `W` says how the request body
/// reaches the inner service ([`PlainBody`], or
/// [`TonicBody`](crate::TonicBody) via [`for_tonic`](Self::for_tonic)).
///
/// ```
/// use std::time::Duration;
/// use tower_stream_guard::{IdleDirection, StreamGuardLayer};
///
/// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
/// let guard = StreamGuardLayer::builder()
///     .idle_timeout(Duration::from_secs(30))
///     .request_idle_timeout(Duration::from_secs(10))
///     .max_lifetime(Duration::from_secs(3600))
///     .build()?;
/// let mut events = guard.subscribe();
/// # drop(events);
/// # Ok(())
/// # }
/// ```
pub struct StreamGuardLayer<W = PlainBody> {
    policy: Policy,
    core: Arc<Core>,
    _wrap: PhantomData<fn() -> W>,
}

impl StreamGuardLayer {
    /// Starts building a guard. With nothing set it enforces no limit but
    /// still gives every stream a handle and an end event.
    pub fn builder() -> StreamGuardBuilder {
        StreamGuardBuilder::default()
    }
}

impl<W> StreamGuardLayer<W> {
    /// A receiver of this guard's end events: one per stream, never blocking
    /// a stream. A receiver that falls more than the channel's capacity
    /// behind is told how many it missed
    /// ([`RecvError::Lagged`](broadcast::error::RecvError::Lagged)).
    pub fn subscribe(&self) -> broadcast::Receiver<EndEvent> {
        self.core.events.subscribe()
    }

    /// Streams this guard watches that have not ended yet.
    pub fn active_streams(&self) -> usize {
        self.core.active.load(Ordering::Relaxed)
    }

    /// The limits this guard enforces.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The same guard, handing the inner service a `tonic::body::Body`, as
    /// tonic's `Server::layer` requires.
    #[cfg(feature = "tonic")]
    pub fn for_tonic(self) -> StreamGuardLayer<crate::TonicBody> {
        self.wrap_request_body()
    }

    /// The same guard, handing request bodies to the inner service as `W2`
    /// says (see [`WrapRequestBody`](crate::WrapRequestBody)).
    pub fn wrap_request_body<W2>(self) -> StreamGuardLayer<W2> {
        StreamGuardLayer {
            policy: self.policy,
            core: self.core,
            _wrap: PhantomData,
        }
    }
}

impl<W> Clone for StreamGuardLayer<W> {
    fn clone(&self) -> Self {
        StreamGuardLayer {
            policy: self.policy,
            core: Arc::clone(&self.core),
            _wrap: PhantomData,
        }
    }
}

impl<W> fmt::Debug for StreamGuardLayer<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamGuardLayer")
            .field("policy", &self.policy)
            .field("active_streams", &self.active_streams())
            .finish()
    }
}

impl<S, W> Layer<S> for StreamGuardLayer<W> {
    type Service = StreamGuard<S, W>;

    fn layer(&self, inner: S) -> Self::Service {
        StreamGuard::new(inner, self.policy, Arc::clone(&self.core))
    }
}

/// Configures a [`StreamGuardLayer`]; every setting is optional.
#[derive(Clone)]
pub struct StreamGuardBuilder {
    policy: Policy,
    resolution: Duration,
    capacity: usize,
    callbacks: Vec<EndCallback>,
}

impl Default for StreamGuardBuilder {
    fn default() -> Self {
        StreamGuardBuilder {
            policy: Policy::default(),
            resolution: DEFAULT_TIMER_RESOLUTION,
            capacity: DEFAULT_EVENT_CAPACITY,
            callbacks: Vec::new(),
        }
    }
}

impl fmt::Debug for StreamGuardBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamGuardBuilder")
            .field("policy", &self.policy)
            .field("resolution", &self.resolution)
            .field("capacity", &self.capacity)
            .field("callbacks", &self.callbacks.len())
            .finish()
    }
}

impl StreamGuardBuilder {
    /// Ends a stream when no frame moved in *either* direction for `timeout`:
    /// the safe choice for bidirectional calls where one side is quiet for a
    /// while. Ends gRPC responses with `DEADLINE_EXCEEDED`.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.policy.set_idle(IdleDirection::Both, timeout);
        self
    }

    /// Ends a stream when the peer sent no request frame for `timeout` while
    /// its request body is still open: the client-streaming call whose client
    /// went silent. The handler's next read fails with `DEADLINE_EXCEEDED`.
    pub fn request_idle_timeout(mut self, timeout: Duration) -> Self {
        self.policy.set_idle(IdleDirection::Request, timeout);
        self
    }

    /// Ends a stream when the service sent no response frame for `timeout`,
    /// counted from the request's arrival: a silent producer, or a peer that
    /// stopped reading (hyper then no longer polls the body; the guard fires
    /// anyway).
    pub fn response_idle_timeout(mut self, timeout: Duration) -> Self {
        self.policy.set_idle(IdleDirection::Response, timeout);
        self
    }

    /// Ends a stream `lifetime` after its request reached the guard, whatever
    /// it is doing.
    pub fn max_lifetime(mut self, lifetime: Duration) -> Self {
        self.policy.max_lifetime = Some(lifetime);
        self
    }

    /// How often deadlines are checked (default 10 ms, between 1 ms and 1 s).
    /// A guard fires at most one resolution after its deadline (an idle
    /// timeout at most two), never before. Each guard with open streams wakes
    /// once per resolution, however many streams it has.
    pub fn timer_resolution(mut self, resolution: Duration) -> Self {
        self.resolution = resolution;
        self
    }

    /// How many end events a lagging receiver may fall behind before it
    /// misses some (default [`DEFAULT_EVENT_CAPACITY`]).
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Runs `callback` for every end event, on whichever task ended the stream
    /// (the server's connection task, or the guard's timer task). Keep it
    /// short and non-blocking; a panic in it is caught and logged.
    pub fn on_end<F>(mut self, callback: F) -> Self
    where
        F: Fn(&EndEvent) + Send + Sync + 'static,
    {
        self.callbacks.push(Arc::new(callback));
        self
    }

    /// Checks the configuration and builds the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] when a duration is zero, longer than
    /// [`MAX_DURATION`](crate::MAX_DURATION) or shorter than the timer
    /// resolution, when an idle timeout is not shorter than the maximum
    /// lifetime, when the resolution is out of range, or when the event
    /// capacity is zero.
    pub fn build(self) -> Result<StreamGuardLayer, ConfigError> {
        self.policy.validate(self.resolution)?;
        if self.capacity == 0 {
            return Err(ConfigError::ZeroEventCapacity);
        }
        Ok(StreamGuardLayer {
            policy: self.policy,
            core: Arc::new(Core {
                sweeper: Arc::new(Sweeper::new(self.resolution)),
                events: EventHub::new(self.capacity, self.callbacks),
                active: Default::default(),
            }),
            _wrap: PhantomData,
        })
    }
}

macro_rules! single_guard_layer {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub struct $name<W = PlainBody>(StreamGuardLayer<W>);

        impl<W> $name<W> {
            /// A receiver of this layer's end events; see
            /// [`StreamGuardLayer::subscribe`].
            pub fn subscribe(&self) -> broadcast::Receiver<EndEvent> {
                self.0.subscribe()
            }

            /// Streams this layer owns or limits that have not ended yet.
            pub fn active_streams(&self) -> usize {
                self.0.active_streams()
            }

            /// The same layer, handing the inner service a `tonic::body::Body`.
            #[cfg(feature = "tonic")]
            pub fn for_tonic(self) -> $name<crate::TonicBody> {
                $name(self.0.for_tonic())
            }

            /// The underlying general guard layer.
            pub fn into_inner(self) -> StreamGuardLayer<W> {
                self.0
            }
        }

        impl<W> Clone for $name<W> {
            fn clone(&self) -> Self {
                $name(self.0.clone())
            }
        }

        impl<W> fmt::Debug for $name<W> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_tuple(stringify!($name)).field(&self.0).finish()
            }
        }

        impl<S, W> Layer<S> for $name<W> {
            type Service = StreamGuard<S, W>;

            fn layer(&self, inner: S) -> Self::Service {
                self.0.layer(inner)
            }
        }
    };
}

single_guard_layer! {
    /// Only an idle timeout; stacks with [`MaxLifetimeLayer`] and
    /// [`StreamGuardLayer`] without wrapping bodies twice (the outermost layer
    /// owns the stream, the inner ones add their limits to it and their
    /// subscribers hear its end).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower::ServiceBuilder;
    /// use tower_stream_guard::{IdleDirection, IdleTimeoutLayer, MaxLifetimeLayer};
    ///
    /// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
    /// let layers = ServiceBuilder::new()
    ///     .layer(MaxLifetimeLayer::new(Duration::from_secs(600))?)
    ///     .layer(IdleTimeoutLayer::new(Duration::from_secs(20), IdleDirection::Request)?);
    /// # drop(layers);
    /// # Ok(())
    /// # }
    /// ```
    IdleTimeoutLayer
}

single_guard_layer! {
    /// Only a maximum lifetime; stacks like [`IdleTimeoutLayer`].
    MaxLifetimeLayer
}

impl IdleTimeoutLayer {
    /// Ends a stream when no frame moved in `direction` for `timeout`.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for a zero or absurdly long timeout.
    pub fn new(timeout: Duration, direction: IdleDirection) -> Result<Self, ConfigError> {
        let mut builder = StreamGuardLayer::builder();
        builder.policy.set_idle(direction, timeout);
        builder.build().map(IdleTimeoutLayer)
    }
}

impl MaxLifetimeLayer {
    /// Ends a stream `lifetime` after its request reached the layer.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] for a zero or absurdly long lifetime.
    pub fn new(lifetime: Duration) -> Result<Self, ConfigError> {
        StreamGuardLayer::builder()
            .max_lifetime(lifetime)
            .build()
            .map(MaxLifetimeLayer)
    }
}
