//! Unit tests of the stream caps.

use std::{net::SocketAddr, time::Duration};

use super::*;
use crate::draw::{Draw, for_seeds};

fn origin(port: u16, ip: [u8; 4]) -> Origin {
    let remote = SocketAddr::from((ip, port));
    Origin {
        connection: Some(ConnectionKey::from_remote(remote)),
        peer: Some(remote.ip()),
    }
}

fn caps(limits: CapLimits) -> Arc<CapSet> {
    Arc::new(CapSet::new(limits, false))
}

#[test]
fn per_connection_cap_refuses_the_extra_stream_and_frees_on_release() {
    let set = caps(CapLimits {
        per_connection: Some(2),
        ..CapLimits::default()
    });
    let a = origin(1, [10, 0, 0, 1]);
    let first = set.try_acquire(&a).unwrap();
    let _second = set.try_acquire(&a).unwrap();
    assert_eq!(set.try_acquire(&a).err(), Some(StreamCap::PerConnection));
    // Another connection of the same peer is not affected.
    assert!(set.try_acquire(&origin(2, [10, 0, 0, 1])).is_ok());
    first.release();
    assert!(set.try_acquire(&a).is_ok());
}

#[test]
fn a_refused_stream_leaves_no_slot_taken() {
    let set = caps(CapLimits {
        per_connection: Some(5),
        per_peer: Some(1),
        total: Some(10),
    });
    let held = set.try_acquire(&origin(1, [10, 0, 0, 1])).unwrap();
    assert_eq!(
        set.try_acquire(&origin(2, [10, 0, 0, 1])).err(),
        Some(StreamCap::PerPeer)
    );
    assert_eq!(set.total.load(Ordering::SeqCst), 1);
    assert_eq!(set.entries(), 2, "one connection, one peer");
    held.release();
    assert_eq!(set.total.load(Ordering::SeqCst), 0);
    assert_eq!(set.entries(), 0);
}

#[test]
fn total_cap_counts_every_connection() {
    let set = caps(CapLimits {
        total: Some(2),
        ..CapLimits::default()
    });
    let _a = set.try_acquire(&origin(1, [10, 0, 0, 1])).unwrap();
    let _b = set.try_acquire(&origin(2, [10, 0, 0, 2])).unwrap();
    assert_eq!(
        set.try_acquire(&origin(3, [10, 0, 0, 3])).err(),
        Some(StreamCap::Total)
    );
}

#[test]
fn an_unknown_peer_is_refused_by_the_peer_cap_not_pooled() {
    let set = caps(CapLimits {
        per_peer: Some(1),
        ..CapLimits::default()
    });
    let unknown = Origin {
        connection: Some(ConnectionKey::from_id(1)),
        peer: None,
    };
    assert_eq!(set.try_acquire(&unknown).err(), Some(StreamCap::PerPeer));
    assert_eq!(set.total.load(Ordering::SeqCst), 0);
    assert_eq!(set.entries(), 0);
}

#[test]
fn an_unknown_connection_is_refused_by_the_connection_cap_not_pooled() {
    let set = caps(CapLimits {
        per_connection: Some(5),
        ..CapLimits::default()
    });
    let unknown = Origin {
        connection: None,
        peer: Some([10, 0, 0, 1].into()),
    };
    assert_eq!(
        set.try_acquire(&unknown).err(),
        Some(StreamCap::PerConnection)
    );
    assert_eq!(set.total.load(Ordering::SeqCst), 0);
    assert_eq!(set.entries(), 0);
}

#[test]
fn an_unknown_connection_is_not_counted_without_a_connection_cap() {
    let set = Arc::new(CapSet::new(CapLimits::default(), true));
    let unknown = Origin {
        connection: None,
        peer: None,
    };
    let permit = set.try_acquire(&unknown).expect("no cap to refuse it");
    assert_eq!(set.entries(), 0);
    permit.release();
    assert_eq!(set.total.load(Ordering::SeqCst), 0);
}

