//! Scalar formats: E4M3, E2M1, INT8 rounding, and the f32 helpers every quantizer shares.
//!
//! Every function here is written with integer operations on the f32 bit pattern, exactly as
//! its twin in `shaders/common.wgsl` (and `kernels/common.cuh`): GPU compilers may fuse a
//! multiply into a following add, may flush subnormals, and divide to within 2.5 ULP, so the only
//! float operations a quantizer may use are single correctly rounded multiplies whose result is
//! looked at through its bits, and [`div_rn`] (which the shaders emulate with integers).

/// Largest finite E4M3 code (448.0), sign bit clear.
pub const E4M3_MAX_CODE: u8 = 0x7E;
/// The E4M3 NaN code (E4M3 "fn" has no infinities).
pub const E4M3_NAN: u8 = 0x7F;
/// Largest E2M1 code (6.0).
pub const E2M1_MAX_CODE: u8 = 7;
/// Magnitudes below this (2^-96) quantize a whole INT8 / FP8 group to zero: its scale would be
/// near the bottom of f32's range and its reciprocal overflow.
pub const TINY: f32 = 1.262_177_4e-29; // 2^-96

/// |x| as bits (sign cleared). Non-negative floats order like their bits as integers.
#[inline]
pub fn abs_bits(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// Whether `abs_bits` is an Inf or NaN.
#[inline]
pub fn non_finite(abs_bits: u32) -> bool {
    abs_bits >= 0x7f80_0000
}

/// Round a non-negative finite float (given as bits) to a minifloat with `mant` mantissa bits
/// and smallest normal exponent `emin`, nearest-even, and return the code without sign (not
/// saturated). f32 subnormals round to code 0, as they would anyway for every format here.
///
/// code = ((E - emin) << mant) + RNE(v · 2^(mant - E)) with E = max(floor(log2 v), emin):
/// a carry out of the mantissa lands in the next binade by itself.
#[inline]
pub fn round_minifloat(abs_bits: u32, mant: u32, emin: i32) -> u32 {
    let field = (abs_bits >> 23) as i32;
    if field == 0 {
        return 0;
    }
    let e = field - 127;
    let sig = (abs_bits & 0x7f_ffff) | 0x80_0000;
    let big_e = e.max(emin);
    let shift = (23 - mant as i32 + big_e - e) as u32;
    let n = rne_shift_right(sig, shift);
    (((big_e - emin) as u32) << mant) + n
}

/// sig / 2^shift rounded to nearest, ties to even (shift >= 1).
#[inline]
pub fn rne_shift_right(sig: u32, shift: u32) -> u32 {
    if shift >= 32 {
        return 0;
    }
    let q = sig >> shift;
    let rem = sig & ((1u32 << shift) - 1);
    let half = 1u32 << (shift - 1);
    if rem > half || (rem == half && (q & 1) == 1) {
        q + 1
    } else {
        q
    }
}

/// f32 → E4M3 (OCP "e4m3fn": bias 7, max 448, no Inf), nearest-even. Everything past ±448,
/// ±Inf included, saturates to ±448 (PTX's `.satfinite`); NaN maps to the NaN code.
#[inline]
pub fn e4m3_from_f32(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = bits & 0x7fff_ffff;
    if a > 0x7f80_0000 {
        return sign | E4M3_NAN;
    }
    let code = if a == 0x7f80_0000 {
        E4M3_MAX_CODE as u32
    } else {
        round_minifloat(a, 3, -6)
    };
    sign | code.min(E4M3_MAX_CODE as u32) as u8
}

/// E4M3 code → f32 (exact).
#[inline]
pub fn e4m3_to_f32(c: u8) -> f32 {
    let sign = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((c >> 3) & 0xf) as i32;
    let m = (c & 7) as f32;
    if c & 0x7f == E4M3_NAN {
        return f32::NAN;
    }
    let v = if e == 0 {
        m * 2f32.powi(-9)
    } else {
        (8.0 + m) * 2f32.powi(e - 10)
    };
    sign * v
}

/// E2M1 code (low 4 bits: sign, 2 exponent, 1 mantissa) → f32: {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
#[inline]
pub fn e2m1_to_f32(c: u8) -> f32 {
    const MAG: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let v = MAG[(c & 7) as usize];
    if c & 8 != 0 {
        -v
    } else {
        v
    }
}

/// E2M1 code of the exact quotient x / s (no intermediate f32 rounding), nearest-even,
/// saturating at 6; s must be a positive E4M3 value (optionally times a power of two), so that
/// every midpoint·s below is exact in f32. s = 0 (a zero block) gives code 0.
#[inline]
#[allow(clippy::neg_cmp_op_on_partial_ord)] // `!(x > 0.0)` is meant to hold for NaN too
pub fn e2m1_code_of_ratio(x: f32, s: f32) -> u8 {
    // Midpoints between consecutive E2M1 magnitudes; at a tie the even code (LSB 0) wins.
    const MID: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];
    let sign = if x.to_bits() >> 31 != 0 { 8u8 } else { 0 };
    let a = f32::from_bits(abs_bits(x));
    if !(s > 0.0) {
        return 0;
    }
    let mut code = 0u8;
    for (i, m) in MID.iter().enumerate() {
        let t = m * s;
        // Passing midpoint i moves to code i+1; exactly on it, only if i+1 is even.
        if a > t || (a == t && (i + 1) % 2 == 0) {
            code = i as u8 + 1;
        }
    }
    if code == 0 {
        0
    } else {
        sign | code
    }
}

