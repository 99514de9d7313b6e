//! The connection record's checks: ages, stalls, idleness, dead-peer options.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::connection::{ConnectionGuard, ConnectionHandle, GuardedIo, PeerOf};

/// An IO that is never read: the tests drive the connection's state.
struct NoIo;

impl PeerOf for NoIo {
    fn peer(&self) -> Option<SocketAddr> {
        None
    }
}

const GRACE: Duration = Duration::from_secs(1);

fn connection(guard: &ConnectionGuard) -> (GuardedIo<NoIo>, ConnectionHandle) {
    let io = guard.wrap(NoIo);
    let handle = io.handle().clone();
    (io, handle)
}

fn check(guard: &ConnectionGuard, handle: &ConnectionHandle, now: u64) {
    handle.state.check(&guard.connections.policy, now);
}

fn secs(s: u64) -> u64 {
    s * 1_000_000_000
}

fn policy(age: Option<Duration>, percent: u8) -> super::ConnPolicy {
    super::ConnPolicy {
        idle: None,
        stalled_grace: None,
        max_age: age,
        max_age_grace: Duration::ZERO,
        max_age_jitter_percent: percent,
        resolution: Duration::from_millis(100),
        dead_peer: None,
    }
}

/// The draw maps onto max_age × (1 ± jitter) end to end, evenly.
#[test]
fn a_connections_max_age_spans_the_jitter_both_ways() {
    let ten = policy(Some(Duration::from_secs(100)), 10);
    assert_eq!(ten.connection_max_age(0), secs(90));
    assert_eq!(ten.connection_max_age(u64::MAX), secs(110));
    assert_eq!(ten.connection_max_age(1 << 63), secs(100));
    assert_eq!(ten.connection_max_age(1 << 62), secs(95));
    let none = policy(Some(Duration::from_secs(100)), 0);
    for draw in [0, 1 << 63, u64::MAX] {
        assert_eq!(none.connection_max_age(draw), secs(100));
    }
    assert_eq!(policy(None, 10).connection_max_age(0), super::NEVER);
    // The longest age accepted, drawn at the top of the widest jitter.
    let longest = policy(Some(crate::error::MAX_DURATION), 99);
    assert_eq!(
        u128::from(longest.connection_max_age(u64::MAX)),
        crate::error::MAX_DURATION.as_nanos() * 199 / 100
    );
}

#[test]
fn a_jittered_max_age_is_at_least_the_resolution() {
    let wide = policy(Some(Duration::from_millis(100)), 99);
    assert_eq!(wide.connection_max_age(0), 100_000_000);
    assert_eq!(wide.connection_max_age(u64::MAX), 199_000_000);
}

/// A stall and an unstall racing: the unstall's "no time" lands first,
/// the stall's time after it, with no stalled stream left.
#[tokio::test(start_paused = true)]
pub(crate) async fn a_stall_time_without_a_stalled_stream_never_closes_the_connection() {
    let guard = ConnectionGuard::builder()
        .stalled_grace(GRACE)
        .build()
        .expect("valid configuration");
    let (_io, handle) = connection(&guard);
    let state = &handle.state;
    state.stalled.fetch_add(1, Ordering::AcqRel);
    handle.stream_unstalled();
    state.stalled_since.store(0, Ordering::Release);
    check(&guard, &handle, secs(10));
    assert!(
        !handle.is_closed(),
        "closed as stalled with nothing stalled"
    );
}

/// The other order: a stalled stream whose time was wiped by a racing
/// unstall of another one still gets its connection closed, one grace
/// after the timer noticed it.
#[tokio::test(start_paused = true)]
pub(crate) async fn a_stalled_stream_without_a_stall_time_still_closes_the_connection() {
    let guard = ConnectionGuard::builder()
        .stalled_grace(GRACE)
        .build()
        .expect("valid configuration");
    let (_io, handle) = connection(&guard);
    handle.stream_stalled();
    handle
        .state
        .stalled_since
        .store(super::NEVER, Ordering::Release);
    check(&guard, &handle, secs(10));
    assert!(!handle.is_closed(), "the grace starts when noticed");
    check(&guard, &handle, secs(11));
    assert!(handle.is_closed(), "a stalled reader's connection closes");
}

/// The last stream's end is seen with its time: a connection is never
/// closed as idle the moment its last stream ends.
#[tokio::test(start_paused = true)]
pub(crate) async fn the_last_stream_ending_restarts_the_idle_time() {
    let guard = ConnectionGuard::builder()
        .idle_timeout(GRACE)
        .build()
        .expect("valid configuration");
    let (_io, handle) = connection(&guard);
    handle.stream_started();
    tokio::time::advance(Duration::from_secs(10)).await;
    handle.stream_ended();
    let now = guard.connections.now_ns();
    check(&guard, &handle, now);
    assert!(
        !handle.is_closed(),
        "closed as idle as its last stream ended"
    );
    check(&guard, &handle, now + secs(1));
    assert_eq!(
        handle.state.goaway_reason(),
        Some(crate::ConnectionEnd::Idle),
        "idle for the idle timeout: GOAWAY first"
    );
    assert!(
        !handle.is_closed(),
        "closed in the tick that asked for GOAWAY"
    );
    check(&guard, &handle, now + secs(1) + 100_000_000);
    assert_eq!(handle.state.end(), Some(crate::ConnectionEnd::Idle));
}

