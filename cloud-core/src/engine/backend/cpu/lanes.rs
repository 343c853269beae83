//! The decode products' inner loop in explicit x86 vectors: sixteen f32 lanes as one
//! AVX-512 register or two AVX2 ones. Left to the compiler, the same loop was
//! vectorised for some tile shapes and not others (two or three activation rows ran
//! three to five times slower per row than one or four). Each lane multiplies, then
//! adds, never fused, and the lanes are summed in the portable code's order, so every
//! level gives that code's bits.

// Raw loads and stores of SIMD registers, within bounds checked before the loop.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use half::bf16;

const _: () = assert!(super::DOT_LANES == 16, "the lanes are sixteen f32");

/// Sixteen f32 lanes of one SIMD level. The operations are `unsafe`: the caller runs
/// where the CPU has the level's features, and pointers address sixteen values.
pub(super) trait Lanes: Copy {
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn load_bf16(p: *const bf16) -> Self;
    /// `self + x · w`, rounded after the product and after the sum.
    unsafe fn mul_add(self, x: Self, w: Self) -> Self;
    unsafe fn add(self, x: Self) -> Self;
    unsafe fn store(self, out: &mut [f32; 16]);
}

/// One AVX-512 register.
#[derive(Clone, Copy)]
pub(super) struct Avx512(__m512);

