//! What every benchmark needs: environment knobs and a small deterministic generator (no rand
//! crate). Included with `#[path]`, like the tests' common module.

/// A knob from the environment, or its default.
pub fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// A comma list of numbers from the environment, or the default list.
pub fn env_list(k: &str, d: &str) -> Vec<usize> {
    env_or(k, d.to_string()).split(',').filter_map(|s| s.trim().parse().ok()).collect()
}

/// A seed that differs between runs (data that must not be deduplicated across runs).
pub fn seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
}

/// splitmix64: fast, and enough to defeat compression and deduplication.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}