/// A stream that raced the idle GOAWAY is served: no hard close while it
/// is open, and the idle time starts over when it ends (no second GOAWAY:
/// the first one stands).
#[tokio::test(start_paused = true)]
async fn a_stream_that_raced_the_idle_goaway_keeps_the_connection_until_idle_again() {
    let guard = ConnectionGuard::builder()
        .idle_timeout(GRACE)
        .build()
        .expect("valid configuration");
    let (_io, handle) = connection(&guard);
    let now = guard.connections.now_ns();
    check(&guard, &handle, now + secs(1));
    assert!(handle.state.goaway_reason().is_some());
    handle.stream_started();
    check(&guard, &handle, now + secs(5));
    assert!(!handle.is_closed(), "closed with a stream open");
    tokio::time::advance(Duration::from_secs(5)).await;
    handle.stream_ended();
    let ended = guard.connections.now_ns();
    check(&guard, &handle, ended + 500_000_000);
    assert!(!handle.is_closed(), "idle counted from the stream's end");
    check(&guard, &handle, ended + secs(1));
    assert_eq!(handle.state.end(), Some(crate::ConnectionEnd::Idle));
}

/// The dead-peer options go on the TCP socket a guard wraps, by
/// default and as set; `None` leaves the kernel's defaults.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn wrapped_tcp_sockets_get_the_dead_peer_options() -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    // `None` as the setting: the builder's default.
    for (setting, expected) in [
        (
            Some(Some(Duration::from_secs(4))),
            Some(Duration::from_secs(4)),
        ),
        (None, Some(Duration::from_secs(20))),
        (Some(None), None),
    ] {
        let builder = ConnectionGuard::builder();
        let builder = match setting {
            Some(timeout) => builder.dead_peer_timeout(timeout),
            None => builder,
        };
        let guard = builder.build().expect("valid");
        let _client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
        let (tcp, _) = listener.accept().await?;
        let io = guard.wrap(tcp);
        let socket = socket2::SockRef::from(io.get_ref());
        assert_eq!(socket.tcp_user_timeout()?, expected, "{setting:?}");
        assert_eq!(socket.keepalive()?, expected.is_some(), "{setting:?}");
    }
    Ok(())
}

/// A guard ended a stream while its peer was not reading: the stream's end
/// leaves no stream counted, but hyper holds it, so the connection is not
/// idle and the reader gets its whole grace.
#[tokio::test(start_paused = true)]
async fn a_stalled_readers_connection_is_closed_stalled_after_its_grace_not_idle() {
    let guard = ConnectionGuard::builder()
        .idle_timeout(Duration::from_millis(300))
        .stalled_grace(Duration::from_secs(2))
        .build()
        .expect("valid configuration");
    let (_io, handle) = connection(&guard);
    handle.stream_started();
    handle.stream_stalled();
    handle.stream_ended();
    check(&guard, &handle, secs(1));
    assert!(
        !handle.is_closed(),
        "closed as idle while a stream is stalled"
    );
    check(&guard, &handle, secs(2));
    assert_eq!(handle.state.end(), Some(crate::ConnectionEnd::Stalled));
}

/// Once hyper lets the stalled stream go (read or dropped), the
/// connection's quiet time starts then, not when the guard fired.
#[tokio::test(start_paused = true)]
async fn a_released_stall_starts_the_idle_time_again() {
    let guard = ConnectionGuard::builder()
        .idle_timeout(Duration::from_millis(300))
        .stalled_grace(Duration::from_secs(60))
        .build()
        .expect("valid configuration");
    let (_io, handle) = connection(&guard);
    handle.stream_started();
    handle.stream_stalled();
    handle.stream_ended();
    tokio::time::advance(Duration::from_secs(1)).await;
    handle.stream_unstalled();
    check(&guard, &handle, secs(1) + 200_000_000);
    assert!(!handle.is_closed(), "idle counted from the guard's end");
    check(&guard, &handle, secs(1) + 300_000_000);
    assert_eq!(
        handle.state.goaway_reason(),
        Some(crate::ConnectionEnd::Idle)
    );
    check(&guard, &handle, secs(1) + 400_000_000);
    assert_eq!(handle.state.end(), Some(crate::ConnectionEnd::Idle));
}

/// With a zero `max_age_grace`, the GOAWAY is asked for at the age and the
/// hard close comes one resolution later, never in the same tick (a close
/// fails every write: the GOAWAY would never be flushed).
#[tokio::test(start_paused = true)]
async fn the_hard_close_follows_the_goaway_by_a_resolution() {
    let guard = ConnectionGuard::builder()
        .max_age(Duration::from_secs(1))
        .max_age_jitter_percent(0)
        .build()
        .expect("valid configuration");
    let (_io, handle) = connection(&guard);
    check(&guard, &handle, secs(1));
    assert!(handle.state.goaway_reason().is_some());
    assert!(
        !handle.is_closed(),
        "closed in the tick that asked for GOAWAY"
    );
    check(&guard, &handle, secs(1) + 100_000_000);
    assert_eq!(handle.state.end(), Some(crate::ConnectionEnd::MaxAge));
}

/// A late tick that finds the age and its grace both passed asks for the
/// GOAWAY and leaves the hard close to a later tick.
#[tokio::test(start_paused = true)]
async fn a_late_tick_asks_for_goaway_before_it_closes() {
    let guard = ConnectionGuard::builder()
        .max_age(Duration::from_secs(1))
        .max_age_grace(Duration::from_secs(1))
        .max_age_jitter_percent(0)
        .build()
        .expect("valid configuration");
    let (_io, handle) = connection(&guard);
    check(&guard, &handle, secs(5));
    assert!(handle.state.goaway_reason().is_some());
    assert!(
        !handle.is_closed(),
        "closed in the tick that asked for GOAWAY"
    );
    check(&guard, &handle, secs(5) + 100_000_000);
    assert_eq!(handle.state.end(), Some(crate::ConnectionEnd::MaxAge));
}
