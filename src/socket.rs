//! Dead-peer detection by the kernel: the TCP options a connection guard
//! (and a client's `GoawayNotice`
//! connector) sets on each TCP socket, and the IO errors that say the peer
//! is unreachable.
//!
//! A peer whose network vanished sends no FIN and no RST. From userspace
//! nothing shows: writes go on into the HTTP/2 window and the socket's send
//! buffer, and Linux retransmits for about 15 minutes (`tcp_retries2`)
//! before it gives up. Two socket options bound that, both read by the
//! kernel, nothing per frame:
//!
//! - `TCP_USER_TIMEOUT` = the bound `D`: data sent and not acknowledged for
//!   `D` aborts the connection (a peer that vanished while data flows to
//!   it). With keepalive on, Linux also uses it instead of the probe count:
//!   a silent connection is aborted at the first probe due once nothing has
//!   been heard from the peer for `D`.
//! - TCP keepalive, first probe after `D / 2` of silence, then a probe every
//!   second (a probe is a bare segment the peer's kernel answers; a live
//!   peer's answer resets the silence, so one probe per `D / 2` of silence
//!   is all a healthy quiet connection costs). A dead silent connection is
//!   thus aborted about `D` after it was last heard from; the count of
//!   probes (for kernels without `TCP_USER_TIMEOUT`) is chosen to give the
//!   same bound.
//!
//! See gRFC A18 (TCP user timeout) for why the two go together: the user
//! timeout alone never fires on a connection with nothing in flight, and
//! keepalive alone never fires while data is in flight (the kernel sends no
//! probe then).
//!
//! When the kernel aborts the socket, reads and writes fail with
//! `ETIMEDOUT` (or `EHOSTUNREACH`/`ENETUNREACH` when an ICMP error said so):
//! [`is_unreachable`] tells those apart from a peer that closed or reset.

use std::{io, time::Duration};

/// The default bound on how long a dead peer goes unnoticed: 20 s, gRPC
/// C-core's default `TCP_USER_TIMEOUT` for servers.
pub(crate) const DEFAULT_DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(20);

/// The shortest bound accepted: keepalive's clock ticks in whole seconds.
pub(crate) const MIN_DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest bound accepted: Linux takes keepalive idle times up to about
/// 9 hours, and a dead peer found an hour late is not found.
pub(crate) const MAX_DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Checks a dead-peer bound: 1 s..=1 h, or none.
pub(crate) fn check_dead_peer_timeout(
    timeout: Option<Duration>,
) -> Result<(), crate::error::ConfigError> {
    match timeout {
        Some(value) if !(MIN_DEAD_PEER_TIMEOUT..=MAX_DEAD_PEER_TIMEOUT).contains(&value) => {
            Err(crate::error::ConfigError::DeadPeerTimeoutOutOfRange { value })
        }
        _ => Ok(()),
    }
}

/// Keepalive probes after the first: one per second.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The keepalive settings that go with a bound of `timeout`: the silence
/// before the first probe, the interval between probes, and how many
/// unanswered probes abort the connection where the kernel counts them.
pub(crate) fn keepalive_of(timeout: Duration) -> (Duration, Duration, u32) {
    let idle = Duration::from_secs((timeout.as_secs() / 2).max(1));
    // Probes at idle + 1 s, idle + 2 s, ... until `timeout` has passed.
    let rest = timeout.saturating_sub(idle).as_secs_f64();
    let retries = (rest / PROBE_INTERVAL.as_secs_f64()).ceil().max(1.0) as u32;
    (idle, PROBE_INTERVAL, retries)
}

/// Sets the dead-peer options for a bound of `timeout` on a TCP socket.
///
/// Keepalive (with its first probe after `timeout / 2`) on every platform
/// socket2 supports; the probe interval on Linux, Android, Fuchsia, the BSDs
/// but OpenBSD, illumos, macOS, iOS and Windows; the probe count on Linux,
/// Android, Fuchsia, FreeBSD, NetBSD and macOS; `TCP_USER_TIMEOUT` on
/// Linux, Android and Fuchsia only. Elsewhere a peer that vanished while
/// data flows to it is found only by the platform's retransmission limit,
/// or by HTTP/2 PING keepalive.
pub(crate) fn set_dead_peer_timeout(
    tcp: &tokio::net::TcpStream,
    timeout: Duration,
) -> io::Result<()> {
    let socket = socket2::SockRef::from(tcp);
    let (idle, interval, retries) = keepalive_of(timeout);
    let keepalive = socket2::TcpKeepalive::new().with_time(idle);
    // Where socket2 0.6 offers the interval (a subset of its list).
    #[cfg(any(
        target_os = "android",
        target_os = "dragonfly",
        target_os = "freebsd",
        target_os = "fuchsia",
        target_os = "illumos",
        target_os = "ios",
        target_os = "linux",
        target_os = "macos",
        target_os = "netbsd",
        target_os = "windows",
    ))]
    let keepalive = keepalive.with_interval(interval);
    #[cfg(any(
        target_os = "android",
        target_os = "freebsd",
        target_os = "fuchsia",
        target_os = "linux",
        target_os = "macos",
        target_os = "netbsd",
    ))]
    let keepalive = keepalive.with_retries(retries);
    let _ = (interval, retries);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    socket.set_tcp_user_timeout(Some(timeout))?;
    Ok(())
}

/// Whether an IO error says the peer cannot be reached: the kernel gave up
/// on it (`ETIMEDOUT`: unacknowledged data or keepalive probes), or the
/// network said there is no route to it. A peer that closed, reset or
/// refused is not unreachable.
pub(crate) fn is_unreachable(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::TimedOut
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_probes_reach_the_bound() {
        for (timeout, idle, retries) in [(1, 1, 1), (2, 1, 1), (3, 1, 2), (20, 10, 10), (7, 3, 4)] {
            let (got_idle, interval, got_retries) = keepalive_of(Duration::from_secs(timeout));
            assert_eq!(got_idle, Duration::from_secs(idle), "{timeout} s");
            assert_eq!(interval, Duration::from_secs(1));
            assert_eq!(got_retries, retries, "{timeout} s");
            // The last probe is due no earlier than the bound, and no later
            // than a second after it.
            let last = idle + u64::from(retries);
            assert!(last >= timeout && last <= timeout + 1, "{timeout} s");
        }
    }

    #[test]
    fn only_unreachable_errors_count() {
        for kind in [
            io::ErrorKind::TimedOut,
            io::ErrorKind::HostUnreachable,
            io::ErrorKind::NetworkUnreachable,
        ] {
            assert!(is_unreachable(&io::Error::from(kind)), "{kind:?}");
        }
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
        ] {
            assert!(!is_unreachable(&io::Error::from(kind)), "{kind:?}");
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_kernel_gets_the_options() -> io::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let _client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
        let (tcp, _) = listener.accept().await?;
        set_dead_peer_timeout(&tcp, Duration::from_secs(6))?;
        let socket = socket2::SockRef::from(&tcp);
        assert!(socket.keepalive()?);
        assert_eq!(socket.tcp_keepalive_time()?, Duration::from_secs(3));
        assert_eq!(socket.tcp_keepalive_interval()?, Duration::from_secs(1));
        assert_eq!(socket.tcp_keepalive_retries()?, 3);
        assert_eq!(socket.tcp_user_timeout()?, Some(Duration::from_secs(6)));
        Ok(())
    }
}
