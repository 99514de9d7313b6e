//! A guarded Echo gRPC server that reports every stream's end as a JSON line.
//!
//! ```text
//! cargo run --example server -- [--addr 127.0.0.1:50051] [--idle-timeout 2s]
//!     [--max-lifetime 30s] [--request-idle-timeout 5s] [--response-idle-timeout 5s]
//!     [--max-streams-per-connection N] [--max-streams-per-peer N] [--max-streams N]
//!     [--cap-wait 100ms] [--drain-grace 5s] [--dead-peer-timeout 20s]
//! cargo run --example server -- --help
//! ```
//!
//! It serves the Echo service of `proto/echo.proto` (from `examples/common`)
//! behind a `StreamGuardLayer` configured from the command line, and writes
//! one JSON object per line on **stdout** for every stream that ends
//! ([`EndEvent::to_json`](tower_stream_guard::EndEvent::to_json)), flushed per
//! line, so it pipes straight into `jq` or a log shipper:
//!
//! ```text
//! cargo run --example server -- --idle-timeout 500ms | jq -c '{route, reason, duration_ms}'
//! ```
//!
//! Logs (the listening address, the guard's own `tracing` output, shutdown)
//! go to **stderr**; `RUST_LOG` filters them (default `info`; the guard logs
//! guard-made ends at `info`, every other end at `debug`).
//!
//! Durations are a whole number with a unit, `500ms`, `2s`, `1m` or `1h`, or
//! `off` for no limit. A bad argument, or a configuration the guard rejects
//! (say an idle timeout not below the maximum lifetime), is reported on stderr
//! with exit code 2.
//!
//! To poke it without writing a client, `curl` can speak gRPC well enough:
//! this asks `ServerStream` for 3 messages of 10 bytes, 100 ms apart, and
//! shows the response headers and trailers (`grpc-status`):
//!
//! ```text
//! printf '\0\0\0\0\6\10\3\20\144\30\12' | curl -s --http2-prior-knowledge \
//!     -H 'content-type: application/grpc' -H 'te: trailers' --data-binary @- \
//!     -o /dev/null -D - http://127.0.0.1:50051/echo.Echo/ServerStream
//! ```
//!
//! Streams over a cap are refused with `RESOURCE_EXHAUSTED`; their end events
//! say `"reason":"rejected"` with the cap.
//!
//! Ctrl-C or SIGTERM drains the server: it stops accepting connections (GOAWAY
//! on open ones), refuses new streams with `UNAVAILABLE`, lets open streams
//! finish for `--drain-grace`, then cuts the rest with `UNAVAILABLE` (their
//! end events say `"reason":"drained"`) and closes the connections left, even
//! those of clients that stopped reading. The drain's report is the last JSON
//! line (`"event":"drain"`). A second signal exits at once.

mod common;

use std::{io::IsTerminal as _, net::SocketAddr, process::ExitCode, time::Duration};

