//! The plan of a round: its connections, the fates of their streams, their
//! servers and transports.

use crate::{
    CAP, MAX_PER_CONNECTION, MAX_PER_PEER, SCARCE,
    fates::{Fate, Rng},
    server::Server,
    transport::Transport,
};

/// One planned connection: the fates of its streams, its server and its
/// transport.
pub(crate) struct Planned {
    pub(crate) fates: Vec<Fate>,
    pub(crate) server: Server,
    pub(crate) transport: Transport,
}

/// Plans a round's connections: first one to the doomed runtime's server
/// (its streams are the round's first, so the guard's timers start on that
/// runtime); then shared ones with a mix of fates (some with a capped
/// group; the first two hold the scarce route's slots, the last has the
/// streams its total refuses), and connections of their own for stalled
/// readers, half-open and vanishing peers and bodyless requests; then the
/// caps' floods: one connection that fills the layer's per-connection cap,
/// and two that fill the `held-peer` route's per-peer cap. About a third of
/// them go to the second runtime's server; about a quarter each over TLS and
/// over a Unix socket (never the per-peer flood: a Unix socket has no peer
/// address).
///
/// No connection but the per-connection flood has as many streams as the
/// layer's per-connection cap, and connections open their streams one after
/// another, holders first: the caps refuse exactly the `Over*` fates (and
/// the capped groups' `Rejected`), whatever the timing.
pub(crate) fn plan(rng: &mut Rng, scale: usize) -> Vec<Planned> {
    let mixed = [
        Fate::Completes,
        Fate::Cancels,
        Fate::Silent,
        Fate::OutlivesLifetime,
        Fate::Drained,
        Fate::Panics,
        Fate::BodyPanics,
        Fate::AnswerAfterEnd,
        Fate::LastFrameAfterEnd,
    ];
    let mut connections = Vec::new();
    for _ in 0..12 * scale {
        let n = 16 + rng.below(36) as usize;
        let mut fates: Vec<Fate> = (0..n)
            .map(|_| mixed[rng.below(mixed.len() as u64) as usize])
            .collect();
        if rng.below(3) == 0 {
            fates.extend([Fate::CapHolder; CAP]);
            fates.extend(std::iter::repeat_n(
                Fate::Rejected,
                1 + rng.below(3) as usize,
            ));
        }
        connections.push(fates);
    }
    connections[0].extend([Fate::ScarceHolder; SCARCE / 2]);
    connections[1].extend([Fate::ScarceHolder; SCARCE - SCARCE / 2]);
    let last = connections.len() - 1;
    connections[last].extend(std::iter::repeat_n(
        Fate::OverTotal,
        1 + rng.below(3) as usize,
    ));
    for _ in 0..3 * scale {
        connections.push(vec![Fate::StalledReader]);
        connections.push(vec![Fate::HalfOpen; 2 + rng.below(5) as usize]);
        connections.push(vec![Fate::Vanishes; 2 + rng.below(5) as usize]);
        connections.push(vec![Fate::Bodyless; 2 + rng.below(5) as usize]);
    }
    let mut flood = vec![Fate::Held; MAX_PER_CONNECTION];
    flood.extend(std::iter::repeat_n(
        Fate::OverConnection,
        1 + rng.below(3) as usize,
    ));
    connections.push(flood);
    for fates in &connections {
        let holding = fates.iter().filter(|f| !f.is_refused()).count();
        assert!(
            holding <= MAX_PER_CONNECTION,
            "a connection of {holding} streams would fill the per-connection cap"
        );
    }
    let doomed = Planned {
        fates: vec![Fate::RuntimeDies; 1 + rng.below(4) as usize],
        server: Server::Doomed,
        transport: Transport::Tcp,
    };
    let mut planned: Vec<Planned> = std::iter::once(doomed)
        .chain(connections.into_iter().map(|fates| Planned {
            fates,
            server: draw_server(rng),
            transport: match rng.below(4) {
                0 => Transport::Tls,
                1 => Transport::Uds,
                _ => Transport::Tcp,
            },
        }))
        .collect();
    // The per-peer flood: every TCP and TLS connection comes from
    // 127.0.0.1, but only these two send `held-peer` streams.
    let mut second = vec![Fate::HeldByPeer; MAX_PER_PEER - MAX_PER_PEER / 2];
    second.extend(std::iter::repeat_n(
        Fate::OverPeer,
        1 + rng.below(3) as usize,
    ));
    for fates in [vec![Fate::HeldByPeer; MAX_PER_PEER / 2], second] {
        planned.push(Planned {
            fates,
            server: draw_server(rng),
            transport: if rng.below(3) == 0 {
                Transport::Tls
            } else {
                Transport::Tcp
            },
        });
    }
    planned
}

/// The second runtime's server for about a third of the connections.
fn draw_server(rng: &mut Rng) -> Server {
    if rng.below(3) == 0 {
        Server::Second
    } else {
        Server::First
    }
}
