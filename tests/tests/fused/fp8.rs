//! The FP8 unit (`engine::fused::fp8`): the two formats' codes against their definition, the
//! per-row weight quantisation, the products `x Wᵀ` and `g W` against the formulas of the unit's
//! doc recomputed here from the codes in f64, against the dense products within FP8's error,
//! `Tensor::linear_fp8`'s gradient, NaN propagation and typed errors. The CPU ↔ CUDA parity is
//! in `fp8_gpu.rs`.
//!
//! The op is not the derivative of a smooth function (its input is rounded to 8 bits), so its
//! gradient is checked against its definition (`g W` through e5m2), not by finite differences.

use engine::fused::fp8::{decode, encode};
use engine::{DType, Device, Fp8Format, Fp8Weight, FrozenWeight, Tensor};
use testutil::rel_err;

/// Standard normal values in f32.
fn randn(shape: &[usize], seed: u64) -> Tensor {
    testutil::randn(shape, seed).to_dtype(DType::F32).unwrap()
}

const FORMATS: [Fp8Format; 2] = [Fp8Format::E4M3, Fp8Format::E5M2];

/// The value of every code that is a number.
fn finite_codes(f: Fp8Format) -> impl Iterator<Item = (u8, f32)> {
    (0..=255u8)
        .map(move |c| (c, decode(c, f)))
        .filter(|(_, v)| v.is_finite())
}

#[test]
fn every_code_decodes_and_encodes_back_to_itself() {
    for f in FORMATS {
        let n = finite_codes(f).count();
        // e4m3: 256 − 2 NaNs; e5m2: 256 − 2 infinities − 6 NaNs.
        assert_eq!(n, if f == Fp8Format::E4M3 { 254 } else { 248 }, "{f}");
        for (c, v) in finite_codes(f) {
            assert_eq!(encode(v, f), c, "{f} code {c:#04x} = {v}");
        }
    }
}

#[test]
fn known_values_of_both_formats() {
    let e4 = Fp8Format::E4M3;
    let e5 = Fp8Format::E5M2;
    assert_eq!(decode(0x7E, e4), 448.0);
    assert_eq!(decode(0x38, e4), 1.0);
    assert_eq!(decode(0x01, e4), 2f32.powi(-9));
    assert_eq!(decode(0x08, e4), 2f32.powi(-6));
    assert!(decode(0x7F, e4).is_nan() && decode(0xFF, e4).is_nan());
    assert_eq!(decode(0x7B, e5), 57344.0);
    assert_eq!(decode(0x3C, e5), 1.0);
    assert_eq!(decode(0x01, e5), 2f32.powi(-16));
    assert_eq!(decode(0x7C, e5), f32::INFINITY);
    assert_eq!(decode(0xFC, e5), f32::NEG_INFINITY);
    assert!(decode(0x7D, e5).is_nan());
    assert_eq!(decode(0x80, e4).to_bits(), (-0.0f32).to_bits());
}

#[test]
fn encoding_rounds_to_nearest_even_and_saturates() {
    let e4 = Fp8Format::E4M3;
    // Ties between neighbours go to the even mantissa.
    assert_eq!(encode(1.0625, e4), 0x38); // 1 and 1.125: to 1
    assert_eq!(encode(1.1875, e4), 0x3A); // 1.125 and 1.25: to 1.25
    assert_eq!(encode(1.0626, e4), 0x39);
    assert_eq!(encode(-1.1875, e4), 0xBA);
    // Subnormals: 2^-10 is half the smallest, a tie with 0.
    assert_eq!(encode(2f32.powi(-10), e4), 0x00);
    assert_eq!(encode(1.5 * 2f32.powi(-9), e4), 0x02);
    assert_eq!(encode(2f32.powi(-11), e4), 0x00);
    // The largest subnormal rounds up into the smallest normal.
    assert_eq!(encode(7.9 * 2f32.powi(-9), e4), 0x08);
    // Saturation, never NaN or infinity from a number.
    for (f, max) in [(e4, 0x7E), (Fp8Format::E5M2, 0x7B)] {
        assert_eq!(encode(1e9, f), max, "{f}");
        assert_eq!(encode(f32::INFINITY, f), max, "{f}");
        assert_eq!(encode(f32::NEG_INFINITY, f), max | 0x80, "{f}");
        assert!(decode(encode(f32::NAN, f), f).is_nan(), "{f}");
    }
    assert_eq!(encode(464.0, e4), 0x7E); // the tie between 448 and (non-existent) 480
}

