//! Waiting helpers shared by the loopback integration tests (`tonic.rs`,
//! `hyper.rs`). Each waits for a condition with a bound; none waits for a
//! guard by sleeping.

use std::time::Duration;

use tokio::{
    sync::broadcast::{self, error::TryRecvError},
    time::{Instant, timeout},
};
use tower_stream_guard::EndEvent;

/// How long a test waits for something that should happen (an event, a
/// counter reaching zero, a client error) before it fails.
pub const PATIENCE: Duration = Duration::from_secs(5);
/// How long a test listens for an event that must not come.
pub const QUIET: Duration = Duration::from_millis(200);
/// How late a guard may be seen to fire on a loaded machine (its own
/// precision is one or two timer resolutions, 10-20 ms).
pub const SLACK: Duration = Duration::from_secs(2);

/// The next end event, or a failure after [`PATIENCE`].
pub async fn next_event(events: &mut broadcast::Receiver<EndEvent>) -> EndEvent {
    timeout(PATIENCE, events.recv())
        .await
        .expect("no end event within 5 s")
        .expect("event channel failed")
}

/// Fails if any further event is queued or arrives within [`QUIET`].
pub async fn assert_no_more_events(events: &mut broadcast::Receiver<EndEvent>) {
    match events.try_recv() {
        Err(TryRecvError::Empty) => {}
        other => panic!("unexpected extra end event: {other:?}"),
    }
    if let Ok(extra) = timeout(QUIET, events.recv()).await {
        panic!("unexpected extra end event: {extra:?}");
    }
}

/// Polls `condition` every 10 ms until it holds; fails after [`PATIENCE`].
pub async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < PATIENCE,
            "timed out after {PATIENCE:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until no task is left on the current runtime (connection tasks,
/// producers, the guards' timer tasks); fails after [`PATIENCE`].
pub async fn wait_for_no_tasks() {
    wait_until("no task is left on the runtime", || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
            == 0
    })
    .await;
}