use tokio::{
    io::AsyncWriteExt as _,
    net::TcpListener,
    sync::{
        broadcast::error::{RecvError, TryRecvError},
        oneshot,
    },
};
use tonic::transport::{Server, server::TcpIncoming};
use tower_stream_guard::{ConnectionGuard, Drain, StreamGuardBuilder, StreamGuardLayer};
use tracing_subscriber::{
    filter::Targets, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

use common::{EchoService, echo::echo_server::EchoServer};

const USAGE: &str = "\
Usage: server [OPTIONS]

Serves the Echo gRPC service behind tower-stream-guard and prints one JSON
line per ended stream on stdout. Logs go to stderr (filter with RUST_LOG).

Options:
  --addr <ADDR>                     address to listen on [default: 127.0.0.1:50051]
  --idle-timeout <DURATION>         end a stream when nothing moved either way
                                    for this long [default: 2s]
  --request-idle-timeout <DURATION> end a stream when the client sent nothing
                                    for this long while its request is open
                                    [default: off]
  --response-idle-timeout <DURATION>
                                    end a stream when the server sent nothing
                                    for this long [default: off]
  --max-lifetime <DURATION>         end any stream this long after it started
                                    [default: 30s]
  --max-streams-per-connection <N>  refuse streams beyond N open on one
                                    connection [default: no cap]
  --max-streams-per-peer <N>        refuse streams beyond N open from one client
                                    IP address [default: no cap]
  --max-streams <N>                 refuse streams beyond N open in total
                                    [default: no cap]
  --cap-wait <DURATION>             let a stream over a cap wait this long for
                                    a slot before it is refused [default: off]
  --drain-grace <DURATION>          on Ctrl-C or SIGTERM, how long open streams
                                    may run before they are cut [default: 5s]
  --dead-peer-timeout <DURATION>    close a connection whose client vanished
                                    (sent data unacknowledged, or silent and
                                    not answering keepalive probes) after
                                    about this long; its streams end with
                                    reason `peer_unreachable`; between 1s and
                                    1h, or `off` [default: 20s]
  -h, --help                        print this help

DURATION is a whole number followed by ms, s, m or h (500ms, 2s, 1m, 1h), or
`off` for no limit. Exit codes: 0 after a clean shutdown (Ctrl-C, SIGTERM),
1 when the server cannot run, 2 for bad arguments or configuration.
";

/// The command line, parsed.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    addr: SocketAddr,
    idle_timeout: Option<Duration>,
    request_idle_timeout: Option<Duration>,
    response_idle_timeout: Option<Duration>,
    max_lifetime: Option<Duration>,
    max_streams_per_connection: Option<usize>,
    max_streams_per_peer: Option<usize>,
    max_streams: Option<usize>,
    cap_wait: Option<Duration>,
    drain_grace: Duration,
    dead_peer_timeout: Option<Duration>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            idle_timeout: Some(Duration::from_secs(2)),
            request_idle_timeout: None,
            response_idle_timeout: None,
            max_lifetime: Some(Duration::from_secs(30)),
            max_streams_per_connection: None,
            max_streams_per_peer: None,
            max_streams: None,
            cap_wait: None,
            drain_grace: Duration::from_secs(5),
            dead_peer_timeout: Some(Duration::from_secs(20)),
        }
    }
}

impl Args {
    fn guard(&self) -> StreamGuardBuilder {
        let mut builder = StreamGuardLayer::builder();
        if let Some(timeout) = self.idle_timeout {
            builder = builder.idle_timeout(timeout);
        }
        if let Some(timeout) = self.request_idle_timeout {
            builder = builder.request_idle_timeout(timeout);
        }
        if let Some(timeout) = self.response_idle_timeout {
            builder = builder.response_idle_timeout(timeout);
        }
        if let Some(lifetime) = self.max_lifetime {
            builder = builder.max_lifetime(lifetime);
        }
        if let Some(limit) = self.max_streams_per_connection {
            builder = builder.max_streams_per_connection(limit);
        }
        if let Some(limit) = self.max_streams_per_peer {
            builder = builder.max_streams_per_peer(limit);
        }
        if let Some(limit) = self.max_streams {
            builder = builder.max_streams(limit);
        }
        if let Some(patience) = self.cap_wait {
            builder = builder.cap_wait(patience);
        }
        builder
    }

    fn describe(&self) -> String {
        let show = |d: Option<Duration>| d.map_or_else(|| "off".to_string(), |d| format!("{d:?}"));
        let cap = |n: Option<usize>| n.map_or_else(|| "none".to_string(), |n| n.to_string());
        format!(
            "idle_timeout {}, request_idle_timeout {}, response_idle_timeout {}, max_lifetime {}, \
             max_streams_per_connection {}, max_streams_per_peer {}, max_streams {}, cap_wait {}, \
             drain_grace {:?}, dead_peer_timeout {}",
            show(self.idle_timeout),
            show(self.request_idle_timeout),
            show(self.response_idle_timeout),
            show(self.max_lifetime),
            cap(self.max_streams_per_connection),
            cap(self.max_streams_per_peer),
            cap(self.max_streams),
            show(self.cap_wait),
            self.drain_grace,
            show(self.dead_peer_timeout),
        )
    }
}

