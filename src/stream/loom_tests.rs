//! loom models of the stream's end protocol: which thread's end counts, the
//! one end event, the wake-ups and the cap slots, explored over every
//! interleaving (within `LOOM_MAX_PREEMPTIONS`) of the threads that race.
//!
//! Built only with `RUSTFLAGS="--cfg stream_guard_loom"` (see `.ci/run`):
//! `crate::sync` then hands the record, its ending, the timer's locks and the
//! cap slots loom's atomics, locks and waker slot. The models drive the real
//! record, ticket, bodies, handle and caps; what cannot run under loom is cut
//! off at the record: the sweeper is its `Record::end(limit)` (what its tick
//! does with an expired stream), the event channel (tokio's broadcast) is
//! read once the threads are done, and the cap queue's `Notify` (tokio's) is
//! polled with a waker that only raises a flag.

use std::{
    collections::VecDeque,
    convert::Infallible,
    future::{Future, poll_fn},
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use loom::thread;
use tokio::sync::broadcast;

use super::{
    cap::{self, CapPermit, CapSet, Origin},
    ending::After,
    future::{ForResponse, Gate, ResponseFuture},
    handle::StreamHandle,
    layer::StreamGuardLayer,
    request_body::RequestBody,
    response_body::{Opened, ResponseBody},
    ticket::Ticket,
};
use crate::{
    end::{EndReason, Ending, IdleDirection},
    error::{BoxError, GuardError},
    events::EndEvent,
    grpc,
};

/// An inner body that hands out `frames`, or stays pending for ever.
pub(super) struct Script {
    frames: VecDeque<Frame<Bytes>>,
    pending: bool,
}

impl Script {
    pub(super) fn frames(frames: impl IntoIterator<Item = Frame<Bytes>>) -> Self {
        Script {
            frames: frames.into_iter().collect(),
            pending: false,
        }
    }

    fn pending() -> Self {
        Script {
            frames: VecDeque::new(),
            pending: true,
        }
    }
}

impl Body for Script {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.pending {
            return Poll::Pending;
        }
        Poll::Ready(this.frames.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        !self.pending && self.frames.is_empty()
    }
}

pub(super) fn ok_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers
}

/// A stream of `layer`, as `call` starts one (without the timer filing).
pub(super) fn start(layer: &StreamGuardLayer, grpc: bool) -> Ticket {
    let request = http::Request::new(());
    let after = After::new(&request, None, None, None);
    match Ticket::start(layer.shared(), layer.policy(), grpc, after, 0) {
        Ok(ticket) => ticket,
        Err(_) => panic!("no drain began"),
    }
}

/// What the response future hands a body whose head more parts follow.
pub(super) fn opened(grpc: bool) -> Opened {
    Opened {
        grpc,
        heartbeat: None,
        client: false,
        declared: None,
        last: false,
    }
}

/// The reasons of the end events emitted so far.
pub(super) fn ended(events: &mut broadcast::Receiver<EndEvent>) -> Vec<EndReason> {
    std::iter::from_fn(|| events.try_recv().ok())
        .map(|event| event.reason())
        .collect()
}

/// What a peer reads of a gRPC response body: the `grpc-status` of its
/// trailers, if any.
fn read_status(body: ResponseBody<Script>) -> Option<u32> {
    let mut body = pin!(body);
    let mut cx = Context::from_waker(Waker::noop());
    let mut status = None;
    loop {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    status = grpc::status_of(trailers);
                }
            }
            Poll::Ready(Some(Err(err))) => panic!("a gRPC body yields no error: {err}"),
            Poll::Ready(None) => return status,
            Poll::Pending => panic!("the script never waits"),
        }
    }
}