/// Round half away from zero to an integer in [-127, 127] (saturating); |y| given as bits.
#[inline]
pub fn int8_round(y: f32) -> i8 {
    let bits = y.to_bits();
    let a = bits & 0x7fff_ffff;
    let e = (a >> 23) as i32 - 127;
    let n: u32 = if a >= 0x7f80_0000 || e >= 7 {
        127 // |y| >= 128 (or Inf): saturate
    } else if e < -1 {
        0 // |y| < 0.5
    } else {
        let sig = (a & 0x7f_ffff) | 0x80_0000;
        let shift = (23 - e) as u32; // 17..=24
        ((sig + (1 << (shift - 1))) >> shift).min(127)
    };
    if bits >> 31 != 0 {
        -(n as i32) as i8
    } else {
        n as i8
    }
}

/// a / b correctly rounded to nearest-even (IEEE division), with subnormal inputs and
/// results flushed to zero. On the CPU this is the `/` operator; the shaders emulate it with
/// integer long division because WGSL's division is only accurate to 2.5 ULP. `b` must be a
/// positive normal number; `a` may be anything (Inf and NaN propagate).
#[inline]
pub fn div_rn(a: f32, b: f32) -> f32 {
    ftz(ftz(a) / b)
}

/// The least power of two ≥ a normal |x| given as bits (at most 2^126), as bits: the mantissa
/// mask's add carries into the exponent unless x already is one.
#[inline]
pub fn pow2_ceil_bits(abs_bits: u32) -> u32 {
    (abs_bits.min(0x7e80_0000) + 0x007f_ffff) & 0x7f80_0000
}

/// Flush an f32 subnormal to a zero of the same sign (GPUs differ on subnormals, so quantizer
/// inputs are defined with them flushed).
#[inline]
pub fn ftz(x: f32) -> f32 {
    let b = x.to_bits();
    if b & 0x7f80_0000 == 0 {
        f32::from_bits(b & 0x8000_0000)
    } else {
        x
    }
}

/// Round an f32 to f16 precision (nearest-even, f32 subnormals flushed first) and back.
#[inline]
pub fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(ftz(x)).to_f32()
}

