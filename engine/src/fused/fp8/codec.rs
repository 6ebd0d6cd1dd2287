//! Encoding and decoding of the two FP8 formats, with the rounding of NVIDIA's
//! `__nv_cvt_float_to_fp8` under `__NV_SATFINITE`: to nearest, ties to even; values beyond the
//! largest finite one saturate to it, infinities included; NaN stays NaN (keeping its sign bit).
//! The kernels of `kernels/src/fp8.cu` port these steps rather than call the intrinsic, and give
//! the same code for every f32 input (checked on the host for all 2^32 of them, both formats).
//!
//! A code is `sign | exponent | mantissa` with `E` exponent and `M` mantissa bits and bias `B`:
//! exponent 0 is subnormal (`m / 2^M · 2^(1−B)`), others `(1 + m / 2^M) · 2^(e−B)`. e4m3 has
//! `E = 4, M = 3, B = 7` and no infinities (`S.1111.111` is NaN, largest 448); e5m2 has `E = 5,
//! M = 2, B = 15` with IEEE infinities and NaNs (exponent 31; largest 57344).

use std::sync::OnceLock;

use super::primitives::Fp8Format;

struct Spec {
    mbits: u32,
    bias: i32,
    /// The code of the largest finite value.
    max_code: u8,
    nan_code: u8,
}

fn spec(f: Fp8Format) -> Spec {
    match f {
        Fp8Format::E4M3 => Spec {
            mbits: 3,
            bias: 7,
            max_code: 0x7E,
            nan_code: 0x7F,
        },
        Fp8Format::E5M2 => Spec {
            mbits: 2,
            bias: 15,
            max_code: 0x7B,
            nan_code: 0x7F,
        },
    }
}

/// The code of `x` in format `f`.
pub fn encode(x: f32, f: Fp8Format) -> u8 {
    let s = spec(f);
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return s.nan_code | sign;
    }
    let a = x.abs();
    // Below the smallest normal: a multiple of the smallest subnormal 2^(1−B−M); the count, as
    // a code, also runs on into the smallest normal (count 2^M is exponent 1, mantissa 0).
    let min_normal = f32::powi(2.0, 1 - s.bias);
    let code = if a < min_normal {
        let unit = f32::powi(2.0, 1 - s.bias - s.mbits as i32);
        (a / unit).round_ties_even() as u32
    } else if a.is_infinite() {
        s.max_code as u32
    } else {
        let bits = a.to_bits();
        let exp = ((bits >> 23) & 0xFF) as i32 - 127;
        let shift = 23 - s.mbits;
        let mant = bits & 0x7F_FFFF;
        let mut m = mant >> shift;
        let rem = mant & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        if rem > half || (rem == half && m & 1 == 1) {
            m += 1; // a carry into the exponent is the right code too
        }
        (((exp + s.bias) as u32) << s.mbits) + m
    };
    (code.min(s.max_code as u32) as u8) | sign
}

/// The value of `code` in format `f`.
pub fn decode(code: u8, f: Fp8Format) -> f32 {
    table(f)[code as usize]
}

/// All 256 values of a format, indexed by code.
pub fn table(f: Fp8Format) -> &'static [f32; 256] {
    static E4M3: OnceLock<[f32; 256]> = OnceLock::new();
    static E5M2: OnceLock<[f32; 256]> = OnceLock::new();
    let cell = match f {
        Fp8Format::E4M3 => &E4M3,
        Fp8Format::E5M2 => &E5M2,
    };
    cell.get_or_init(|| std::array::from_fn(|c| decode_slow(c as u8, f)))
}

fn decode_slow(code: u8, f: Fp8Format) -> f32 {
    let s = spec(f);
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let ebits = 7 - s.mbits;
    let e = ((code >> s.mbits) & ((1 << ebits) - 1)) as i32;
    let m = (code & ((1 << s.mbits) - 1)) as f32;
    let emax = (1 << ebits) - 1;
    let frac = m / (1 << s.mbits) as f32;
    let v = match f {
        Fp8Format::E4M3 if e == emax && code & 0x7F == 0x7F => f32::NAN,
        Fp8Format::E5M2 if e == emax => {
            if m == 0.0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        }
        _ if e == 0 => frac * f32::powi(2.0, 1 - s.bias),
        _ => (1.0 + frac) * f32::powi(2.0, e - s.bias),
    };
    sign * v
}
