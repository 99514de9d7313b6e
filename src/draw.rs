//! Seeded randomness for the crate's own property tests (test builds only):
//! the library's dev-dependencies carry no property-testing crate, so that
//! its first build stays small. A failing case names its seed.

/// SplitMix64: seeded, small, good enough to pick cases.
pub(crate) struct Draw(pub(crate) u64);

impl Draw {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `low..high`.
    pub(crate) fn within(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low)
    }

    /// True one time in `n`.
    pub(crate) fn one_in(&mut self, n: u64) -> bool {
        self.within(0, n) == 0
    }

    /// `len` random bytes.
    pub(crate) fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Runs `case` for seeds `0..cases`, naming the seed of a failing one.
pub(crate) fn for_seeds(cases: u64, case: impl Fn(u64)) {
    for seed in 0..cases {
        let run = std::panic::AssertUnwindSafe(|| case(seed));
        if let Err(panic) = std::panic::catch_unwind(run) {
            eprintln!("failing case: seed {seed}");
            std::panic::resume_unwind(panic);
        }
    }
}
