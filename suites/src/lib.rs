//! tower-stream-guard's heavy suites: benches (criterion, tower-http as the
//! baseline), property suites (proptest), TLS suites (rustls, rcgen), the
//! metrics tests and Prometheus example, and the check that `proto/echo.rs`
//! matches `proto/echo.proto` (protoc-bin-vendored). They live in this
//! unpublished workspace member so that the crate's own dev-dependencies,
//! which `cargo run --example demo` builds, stay small.
//!
//! `cargo test --workspace --all-features` (the README's test command) runs
//! these suites with the crate's own; `cargo bench -p stream-guard-suites`
//! runs the benches.
