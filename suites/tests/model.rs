//! A property test of one guarded stream against a small model of the
//! policy: random limits, then random sequences of request frames, response
//! frames, time advances, ends, drops and drains under paused time. The
//! guard must end the stream for the model's reason, at the model's time
//! (within the timer's precision), with exactly one end event, and the
//! handle must agree.
//!
//! Precision: the timer ticks every 10 ms from the stream's start; a
//! deadline fires on the first tick at or after it, and frames are stamped
//! with the next tick's time, so an end comes at most two ticks after the
//! model's deadline and never before it. Where two limits fall within those
//! two ticks of each other, either reason is right. Once the model says the
//! stream has ended, the test only lets time pass (past the two ticks) so no
//! operation lands inside that window.

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use proptest::prelude::*;
use tokio::{
    sync::mpsc,
    time::{Instant, sleep, sleep_until, timeout},
};
use tower::{Layer, ServiceExt, service_fn};
use tower_stream_guard::{
    Drain, EndReason, IdleDirection, StreamGuardLayer, StreamHandle,
    stream::{RequestBody, ResponseBody},
};

const TICK_MS: u64 = 10;
/// How late after the model's deadline the guard may end a stream.
const SLACK_MS: u64 = 2 * TICK_MS;

#[path = "../../tests/support/paused.rs"]
mod paused;
/// A body fed through a channel; the sender dropped is its end.
use paused::Feed as Chan;

#[derive(Clone, Copy, Debug)]
struct Limits {
    idle_both: Option<u64>,
    idle_request: Option<u64>,
    idle_response: Option<u64>,
    lifetime: Option<u64>,
    drain: bool,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Advance(u64),
    RequestFrame,
    ResponseFrame,
    EndRequest,
    FinishResponse,
    DropResponse,
    StartDrain(u64),
}

fn limit() -> impl Strategy<Value = Option<u64>> {
    proptest::option::weighted(0.5, (5u64..200).prop_map(|n| n * TICK_MS))
}

fn limits() -> impl Strategy<Value = Limits> {
    (limit(), limit(), limit(), limit(), any::<bool>()).prop_map(
        |(idle_both, idle_request, idle_response, lifetime, drain)| Limits {
            idle_both,
            idle_request,
            idle_response,
            lifetime,
            drain,
        },
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u64..400).prop_map(Op::Advance),
        3 => Just(Op::RequestFrame),
        3 => Just(Op::ResponseFrame),
        1 => Just(Op::EndRequest),
        1 => Just(Op::FinishResponse),
        1 => Just(Op::DropResponse),
        1 => (1u64..60).prop_map(|n| Op::StartDrain(n * TICK_MS)),
    ]
}

/// The policy, in milliseconds since the stream's start.
struct Model {
    limits: Limits,
    now: u64,
    last_request: u64,
    last_response: u64,
    request_done: bool,
    drain_deadline: Option<u64>,
}

impl Model {
    /// Every limit's deadline, and the reason it gives.
    fn deadlines(&self) -> Vec<(u64, EndReason)> {
        let l = &self.limits;
        let mut all = Vec::new();
        if let Some(lifetime) = l.lifetime {
            all.push((lifetime, EndReason::LifetimeExceeded));
        }
        if let Some(deadline) = self.drain_deadline {
            all.push((deadline, EndReason::Drained));
        }
        if let Some(idle) = l.idle_both {
            all.push((
                self.last_request.max(self.last_response) + idle,
                EndReason::IdleTimeout(IdleDirection::Both),
            ));
        }
        if let (Some(idle), false) = (l.idle_request, self.request_done) {
            all.push((
                self.last_request + idle,
                EndReason::IdleTimeout(IdleDirection::Request),
            ));
        }
        if let Some(idle) = l.idle_response {
            all.push((
                self.last_response + idle,
                EndReason::IdleTimeout(IdleDirection::Response),
            ));
        }
        all
    }

