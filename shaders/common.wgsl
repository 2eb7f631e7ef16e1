// common.wgsl: the parameters every kernel reads, and the bit-level numerics.
// Each function is the twin of the one with the same name in src/numerics/formats.rs and is
// written with integer operations on f32 bit patterns: compilers may fuse a multiply into a
// following add, may flush subnormals, and divide to 2.5 ULP, so a quantizer only uses single
// multiplies whose result is looked at through its bits, and div_rn below.

struct Params {
    batch: u32, heads_q: u32, heads_kv: u32, seq_q: u32,
    seq_kv: u32, head_dim: u32, dp: u32, group: u32,
    q_sb: u32, q_sh: u32, q_st: u32, kv_sb: u32,
    kv_sh: u32, kv_st: u32, dtype: u32, flags: u32,
    q_blocks: u32, k_blocks: u32, fold: f32, score_scale: f32,
    inv_g: f32, g: f32, mode: u32, count: u32,
    off_kmean: u32, off_qdelta: u32, off_qcodes: u32, off_qscales: u32,
    off_kcodes: u32, off_kscales: u32, off_vcodes: u32, off_vscales: u32,
    q_gblock: u32, q_ginter: u32, k_gblock: u32, k_ginter: u32,
    np: u32, off_vinv: u32, recipe: u32, off_kpart: u32,
    nm_n: u32, nm_m: u32, nm_sink: u32, nm_recent: u32,
    skip_log2: f32, off_tiles: u32, skip_on: u32, pad1: u32,
    v_inv_g: f32, v_g: f32, p_log2: f32, pad3: u32,
}

const DT_F16: u32 = 0u;
const DT_BF16: u32 = 1u;
const DT_F32: u32 = 2u;

const R_EXACT: u32 = 0u;
const R_INT8_F16: u32 = 1u;
const R_INT8_FP8: u32 = 2u;
const R_NVFP4: u32 = 3u;
const R_NVFP4P: u32 = 4u;
const R_FP8P: u32 = 5u;

const FLAG_CAUSAL: u32 = 1u;
const FLAG_LSE: u32 = 2u;
const FLAG_MASK: u32 = 4u;
const FLAG_SMOOTH: u32 = 8u;
const FLAG_VNVFP4: u32 = 16u;

const TINY_BITS: u32 = 0x0f800000u;   // 2^-96: smaller groups quantize to zero
const E4M3_NAN: u32 = 0x7fu;
const E4M3_MAX_CODE: u32 = 0x7eu;

fn f32_nan() -> f32 { return bitcast<f32>(0x7fc00000u); }
fn f32_neg_inf() -> f32 { return bitcast<f32>(0xff800000u); }
fn abs_bits(x: f32) -> u32 { return bitcast<u32>(x) & 0x7fffffffu; }
fn non_finite(a: u32) -> bool { return a >= 0x7f800000u; }
fn is_nan(x: f32) -> bool { return abs_bits(x) > 0x7f800000u; }

// max that propagates NaN (WGSL's max leaves NaN to the implementation).
fn nan_max(a: f32, b: f32) -> f32 {
    if (is_nan(a) || is_nan(b)) { return f32_nan(); }
    return max(a, b);
}

// The least power of two >= a normal |x| given as bits (at most 2^126), as bits: the mantissa
// mask's add carries into the exponent unless x already is one.
fn pow2_ceil_bits(a: u32) -> u32 { return (min(a, 0x7e800000u) + 0x007fffffu) & 0x7f800000u; }

fn ftz(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7f800000u) == 0u) { return bitcast<f32>(b & 0x80000000u); }
    return x;
}

fn rne_shift_right(sig: u32, shift: u32) -> u32 {
    if (shift >= 32u) { return 0u; }
    let q = sig >> shift;
    let rem = sig & ((1u << shift) - 1u);
    let half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u) == 1u)) { return q + 1u; }
    return q;
}

// Code (no sign) of a non-negative finite f32 rounded nearest-even to a minifloat with `mant`
// mantissa bits and smallest normal exponent `emin`; not saturated.
fn round_minifloat(a: u32, mant: u32, emin: i32) -> u32 {
    let field = i32(a >> 23u);
    if (field == 0) { return 0u; }
    let e = field - 127;
    let sig = (a & 0x7fffffu) | 0x800000u;
    let big_e = max(e, emin);
    let shift = u32(23 - i32(mant) + big_e - e);
    return (u32(big_e - emin) << mant) + rne_shift_right(sig, shift);
}

fn e4m3_from_f32(x: f32) -> u32 {
    let bits = bitcast<u32>(x);
    let sign = (bits >> 24u) & 0x80u;
    let a = bits & 0x7fffffffu;
    if (a > 0x7f800000u) { return sign | E4M3_NAN; }
    var code = E4M3_MAX_CODE;
    if (a < 0x7f800000u) { code = min(round_minifloat(a, 3u, -6), E4M3_MAX_CODE); }
    return sign | code;
}

fn e4m3_to_f32(c: u32) -> f32 {
    let sign = (c & 0x80u) << 24u;
    if ((c & 0x7fu) == E4M3_NAN) { return f32_nan(); }
    let e = (c >> 3u) & 0xfu;
    let m = c & 7u;
    if (e == 0u) {
        return bitcast<f32>(sign | bitcast<u32>(f32(m) * bitcast<f32>(0x3b000000u))); // m · 2^-9
    }
    return bitcast<f32>(sign | ((e + 120u) << 23u) | (m << 20u));
}

fn e2m1_to_f32(c: u32) -> f32 {
    let sign = (c & 8u) << 28u;
    let e = (c >> 1u) & 3u;
    let m = c & 1u;
    if (e == 0u) { return bitcast<f32>(sign | bitcast<u32>(0.5 * f32(m))); }
    return bitcast<f32>(sign | ((e + 126u) << 23u) | (m << 22u));
}

