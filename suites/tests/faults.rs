//! Faults made by the kernel against real servers and clients (issue 26):
//! a blackholed client (iptables DROP both ways: no FIN, no RST), a RST from
//! the path, a killed client process, a rate-limited link (tc tbf).
//!
//! Each scenario makes a network namespace of its own (`sg-<pid>-<n>`, only
//! `lo`, loopback addresses only), runs the server and the clients in it as
//! processes of this very test binary (`roles.rs`: the scenario starts
//! `ip netns exec NS <this binary> --exact roles::NAME` with the role's
//! configuration in an environment variable), makes the fault with
//! `ip netns exec NS iptables|tc ...`, and reads what the processes report
//! (JSON lines on stdout, stamped as they arrive) with a bounded wait on
//! each. The namespace is deleted and the processes killed when the
//! scenario ends, however it ends.
//!
//! Needs root and `ip`, `iptables`, `tc`, `ss` (`.ci/run` installs
//! iptables and iproute2 when missing). Without them each scenario says
//! `SKIPPED` on stderr and passes, except under `CI=true`, where it fails.
//!
//! `FAULTS_DEAD_PEER=off` (or `default`, or milliseconds) replaces the
//! scenarios' 2 s dead-peer timeout, to see which assertions fail without it.
//!
//! The baselines (`baselines.rs`, ignored: a run takes two minutes) measure
//! the same blackhole with the setting at its default, off, and with tonic
//! alone:
//!
//! ```sh
//! cargo test -p stream-guard-suites --all-features --test faults -- --ignored --nocapture
//! ```

#[path = "../../examples/common/mod.rs"]
mod common;

#[path = "faults/baselines.rs"]
mod baselines;
#[path = "faults/lab.rs"]
mod lab;
#[path = "faults/roles.rs"]
mod roles;
#[path = "faults/scenarios.rs"]
mod scenarios;
#[path = "faults/setup.rs"]
mod setup;