/// Parses the arguments after the program name: `Ok(None)` asks for help.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Args>, String> {
    let mut parsed = Args::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        // Both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_string(), Some(value.to_string()))
            }
            _ => (arg, None),
        };
        let known = [
            "--addr",
            "--idle-timeout",
            "--request-idle-timeout",
            "--response-idle-timeout",
            "--max-lifetime",
            "--max-streams-per-connection",
            "--max-streams-per-peer",
            "--max-streams",
            "--cap-wait",
            "--drain-grace",
            "--dead-peer-timeout",
        ];
        if !known.contains(&flag.as_str()) {
            return Err(format!("unknown argument `{flag}`"));
        }
        let value = match inline {
            Some(value) => value,
            None => args
                .next()
                .filter(|value| !value.starts_with("--"))
                .ok_or_else(|| format!("`{flag}` needs a value"))?,
        };
        match flag.as_str() {
            "--addr" => {
                parsed.addr = value.parse().map_err(|_| {
                    format!("invalid address `{value}` for --addr: expected IP:PORT, e.g. 127.0.0.1:50051")
                })?;
            }
            "--idle-timeout" => parsed.idle_timeout = parse_duration(&flag, &value)?,
            "--request-idle-timeout" => {
                parsed.request_idle_timeout = parse_duration(&flag, &value)?
            }
            "--response-idle-timeout" => {
                parsed.response_idle_timeout = parse_duration(&flag, &value)?
            }
            "--max-lifetime" => parsed.max_lifetime = parse_duration(&flag, &value)?,
            "--max-streams-per-connection" => {
                parsed.max_streams_per_connection = Some(parse_count(&flag, &value)?)
            }
            "--max-streams-per-peer" => {
                parsed.max_streams_per_peer = Some(parse_count(&flag, &value)?)
            }
            "--max-streams" => parsed.max_streams = Some(parse_count(&flag, &value)?),
            "--cap-wait" => parsed.cap_wait = parse_duration(&flag, &value)?,
            "--drain-grace" => {
                parsed.drain_grace = parse_duration(&flag, &value)?.unwrap_or(Duration::ZERO)
            }
            "--dead-peer-timeout" => parsed.dead_peer_timeout = parse_duration(&flag, &value)?,
            _ => unreachable!("checked against the known flags above"),
        }
    }
    Ok(Some(parsed))
}

/// A stream count of at least 1.
fn parse_count(flag: &str, value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err(format!(
            "{flag} must be at least 1 (leave it out for no cap)"
        )),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "invalid count `{value}` for {flag}: expected a whole number, e.g. 100"
        )),
    }
}