/// (a) The response body's last frame (trailers: a normal completion)
/// against the sweeper firing a limit: one end, one event, and the reason is
/// what the peer read (`grpc-status: 0` for a completion, the guard's
/// `4` for the limit).
#[test]
fn loom_last_frame_vs_limit() {
    loom::model(|| {
        let layer = StreamGuardLayer::builder().build().unwrap();
        let mut events = layer.subscribe();
        let ticket = start(&layer, true);
        let record = Arc::clone(ticket.record());
        let frames = [
            Frame::data(Bytes::from_static(b"last")),
            Frame::trailers(ok_trailers()),
        ];
        let body = ResponseBody::guarded(Script::frames(frames), ticket, opened(true));
        let reader = thread::spawn(move || read_status(body));

        // The sweeper, on this thread.
        let fired = record.end(Ending::IdleResponse);

        let status = reader.join().unwrap();
        let ends = ended(&mut events);
        assert_eq!(ends.len(), 1, "one end event: {ends:?}");
        match ends[0] {
            EndReason::Completed => {
                assert!(!fired, "the limit counted too");
                assert_eq!(status, Some(0));
            }
            EndReason::IdleTimeout(IdleDirection::Response) => {
                assert!(fired);
                assert_eq!(status, Some(4), "the peer read another end");
            }
            other => panic!("ended as {other:?}"),
        }
        assert!(record.is_ended());
        assert_eq!(layer.shared().report.active(), 0);
    });
}

/// Takes the one slot of a one-stream cap, or panics.
fn take_slot(caps: &[Arc<CapSet>]) -> Vec<CapPermit> {
    cap::try_acquire_all(caps, &NOWHERE).expect("the slot is free")
}

const NOWHERE: Origin = Origin {
    connection: None,
    peer: None,
};

/// The one slot of `caps` is free: exactly one stream can take it (a slot
/// given back twice would let two in, or wrap the count round).
fn assert_one_free_slot(caps: &[Arc<CapSet>]) {
    let taken = take_slot(caps);
    assert!(
        cap::try_acquire_all(caps, &NOWHERE).is_err(),
        "a slot given back twice"
    );
    taken.into_iter().for_each(CapPermit::release);
}

fn one_slot_guard() -> (StreamGuardLayer, Vec<Arc<CapSet>>) {
    let layer = StreamGuardLayer::builder().max_streams(1).build().unwrap();
    let caps = layer.shared().admission.caps.iter().cloned().collect();
    (layer, caps)
}

/// (b) A guard's end against the handle's `cancel()` against the response
/// body's drop (the peer went away): one end, one event with the reason of
/// whichever won, the slot given back once.
#[test]
fn loom_limit_vs_cancel_vs_drop() {
    loom::model(|| {
        let (layer, caps) = one_slot_guard();
        let mut events = layer.subscribe();
        let ticket = start(&layer, false);
        ticket.hold(take_slot(&caps));
        let handle = StreamHandle {
            record: Arc::clone(ticket.record()),
            goaways_seen: 0,
        };
        let sweeper = Arc::clone(ticket.record());
        let body = ResponseBody::guarded(Script::pending(), ticket, opened(false));

        let sweeper = thread::spawn(move || sweeper.end(Ending::Lifetime));
        let handler = thread::spawn(move || handle.cancel());
        drop(body);
        let fired = sweeper.join().unwrap();
        let cancelled = handler.join().unwrap();

        assert!(!(fired && cancelled), "two ends counted");
        let ends = ended(&mut events);
        let expected = if fired {
            EndReason::LifetimeExceeded
        } else {
            EndReason::Cancelled
        };
        assert_eq!(ends, [expected]);
        assert_eq!(layer.shared().report.active(), 0);
        assert_one_free_slot(&caps);
    });
}

/// (b') Slots handed to a stream after it started (the response future does
/// so once `cap_wait` admits it) against the handle's `cancel()`: the slots
/// are given back once, whichever comes first.
#[test]
fn loom_late_slots_vs_cancel() {
    loom::model(|| {
        let (layer, caps) = one_slot_guard();
        let mut events = layer.subscribe();
        let ticket = start(&layer, false);
        let handle = StreamHandle {
            record: Arc::clone(ticket.record()),
            goaways_seen: 0,
        };
        let permits = take_slot(&caps);

        let handler = thread::spawn(move || handle.cancel());
        ticket.hold(permits);
        assert!(handler.join().unwrap(), "only the handle ends it");
        drop(ticket);

        assert_eq!(ended(&mut events), [EndReason::Cancelled]);
        assert_one_free_slot(&caps);
    });
}

