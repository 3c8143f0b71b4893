//! The score of a node for an extent: the placement contract.
//!
//! Every node computes every replica set from the cluster map alone, so this
//! function must give the same bits on every platform, compiler and release,
//! forever. It therefore uses integer arithmetic only: a 64-bit mixer and a
//! fixed-point logarithm from a table built at compile time by integer
//! squaring. No `f64::ln` (it comes from the platform's libm, whose last bits
//! differ between systems and versions).
//!
//! **Changing anything here (a salt, a mixer constant, the table size, the
//! rounding) moves almost every replica in every cluster.** Such a change
//! needs a new placement version in the metadata and a migration; the golden
//! test in `placement::tests` fails on purpose when it happens.
//!
//! Weighted rendezvous: for an extent key `k` and node `n` of weight `w`,
//! `u = hash(k, n)` is uniform in (0, 1) and `E = -ln(u)` is exponential
//! with mean 1, so `E / w` is exponential with rate `w`. The node with the
//! smallest `E / w` wins with probability `w / sum(w)`; this is the usual
//! `score = -w / ln(u)`, highest wins, without the division. We compute
//! `-log2(u)` instead of `-ln(u)`: a constant factor, same order.

use crate::types::{ExtentIndex, NodeId, VolumeId};

/// Golden-ratio increment (SplitMix64's gamma): spreads consecutive extent
/// indexes far apart before mixing.
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
/// Salts keep node and volume ids in different hash domains, so node 5 and
/// volume 5 do not start from the same word.
const NODE_SALT: u64 = 0x6a09_e667_f3bc_c908;
const VOLUME_SALT: u64 = 0xbb67_ae85_84ca_a73b;

/// A bijective 64-bit finalizer (Stafford's "Mix13", the SplitMix64 output
/// function): every input bit flips each output bit with probability close
/// to 1/2.
#[inline]
pub(crate) const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Per-node part of the hash, computed once per cluster map.
#[inline]
pub(crate) const fn node_hash(id: NodeId) -> u64 {
    mix64(id.0 ^ NODE_SALT)
}

/// Per-extent part of the hash, computed once per placement.
#[inline]
pub(crate) const fn key_hash(volume: VolumeId, extent: ExtentIndex) -> u64 {
    mix64(mix64(volume.0 ^ VOLUME_SALT).wrapping_add(extent.0.wrapping_mul(GAMMA)))
}

/// The uniform draw of this node for this key.
#[inline]
pub(crate) const fn draw(key: u64, node: u64) -> u64 {
    mix64(key ^ node)
}

/// `-log2(u)` in Q32 fixed point (value times 2^32) for this node and key,
/// with `u = (h | 1) / 2^64` uniform in (0, 1). Always at least 1 (never 0:
/// a zero would tie every weight) and at most `64 << 32`.
#[inline]
pub(crate) fn exp_q32(key: u64, node: u64) -> u64 {
    neg_log2_q32(draw(key, node))
}

/// A cheap lower bound of [`neg_log2_q32`]`(h)`: `(1 - u)` in Q32. Lets the
/// search skip the logarithm for the nodes that cannot win (nearly all).
///
/// Why it is below: `-log2(u) >= (1 - u) / ln 2 >= 1.44 (1 - u)`, and
/// `neg_log2_q32` is never below the true value by more than half a unit
/// (the table is rounded to nearest; interpolating a concave function and
/// truncating the mantissa both err upwards). With `b` this bound,
/// `(1 - u) * 2^32 >= b`, so the computed value is at least `1.44 b - 0.5`,
/// which is at least `b` for `b >= 2`; for `b <= 1` the computed value's
/// floor of 1 covers it. `tests` check it on edge values and random draws.
#[inline]
pub(crate) const fn neg_log2_lower_bound_q32(h: u64) -> u64 {
    !h >> 32
}

const LOG_BITS: u32 = 10;
const LOG_SIZE: usize = 1 << LOG_BITS;

/// `LOG2[i] = round(log2(1 + i / 1024) * 2^32)`, `LOG2[1024] = 2^32`.
static LOG2: [u64; LOG_SIZE + 1] = log2_table();

const fn log2_table() -> [u64; LOG_SIZE + 1] {
    let mut t = [0u64; LOG_SIZE + 1];
    let mut i = 0;
    while i < LOG_SIZE {
        // y in [1, 2) as Q62; square it bit by bit: each square that reaches
        // 2 is a one bit of log2(y). 34 bits, then round to 32.
        let mut y: u128 = ((LOG_SIZE + i) as u128) << (62 - LOG_BITS);
        let mut bits: u64 = 0;
        let mut b = 0;
        while b < 34 {
            y = (y * y) >> 62;
            bits <<= 1;
            if y >= 2 << 62 {
                bits |= 1;
                y >>= 1;
            }
            b += 1;
        }
        t[i] = (bits + 2) >> 2;
        i += 1;
    }
    t[LOG_SIZE] = 1 << 32;
    t
}

