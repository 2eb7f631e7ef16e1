//! Our E4M3 and E2M1 conversions against the `float8` and `float4` crates, as independent
//! oracles. tessera keeps its own integer implementation because every function must have a
//! WGSL and CUDA twin that computes the same bits the same way; these tests show the crates'
//! rounding and saturation (NVIDIA's `__nv_cvt_*` satfinite semantics) are the same rules.

use tessera::numerics::formats::{e2m1_code_of_ratio, e4m3_from_f32};

fn values() -> Vec<f32> {
    let mut v: Vec<f32> = vec![
        0.0,
        -0.0,
        448.0,
        464.0,
        463.99,
        480.0,
        1e30,
        -1e30,
        f32::MAX,
        6.0,
        7.0,
        5.0,
        0.25,
        0.75,
    ];
    let mut s = 0x1234_5678u32;
    for _ in 0..200_000 {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        let x = f32::from_bits(s);
        if x.is_finite() {
            v.push(x);
            v.push(x * 1e-30); // bring far-out values into range
        }
    }
    for c in 0u8..=0x7E {
        let a = float8::F8E4M3::from_bits(c).to_f32();
        let b = float8::F8E4M3::from_bits(c + 1).to_f32();
        v.extend([a, (a + b) / 2.0, -(a + b) / 2.0]);
    }
    v
}

#[test]
fn e4m3_equals_float8_crate() {
    for x in values() {
        let ours = e4m3_from_f32(x);
        let theirs = float8::F8E4M3::from_f32(x).to_bits();
        // The crate flushes f32 subnormals to +0 without keeping the sign of a tiny negative.
        let same = ours == theirs || (ours & 0x7f == 0 && theirs & 0x7f == 0);
        assert!(same, "x = {x:e}: ours {ours:#04x}, float8 {theirs:#04x}");
    }
}

#[test]
fn e2m1_equals_float4_crate() {
    // E2M1 has no NaN: float4 maps NaN to ±6, tessera to 0 and marks the whole block through
    // its E4M3 scale (NaN) instead, so NaN is left out here.
    for x in values().into_iter().filter(|x| !x.is_nan()) {
        let ours = e2m1_code_of_ratio(x, 1.0);
        let theirs = float4::F4E2M1::from_f64(x as f64).to_bits();
        let same = ours == theirs || (ours & 7 == 0 && theirs & 7 == 0);
        assert!(same, "x = {x:e}: ours {ours:#x}, float4 {theirs:#x}");
    }
}