/// (c) A pending response body registering its waker against the sweeper's
/// end and wake-up: the body is woken or sees the end when it re-checks
/// (a lost wake-up leaves `block_on` waiting for ever: loom reports the
/// deadlock), and reads the guard's trailers.
#[test]
fn loom_pending_response_body_vs_limit() {
    loom::model(|| {
        let layer = StreamGuardLayer::builder().build().unwrap();
        let mut events = layer.subscribe();
        let ticket = start(&layer, true);
        let sweeper = Arc::clone(ticket.record());
        let mut body = ResponseBody::guarded(Script::pending(), ticket, opened(true));

        let sweeper = thread::spawn(move || assert!(sweeper.end(Ending::IdleBoth)));
        let frame = loom::future::block_on(poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)));
        let trailers = frame.unwrap().unwrap().into_trailers().unwrap();
        assert_eq!(grpc::status_of(&trailers), Some(4));
        sweeper.join().unwrap();
        drop(body);

        assert_eq!(
            ended(&mut events),
            [EndReason::IdleTimeout(IdleDirection::Both)]
        );
    });
}

/// (c') The same for a pending request body: it is woken or sees the end,
/// and yields the guard's error.
#[test]
fn loom_pending_request_body_vs_limit() {
    loom::model(|| {
        let layer = StreamGuardLayer::builder().build().unwrap();
        let mut events = layer.subscribe();
        let ticket = start(&layer, true);
        let mut body = RequestBody::guarded(Script::pending(), Arc::clone(ticket.record()));

        let sweeper = thread::spawn(move || {
            assert!(ticket.end(Ending::IdleRequest));
            drop(ticket);
        });
        let frame = loom::future::block_on(poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)));
        let err: BoxError = frame.unwrap().unwrap_err();
        let err = err.downcast_ref::<GuardError>().expect("the guard's error");
        assert_eq!(err.reason(), EndReason::IdleTimeout(IdleDirection::Request));
        sweeper.join().unwrap();

        assert_eq!(
            ended(&mut events),
            [EndReason::IdleTimeout(IdleDirection::Request)]
        );
    });
}

/// A waker that only raises a flag: tokio's `Notify` (the cap queues') is
/// not loom's, so it must not call into loom while it holds its own lock.
#[derive(Default)]
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// (d) A cap slot given back by a stream's end against a stream waiting for
/// one (`cap_wait`): the waiter takes the slot, or is woken and takes it
/// then. Never left waiting beside a free slot, never both streams in.
#[test]
fn loom_slot_released_vs_waiter() {
    loom::model(|| {
        let (layer, caps) = one_slot_guard();
        let holder = start(&layer, false);
        holder.hold(take_slot(&caps));

        let releaser = thread::spawn(move || assert!(holder.end(Ending::Completed)));
        let flag = Arc::new(Flag::default());
        let waker = Waker::from(Arc::clone(&flag));
        let mut cx = Context::from_waker(&waker);
        let mut refused = None;
        let mut wait = pin!(cap::acquire_all(&caps, &NOWHERE, &mut refused));
        let first = wait.as_mut().poll(&mut cx);
        releaser.join().unwrap();

        let permits = match first {
            Poll::Ready(admitted) => admitted.expect("no key is missing"),
            Poll::Pending => {
                assert!(flag.0.load(Ordering::SeqCst), "lost wake-up");
                match wait.as_mut().poll(&mut cx) {
                    Poll::Ready(admitted) => admitted.expect("no key is missing"),
                    Poll::Pending => panic!("woken, yet no slot"),
                }
            }
        };
        assert!(
            cap::try_acquire_all(&caps, &NOWHERE).is_err(),
            "two streams in one slot"
        );
        permits.into_iter().for_each(CapPermit::release);
    });
}

/// (e) A drain beginning against a stream starting: the stream is refused
/// (and counted as refused) or admitted and counted among the streams open
/// at the drain's start; never both, never neither.
#[test]
fn loom_drain_begins_vs_stream_starts() {
    loom::model(|| {
        let drain = crate::Drain::new();
        let layer = StreamGuardLayer::builder().drain(&drain).build().unwrap();
        let mut events = layer.subscribe();
        let draining = Arc::clone(drain.shared());

        let drainer =
            thread::spawn(move || draining.begin(std::time::Duration::from_secs(1)).is_some());
        let request = http::Request::new(());
        let after = After::new(&request, None, None, None);
        let started = Ticket::start(layer.shared(), layer.policy(), false, after, 0);
        let refused = started.is_err();
        let ticket = started.unwrap_or_else(|refused| refused);
        assert!(drainer.join().unwrap(), "the drain began once");

        let (open_at_start, refused_count) = drain.shared().counted();
        assert_eq!(refused_count, u64::from(refused), "refusals counted");
        assert_eq!(
            open_at_start,
            u64::from(!refused),
            "the stream was {} and the drain counted {open_at_start} open",
            if refused { "refused" } else { "admitted" }
        );
        drop(ticket);
        let ends = ended(&mut events);
        let expected = if refused {
            EndReason::Drained
        } else {
            EndReason::Cancelled
        };
        assert_eq!(ends, [expected]);
    });
}