/// `-log2((h | 1) / 2^64)` in Q32: the exponent from the leading zeros, the
/// mantissa's log from the table, interpolated linearly (error below 2e-7,
/// far under the statistical noise of any placement).
#[inline]
pub(crate) fn neg_log2_q32(h: u64) -> u64 {
    let x = h | 1;
    let lz = x.leading_zeros();
    // The mantissa's fraction bits, its leading one shifted out.
    let f = (x << lz) << 1;
    let idx = (f >> (64 - LOG_BITS)) as usize;
    let rem = (f >> (64 - LOG_BITS - 32)) & 0xffff_ffff;
    let lo = LOG2[idx];
    let hi = LOG2[idx + 1];
    // Wrapping ops because none can wrap (the hot loop runs under the
    // ci profile's overflow checks): hi - lo < 2^23, rem < 2^32, and
    // frac < 2^32 (log2(1 + f) < 1), so the result is at least 1.
    let frac = lo.wrapping_add(hi.wrapping_sub(lo).wrapping_mul(rem) >> 32);
    // log2(x) = (63 - lz) + frac; -log2(x / 2^64) = 64 - log2(x).
    ((1 + lz as u64) << 32).wrapping_sub(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw values of the contract, pinned (see the module docs before
    /// changing one: every replica in every cluster would move).
    #[test]
    fn contract_values_never_change() {
        let got = [
            node_hash(NodeId(1)),
            key_hash(VolumeId(1), ExtentIndex(0)),
            key_hash(VolumeId(1), ExtentIndex(1)),
            exp_q32(key_hash(VolumeId(1), ExtentIndex(0)), node_hash(NodeId(1))),
            neg_log2_q32(0x0123_4567_89ab_cdef),
            LOG2[1],
            LOG2[511],
        ];
        let want = [
            0x3564_b439_cd1e_1f16,
            0x0a37_7d1e_0ea7_dd99,
            0x15d2_2d6d_fea0_7126,
            0x00af_7801,
            0x0007_d053_f783, // 7.8138 = -log2(0x0123456789abcdef / 2^64)
            0x005c_4995,      // log2(1 + 1/1024) = 0.0014082
            0x9582_8705,      // log2(1 + 511/1024) = 0.5841
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn table_matches_float_log2() {
        for (i, &v) in LOG2.iter().enumerate() {
            let want = (1.0 + i as f64 / LOG_SIZE as f64).log2();
            let got = v as f64 / 4294967296.0;
            assert!((got - want).abs() < 1e-9, "entry {i}: {got} vs {want}");
        }
        assert!(LOG2.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn neg_log2_matches_float_and_stays_in_range() {
        let mut h = 1u64;
        for _ in 0..100_000 {
            h = mix64(h.wrapping_add(GAMMA));
            let got = neg_log2_q32(h) as f64 / 4294967296.0;
            let want = -(((h | 1) as f64) / 18446744073709551616.0).log2();
            assert!((got - want).abs() < 3e-7, "h={h:#x}: {got} vs {want}");
        }
        assert_eq!(neg_log2_q32(0), 64 << 32);
        assert_eq!(neg_log2_q32(1), 64 << 32);
        assert!(neg_log2_q32(u64::MAX) >= 1);
        assert_eq!(neg_log2_q32(1 << 63), 1 << 32);
    }

    #[test]
    fn lower_bound_is_below() {
        let mut edges: Vec<u64> = vec![0, 1, 2, 3, u64::MAX, u64::MAX - 1, 1 << 63];
        for k in 0..64 {
            for d in [0u64, 1, 2, 3] {
                edges.push((u64::MAX << k).wrapping_sub(d));
                edges.push((u64::MAX >> k).wrapping_add(d));
                edges.push(u64::MAX - (5u64 << k));
            }
        }
        let mut h = 7u64;
        for _ in 0..200_000 {
            h = mix64(h.wrapping_add(GAMMA));
            edges.push(h);
            // Draws close to 1, where the bound is tight.
            edges.push(!(h >> 20));
        }
        for h in edges {
            assert!(neg_log2_lower_bound_q32(h) <= neg_log2_q32(h), "h={h:#x}");
        }
    }

    #[test]
    fn exponential_mean_is_one_over_ln2() {
        // E[-log2(u)] = 1 / ln 2 for u uniform.
        let n = 200_000u64;
        let key = key_hash(VolumeId(7), ExtentIndex(3));
        let sum: u128 = (0..n).map(|i| exp_q32(key, node_hash(NodeId(i))) as u128).sum();
        let mean = sum as f64 / n as f64 / 4294967296.0;
        assert!((mean - std::f64::consts::LOG2_E).abs() < 0.01, "mean {mean}");
    }
}
