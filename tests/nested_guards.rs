//! Two guards nested in one stack: each inserts its own handle. The handler
//! finds the innermost guard's in its request, a client the outermost's in
//! the response (README "Clients").

#[path = "support/paused.rs"]
mod paused;

use paused::{App, SECOND, call, guard, next_event, request};
use tower::Layer;
use tower_stream_guard::{EndReason, StreamGuardLayer, StreamHandle};

#[tokio::test(start_paused = true)]
async fn the_response_carries_the_outermost_guards_handle() {
    let outer = guard(StreamGuardLayer::builder().response_handle(true));
    let inner = guard(
        StreamGuardLayer::builder()
            .response_handle(true)
            .idle_timeout(60 * SECOND),
    );
    let mut outer_events = outer.subscribe();
    let mut inner_events = inner.subscribe();
    let (app, mut feeders) = App::new();
    let mut svc = outer.layer(inner.layer(app.service()));

    let response = call(&mut svc, request("/echo.Echo/ServerStream", 1, true)).await;
    let _feed = feeders.recv().await.expect("the handler's feeder");
    let in_request = app.last_handle().expect("the handler's handle");
    let in_response = response
        .extensions()
        .get::<StreamHandle>()
        .cloned()
        .expect("a handle in the response");
    assert_ne!(
        in_response.id(),
        in_request.id(),
        "the response's handle is not the innermost guard's"
    );

    // Cancelling it ends the outer guard's stream: its event, its id.
    assert!(in_response.cancel());
    let ended = next_event(&mut outer_events).await;
    assert_eq!(ended.id(), in_response.id());
    assert_eq!(ended.reason(), EndReason::Cancelled);
    assert!(
        !in_request.is_ended(),
        "the inner guard's stream ends only when its body goes"
    );
    drop(response);
    let inner_ended = next_event(&mut inner_events).await;
    assert_eq!(inner_ended.id(), in_request.id());
}
