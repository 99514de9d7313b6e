//! The laboratory: a network namespace of the scenario's own, the processes
//! that run in it (this test binary again, one role each), and the faults
//! the kernel makes in it (iptables, tc). Everything here is undone on drop,
//! so a failing assertion leaves no namespace and no process behind.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The tools a scenario runs, with the argument that makes each print its
/// version (and so proves it is installed and runs).
const TOOLS: [(&str, &str); 4] = [
    ("ip", "-V"),
    ("iptables", "--version"),
    ("tc", "-V"),
    ("ss", "-V"),
];

/// How every line a role writes for the scenario starts: the test harness
/// writes its own lines on the same stdout (`running 1 test`, `test ... ok`),
/// sometimes without a line break before ours.
pub const MARK: &str = "FAULT> ";

/// Writes one report line: `FAULT> <kind> <json>`, flushed at once (a role
/// may be killed at any moment, and the scenario measures when lines arrive).
pub fn report(kind: &str, json: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{MARK}{kind} {json}");
    let _ = stdout.flush();
}

// === impl Netns ===

/// A network namespace with only `lo`, deleted on drop.
pub struct Netns {
    name: String,
}

/// Why a scenario cannot run here, when it may say so and pass.
fn missing_requirement() -> Option<String> {
    if !is_root() {
        return Some("not root".into());
    }
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, version)| {
            !Command::new(tool)
                .arg(version)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        })
        .map(|(tool, _)| *tool)
        .collect();
    (!missing.is_empty()).then(|| format!("missing {}", missing.join(", ")))
}

/// The effective user id is 0 (read from procfs: no `unsafe` `geteuid`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

/// In CI a scenario that cannot run fails: a green run must have run it.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

impl Netns {
    /// A fresh namespace for `scenario`, or `None` (after saying so loudly on
    /// stderr) when this machine cannot make one and this is not CI.
    pub fn for_scenario(scenario: &str) -> Option<Netns> {
        let refuse = |why: String| {
            if in_ci() {
                panic!("faults::{scenario} cannot run under CI=true: {why}");
            }
            eprintln!("SKIPPED faults::{scenario}: needs root, ip, iptables, tc and ss ({why})");
            None
        };
        if let Some(why) = missing_requirement() {
            return refuse(why);
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "sg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        if let Err(why) = run("ip", &["netns", "add", &name]) {
            return refuse(format!("cannot create a network namespace: {why}"));
        }
        let netns = Netns { name };
        if let Err(why) = run("ip", &["-n", &netns.name, "link", "set", "lo", "up"]) {
            return refuse(format!("cannot bring up lo in {}: {why}", netns.name));
        }
        Some(netns)
    }

    /// Runs `program args` inside the namespace; panics with its stderr when
    /// it fails (a fault that was not made would make the scenario lie).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        let output = Command::new("ip")
            .args(&full)
            .output()
            .expect("run ip netns exec");
        assert!(
            output.status.success(),
            "`ip {}` failed: {}",
            full.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Drops every packet to or from these ports, both ways (the rule sees
    /// each loopback packet once, on input): the connections look like a
    /// pulled cable, no FIN, no RST. One rule, so all of them go at once.
    pub fn blackhole(&self, ports: &[u16]) -> Instant {
        self.port_rule(ports, &["-j", "DROP"])
    }

    /// Answers every packet to or from these ports with a RST, as a
    /// middlebox that dropped the connection's state does. The RSTs
    /// themselves pass: the one REJECT makes also crosses INPUT on its way
    /// back over `lo`, and would otherwise be rejected (that is, dropped).
    pub fn reset(&self, ports: &[u16]) -> Instant {
        let not_rst = ["-m", "tcp", "!", "--tcp-flags", "RST", "RST"];
        self.port_rule(
            ports,
            &[
                &not_rst[..],
                &["-j", "REJECT", "--reject-with", "tcp-reset"],
            ]
            .concat(),
        )
    }

    fn port_rule(&self, ports: &[u16], rule: &[&str]) -> Instant {
        assert!(
            (1..=15).contains(&ports.len()),
            "multiport takes 1 to 15 ports"
        );
        let list = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec![
            "-I",
            "INPUT",
            "-p",
            "tcp",
            "-m",
            "multiport",
            "--ports",
            &list,
        ];
        args.extend_from_slice(rule);
        self.exec("iptables", &args);
        // The fault is in force once the command returned.
        Instant::now()
    }

    /// Limits `lo` to `rate` (tc's syntax, e.g. `160kbit`) both ways. `lo`'s
    /// 64 KiB MTU is lowered first: tbf never sends a packet larger than its
    /// burst.
    pub fn rate_limit(&self, rate: &str) {
        self.exec("ip", &["link", "set", "lo", "mtu", "1500"]);
        self.exec(
            "tc",
            &[
                "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "16kb",
                "latency", "400ms",
            ],
        );
    }

    /// Whether the server's end (`:server_port` to `:client_port`) of a
    /// connection is still ESTABLISHED.
    pub fn established(&self, server_port: u16, client_port: u16) -> bool {
        let filter = format!("( sport = :{server_port} and dport = :{client_port} )");
        let output = self.exec("ss", &["-tnH", "state", "established", &filter]);
        !String::from_utf8_lossy(&output.stdout).trim().is_empty()
    }

    /// Starts this test binary again inside the namespace, running only the
    /// role test `role` with `config` in its environment variable `var`.
    pub fn spawn(&self, role: &str, var: &str, config: &str) -> Proc {
        let exe = std::env::current_exe().expect("the test binary's path");
        let exe = exe.to_str().expect("a UTF-8 path");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                exe,
                "--exact",
                role,
                "--nocapture",
                "--test-threads=1",
            ])
            .env(var, config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a role");
        Proc::new(format!("{role} ({config})"), child)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside keep the namespace alive until they exit;
        // `Proc`s are dropped (killed) before this when declared after it.
        if let Err(why) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("could not delete network namespace {}: {why}", self.name);
        }
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    match Command::new(program).args(args).output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(String::from_utf8_lossy(&output.stderr).trim().to_string()),
        Err(err) => Err(err.to_string()),
    }
}

