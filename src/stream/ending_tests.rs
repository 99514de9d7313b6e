//! Unit tests of `ending.rs`: the method and the origin a stream's end
//! reports.

use std::net::SocketAddr;

use http::{Method, Request};

use super::{After, CONNECT, HEAD, METHODS, Source};
use crate::peer::ConnectionKey;

fn after(method: Method, key: Option<ConnectionKey>, peer: Option<SocketAddr>) -> After {
    let request = Request::builder()
        .method(method)
        .uri("/a/b?c")
        .body(())
        .unwrap();
    After::new(&request, key, peer, None)
}

#[test]
fn every_method_comes_back_as_it_came() {
    let others = [Method::from_bytes(b"PROPFIND").unwrap()];
    for method in METHODS.iter().chain(&others) {
        let after = after(method.clone(), None, None);
        assert_eq!(after.method(), *method);
        assert_eq!(after.is_head(), *method == Method::HEAD);
    }
    assert_eq!(METHODS[usize::from(HEAD) - 1], Method::HEAD);
    assert_eq!(METHODS[usize::from(CONNECT) - 1], Method::CONNECT);
}

#[test]
fn where_a_stream_came_from_is_kept_as_it_came() {
    let bare = after(Method::POST, None, None);
    assert!(matches!(bare.source, Source::Unknown));
    assert_eq!(bare.path.as_ref().map(|p| p.as_str()), Some("/a/b?c"));
    let peer: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let key = ConnectionKey::from_id(7);
    let held = after(Method::GET, Some(key), Some(peer));
    assert!(matches!(held.source, Source::Held(_)));
    assert_eq!(
        (held.connection_key(), held.peer()),
        (Some(key), Some(peer))
    );
    assert!(held.connection().is_none());
    // tonic's TCP connect info without a connection guard.
    let local: SocketAddr = "10.0.0.2:50051".parse().unwrap();
    let tcp = ConnectionKey::from_addrs(local, peer);
    let keyed = after(Method::POST, Some(tcp), Some(peer));
    assert!(matches!(keyed.source, Source::Keyed(_)));
    assert_eq!(
        (keyed.connection_key(), keyed.peer()),
        (Some(tcp), Some(peer))
    );
    // Behind a proxy: the peer is not the key's remote address.
    let client: SocketAddr = "192.0.2.7:1234".parse().unwrap();
    let proxied = after(Method::POST, Some(tcp), Some(client));
    assert!(matches!(proxied.source, Source::Held(_)));
    assert_eq!(proxied.peer(), Some(client));
}
