//! Standard normal variates by the ziggurat method (Marsaglia and Tsang, 2000), 256 layers.
//!
//! Written here rather than taken from `rand_distr` for two reasons: its tail and wedge paths
//! call the platform's `exp`/`ln`, whose last bit differs between libms (recordings must be
//! byte-identical on every machine), and it spends 64 random bits per variate. This one draws
//! 32 bits per variate on the fast path (8 bits pick the layer, 24 bits give a signed position,
//! independent of the layer bits as Doornik recommends), uses the `libm` crate (a pure-Rust port
//! of musl) on the rare slow paths, and builds its tables once with the same functions.

use std::sync::LazyLock;

use crate::rng::Stream;

const LAYERS: usize = 256;
/// Start of the tail (Marsaglia and Tsang's constants for 256 layers).
const R: f64 = 3.654_152_885_361_009;
/// Area of each layer.
const V: f64 = 4.928_673_233_99e-3;
/// Scale of the 24-bit signed position: positions lie in [-2^23, 2^23).
const M: f64 = 8_388_608.0;

struct Tables {
    /// Fast-path acceptance bounds, in position units.
    k: [f64; LAYERS],
    /// Position-to-value scale per layer.
    w: [f64; LAYERS],
    /// Density at each layer's edge.
    f: [f64; LAYERS],
    /// Right edge of each layer (`edge[0] = 0`).
    edge: [f64; LAYERS],
    /// Slope of the chord across each layer's wedge.
    chord: [f64; LAYERS],
}

static TABLES: LazyLock<Tables> = LazyLock::new(build_tables);

fn build_tables() -> Tables {
    let mut k = [0.0; LAYERS];
    let mut w = [0.0; LAYERS];
    let mut f = [0.0; LAYERS];
    let mut d = R;
    let mut t = R;
    let q = V / libm::exp(-0.5 * d * d);
    k[0] = (d / q) * M;
    k[1] = 0.0;
    w[0] = q / M;
    w[LAYERS - 1] = d / M;
    f[0] = 1.0;
    f[LAYERS - 1] = libm::exp(-0.5 * d * d);
    for i in (1..LAYERS - 1).rev() {
        d = (-2.0 * libm::log(V / d + libm::exp(-0.5 * d * d))).sqrt();
        k[i + 1] = (d / t) * M;
        t = d;
        f[i] = libm::exp(-0.5 * d * d);
        w[i] = d / M;
    }
    let mut edge = [0.0; LAYERS];
    let mut chord = [0.0; LAYERS];
    for i in 1..LAYERS {
        edge[i] = w[i] * M;
        chord[i] = (f[i] - f[i - 1]) / (edge[i] - edge[i - 1]);
    }
    Tables { k, w, f, edge, chord }
}

/// Margin of the wedge shortcuts: far above the rounding of the bounds and of `libm::exp`,
/// so a shortcut never decides differently from the exact test.
const WEDGE_MARGIN: f64 = 1e-9;

/// Decides a wedge point `(ax, y)` of `layer` without `exp` when the density's chord and
/// tangent bound it clearly: the density is concave below 1 (the chord lies under it, the
/// tangent at the inner edge over it) and convex above 1 (the other way round). `None` when
/// the point is too close to call, or the layer straddles 1.
#[inline]
fn wedge_shortcut(tables: &Tables, layer: usize, ax: f64, y: f64) -> Option<bool> {
    let (inner, outer) = (tables.edge[layer - 1], tables.edge[layer]);
    let chord = tables.f[layer - 1] + tables.chord[layer] * (ax - inner);
    if outer <= 1.0 {
        let tangent = tables.f[layer - 1] - inner * tables.f[layer - 1] * (ax - inner);
        if y < chord - WEDGE_MARGIN {
            return Some(true);
        }
        if y > tangent + WEDGE_MARGIN {
            return Some(false);
        }
    } else if inner >= 1.0 {
        let tangent = tables.f[layer] - outer * tables.f[layer] * (ax - outer);
        if y > chord + WEDGE_MARGIN {
            return Some(false);
        }
        if y < tangent - WEDGE_MARGIN {
            return Some(true);
        }
    }
    None
}

/// Turns 32 random bits into a standard normal variate, drawing more from `stream` only on the
/// slow path (about 1.2% of calls).
#[inline(always)]
pub fn from_bits(bits: u32, stream: &mut Stream) -> f64 {
    let tables = &*TABLES;
    let layer = (bits & 0xff) as usize;
    let position = f64::from((bits as i32) >> 8);
    if position.abs() < tables.k[layer] {
        return position * tables.w[layer];
    }
    slow_path(tables, layer, position, stream)
}

