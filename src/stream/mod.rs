//! The stream guard: the layer and its builder, the service, its response
//! future and the body wrappers, and what each stream carries.

mod body;
mod cap;
mod handle;
mod layer;
mod origin;
mod policy;
mod record;
mod route;
mod service;
mod timer;

pub use body::{RequestBody, ResponseBody};
pub use handle::StreamHandle;
pub use layer::{DEFAULT_EVENT_CAPACITY, StreamGuardBuilder, StreamGuardLayer};
pub use policy::Policy;
pub use route::{RoutePolicy, RouteRequest};
#[cfg(feature = "tonic")]
pub use service::TonicBody;
pub use service::{PlainBody, ResponseFuture, StreamGuard, WrapRequestBody};