impl Lanes for Avx512 {
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn zero() -> Self {
        Avx512(_mm512_setzero_ps())
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(p: *const f32) -> Self {
        Avx512(_mm512_loadu_ps(p))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_bf16(p: *const bf16) -> Self {
        // bf16 bits are the upper half of the f32's: widen to 32 bits, shift up.
        let h = _mm256_loadu_si256(p.cast());
        Avx512(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(
            _mm512_cvtepu16_epi32(h),
        )))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn mul_add(self, x: Self, w: Self) -> Self {
        Avx512(_mm512_add_ps(self.0, _mm512_mul_ps(x.0, w.0)))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn add(self, x: Self) -> Self {
        Avx512(_mm512_add_ps(self.0, x.0))
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(self, out: &mut [f32; 16]) {
        _mm512_storeu_ps(out.as_mut_ptr(), self.0)
    }
}

/// Two AVX2 registers.
#[derive(Clone, Copy)]
pub(super) struct Avx2(__m256, __m256);

impl Lanes for Avx2 {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn zero() -> Self {
        Avx2(_mm256_setzero_ps(), _mm256_setzero_ps())
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load(p: *const f32) -> Self {
        Avx2(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load_bf16(p: *const bf16) -> Self {
        let wide =
            |h: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
        Avx2(
            wide(_mm_loadu_si128(p.cast())),
            wide(_mm_loadu_si128(p.add(8).cast())),
        )
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn mul_add(self, x: Self, w: Self) -> Self {
        Avx2(
            _mm256_add_ps(self.0, _mm256_mul_ps(x.0, w.0)),
            _mm256_add_ps(self.1, _mm256_mul_ps(x.1, w.1)),
        )
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn add(self, x: Self) -> Self {
        Avx2(_mm256_add_ps(self.0, x.0), _mm256_add_ps(self.1, x.1))
    }
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store(self, out: &mut [f32; 16]) {
        _mm256_storeu_ps(out.as_mut_ptr(), self.0);
        _mm256_storeu_ps(out.as_mut_ptr().add(8), self.1);
    }
}

/// A matrix element loaded sixteen at a time into lanes.
pub(super) trait LoadLanes: Copy {
    /// How many values ahead of its loads a weight row is prefetched, 0 for not at all.
    const AHEAD: usize = 0;
    unsafe fn load<L: Lanes>(p: *const Self) -> L;
}

impl LoadLanes for f32 {
    #[inline(always)]
    unsafe fn load<L: Lanes>(p: *const f32) -> L {
        L::load(p)
    }
}

impl LoadLanes for bf16 {
    // Widening takes twice the instructions per byte of an f32 load: the loads a core
    // has in flight cover half the bytes, and the memory, read at the same pace, gives
    // less. A prefetch 1 KiB ahead of each line keeps more of it in flight (a widening
    // read of 512 MiB: 18–19 → 20–22 GB/s on two cores); an f32 product is already at
    // the pace of a plain read.
    const AHEAD: usize = 512;
    #[inline(always)]
    unsafe fn load<L: Lanes>(p: *const bf16) -> L {
        L::load_bf16(p)
    }
}

/// [`super::dot_rows`] in lanes `L`: `o[j·m + r] = x[r]·w[j]` for the first `R` rows of
/// `x` and the first `J` rows of `w`, returning `R`; the same bits.
///
/// # Safety
/// The CPU has `L`'s features.
#[inline(always)]
pub(super) unsafe fn dot_rows<
    L: Lanes,
    W: super::Elem + LoadLanes,
    const R: usize,
    const J: usize,
>(
    t: super::Tile<'_, W>,
) -> usize {
    let super::Tile { x, k, w, m, o } = t;
    const LANES: usize = super::DOT_LANES;
    assert!(x.len() >= R * k && w.len() >= J * k && o.len() > (J - 1) * m + R - 1);
    let full = k / LANES * LANES;
    let mut acc = [[L::zero(); R]; J];
    let (xp, wp) = (x.as_ptr(), w.as_ptr());
    for c in (0..full / LANES).map(|c| c * LANES) {
        for (j, aj) in acc.iter_mut().enumerate() {
            // A hint, never a fault, wherever it points: once per 64-byte line.
            if W::AHEAD > 0 && (c * size_of::<W>()).is_multiple_of(64) {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(j * k + c + W::AHEAD).cast());
            }
            // SAFETY: c + LANES ≤ full ≤ k, and the assert bounds the rows.
            let wv: L = W::load(wp.add(j * k + c));
            for (r, a) in aj.iter_mut().enumerate() {
                *a = a.mul_add(L::load(xp.add(r * k + c)), wv);
            }
        }
    }
    for (j, aj) in acc.iter().enumerate() {
        for (r, a) in aj.iter().enumerate() {
            let mut lanes = [0f32; LANES];
            a.store(&mut lanes);
            let (xt, wt) = (&x[r * k + full..(r + 1) * k], &w[j * k + full..(j + 1) * k]);
            o[j * m + r] = super::lane_sum(&lanes, xt, wt);
        }
    }
    R
}

/// [`super::stream_sum`] in lanes `L`: four registers' worth of values a step, into four
/// independent sums.
///
/// # Safety
/// The CPU has `L`'s features.
#[inline(always)]
pub(super) unsafe fn stream_sum<L: Lanes>(s: &[f32]) -> f32 {
    const STEP: usize = 4 * super::DOT_LANES;
    let whole = s.len() / STEP * STEP;
    let p = s.as_ptr();
    let mut acc = [L::zero(); 4];
    for c in (0..whole).step_by(STEP) {
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: c + STEP ≤ whole ≤ s.len().
            *a = a.add(L::load(p.add(c + i * super::DOT_LANES)));
        }
    }
    let mut lanes = [0f32; super::DOT_LANES];
    acc[0].add(acc[1]).add(acc[2].add(acc[3])).store(&mut lanes);
    lanes.iter().sum::<f32>() + s[whole..].iter().sum::<f32>()
}

/// [`super::columns`] in AVX-512 for the whole 16 × 16 tiles: `out[i·nb + j] =
/// w[j·stride + i]` (as f32) for `j` below `nb / 16 · 16` and `i` below `k / 16 · 16`,
/// where `k = out.len() / nb`, each tile loaded as sixteen rows, transposed in registers
/// and stored as sixteen columns. Returns those two bounds; the rest is the caller's.
///
/// # Safety
/// The CPU has AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn columns_avx512<W: LoadLanes>(
    w: &[W],
    nb: usize,
    stride: usize,
    out: &mut [f32],
) -> (usize, usize) {
    let k = out.len() / nb.max(1);
    assert!(k <= stride && (nb == 0 || w.len() >= (nb - 1) * stride + k));
    let (rows, cols) = (nb / 16 * 16, k / 16 * 16);
    let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
    for j in (0..rows).step_by(16) {
        for i in (0..cols).step_by(16) {
            // SAFETY: rows j..j + 16 ≤ nb, values i..i + 16 ≤ k: within the assert's bounds.
            let mut r: [__m512; 16] =
                std::array::from_fn(|l| W::load::<Avx512>(wp.add((j + l) * stride + i)).0);
            transpose16(&mut r);
            for (l, v) in r.iter().enumerate() {
                // SAFETY: value i + l < k, rows j..j + 16 ≤ nb: within out's nb·k.
                _mm512_storeu_ps(op.add((i + l) * nb + j), *v);
            }
        }
    }
    (rows, cols)
}

/// [`super::columns`] in AVX2 for whole tiles of 8 rows by 16 values, as
/// [`columns_avx512`] does for 16 × 16: each half of the tile's sixteen values transposed
/// as an 8 × 8 block in registers. Returns the bounds it covered (rows, values).
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn columns_avx2<W: LoadLanes>(
    w: &[W],
    nb: usize,
    stride: usize,
    out: &mut [f32],
) -> (usize, usize) {
    let k = out.len() / nb.max(1);
    assert!(k <= stride && (nb == 0 || w.len() >= (nb - 1) * stride + k));
    let (rows, cols) = (nb / 8 * 8, k / 16 * 16);
    let (wp, op) = (w.as_ptr(), out.as_mut_ptr());
    for j in (0..rows).step_by(8) {
        for i in (0..cols).step_by(16) {
            // SAFETY: rows j..j + 8 ≤ nb, values i..i + 16 ≤ k: within the assert's bounds.
            let r: [Avx2; 8] =
                std::array::from_fn(|l| W::load::<Avx2>(wp.add((j + l) * stride + i)));
            let mut lo = r.map(|v| v.0);
            let mut hi = r.map(|v| v.1);
            transpose8(&mut lo);
            transpose8(&mut hi);
            for l in 0..8 {
                // SAFETY: values i + l and i + 8 + l < k, rows j..j + 8 ≤ nb: within nb·k.
                _mm256_storeu_ps(op.add((i + l) * nb + j), lo[l]);
                _mm256_storeu_ps(op.add((i + 8 + l) * nb + j), hi[l]);
            }
        }
    }
    (rows, cols)
}

/// Eight registers of eight values transposed: `r[i][l]` becomes `r[l][i]`, by the same
/// three rounds as [`transpose16`] (values, pairs, then 128-bit halves).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn transpose8(r: &mut [__m256; 8]) {
    let mut t = [_mm256_setzero_ps(); 8];
    for p in 0..4 {
        t[2 * p] = _mm256_unpacklo_ps(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm256_unpackhi_ps(r[2 * p], r[2 * p + 1]);
    }
    for q in 0..2 {
        let t = &t[4 * q..4 * q + 4];
        r[4 * q] = _mm256_shuffle_ps::<0x44>(t[0], t[2]);
        r[4 * q + 1] = _mm256_shuffle_ps::<0xEE>(t[0], t[2]);
        r[4 * q + 2] = _mm256_shuffle_ps::<0x44>(t[1], t[3]);
        r[4 * q + 3] = _mm256_shuffle_ps::<0xEE>(t[1], t[3]);
    }
    // Now half `h` of r[4q + i] holds value 4h + i of rows 4q..4q + 4.
    for i in 0..4 {
        t[i] = _mm256_permute2f128_ps::<0x20>(r[i], r[i + 4]);
        t[i + 4] = _mm256_permute2f128_ps::<0x31>(r[i], r[i + 4]);
    }
    *r = t;
}

/// Sixteen registers of sixteen values transposed: `r[i][l]` becomes `r[l][i]`. Pairs of
/// rows are interleaved by value, then by pairs within each 128-bit lane, then the lanes
/// are gathered twice.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for p in 0..8 {
        t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
        t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
    }
    for q in 0..4 {
        let t = &t[4 * q..4 * q + 4];
        r[4 * q] = _mm512_shuffle_ps::<0x44>(t[0], t[2]);
        r[4 * q + 1] = _mm512_shuffle_ps::<0xEE>(t[0], t[2]);
        r[4 * q + 2] = _mm512_shuffle_ps::<0x44>(t[1], t[3]);
        r[4 * q + 3] = _mm512_shuffle_ps::<0xEE>(t[1], t[3]);
    }
    // Now 128-bit lane `l` of r[4q + i] holds value 4l + i of rows 4q..4q + 4.
    for i in 0..4 {
        t[i] = _mm512_shuffle_f32x4::<0x88>(r[i], r[i + 4]);
        t[i + 4] = _mm512_shuffle_f32x4::<0xDD>(r[i], r[i + 4]);
        t[i + 8] = _mm512_shuffle_f32x4::<0x88>(r[i + 8], r[i + 12]);
        t[i + 12] = _mm512_shuffle_f32x4::<0xDD>(r[i + 8], r[i + 12]);
    }
    for i in 0..8 {
        r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[i + 8]);
        r[i + 8] = _mm512_shuffle_f32x4::<0xDD>(t[i], t[i + 8]);
    }
}
