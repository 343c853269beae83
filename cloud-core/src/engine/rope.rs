//! Rotary position embeddings: inverse frequencies for plain, linear, YaRN and llama3
//! scaling, and the cos/sin tables the backends read.
//!
//! YaRN follows DeepSeek's reference code (`DeepseekV2YarnRotaryEmbedding`): frequencies
//! blend interpolated and extrapolated values over a linear ramp between the correction
//! dimensions of `beta_fast` and `beta_slow`, and cos/sin are multiplied by
//! `mscale(factor, mscale) / mscale(factor, mscale_all_dim)`. The attention softmax scale
//! is multiplied by `mscale(factor, mscale_all_dim)²` ([`softmax_scale`]).

use std::f64::consts::PI;

use super::config::RopeScaling;

/// `0.1 · m · ln(s) + 1` for `s > 1`, else 1 (YaRN's attention temperature).
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn yarn_correction_dim(num_rotations: f64, dim: usize, base: f64, max_pos: usize) -> f64 {
    (dim as f64 * (max_pos as f64 / (num_rotations * 2.0 * PI)).ln()) / (2.0 * base.ln())
}

/// Inverse frequencies (`rot_dim / 2` of them) and the cos/sin multiplier.
pub fn inv_freq(rot_dim: usize, base: f64, scaling: &RopeScaling) -> (Vec<f64>, f64) {
    let half = rot_dim / 2;
    let plain: Vec<f64> = (0..half)
        .map(|i| 1.0 / base.powf((2 * i) as f64 / rot_dim as f64))
        .collect();
    match scaling {
        RopeScaling::None => (plain, 1.0),
        RopeScaling::Linear { factor } => (plain.iter().map(|f| f / factor).collect(), 1.0),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let orig = *original_max_position_embeddings as f64;
            let low_wavelen = orig / low_freq_factor;
            let high_wavelen = orig / high_freq_factor;
            let f = plain
                .iter()
                .map(|&freq| {
                    let wavelen = 2.0 * PI / freq;
                    if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        let smooth = (orig / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect();
            (f, 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
        } => {
            let low =
                yarn_correction_dim(*beta_fast, rot_dim, base, *original_max_position_embeddings)
                    .floor()
                    .max(0.0);
            let high =
                yarn_correction_dim(*beta_slow, rot_dim, base, *original_max_position_embeddings)
                    .ceil()
                    .min(rot_dim as f64 - 1.0);
            let (low, high) = if low == high {
                (low, high + 0.001)
            } else {
                (low, high)
            };
            let f = plain
                .iter()
                .enumerate()
                .map(|(i, &extra)| {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolate = 1.0 - ramp;
                    let inter = extra / factor;
                    inter * (1.0 - extrapolate) + extra * extrapolate
                })
                .collect();
            (
                f,
                yarn_get_mscale(*factor, *mscale) / yarn_get_mscale(*factor, *mscale_all_dim),
            )
        }
    }
}

/// cos and sin tables, `[max_pos, rot_dim / 2]`, row-major.
pub fn tables(
    rot_dim: usize,
    base: f64,
    scaling: &RopeScaling,
    max_pos: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (freqs, mult) = inv_freq(rot_dim, base, scaling);
    let mut cos = Vec::with_capacity(max_pos * freqs.len());
    let mut sin = Vec::with_capacity(max_pos * freqs.len());
    for p in 0..max_pos {
        for f in &freqs {
            // Computed as torch does: the angle in f32, then cos/sin.
            let angle = (p as f32) * (*f as f32);
            cos.push(angle.cos() * mult as f32);
            sin.push(angle.sin() * mult as f32);
        }
    }
    (cos, sin)
}

/// The attention softmax scale of a head of dimension `head_dim` (DeepSeek: with YaRN's
/// `mscale_all_dim` correction).
pub fn softmax_scale(head_dim: usize, scaling: &RopeScaling) -> f64 {
    let base = 1.0 / (head_dim as f64).sqrt();
    match scaling {
        RopeScaling::Yarn {
            factor,
            mscale_all_dim,
            ..
        } if *mscale_all_dim != 0.0 => {
            let m = yarn_get_mscale(*factor, *mscale_all_dim);
            base * m * m
        }
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_frequencies_and_mscale() {
        let (f, m) = inv_freq(8, 10_000.0, &RopeScaling::None);
        assert_eq!(f.len(), 4);
        assert!((f[0] - 1.0).abs() < 1e-12 && (f[1] - 0.1).abs() < 1e-12);
        assert_eq!(m, 1.0);
        assert!((yarn_get_mscale(40.0, 0.707) - (0.0707 * 40f64.ln() + 1.0)).abs() < 1e-12);
        assert_eq!(yarn_get_mscale(1.0, 0.707), 1.0);
    }

    #[test]
    fn yarn_keeps_high_frequencies_and_interpolates_low_ones() {
        let s = RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 0.707,
            mscale_all_dim: 0.707,
        };
        let (plain, _) = inv_freq(64, 10_000.0, &RopeScaling::None);
        let (f, m) = inv_freq(64, 10_000.0, &s);
        assert_eq!(f[0], plain[0]);
        assert!((f[31] - plain[31] / 40.0).abs() < 1e-15);
        assert_eq!(m, 1.0); // mscale == mscale_all_dim
    }
}