/// Round an f32 to bf16 precision (nearest-even, f32 subnormals flushed first) and back.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(ftz(x)).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_round_trip_every_code() {
        for c in 0u8..=255 {
            if c & 0x7f == E4M3_NAN {
                assert!(e4m3_to_f32(c).is_nan());
                continue;
            }
            let v = e4m3_to_f32(c);
            let back = e4m3_from_f32(v);
            // ±0 keep their sign; every finite code maps back to itself.
            assert_eq!(back, c, "code {c:#04x} value {v}");
        }
    }

    #[test]
    fn e4m3_edges() {
        assert_eq!(e4m3_from_f32(448.0), 0x7E);
        assert_eq!(e4m3_from_f32(463.9), 0x7E);
        assert_eq!(e4m3_from_f32(464.0), 0x7E); // would round to 480: saturates
        assert_eq!(e4m3_from_f32(1e30), 0x7E);
        assert_eq!(e4m3_from_f32(-1e30), 0xFE);
        assert_eq!(e4m3_from_f32(f32::INFINITY), 0x7E);
        assert_eq!(e4m3_from_f32(f32::NAN) & 0x7f, E4M3_NAN);
        assert_eq!(e4m3_from_f32(-0.0), 0x80);
        // Smallest subnormal 2^-9; half of it is a tie that goes to even (0).
        assert_eq!(e4m3_from_f32(2f32.powi(-9)), 0x01);
        assert_eq!(e4m3_from_f32(2f32.powi(-10)), 0x00);
        assert_eq!(e4m3_from_f32(1.5 * 2f32.powi(-9)), 0x02); // tie 1.5 -> 2
        assert_eq!(e4m3_from_f32(f32::from_bits(1)), 0x00); // f32 subnormal
                                                            // 1.0625 lies halfway between 1.0 and 1.125: even mantissa (1.0) wins.
        assert_eq!(e4m3_from_f32(1.0625), e4m3_from_f32(1.0));
        assert_eq!(e4m3_from_f32(1.1875), e4m3_from_f32(1.25));
        // Largest subnormal rounds up into the first normal binade.
        assert_eq!(e4m3_to_f32(e4m3_from_f32(0.0155)), 2f32.powi(-6));
    }

    #[test]
    fn e2m1_ties_go_to_even() {
        let cases = [
            (0.25, 0.0),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (5.01, 6.0),
            (7.0, 6.0),
            (100.0, 6.0),
            (0.26, 0.5),
            (0.0, 0.0),
        ];
        for (x, want) in cases {
            assert_eq!(e2m1_to_f32(e2m1_code_of_ratio(x, 1.0)), want, "x = {x}");
            assert_eq!(e2m1_to_f32(e2m1_code_of_ratio(-x, 1.0)), -want, "x = -{x}");
            // The same with a non-trivial E4M3 scale: the comparison is exact.
            let s = e4m3_to_f32(0x3B); // 0.8125... any E4M3 value
            assert_eq!(
                e2m1_to_f32(e2m1_code_of_ratio(x * s, s)),
                want,
                "x = {x} s = {s}"
            );
        }
    }

    #[test]
    fn int8_rounds_half_away_and_saturates() {
        for (y, want) in [
            (0.5f32, 1i8),
            (-0.5, -1),
            (0.49999997, 0),
            (1.5, 2),
            (2.5, 3),
            (-2.5, -3),
            (126.5, 127),
            (127.4, 127),
            (200.0, 127),
            (-1e9, -127),
            (0.0, 0),
            (-0.0, 0),
        ] {
            assert_eq!(int8_round(y), want, "y = {y}");
        }
        // Against the float definition on many values.
        let mut s = 1u32;
        for _ in 0..100_000 {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            let y = (s as f32 / u32::MAX as f32 - 0.5) * 300.0;
            let want = y.round().clamp(-127.0, 127.0) as i8;
            assert_eq!(int8_round(y), want, "y = {y}");
        }
    }

    #[test]
    fn minifloat_matches_float8_definition_on_random_values() {
        // Brute-force reference: the nearest E4M3 value, ties to the even code.
        let values: Vec<(u8, f32)> = (0u8..=0x7E).map(|c| (c, e4m3_to_f32(c))).collect();
        let mut s = 7u32;
        for _ in 0..50_000 {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            let x = f32::from_bits((s >> 1) % 0x43e0_0000); // [0, 448)
            let mut best = (0u8, f64::INFINITY);
            for &(c, v) in &values {
                let d = (v as f64 - x as f64).abs();
                if d < best.1 || (d == best.1 && c % 2 == 0) {
                    best = (c, d);
                }
            }
            assert_eq!(e4m3_from_f32(x), best.0, "x = {x:e}");
        }
    }
}