    /// The earliest deadline and every reason that may win it.
    fn next_end(&self) -> Option<(u64, Vec<EndReason>)> {
        let all = self.deadlines();
        let first = all.iter().map(|(at, _)| *at).min()?;
        let reasons = all
            .into_iter()
            .filter(|(at, _)| *at <= first + SLACK_MS)
            .map(|(_, reason)| reason)
            .collect();
        Some((first, reasons))
    }
}

/// What the model expects: the end time in ms (exact for ends the test
/// causes, a lower bound for the guard's) and the acceptable reasons.
#[derive(Debug)]
struct Expected {
    at: u64,
    by_guard: bool,
    reasons: Vec<EndReason>,
}

fn build(limits: &Limits, drain: &Drain) -> Option<StreamGuardLayer> {
    let mut builder = StreamGuardLayer::builder().event_capacity(16);
    if let Some(ms) = limits.idle_both {
        builder = builder.idle_timeout(Duration::from_millis(ms));
    }
    if let Some(ms) = limits.idle_request {
        builder = builder.request_idle_timeout(Duration::from_millis(ms));
    }
    if let Some(ms) = limits.idle_response {
        builder = builder.response_idle_timeout(Duration::from_millis(ms));
    }
    if let Some(ms) = limits.lifetime {
        builder = builder.max_lifetime(Duration::from_millis(ms));
    }
    if limits.drain {
        builder = builder.drain(drain);
    }
    // Every generated policy is accepted, idle timeouts not below the
    // lifetime included (they can never fire first, which the model's
    // earliest-deadline rule covers).
    let built = builder.build();
    assert!(built.is_ok(), "{built:?}");
    built.ok()
}

type Seen = (RequestBody<Chan>, Option<StreamHandle>, mpsc::Sender<Bytes>);

/// Fails the case with what the model and the guard disagreed on.
fn diverged(what: &str, limits: &Limits, model: &Model) -> TestCaseError {
    TestCaseError::fail(format!(
        "{what} at {} ms ({limits:?}; last request {} ms, last response {} ms)",
        model.now, model.last_request, model.last_response
    ))
}