// E2M1 code of the exact quotient x / s (s an E4M3 value): compares x with each midpoint · s,
// which is exact in f32; a tie goes to the even code.
fn e2m1_code_of_ratio(x: f32, s: f32) -> u32 {
    if (!(s > 0.0)) { return 0u; }
    let sign = (bitcast<u32>(x) >> 28u) & 8u;
    let a = bitcast<f32>(abs_bits(x));
    var mids = array<f32, 7>(0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0);
    var code = 0u;
    for (var i = 0u; i < 7u; i++) {
        let t = mids[i] * s;
        if (a > t || (a == t && ((i + 1u) & 1u) == 0u)) { code = i + 1u; }
    }
    if (code == 0u) { return 0u; }
    return sign | code;
}

// Round half away from zero, saturating to [-127, 127].
fn int8_round(y: f32) -> i32 {
    let bits = bitcast<u32>(y);
    let a = bits & 0x7fffffffu;
    let e = i32(a >> 23u) - 127;
    var n = 0u;
    if (a >= 0x7f800000u || e >= 7) {
        n = 127u;
    } else if (e >= -1) {
        let sig = (a & 0x7fffffu) | 0x800000u;
        let shift = u32(23 - e);
        n = min((sig + (1u << (shift - 1u))) >> shift, 127u);
    }
    if ((bits >> 31u) != 0u) { return -i32(n); }
    return i32(n);
}

// a / b, correctly rounded, by integer long division (WGSL's '/' is only 2.5 ULP).
// b must be positive and normal; subnormal inputs and results are flushed to zero.
fn div_rn(a: f32, b: f32) -> f32 {
    let ab = bitcast<u32>(a);
    let sign = ab & 0x80000000u;
    let aa = ab & 0x7fffffffu;
    if (aa >= 0x7f800000u) { return a; }
    if (aa < 0x00800000u) { return bitcast<f32>(sign); }
    let bb = bitcast<u32>(b) & 0x7fffffffu;
    var ma = (aa & 0x7fffffu) | 0x800000u;
    let mb = (bb & 0x7fffffu) | 0x800000u;
    var e = i32(aa >> 23u) - i32(bb >> 23u);
    if (ma < mb) { ma = ma << 1u; e = e - 1; }
    var q = 0u;
    var r = ma;
    for (var i = 0u; i < 24u; i++) {
        q = q << 1u;
        if (r >= mb) { r = r - mb; q = q | 1u; }
        r = r << 1u;
    }
    if (r > mb || (r == mb && (q & 1u) == 1u)) { q = q + 1u; }
    if (q == 0x1000000u) { q = 0x800000u; e = e + 1; }
    let be = e + 127;
    if (be >= 255) { return bitcast<f32>(sign | 0x7f800000u); }
    if (be <= 0) { return bitcast<f32>(sign); }
    return bitcast<f32>(sign | (u32(be) << 23u) | (q & 0x7fffffu));
}

fn f16_bits_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) { return bitcast<f32>(sign | bitcast<u32>(f32(m) * bitcast<f32>(0x33800000u))); } // m · 2^-24
    if (e == 31u) { return bitcast<f32>(sign | 0x7f800000u | (m << 13u)); }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

// f32 → f16 bits, nearest-even, overflow to Inf (IEEE; the `half` crate's from_f32).
fn f32_to_f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a > 0x7f800000u) { return sign | 0x7e00u; }
    return sign | min(round_minifloat(a, 10u, -14), 0x7c00u);
}

// f32 → bf16 bits, nearest-even.
fn f32_to_bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a > 0x7f800000u) { return sign | 0x7fc0u; }
    return sign | min(round_minifloat(a, 7u, -126), 0x7f80u);
}

fn round_to(dtype: u32, x: f32) -> f32 {
    if (dtype == DT_F16) { return f16_bits_to_f32(f32_to_f16_bits(x)); }
    if (dtype == DT_BF16) { return bitcast<f32>(f32_to_bf16_bits(x) << 16u); }
    return x;
}

// Element `idx` of a tensor stored as u32 words: word_index picks the word, decode the value
// (subnormals flushed, the input every recipe is defined on).
fn word_index(idx: u32, dtype: u32) -> u32 {
    return select(idx >> 1u, idx, dtype == DT_F32);
}
fn decode(word: u32, idx: u32, dtype: u32) -> f32 {
    if (dtype == DT_F32) { return ftz(bitcast<f32>(word)); }
    let h = (word >> ((idx & 1u) * 16u)) & 0xffffu;
    if (dtype == DT_F16) { return f16_bits_to_f32(h); }
    return ftz(bitcast<f32>(h << 16u));
}

// Byte `idx` of a u32 array (codes are stored 4 to a word, little-endian).
fn byte_of(word: u32, idx: u32) -> u32 {
    return (word >> ((idx & 3u) * 8u)) & 0xffu;
}

// Signed 8-bit value of a byte.
fn i8_of(b: u32) -> i32 {
    return (i32(b << 24u)) >> 24u;
}

fn group_of(t: u32, block: u32, inter: u32) -> u32 {
    return (t / block) * inter + (t % inter);
}
fn group_count(n: u32, block: u32, inter: u32) -> u32 {
    return ((n + block - 1u) / block) * inter;
}

// E4M3 scale code of an NVFP4 block with largest magnitude `amax` (bits).
fn nvfp4_scale_code(amax: u32) -> u32 {
    if (non_finite(amax)) { return E4M3_NAN; }
    if (amax < TINY_BITS) { return 0u; }
    return e4m3_from_f32(div_rn(bitcast<f32>(amax), 6.0));
}