#[test]
fn a_refusal_by_the_second_set_gives_back_the_first() {
    let layer = Arc::new(CapSet::new(CapLimits::default(), true));
    let route = caps(CapLimits {
        per_connection: Some(1),
        ..CapLimits::default()
    });
    let sets = [Arc::clone(&layer), Arc::clone(&route)];
    let a = origin(1, [10, 0, 0, 1]);
    let held = try_acquire_all(&sets, &a).unwrap();
    let refusal = try_acquire_all(&sets, &a).err().unwrap();
    assert_eq!((refusal.cap, refusal.limit), (StreamCap::PerConnection, 1));
    assert_eq!(layer.connection_streams(), vec![(a.connection.unwrap(), 1)]);
    held.into_iter().for_each(CapPermit::release);
    assert_eq!(layer.entries() + route.entries(), 0);
}

#[test]
fn many_short_connections_leave_no_entries() {
    let set = Arc::new(CapSet::new(CapLimits::default(), true));
    for port in 0..10_000u16 {
        let permit = set.try_acquire(&origin(port, [10, 0, 0, 1])).unwrap();
        permit.release();
    }
    assert_eq!(set.entries(), 0);
}

/// A peer flooding past its own per-connection cap must not make
/// transient total increments that refuse another peer's stream near
/// the total limit.
#[test]
fn refused_keyed_attempts_never_occupy_a_total_slot() {
    let set = caps(CapLimits {
        per_connection: Some(1),
        total: Some(4),
        ..CapLimits::default()
    });
    let a = origin(1, [10, 0, 0, 1]);
    // A's connection is full; with two more streams, total holds N-1.
    let _a_held = set.try_acquire(&a).unwrap();
    let _others = [
        set.try_acquire(&origin(2, [10, 0, 0, 2])).unwrap(),
        set.try_acquire(&origin(3, [10, 0, 0, 3])).unwrap(),
    ];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (set, stop) = (Arc::clone(&set), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut refused = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Checked keyed caps first, A's own cap is what refuses it.
                assert!(set.try_acquire(&a).is_err());
                refused += 1;
            }
            refused
        })
    };
    let b = origin(9, [10, 0, 0, 9]);
    let mut total_refusals = 0;
    for _ in 0..200_000 {
        match set.try_acquire(&b) {
            Ok(permit) => permit.release(),
            Err(cap) => {
                assert_eq!(cap, StreamCap::Total);
                total_refusals += 1;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let refused = flood.join().unwrap();
    assert!(refused > 0);
    assert_eq!(total_refusals, 0, "B refused for the total cap");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_stream_gets_the_slot_given_back() {
    let set = caps(CapLimits {
        total: Some(1),
        ..CapLimits::default()
    });
    let held = set.try_acquire(&origin(1, [10, 0, 0, 1])).unwrap();
    let waiter = tokio::spawn(Admission::within(
        vec![Arc::clone(&set)],
        origin(2, [10, 0, 0, 1]),
        Duration::from_secs(5),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiter.is_finished());
    held.release();
    let permits = waiter.await.unwrap().expect("slot handed over");
    permits.into_iter().for_each(CapPermit::release);
    assert_eq!(set.total.load(Ordering::SeqCst), 0);
}

/// Lets every runnable task run (paused time: never advances the clock).
async fn settle() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

/// Spawns a waiter whose polls are counted in `polls`.
fn counted_waiter(
    set: &Arc<CapSet>,
    origin: Origin,
    patience: Duration,
    polls: &Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Result<Vec<CapPermit>, Refusal>> {
    let polls = Arc::clone(polls);
    let mut waiting = Box::pin(Admission::within(vec![Arc::clone(set)], origin, patience));
    tokio::spawn(std::future::poll_fn(move |cx| {
        polls.fetch_add(1, Ordering::SeqCst);
        waiting.as_mut().poll(cx)
    }))
}

/// A release frees one slot of one connection, one of one peer and one
/// of the total: only a waiter that can now proceed is woken, not every
/// waiter of the set.
#[tokio::test(start_paused = true)]
async fn a_release_wakes_only_the_waiter_that_can_proceed() {
    const CONNECTIONS: u16 = 100;
    let set = caps(CapLimits {
        per_connection: Some(1),
        ..CapLimits::default()
    });
    let patience = Duration::from_secs(60);
    let held: Vec<CapPermit> = (0..CONNECTIONS)
        .map(|port| set.try_acquire(&origin(port, [10, 0, 0, 1])).unwrap())
        .collect();
    let polls = Arc::new(AtomicUsize::new(0));
    let waiters: Vec<_> = (0..CONNECTIONS)
        .map(|port| counted_waiter(&set, origin(port, [10, 0, 0, 1]), patience, &polls))
        .collect();
    settle().await;
    let mut wakeups = Vec::new();
    for (port, permit) in held.into_iter().enumerate() {
        let before = polls.load(Ordering::SeqCst);
        permit.release();
        settle().await;
        wakeups.push(polls.load(Ordering::SeqCst) - before);
        assert!(waiters[port].is_finished(), "waiter {port} admitted");
    }
    // Figures for the report: polls per release.
    eprintln!("polls per release: {wakeups:?}");
    assert!(
        wakeups.iter().all(|&n| n == 1),
        "each release polls its one waiter: {wakeups:?}"
    );
    for waiter in waiters {
        let permits = waiter.await.unwrap().expect("admitted");
        permits.into_iter().for_each(CapPermit::release);
    }
    assert_eq!(set.total.load(Ordering::SeqCst), 0);
    assert_eq!(set.entries(), 0);
}

/// With the total cap full, a release hands its slot to one waiter, not
/// to all of them.
#[tokio::test(start_paused = true)]
async fn a_total_release_wakes_one_waiter() {
    const WAITERS: u16 = 50;
    let set = caps(CapLimits {
        total: Some(1),
        ..CapLimits::default()
    });
    let mut held = set.try_acquire(&origin(0, [10, 0, 0, 1])).unwrap();
    let polls = Arc::new(AtomicUsize::new(0));
    let mut waiters: Vec<_> = (1..=WAITERS)
        .map(|port| {
            counted_waiter(
                &set,
                origin(port, [10, 0, 0, 1]),
                Duration::from_secs(60),
                &polls,
            )
        })
        .collect();
    settle().await;
    let mut wakeups = Vec::new();
    while !waiters.is_empty() {
        let before = polls.load(Ordering::SeqCst);
        held.release();
        settle().await;
        wakeups.push(polls.load(Ordering::SeqCst) - before);
        let done = waiters
            .iter()
            .position(|w| w.is_finished())
            .expect("one admitted");
        let mut permits = waiters.remove(done).await.unwrap().expect("admitted");
        assert_eq!(permits.len(), 1);
        held = permits.remove(0);
    }
    held.release();
    eprintln!("polls per release: {wakeups:?}");
    assert!(wakeups.iter().all(|&n| n == 1), "{wakeups:?}");
}

#[derive(Clone, Debug)]
enum Step {
    /// A stream arrives on connection `conn` of peer `peer` and waits up
    /// to `patience` seconds.
    Arrive { conn: u16, peer: u8, patience: u64 },
    /// The `n`th held stream (modulo) ends.
    Release(usize),
    /// Time passes.
    Advance(u64),
}

fn step(draw: &mut Draw) -> Step {
    match draw.within(0, 3) {
        0 => Step::Arrive {
            conn: draw.within(0, 4) as u16,
            peer: draw.within(0, 3) as u8,
            patience: draw.within(1, 4),
        },
        1 => Step::Release(draw.within(0, 8) as usize),
        _ => Step::Advance(draw.within(1, 1500)),
    }
}

fn origin_of(conn: u16, peer: u8) -> Origin {
    // Connection numbers are per peer: (peer, conn) names one.
    origin(u16::from(peer) * 100 + conn, [10, 0, 0, peer])
}

/// Waiters queued by what refused them are all admitted or refused
/// exactly once, never left asleep while they could proceed, and slots are
/// conserved: 128 random cases of limits and arrivals, releases and time.
#[test]
fn waiters_are_admitted_or_refused_once_and_slots_are_conserved() {
    for_seeds(128, |seed| {
        let mut draw = Draw(seed);
        let limits = (
            draw.within(1, 3) as usize,
            draw.within(1, 4) as usize,
            draw.within(1, 5) as usize,
        );
        let steps: Vec<Step> = (0..draw.within(1, 60)).map(|_| step(&mut draw)).collect();
        waiters_case(limits, steps);
    });
}

fn waiters_case(limits: (usize, usize, usize), steps: Vec<Step>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let set = caps(CapLimits {
            per_connection: Some(limits.0),
            per_peer: Some(limits.1),
            total: Some(limits.2),
        });
        let mut held: Vec<CapPermit> = Vec::new();
        let mut pending = Vec::new();
        let (mut admitted, mut refused) = (0usize, 0usize);
        for step in steps {
            match step {
                Step::Arrive {
                    conn,
                    peer,
                    patience,
                } => {
                    let origin = origin_of(conn, peer);
                    pending.push((
                        origin,
                        tokio::spawn(Admission::within(
                            vec![Arc::clone(&set)],
                            origin,
                            Duration::from_secs(patience),
                        )),
                    ));
                }
                Step::Release(n) if !held.is_empty() => {
                    let n = n % held.len();
                    held.swap_remove(n).release();
                }
                Step::Release(_) => {}
                Step::Advance(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
            }
            settle().await;
            let mut still = Vec::new();
            for (origin, task) in pending {
                if task.is_finished() {
                    match task.await.unwrap() {
                        Ok(permits) => {
                            admitted += 1;
                            held.extend(permits);
                        }
                        Err(_) => refused += 1,
                    }
                } else {
                    still.push((origin, task));
                }
            }
            pending = still;
            // Conserved: the counts are exactly the slots held.
            assert_eq!(set.total.load(Ordering::SeqCst), held.len());
            assert!(held.len() <= limits.2);
            // No lost wake-up: no waiter sleeps while it could proceed.
            for (origin, _) in &pending {
                if let Ok(permit) = set.try_acquire(origin) {
                    permit.release();
                    panic!(
                        "a waiter on {:?} sleeps with a slot free",
                        origin.connection
                    );
                }
            }
        }
        let arrived = admitted + refused + pending.len();
        // Everything ends: every waiter resolves exactly once.
        held.drain(..).for_each(CapPermit::release);
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
        for (_, task) in pending {
            match task.await.unwrap() {
                Ok(permits) => {
                    admitted += 1;
                    permits.into_iter().for_each(CapPermit::release);
                }
                Err(_) => refused += 1,
            }
        }
        assert_eq!(admitted + refused, arrived);
        assert_eq!(set.total.load(Ordering::SeqCst), 0);
        assert_eq!(set.entries(), 0, "no counts or queues left");
        assert_eq!(set.waiters.load(Ordering::SeqCst), 0);
    });
}

#[tokio::test(start_paused = true)]
async fn waiting_gives_up_at_its_deadline() {
    let set = caps(CapLimits {
        total: Some(1),
        ..CapLimits::default()
    });
    let _held = set.try_acquire(&origin(1, [10, 0, 0, 1])).unwrap();
    let started = tokio::time::Instant::now();
    let result = Admission::within(
        vec![Arc::clone(&set)],
        origin(2, [10, 0, 0, 1]),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        result.err().map(|r| (r.cap, r.limit)),
        Some((StreamCap::Total, 1))
    );
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(set.waiters.load(Ordering::SeqCst), 0);
}

/// Capped by two sets (a layer's and a route's): the waiter is handed the
/// first set's slot by the release and takes the second's when it runs; a
/// newcomer that arrives in between finds both taken or promised.
#[tokio::test(start_paused = true)]
async fn a_waiter_in_two_sets_is_handed_one_and_takes_the_other() {
    let one = || {
        caps(CapLimits {
            total: Some(1),
            ..CapLimits::default()
        })
    };
    let sets = vec![one(), one()];
    let held = try_acquire_all(&sets, &origin(1, [10, 0, 0, 1])).unwrap();
    let waiter = tokio::spawn(Admission::within(
        sets.clone(),
        origin(2, [10, 0, 0, 2]),
        Duration::from_secs(60),
    ));
    settle().await;
    assert!(!waiter.is_finished());
    held.into_iter().for_each(CapPermit::release);
    // Before the waiter runs: the first set's slot is promised to it.
    let newcomer = try_acquire_all(&sets, &origin(3, [10, 0, 0, 3]));
    assert_eq!(
        newcomer.err().map(|r| (r.set, r.cap)),
        Some((0, StreamCap::Total))
    );
    let permits = waiter.await.unwrap().expect("admitted");
    assert_eq!(permits.len(), 2);
    assert!(try_acquire_all(&sets, &origin(3, [10, 0, 0, 3])).is_err());
    permits.into_iter().for_each(CapPermit::release);
    for set in &sets {
        assert_eq!(set.total.load(Ordering::SeqCst), 0);
        assert_eq!(set.entries(), 0);
        assert_eq!(set.waiters.load(Ordering::SeqCst), 0);
    }
}