async fn run(limits: Limits, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let drain = Drain::new();
    let Some(guard) = build(&limits, &drain) else {
        return Ok(());
    };
    let mut events = guard.subscribe();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<Seen>();
    let service = guard.layer(service_fn(move |request: Request<RequestBody<Chan>>| {
        let seen = seen_tx.clone();
        async move {
            let (tx, rx) = mpsc::channel(4);
            let handle = request.extensions().get::<StreamHandle>().cloned();
            let _ = seen.send((request.into_body(), handle, tx));
            Ok::<_, Infallible>(Response::new(Chan(rx)))
        }
    }));
    let (request_tx, request_rx) = mpsc::channel(4);
    let start = Instant::now();
    let response = service
        .oneshot(Request::new(Chan(request_rx)))
        .await
        .expect("infallible");
    let (mut request_body, handle, response_tx) = seen_rx.recv().await.expect("handler ran");
    let handle = handle.expect("a handle in the extensions");
    let mut request_tx = Some(request_tx);
    let mut response_tx = Some(response_tx);
    let mut response_body: Option<ResponseBody<Chan>> = Some(response.into_body());
    let mut model = Model {
        limits,
        now: 0,
        last_request: 0,
        last_response: 0,
        request_done: false,
        drain_deadline: None,
    };
    let patience = Duration::from_secs(1);

    let mut expected = None;
    for op in ops {
        match op {
            Op::Advance(ms) => {
                let target = model.now + ms;
                if let Some((at, reasons)) = model.next_end()
                    && at <= target
                {
                    expected = Some(Expected {
                        at,
                        by_guard: true,
                        reasons,
                    });
                    break;
                }
                sleep_until(start + Duration::from_millis(target)).await;
                model.now = target;
            }
            Op::RequestFrame => {
                let Some(tx) = &request_tx else { continue };
                let _ = tx.send(Bytes::from_static(b"q")).await;
                match timeout(patience, request_body.frame()).await {
                    Ok(Some(Ok(frame))) if frame.is_data() => model.last_request = model.now,
                    other => {
                        return Err(diverged(
                            &format!("request frame: {other:?}"),
                            &limits,
                            &model,
                        ));
                    }
                }
            }
            Op::ResponseFrame => {
                let (Some(tx), Some(body)) = (&response_tx, response_body.as_mut()) else {
                    continue;
                };
                let _ = tx.send(Bytes::from_static(b"r")).await;
                match timeout(patience, body.frame()).await {
                    Ok(Some(Ok(frame))) if frame.is_data() => model.last_response = model.now,
                    other => {
                        return Err(diverged(
                            &format!("response frame: {other:?}"),
                            &limits,
                            &model,
                        ));
                    }
                }
            }
            Op::EndRequest => {
                let Some(tx) = request_tx.take() else {
                    continue;
                };
                drop(tx);
                match timeout(patience, request_body.frame()).await {
                    Ok(None) => model.request_done = true,
                    other => {
                        return Err(diverged(
                            &format!("request end: {other:?}"),
                            &limits,
                            &model,
                        ));
                    }
                }
            }
            Op::FinishResponse => {
                let (Some(tx), Some(body)) = (response_tx.take(), response_body.as_mut()) else {
                    continue;
                };
                drop(tx);
                match timeout(patience, body.frame()).await {
                    Ok(None) => {}
                    other => {
                        return Err(diverged(
                            &format!("response end: {other:?}"),
                            &limits,
                            &model,
                        ));
                    }
                }
                expected = Some(Expected {
                    at: model.now,
                    by_guard: false,
                    reasons: vec![EndReason::Completed],
                });
                break;
            }
            Op::DropResponse => {
                response_body = None;
                expected = Some(Expected {
                    at: model.now,
                    by_guard: false,
                    reasons: vec![EndReason::Cancelled],
                });
                break;
            }
            Op::StartDrain(grace) => {
                if !limits.drain || model.drain_deadline.is_some() {
                    continue;
                }
                // The drain proceeds whether or not its report is awaited.
                drop(drain.start(Duration::from_millis(grace)));
                model.drain_deadline = Some(model.now + grace);
            }
        }
    }
    let expected = match expected {
        Some(expected) => expected,
        None => match model.next_end() {
            Some((at, reasons)) => Expected {
                at,
                by_guard: true,
                reasons,
            },
            None => {
                response_body = None;
                Expected {
                    at: model.now,
                    by_guard: false,
                    reasons: vec![EndReason::Cancelled],
                }
            }
        },
    };
    if expected.by_guard {
        // Nothing reads the bodies meanwhile: the guard's timer alone must
        // end the stream.
        sleep_until(start + Duration::from_millis(expected.at + SLACK_MS + 1)).await;
    }

    let event = events.try_recv().map_err(|err| {
        diverged(
            &format!("no end event ({err:?}), expected {expected:?}"),
            &limits,
            &model,
        )
    })?;
    prop_assert!(
        expected.reasons.contains(&event.reason()),
        "ended {:?} after {:?}, expected {:?}",
        event.reason(),
        event.duration(),
        expected
    );
    let ended_ms = u64::try_from(event.duration().as_millis()).unwrap_or(u64::MAX);
    if expected.by_guard {
        prop_assert!(
            (expected.at..=expected.at + SLACK_MS).contains(&ended_ms),
            "ended {:?} at {} ms, expected {:?}",
            event.reason(),
            ended_ms,
            expected
        );
    } else {
        prop_assert_eq!(ended_ms, expected.at);
    }
    prop_assert_eq!(handle.end_reason(), Some(event.reason()));
    prop_assert_eq!(guard.active_streams(), 0);
    // Whatever happens to the rest of the stream now, no second event.
    drop((response_body, request_body, request_tx, response_tx));
    sleep(Duration::from_millis(100)).await;
    prop_assert!(events.try_recv().is_err(), "a second end event");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_guard_ends_a_stream_as_the_model_says(
        limits in limits(),
        ops in proptest::collection::vec(op(), 0..24),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime");
        runtime.block_on(run(limits, ops))?;
    }
}