// === impl Proc ===

/// One report line of a role, stamped when this process read it.
#[derive(Clone, Debug)]
pub struct Line {
    pub at: Instant,
    pub kind: String,
    pub json: Value,
}

impl Line {
    pub fn str(&self, key: &str) -> &str {
        self.json
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    pub fn num(&self, key: &str) -> u64 {
        self.json
            .get(key)
            .and_then(Value::as_u64)
            .unwrap_or_default()
    }

    /// The port of the `peer` field (`127.0.0.1:PORT`), 0 without one.
    pub fn peer_port(&self) -> u16 {
        self.str("peer")
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .unwrap_or(0)
    }
}

/// A role's process, killed on drop. Its report lines arrive through a
/// channel; its stderr is passed on to this test's (captured) stderr.
pub struct Proc {
    name: String,
    child: Child,
    lines: mpsc::Receiver<Line>,
    seen: Vec<Line>,
}

impl Proc {
    fn new(name: String, mut child: Child) -> Proc {
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let at = Instant::now();
                let Some((_, report)) = line.split_once(MARK) else {
                    continue;
                };
                let (kind, json) = report.split_once(' ').unwrap_or((report, "null"));
                let json = serde_json::from_str(json).unwrap_or(Value::String(json.to_string()));
                if tx
                    .send(Line {
                        at,
                        kind: kind.to_string(),
                        json,
                    })
                    .is_err()
                {
                    return;
                }
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let label = name.split(' ').next().unwrap_or_default().to_string();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{label}] {line}");
            }
        });
        Proc {
            name,
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (already seen or still to come) that `matches` and
    /// arrived by `deadline`, waiting at most until then. Lines already
    /// waiting in the channel count even when the deadline has passed (the
    /// scenario may have been busy reading another process meanwhile): they
    /// were stamped when they arrived.
    pub fn wait_until(
        &mut self,
        deadline: Instant,
        matches: impl Fn(&Line) -> bool,
    ) -> Option<Line> {
        let in_time = |line: &Line| line.at <= deadline && matches(line);
        if let Some(line) = self.seen.iter().find(|line| in_time(line)) {
            return Some(line.clone());
        }
        loop {
            let line = match deadline.checked_duration_since(Instant::now()) {
                Some(left) => self.lines.recv_timeout(left).ok()?,
                None => self.lines.try_recv().ok()?,
            };
            self.seen.push(line.clone());
            if in_time(&line) {
                return Some(line);
            }
        }
    }

    /// As [`wait_until`](Self::wait_until), panicking with what the role
    /// said when nothing matched within `patience`.
    pub fn expect(
        &mut self,
        patience: Duration,
        what: &str,
        matches: impl Fn(&Line) -> bool,
    ) -> Line {
        match self.wait_until(Instant::now() + patience, matches) {
            Some(line) => line,
            None => {
                let said = self.said();
                panic!(
                    "{}: no {what} within {patience:?}; it said:\n{said}",
                    self.name
                )
            }
        }
    }

    /// Takes in every line that arrives until `deadline`, and returns all
    /// lines seen so far that arrived by then.
    pub fn collect_until(&mut self, deadline: Instant) -> Vec<Line> {
        while self.wait_until(deadline, |_| false).is_some() {}
        let seen = self.seen.iter().filter(|line| line.at <= deadline);
        seen.cloned().collect()
    }

    /// The lines seen so far (after taking in those already waiting).
    pub fn seen(&mut self) -> &[Line] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// The lines seen so far, one per row, for a failure message.
    pub fn said(&mut self) -> String {
        self.seen()
            .iter()
            .map(|line| format!("  {} {}", line.kind, line.json))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGKILL, as the OOM killer or a crash would: the kernel closes its
    /// sockets, the process says nothing more.
    pub fn kill(&mut self) -> Instant {
        // Stamped before the signal: the kernel closes the sockets before
        // `wait` returns, and the server may report the end before then.
        let killed = Instant::now();
        let _ = self.child.kill();
        let _ = self.child.wait();
        killed
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // `ip netns exec` execs the test binary, so this is the role itself.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
