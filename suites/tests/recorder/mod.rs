//! An in-memory metrics recorder the metrics tests read back
//! (`metrics.rs`, `route_labels.rs`).
//!
//! Every test runs on a current-thread runtime inside
//! `metrics::with_local_recorder`: the guard records on the thread that
//! polls it, so each test sees its own recorder and nothing of the others'.

#![allow(dead_code)]

use std::{cell::RefCell, collections::BTreeMap, future::Future};

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// What the recorder saw, summed over snapshots (a debugging snapshot
/// resets what it reads, gauges included): `name{label=value,...}` (labels
/// sorted) to the counter's or gauge's value, or a histogram's count.
pub struct Seen {
    snapshotter: Snapshotter,
    totals: RefCell<BTreeMap<String, f64>>,
}

impl Seen {
    pub fn read(&self) -> BTreeMap<String, f64> {
        let mut totals = self.totals.borrow_mut();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            let delta = match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(values) => values.len() as f64,
            };
            *totals.entry(name).or_default() += delta;
        }
        totals.clone()
    }

    pub fn get(&self, name: &str) -> f64 {
        self.read().get(name).copied().unwrap_or(0.0)
    }

    /// The values of label `label` seen on metric `metric`.
    pub fn label_values(&self, metric: &str, label: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .read()
            .keys()
            .filter(|key| key.starts_with(&format!("{metric}{{")))
            .flat_map(|key| {
                let inner = &key[metric.len() + 1..key.len() - 1];
                inner
                    .split(',')
                    .filter_map(|pair| pair.strip_prefix(&format!("{label}=")))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        values.sort();
        values.dedup();
        values
    }
}

/// Runs `test` on a current-thread runtime (time paused if asked) with a
/// recorder of its own.
pub fn run<F: Future<Output = ()>>(paused: bool, test: impl FnOnce(&'static Seen) -> F) {
    let recorder = DebuggingRecorder::new();
    let seen: &'static Seen = Box::leak(Box::new(Seen {
        snapshotter: recorder.snapshotter(),
        totals: RefCell::default(),
    }));
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(paused)
            .build()
            .expect("runtime");
        runtime.block_on(test(seen));
        // Tasks still holding streams or connections end here, inside the
        // recorder's scope.
        drop(runtime);
    });
}