#[test]
fn encoding_picks_the_nearest_code() {
    for f in FORMATS {
        let vals: Vec<(u8, f32)> = finite_codes(f).collect();
        let max = f.max_finite();
        for i in 0..20_000u64 {
            let u = engine::rng::uniform(91, i) as f32;
            let mag = (2.0 * (u - 0.5)) * max * 1.01 * (engine::rng::uniform(92, i) as f32).powi(6);
            let got = decode(encode(mag, f), f);
            let best = vals
                .iter()
                .map(|&(_, v)| (v - mag).abs())
                .fold(f32::INFINITY, f32::min);
            assert!(
                (got - mag).abs() <= best || (mag.abs() > max && got.abs() == max),
                "{f}: {mag} encodes to {got}, nearest is {best} away"
            );
        }
    }
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec_f64().unwrap()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    t.to_vec_u32()
        .unwrap()
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// `v` `[m, k]` quantised in `f` with one scale a row, then decoded: (values, scales), as the
/// unit's doc defines it.
fn quant_ref(v: &[f64], k: usize, f: Fp8Format) -> (Vec<f64>, Vec<f64>) {
    let mut d = Vec::with_capacity(v.len());
    let mut scales = Vec::new();
    for row in v.chunks(k) {
        let v32: Vec<f32> = row.iter().map(|&x| x as f32).collect();
        let amax = v32.iter().fold(0f32, |m, x| m.max(x.abs()));
        let (scale, inv) = if amax == 0.0 {
            (1.0, 1.0)
        } else {
            (amax / f.max_finite(), f.max_finite() / amax)
        };
        d.extend(v32.iter().map(|&x| decode(encode(x * inv, f), f) as f64));
        scales.push(scale as f64);
    }
    (d, scales)
}

#[test]
fn weights_quantise_row_by_row_within_e4m3_rounding() {
    let (out, inp) = (12, 40);
    // Rows of very different magnitudes: one scale each keeps every row's precision.
    let w = randn(&[out, inp], 3)
        .mul(
            &Tensor::from_vec(
                (0..out).map(|o| 10f32.powi(o as i32 - 6)).collect(),
                [out, 1],
                Device::Cpu,
            )
            .unwrap(),
        )
        .unwrap();
    let q = Fp8Weight::quantize(&w).unwrap();
    assert_eq!(q.dims(), [out, inp]);
    assert_eq!(q.codes().dims(), &[out, inp / 4]);
    assert_eq!(q.codes().dtype(), DType::U32);
    assert_eq!(q.bytes(), out * inp + 4 * out);
    let wv = f64s(&w);
    let scales = f64s(q.scales());
    let codes = bytes(q.codes());
    let back = f64s(&q.dequantize().unwrap());
    for o in 0..out {
        let row = &wv[o * inp..(o + 1) * inp];
        let amax = row.iter().fold(0f64, |m, x| m.max(x.abs()));
        assert!(
            (scales[o] - amax / 448.0).abs() <= 1e-6 * scales[o],
            "row {o}"
        );
        for i in 0..inp {
            let x = row[i];
            let c = codes[o * inp + i];
            assert_eq!(
                back[o * inp + i],
                (decode(c, Fp8Format::E4M3) * scales[o] as f32) as f64
            );
            // 3 mantissa bits: half an ulp is 1/16 of the value (or of the smallest normal).
            let err = (back[o * inp + i] - x).abs();
            assert!(
                err <= x.abs() / 16.0 + scales[o] * 2f64.powi(-10),
                "row {o} col {i}: {x} -> {}",
                back[o * inp + i]
            );
        }
    }
    // An all-zero row gets scale 1 and zero codes.
    let z = Fp8Weight::quantize(&Tensor::zeros([4, 8], DType::F32, Device::Cpu).unwrap()).unwrap();
    assert_eq!(f64s(z.scales()), vec![1.0; 4]);
    assert!(bytes(z.codes()).iter().all(|&c| c == 0));
}

/// `y = diag(s_x) · dec(x_q) dec(W_q)ᵀ · diag(s_w)` in f64 from the codes.
fn forward_ref(x: &[f64], m: usize, q: &Fp8Weight) -> Vec<f64> {
    let [out, inp] = q.dims();
    let (xd, sx) = quant_ref(x, inp, Fp8Format::E4M3);
    let wc = bytes(q.codes());
    let sw = f64s(q.scales());
    let mut y = vec![0.0; m * out];
    for r in 0..m {
        for o in 0..out {
            let dot: f64 = (0..inp)
                .map(|i| xd[r * inp + i] * decode(wc[o * inp + i], Fp8Format::E4M3) as f64)
                .sum();
            y[r * out + o] = dot * sx[r] * sw[o];
        }
    }
    y
}

/// `dx = diag(s_g) · dec(g_q) dec(W_q)` with `g_q = quant_e5m2(g · s_w)`, in f64 from the codes.
fn backward_ref(g: &[f64], m: usize, q: &Fp8Weight) -> Vec<f64> {
    let [out, inp] = q.dims();
    let sw = f64s(q.scales());
    let gs: Vec<f64> = (0..m * out)
        .map(|i| (g[i] as f32 * sw[i % out] as f32) as f64)
        .collect();
    let (gd, sg) = quant_ref(&gs, out, Fp8Format::E5M2);
    let wc = bytes(q.codes());
    let mut dx = vec![0.0; m * inp];
    for r in 0..m {
        for i in 0..inp {
            let dot: f64 = (0..out)
                .map(|o| gd[r * out + o] * decode(wc[o * inp + i], Fp8Format::E4M3) as f64)
                .sum();
            dx[r * inp + i] = dot * sg[r];
        }
    }
    dx
}

#[test]
fn products_follow_their_definition_and_stay_near_the_dense_ones() {
    for (m, out, inp) in [(1, 8, 4), (7, 12, 20), (33, 64, 48)] {
        let w = randn(&[out, inp], 10 + m as u64);
        let x = randn(&[m, inp], 20 + m as u64);
        let g = randn(&[m, out], 30 + m as u64).affine(1e-3, 0.0).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let q = Fp8Weight::quantize(&w.to_dtype(dtype).unwrap()).unwrap();
            assert_eq!(q.dtype(), dtype);
            let (xd, gd) = (x.to_dtype(dtype).unwrap(), g.to_dtype(dtype).unwrap());
            let y = q.x_wt(&xd).unwrap();
            let dx = q.g_w(&gd).unwrap();
            assert_eq!((y.dims(), y.dtype()), (&[m, out][..], dtype));
            assert_eq!((dx.dims(), dx.dtype()), (&[m, inp][..], dtype));
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            let (yr, dxr) = (
                forward_ref(&f64s(&xd), m, &q),
                backward_ref(&f64s(&gd), m, &q),
            );
            assert!(
                rel_err(&f64s(&y), &yr) < tol,
                "{dtype} {m}x{out}x{inp} forward"
            );
            assert!(
                rel_err(&f64s(&dx), &dxr) < tol,
                "{dtype} {m}x{out}x{inp} backward"
            );
            // Against the dense f32 products: FP8's relative error, a few percent.
            let dense_y = f64s(&x.matmul(&w.t().unwrap()).unwrap());
            let dense_dx = f64s(&g.matmul(&w).unwrap());
            assert!(
                rel_err(&f64s(&y), &dense_y) < 0.06,
                "{dtype} {m}x{out}x{inp} vs dense y: {}",
                rel_err(&f64s(&y), &dense_y)
            );
            assert!(
                rel_err(&f64s(&dx), &dense_dx) < 0.12,
                "{dtype} {m}x{out}x{inp} vs dense dx: {}",
                rel_err(&f64s(&dx), &dense_dx)
            );
        }
    }
}

