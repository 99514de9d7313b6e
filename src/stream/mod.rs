//! The stream guard: the layer and its builder, the service, its response
//! future and the body wrappers, and what each stream carries.

mod body;
pub(crate) mod builder;
mod cap;
mod ending;
mod future;
pub(crate) mod handle;
pub(crate) mod layer;
mod origin;
mod policy;
mod record;
mod report;
pub(crate) mod route;
mod service;
mod shared;
mod ticket;
mod timer;

pub use body::{RequestBody, ResponseBody};
pub use future::ResponseFuture;
pub use policy::Policy;
#[cfg(feature = "tonic")]
pub use service::TonicBody;
pub use service::{PlainBody, StreamGuard, WrapRequestBody};