/// A service future that never answers.
struct NeverAnswers;

impl Future for NeverAnswers {
    type Output = Result<http::Response<Script>, Infallible>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Pending
    }
}

/// (c'') The response future waiting on a service that has not answered,
/// registering its waker, against the sweeper's end and wake-up: the future
/// is woken or sees the end when it re-checks, and resolves with the
/// guard's own answer (`grpc-status: 4`) and an empty body.
#[test]
fn loom_pending_response_future_vs_limit() {
    loom::model(|| {
        let layer = StreamGuardLayer::builder().build().unwrap();
        let mut events = layer.subscribe();
        let ticket = start(&layer, true);
        let sweeper = Arc::clone(ticket.record());
        let mut future = pin!(ResponseFuture::calling(
            NeverAnswers,
            Gate::Open,
            ticket,
            ForResponse::default(),
        ));

        let sweeper = thread::spawn(move || assert!(sweeper.end(Ending::Lifetime)));
        let response = loom::future::block_on(poll_fn(|cx| future.as_mut().poll(cx)))
            .unwrap_or_else(|never| match never {});
        assert_eq!(grpc::status_of(response.headers()), Some(4));
        assert!(response.into_body().is_end_stream());
        sweeper.join().unwrap();

        assert_eq!(ended(&mut events), [EndReason::LifetimeExceeded]);
    });
}

/// (g) A stream starting (filed in its shard of the timer, without the
/// timer's control lock while the task runs) against the timer task
/// stopping because it found nothing filed: the task saw the stream and
/// goes on, or the stream saw the task stopped and starts one; never
/// neither (a filed stream no task sweeps), never both.
#[test]
fn loom_stream_filed_vs_timer_stops() {
    loom::model(|| {
        let layer = StreamGuardLayer::builder()
            .idle_timeout(std::time::Duration::from_secs(1))
            .build()
            .unwrap();
        let ticket = start(&layer, false);
        let record = Arc::clone(ticket.record());
        let shared = Arc::clone(layer.shared());
        shared.timer.mark_running();

        let starter = {
            let (shared, record) = (Arc::clone(&shared), Arc::clone(&record));
            thread::spawn(move || shared.timer.file_new(&record))
        };
        let stopped = shared.timer.try_stop();
        let starts_a_task = starter.join().unwrap();

        assert_eq!(
            stopped, starts_a_task,
            "the task stopped: {stopped}, the stream starts one: {starts_a_task}"
        );
        drop(ticket);
    });
}

/// (h) A handler waiting on `StreamHandle::cancelled()` against the
/// sweeper's end: the waiter is registered, its `Notified` made, under the
/// lock the end takes the waiters out under, so it is woken or sees the end
/// (a lost wake-up leaves `block_on` waiting for ever: loom reports the
/// deadlock), and it reads the end's reason. Two waiters, one before the
/// end can start and one racing it.
#[test]
fn loom_cancelled_waiter_vs_limit() {
    loom::model(|| {
        let layer = StreamGuardLayer::builder().build().unwrap();
        let ticket = start(&layer, false);
        let handle = StreamHandle {
            record: Arc::clone(ticket.record()),
            goaways_seen: 0,
        };
        let mut early = Box::pin(handle.cancelled());
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            early.as_mut().poll(&mut cx).is_pending(),
            "nothing ended it yet"
        );

        let sweeper = thread::spawn(move || {
            assert!(ticket.end(Ending::Lifetime));
            drop(ticket);
        });
        let reason = loom::future::block_on(handle.cancelled());
        assert_eq!(reason, EndReason::LifetimeExceeded);
        sweeper.join().unwrap();
        assert_eq!(loom::future::block_on(early), EndReason::LifetimeExceeded);
    });
}