#[test]
fn linear_fp8_has_the_products_as_value_and_gradient() {
    let (out, inp) = (16, 24);
    let w = randn(&[out, inp], 5);
    let q = Fp8Weight::quantize(&w).unwrap();
    let x = randn(&[2, 3, inp], 6).to_var().unwrap();
    let y = x.linear_fp8(&q).unwrap();
    assert_eq!(y.dims(), &[2, 3, out]);
    let x2 = x.detach().reshape([6, inp]).unwrap();
    assert_eq!(f64s(&y), f64s(&q.x_wt(&x2).unwrap()));
    let g = randn(&[2, 3, out], 7);
    engine::backward_many(&[(y.clone(), g.clone())]).unwrap();
    let dx = x.grad().unwrap();
    assert_eq!(dx.dims(), &[2, 3, inp]);
    assert_eq!(
        f64s(&dx),
        f64s(&q.g_w(&g.reshape([6, out]).unwrap()).unwrap())
    );
    // The frozen-weight wrapper gives the same, dense or FP8.
    let fw = FrozenWeight::Dense(w.clone()).to_fp8().unwrap();
    assert_eq!(f64s(&fw.linear(&x2).unwrap()), f64s(&q.x_wt(&x2).unwrap()));
    let dense = FrozenWeight::from(w.clone());
    assert_eq!(
        f64s(&dense.linear(&x2).unwrap()),
        f64s(&x2.matmul(&w.t().unwrap()).unwrap())
    );
    assert_eq!(dense.bytes(), out * inp * 4);
    assert_eq!(fw.bytes(), out * inp + out * 4);
}

