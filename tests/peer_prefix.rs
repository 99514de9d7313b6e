//! The per-peer cap against an IPv6 client that rotates its address within
//! its own prefix (a /64 is one subscriber's, and any host in it can pick
//! fresh addresses at will): keyed on the full address, every address gets
//! the full cap; with `peer_ipv6_prefix(64)` the prefix shares one.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use tower::{Layer, ServiceExt};
use tower_stream_guard::{
    ConfigError, EndReason, PeerAddr, StreamCap, StreamGuardBuilder, StreamGuardLayer,
    stream::{RequestBody, ResponseBody},
};

type Answer = Response<ResponseBody<Empty<Bytes>>>;

/// Opens a stream from `peer` whose handler never answers, or returns the
/// guard's refusal.
async fn open(guard: &StreamGuardLayer, peer: &str) -> Option<Answer> {
    let service = guard.layer(tower::service_fn(
        |_: Request<RequestBody<Empty<Bytes>>>| {
            std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>()
        },
    ));
    let mut request = Request::new(Empty::<Bytes>::new());
    let addr = SocketAddr::new(peer.parse::<IpAddr>().unwrap(), 443);
    request.extensions_mut().insert(PeerAddr(addr));
    let call = tokio::spawn(service.oneshot(request));
    tokio::task::yield_now().await;
    if call.is_finished() {
        return Some(call.await.unwrap().unwrap());
    }
    // Kept open until the test ends.
    std::mem::forget(call);
    None
}

fn guard(builder: StreamGuardBuilder) -> StreamGuardLayer {
    builder.max_streams_per_peer(1).build().unwrap()
}

/// The suspicion, confirmed: two addresses of one /64 are two peers.
#[tokio::test]
async fn by_default_each_ipv6_address_is_a_peer_of_its_own() {
    let guard = guard(StreamGuardLayer::builder());
    assert!(open(&guard, "2001:db8:1:2::1").await.is_none());
    assert!(open(&guard, "2001:db8:1:2::2").await.is_none());
    assert_eq!(guard.peer_streams().len(), 2);
}

#[tokio::test]
async fn with_a_prefix_ipv6_addresses_in_it_share_the_peer_cap() {
    let guard = guard(StreamGuardLayer::builder().peer_ipv6_prefix(64));
    let mut events = guard.subscribe();
    assert!(open(&guard, "2001:db8:1:2::1").await.is_none());
    let refused = open(&guard, "2001:db8:1:2:ffff::9")
        .await
        .expect("refused at once");
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    let event = events.recv().await.unwrap();
    assert_eq!(event.reason(), EndReason::Rejected(StreamCap::PerPeer));
    // The event names the address the stream came from, not the prefix.
    assert_eq!(
        event.peer().map(|peer| peer.ip()),
        Some("2001:db8:1:2:ffff::9".parse().unwrap())
    );
    // Another /64 is another peer; the counts are kept per prefix.
    assert!(open(&guard, "2001:db8:1:3::1").await.is_none());
    let mut counts = guard.peer_streams();
    counts.sort();
    assert_eq!(
        counts,
        [
            ("2001:db8:1:2::".parse().unwrap(), 1),
            ("2001:db8:1:3::".parse().unwrap(), 1)
        ]
    );
}

/// IPv4 peers keep their full address, also when a dual-stack listener
/// shows them as IPv4-mapped IPv6 addresses (all of which share one /64).
#[tokio::test]
async fn ipv4_peers_are_not_grouped_by_the_ipv6_prefix() {
    let guard = guard(StreamGuardLayer::builder().peer_ipv6_prefix(64));
    for peer in [
        "192.0.2.1",
        "192.0.2.2",
        "::ffff:192.0.2.3",
        "::ffff:192.0.2.4",
    ] {
        assert!(open(&guard, peer).await.is_none(), "{peer} was refused");
    }
    assert!(open(&guard, "::ffff:192.0.2.1").await.is_some());
}

#[test]
fn build_refuses_a_prefix_outside_1_to_128() {
    for bits in [0, 129] {
        let err = StreamGuardLayer::builder()
            .peer_ipv6_prefix(bits)
            .build()
            .unwrap_err();
        assert_eq!(err, ConfigError::PeerIpv6PrefixOutOfRange { bits });
        assert!(err.to_string().contains("peer_ipv6_prefix"), "{err}");
    }
    for bits in [1, 48, 64, 128] {
        assert!(
            StreamGuardLayer::builder()
                .peer_ipv6_prefix(bits)
                .build()
                .is_ok()
        );
    }
}