/// `500ms`, `2s`, `1m`, `1h`, or `off` (no limit).
fn parse_duration(flag: &str, value: &str) -> Result<Option<Duration>, String> {
    let invalid = |why: &str| {
        format!(
            "invalid duration `{value}` for {flag}: {why} (expected a whole number followed by ms, s, m or h, e.g. 500ms, 2s, 1m, 1h; or `off`)"
        )
    };
    if value == "off" {
        return Ok(None);
    }
    let digits = value.len() - value.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (number, unit) = value.split_at(digits);
    if number.is_empty() {
        return Err(invalid("no number"));
    }
    let number: u64 = number.parse().map_err(|_| invalid("number too large"))?;
    let seconds_per_unit = match unit {
        "ms" => return Ok(Some(Duration::from_millis(number))),
        "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "" => return Err(invalid("missing unit")),
        _ => return Err(invalid("unknown unit")),
    };
    let seconds = number
        .checked_mul(seconds_per_unit)
        .ok_or_else(|| invalid("number too large"))?;
    Ok(Some(Duration::from_secs(seconds)))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            // Not `print!`, which panics when stdout is a closed pipe.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), USAGE.as_bytes());
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("error: {message}\n\nRun with --help for usage.");
            return ExitCode::from(2);
        }
    };
    let drain = Drain::new();
    let built = args.guard().drain(&drain).build().and_then(|guard| {
        let connections = ConnectionGuard::builder()
            .drain(&drain)
            .dead_peer_timeout(args.dead_peer_timeout)
            .build()?;
        Ok((guard, connections))
    });
    let (guard, connections) = match built {
        Ok(built) => built,
        Err(err) => {
            eprintln!("error: the guard rejects this configuration: {err}");
            return ExitCode::from(2);
        }
    };

    // `RUST_LOG` as `target=level` pairs and a default level (`info`,
    // `tower_stream_guard=debug,info`); anything else falls back to `info`.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .finish()
        .with(filter)
        .init();

    let listener = match TcpListener::bind(args.addr).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!("cannot listen on {}: {err}", args.addr);
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(args.addr);
    tracing::info!("Echo server listening on {local} ({})", args.describe());
    tracing::info!("end events are written to stdout, one JSON object per line");

    // End events -> stdout, one flushed line each. At shutdown, `finish`
    // tells it to write what is queued and stop.
    let mut events = guard.subscribe();
    let (finish, mut finishing) = oneshot::channel::<()>();
    let printer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        let mut draining = false;
        loop {
            let received = if draining {
                match events.try_recv() {
                    Ok(event) => Ok(event),
                    Err(TryRecvError::Lagged(missed)) => Err(RecvError::Lagged(missed)),
                    Err(TryRecvError::Empty | TryRecvError::Closed) => return,
                }
            } else {
                tokio::select! {
                    biased;
                    received = events.recv() => received,
                    _ = &mut finishing => {
                        draining = true;
                        continue;
                    }
                }
            };
            let event = match received {
                Ok(event) => event,
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!("stdout is too slow: {missed} end events were dropped");
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            let mut line = event.to_json();
            line.push('\n');
            let written = async {
                stdout.write_all(line.as_bytes()).await?;
                stdout.flush().await
            };
            if let Err(err) = written.await {
                tracing::error!("cannot write end events to stdout: {err}");
                return;
            }
        }
    });

    // The server stops accepting (and sends GOAWAY) when the drain starts.
    // HTTP/2 PING beside the kernel's dead-peer bound, timed after it (see
    // `ConnectionGuardBuilder::dead_peer_timeout`): tonic drives these
    // connections, so the PING is tonic's.
    let keepalive = args.dead_peer_timeout;
    let server = Server::builder()
        .http2_keepalive_interval(keepalive.map(|timeout| timeout * 2))
        .http2_keepalive_timeout(keepalive)
        .layer(guard.clone())
        .add_service(EchoServer::new(EchoService::new()))
        .serve_with_incoming_shutdown(
            // TCP_NODELAY, as `Server::serve` would set it.
            connections.wrap_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
            drain.started(),
        );
    tokio::pin!(server);

    let grace = args.drain_grace;
    let mut report = None;
    let result = tokio::select! {
        result = &mut server => result,
        signal = shutdown_signal() => {
            tracing::info!(
                "{signal} received: draining; open streams may finish within {grace:?} ({} guarded streams active)",
                guard.active_streams()
            );
            report = Some(drain.start(grace));
            tokio::select! {
                // Returns within the grace period plus the drain's delay
                // before it closes the connections left.
                result = &mut server => result,
                signal = shutdown_signal() => {
                    tracing::warn!("second {signal}: exiting at once");
                    Ok(())
                }
            }
        }
    };

    // After a forced exit the connection tasks still hold open streams:
    // their ends come too late to be reported.
    let open = guard.active_streams();
    if open > 0 {
        tracing::warn!("the end events of {open} streams still open are not reported");
    }
    let _ = finish.send(());
    if tokio::time::timeout(Duration::from_secs(1), printer)
        .await
        .is_err()
    {
        tracing::warn!("could not write every end event to stdout in time");
    }
    if let Some(report) = report
        && let Ok(report) = tokio::time::timeout(Duration::from_secs(1), report).await
    {
        let mut line = report.to_json();
        line.push('\n');
        let _ = std::io::Write::write_all(&mut std::io::stdout(), line.as_bytes());
    }

    match result {
        Ok(()) => {
            tracing::info!("server stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!("server failed: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C, or SIGTERM on Unix, with the signal's name.
async fn shutdown_signal() -> &'static str {
    let ctrl_c = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "Ctrl-C",
            Err(err) => {
                tracing::warn!("cannot listen for Ctrl-C: {err}");
                std::future::pending().await
            }
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
                "SIGTERM"
            }
            Err(err) => {
                tracing::warn!("cannot listen for SIGTERM: {err}");
                std::future::pending().await
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<&'static str>();
    tokio::select! {
        signal = ctrl_c => signal,
        signal = terminate => signal,
    }
}