#[test]
fn a_nan_input_gives_nan_outputs_in_its_row() {
    let q = Fp8Weight::quantize(&randn(&[8, 8], 1)).unwrap();
    let mut v = randn(&[3, 8], 2).to_vec_f32().unwrap();
    v[13] = f32::NAN; // row 1
    let x = Tensor::from_vec(v, [3, 8], Device::Cpu).unwrap();
    // The NaN's row is NaN; the other rows, with scales of their own, are not touched.
    let y = f64s(&q.x_wt(&x).unwrap());
    assert!(y[..8].iter().all(|y| y.is_finite()), "{y:?}");
    assert!(y[8..16].iter().all(|y| y.is_nan()), "{y:?}");
    assert!(y[16..].iter().all(|y| y.is_finite()), "{y:?}");
    let mut g = randn(&[3, 8], 3).to_vec_f32().unwrap();
    g[17] = f32::INFINITY; // row 2
    let g = Tensor::from_vec(g, [3, 8], Device::Cpu).unwrap();
    let dx = f64s(&q.g_w(&g).unwrap());
    assert!(dx[16..].iter().any(|y| y.is_nan()), "{dx:?}");
    assert!(dx[..16].iter().all(|y| y.is_finite()), "{dx:?}");
}

#[test]
fn bad_shapes_and_dtypes_are_refused_in_one_line() {
    let e = Fp8Weight::quantize(&randn(&[8, 6], 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[8, 6]") && e.contains("multiples of 4"), "{e}");
    let e = Fp8Weight::quantize(&Tensor::zeros([8], DType::F32, Device::Cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(!e.contains('\n'), "{e}");
    let q = Fp8Weight::quantize(&randn(&[8, 12], 1)).unwrap();
    let e = q.x_wt(&randn(&[3, 8], 2)).unwrap_err().to_string();
    assert!(e.contains("[3, 8]") && e.contains("[8, 12]"), "{e}");
    let e = q
        .x_wt(&randn(&[3, 12], 2).to_dtype(DType::BF16).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.to_lowercase().contains("bf16") && e.to_lowercase().contains("f32"),
        "{e}"
    );
    let e = randn(&[3, 8], 2).linear_fp8(&q).unwrap_err().to_string();
    assert!(e.contains("[3, 8]"), "{e}");
    let fw = FrozenWeight::Fp8(q);
    let e = fw.dense_for("--moe-impl naive").unwrap_err().to_string();
    assert!(e.contains("--moe-impl naive") && e.contains("FP8"), "{e}");
}

#[test]
fn a_row_below_the_smallest_scale_counts_as_zero() {
    // FMAX / amax would overflow for amax below about 1e-34: such a row is zeros, not NaN.
    let tiny = 1e-36f32;
    let mut v = vec![tiny, -tiny, 0.0, tiny / 2.0, 1.0, -2.0, 0.5, 0.25];
    v.extend([1.0; 8]); // two more rows: the weight's dims are multiples of 4
    let x = Tensor::from_vec(v, [4, 4], Device::Cpu).unwrap();
    let q = Fp8Weight::quantize(&x).unwrap();
    assert_eq!(f64s(q.scales())[0], 1.0);
    assert!(bytes(q.codes())[..4].iter().all(|&c| c & 0x7F == 0));
    let back = f64s(&q.dequantize().unwrap());
    assert_eq!(&back[..4], &[0.0; 4]);
    assert_eq!(&back[4..8], &[1.0, -2.0, 0.5, 0.25]);
    let y = f64s(&q.x_wt(&x).unwrap());
    assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
}
