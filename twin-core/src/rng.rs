//! Seeded random streams: every stream derives from (master seed, stable entity key, stream name).
//!
//! Nothing here depends on spawn order, iteration order or threads: a sensor's stream is a pure
//! function of the scenario seed, its device id, its own name and the purpose of the stream. The
//! derivation (FNV-1a over the key bytes, a SplitMix64 finalizer, then `rand`'s documented
//! `seed_from_u64`) and the generator (PCG64 MCG, O'Neill's `pcg64_fast`, from `rand_pcg`) are
//! part of the file format: changing either changes every recording. PCG64 MCG was chosen over
//! xoshiro256++ for its 16 bytes of state at the same speed (a million devices with two sensors
//! each must fit in 512 MiB; see BENCHMARKS.md).

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use crate::normal;

/// Hashes `parts` into a 64-bit key, stable across runs, platforms and releases.
///
/// FNV-1a over the bytes of each part, with a separator byte between parts so that
/// `("ab", "c")` and `("a", "bc")` differ.
pub fn stable_key(parts: &[&str]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for part in parts {
        for byte in part.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
        hash ^= 0xff;
        hash = hash.wrapping_mul(PRIME);
    }
    hash
}

/// Mixes a master seed with a stable key (the SplitMix64 finalizer), giving the seed of one stream.
pub fn mix(seed: u64, key: u64) -> u64 {
    let mut z = seed ^ key.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One seeded random stream (16 bytes of state).
#[derive(Clone, Debug)]
pub struct Stream {
    rng: Pcg64Mcg,
}

impl Stream {
    /// The stream for `(seed, key parts...)`, e.g. `(seed, ["pump-0001", "temperature", "signal"])`.
    pub fn derive(seed: u64, parts: &[&str]) -> Self {
        Self::from_seed_u64(mix(seed, stable_key(parts)))
    }

    /// A stream from an already mixed 64-bit seed.
    pub fn from_seed_u64(seed: u64) -> Self {
        Self {
            rng: Pcg64Mcg::seed_from_u64(seed),
        }
    }

    /// The next 64 random bits.
    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// The next 32 random bits.
    #[inline(always)]
    pub fn next_u32(&mut self) -> u32 {
        self.rng.next_u32()
    }

    /// A uniform variate in the open interval (0, 1): never exactly 0 or 1, so logarithms are finite.
    #[inline(always)]
    pub fn open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// A standard normal variate (ziggurat, see [`normal`]).
    #[inline(always)]
    pub fn normal(&mut self) -> f64 {
        let bits = self.next_u32();
        normal::from_bits(bits, self)
    }

    /// Fills `out` with standard normal variates, two from each 64 random bits.
    #[inline]
    pub fn fill_normal(&mut self, out: &mut [f64]) {
        let mut pairs = out.chunks_exact_mut(2);
        for pair in &mut pairs {
            let bits = self.next_u64();
            pair[0] = normal::from_bits(bits as u32, self);
            pair[1] = normal::from_bits((bits >> 32) as u32, self);
        }
        for value in pairs.into_remainder() {
            let bits = self.next_u32();
            *value = normal::from_bits(bits, self);
        }
    }

    /// Fills `out` with uniform variates in (0, 1).
    #[inline]
    pub fn fill_open01(&mut self, out: &mut [f64]) {
        for value in out.iter_mut() {
            *value = self.open01();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_parts() {
        assert_ne!(stable_key(&["ab", "c"]), stable_key(&["a", "bc"]));
        assert_eq!(stable_key(&["pump-1", "temp"]), stable_key(&["pump-1", "temp"]));
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let mut a = Stream::derive(7, &["d1", "s"]);
        let mut b = Stream::derive(7, &["d1", "s"]);
        let mut c = Stream::derive(8, &["d1", "s"]);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
    }

    #[test]
    fn open01_stays_inside() {
        let mut s = Stream::derive(1, &["x"]);
        for _ in 0..100_000 {
            let u = s.open01();
            assert!(u > 0.0 && u < 1.0, "{u}");
        }
    }
}
