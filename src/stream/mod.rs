//! The stream guard: the layer and its builder, the service, its response
//! future and the body wrappers, and what each stream carries.

mod body;
mod builder;
mod cap;
mod ending;
mod future;
mod handle;
mod layer;
mod origin;
mod policy;
mod record;
mod report;
mod route;
mod service;
mod shared;
mod ticket;
mod timer;

pub use body::{RequestBody, ResponseBody};
pub use builder::{DEFAULT_EVENT_CAPACITY, StreamGuardBuilder};
pub use future::ResponseFuture;
pub use handle::StreamHandle;
pub use layer::StreamGuardLayer;
pub use policy::Policy;
pub use route::{RoutePolicy, RouteRequest};
#[cfg(feature = "tonic")]
pub use service::TonicBody;
pub use service::{PlainBody, StreamGuard, WrapRequestBody};