#[cold]
fn slow_path(tables: &Tables, layer: usize, position: f64, stream: &mut Stream) -> f64 {
    slow_path_with(tables, layer, position, stream, |layer, x, y| {
        match wedge_shortcut(tables, layer, x.abs(), y) {
            Some(decided) => decided,
            None => y < libm::exp(-0.5 * x * x),
        }
    })
}

/// The slow path with the wedge decision `accept(layer, x, y)` given: the base strip's tail, the wedge
/// test, and redrawing a point.
#[inline(always)]
fn slow_path_with(
    tables: &Tables,
    mut layer: usize,
    mut position: f64,
    stream: &mut Stream,
    accept: impl Fn(usize, f64, f64) -> bool,
) -> f64 {
    loop {
        let x = position * tables.w[layer];
        if layer == 0 {
            // The base strip: sample the tail beyond R (Marsaglia's tail method).
            loop {
                let tail_x = -libm::log(stream.open01()) / R;
                let tail_y = -libm::log(stream.open01());
                if tail_y + tail_y >= tail_x * tail_x {
                    return if position > 0.0 { R + tail_x } else { -R - tail_x };
                }
            }
        }
        let uniform = stream.open01();
        let y = tables.f[layer] + uniform * (tables.f[layer - 1] - tables.f[layer]);
        if accept(layer, x, y) {
            return x;
        }
        let bits = stream.next_u32();
        layer = (bits & 0xff) as usize;
        position = f64::from((bits as i32) >> 8);
        if position.abs() < tables.k[layer] {
            return position * tables.w[layer];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{TABLES, Tables, from_bits, slow_path_with};
    use crate::rng::Stream;

    /// The slow path as it was before the wedge shortcuts: `exp` on every wedge point.
    fn reference_slow_path(tables: &Tables, layer: usize, position: f64, stream: &mut Stream) -> f64 {
        slow_path_with(tables, layer, position, stream, |_, x, y| y < libm::exp(-0.5 * x * x))
    }

    #[test]
    fn wedge_shortcuts_never_change_a_variate() {
        let tables = &*TABLES;
        let mut fast = Stream::derive(77, &["wedge"]);
        let mut reference = Stream::derive(77, &["wedge"]);
        let mut slow_paths = 0;
        for _ in 0..4_000_000 {
            let bits = fast.next_u32();
            assert_eq!(bits, reference.next_u32());
            let layer = (bits & 0xff) as usize;
            let position = f64::from((bits as i32) >> 8);
            let expected = if position.abs() < tables.k[layer] {
                position * tables.w[layer]
            } else {
                slow_paths += 1;
                reference_slow_path(tables, layer, position, &mut reference)
            };
            assert_eq!(from_bits(bits, &mut fast).to_bits(), expected.to_bits());
        }
        assert!(
            slow_paths > 30_000,
            "{slow_paths} slow paths: the test must exercise the wedges"
        );
    }

    #[test]
    fn moments_match_standard_normal() {
        let mut stream = Stream::derive(42, &["normal-test"]);
        let n = 2_000_000;
        let mut values = vec![0.0; n];
        stream.fill_normal(&mut values);
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        let kurt = values.iter().map(|v| ((v - mean) / var.sqrt()).powi(4)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.003, "mean {mean}");
        assert!((var - 1.0).abs() < 0.005, "variance {var}");
        assert!((kurt - 3.0).abs() < 0.03, "kurtosis {kurt}");
        // The tails are there: P(|x| > 3) = 0.0027.
        let beyond3 = values.iter().filter(|v| v.abs() > 3.0).count() as f64 / n as f64;
        assert!((beyond3 - 0.0027).abs() < 0.0003, "tail mass {beyond3}");
        let beyond_r = values.iter().filter(|v| v.abs() > 3.5).count();
        assert!(beyond_r > 0, "no variate beyond the base strip");
    }

    #[test]
    fn cdf_matches_at_quantiles() {
        let mut stream = Stream::derive(3, &["cdf"]);
        let n = 1_000_000;
        let mut values = vec![0.0; n];
        stream.fill_normal(&mut values);
        // Phi(-1) = 0.158655, Phi(0) = 0.5, Phi(1.5) = 0.933193
        for (x, expected) in [(-1.0, 0.158_655), (0.0, 0.5), (1.5, 0.933_193)] {
            let p = values.iter().filter(|v| **v < x).count() as f64 / n as f64;
            assert!((p - expected).abs() < 0.002, "P(X < {x}) = {p}, expected {expected}");
        }
    }
}
