//! Starting a scenario's processes and reading what they report: the steps
//! every scenario shares.

use std::time::{Duration, Instant};

use super::{
    lab::{Line, Netns, Proc},
    roles::{AXUM_SERVER, GRPC_CLIENT, H2_CLIENT, TONIC_SERVER},
};

/// The dead-peer timeout the scenarios give the guards.
pub const DEAD_PEER: Duration = Duration::from_secs(2);

/// The bound: a dead peer is found within the timeout plus a second.
pub const BOUND: Duration = Duration::from_secs(3);

/// How long a process may take to start, connect and get data flowing
/// (a cold start under a loaded 2-core machine included).
pub const STARTUP: Duration = Duration::from_secs(15);

/// Which server a scenario runs.
#[derive(Clone, Copy, Debug)]
pub enum ServerKind {
    Tonic,
    Axum,
}

/// Starts a server with `config` and returns it with its port.
pub fn server(ns: &Netns, kind: ServerKind, config: &str) -> (Proc, u16) {
    let (role, var) = match kind {
        ServerKind::Tonic => TONIC_SERVER,
        ServerKind::Axum => AXUM_SERVER,
    };
    let mut server = ns.spawn(role, var, config);
    let port = server
        .expect(STARTUP, "listening port", |line| line.kind == "listening")
        .num("port");
    (server, port as u16)
}

/// Starts the client that goes with `kind`, and returns it with the local
/// ports of its `conns` connections (in connection order).
pub fn client(
    ns: &Netns,
    kind: ServerKind,
    port: u16,
    conns: u64,
    config: &str,
) -> (Proc, Vec<u16>) {
    let config = format!("port={port} conns={conns} {config}");
    let mut client = match kind {
        ServerKind::Tonic => ns.spawn(GRPC_CLIENT.0, GRPC_CLIENT.1, &config),
        ServerKind::Axum => ns.spawn(H2_CLIENT.0, H2_CLIENT.1, &config),
    };
    let ports = (0..conns)
        .map(|conn| {
            let line = client.expect(STARTUP, "connection", |line| {
                line.kind == "connected" && line.num("conn") == conn
            });
            line.num("port") as u16
        })
        .collect();
    (client, ports)
}

/// The counts of a `progress` line (bytes per stream).
pub fn counts(line: &Line) -> Vec<u64> {
    line.json
        .get("counts")
        .and_then(|counts| counts.as_array())
        .map(|counts| counts.iter().filter_map(|c| c.as_u64()).collect())
        .unwrap_or_default()
}

/// Waits until each of the client's `streams` streams has moved at least
/// `bytes`: data flows, so a blackhole leaves data unacknowledged at once.
pub fn flowing(client: &mut Proc, streams: usize, bytes: u64) -> Line {
    client.expect(STARTUP, "data flowing on every stream", |line| {
        let counts = counts(line);
        line.kind == "progress" && counts.len() == streams && counts.iter().all(|&c| c >= bytes)
    })
}

/// A server's end event for a stream of the connection from `client_port`.
pub fn is_end_from(line: &Line, client_port: u16) -> bool {
    line.kind == "end" && line.peer_port() == client_port
}

/// A server's close event for the connection from `client_port`.
pub fn is_close_from(line: &Line, client_port: u16) -> bool {
    line.kind == "conn"
        && line.str("event") == "connection_closed"
        && line.peer_port() == client_port
}

/// Milliseconds from `start` to when `line` arrived.
pub fn ms_after(line: &Line, start: Instant) -> u128 {
    line.at.saturating_duration_since(start).as_millis()
}

/// The last progress count of stream `index` that arrived by `at`.
pub fn count_at(client: &mut Proc, index: usize, at: Instant) -> u64 {
    client
        .seen()
        .iter()
        .filter(|line| line.kind == "progress" && line.at <= at)
        .filter_map(|line| counts(line).get(index).copied())
        .next_back()
        .unwrap_or(0)
}
