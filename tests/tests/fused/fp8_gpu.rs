//! CPU ↔ CUDA parity of the FP8 unit (`engine::fused::fp8`; kernels/src/fp8.cu and cuBLASLt),
//! skipped, saying why, without a GPU. The quantisation (one scale a row, both formats, with and
//! without column scales, f32, bf16 and f64 inputs, contiguous and strided views, values across
//! the whole range: subnormal codes, ties, saturation) gives the CPU's codes and scales bit for
//! bit, and so does the transpose of codes. The FP8 GEMMs (the primitive on the same codes,
//! `Fp8Weight::x_wt` and `g_w`, `Tensor::linear_fp8` forward and backward) agree within a
//! relative error of 1e-3 (only the order of the f32 sums differs; 1e-2 for bf16 results, which
//! round once more), at M off the multiples of 16. A NaN input gives NaN outputs in its row,
//! unsupported shapes and misaligned operands are refused with errors saying what cuBLASLt needs,
//! and products recorded into a CUDA graph replay on new inputs as they run eagerly, bit for bit.
//!
//! A NaN code's sign may differ between the devices where the NaN was made by the arithmetic
//! (`∞ · 0`: the GPU's NaN is positive, x86's negative); NaN codes are compared as NaN codes.

use engine::backend::BackendStorage;
use engine::fused::fp8::primitives::{
    self as prim, CodeDims, GemmFp8, QuantizeRows, TransposeCodes,
};
use engine::fused::Operand;
use engine::{DType, Device, Fp8Format, Fp8Weight, Layout, Storage, Tensor};
use testutil::gpu::{device as gpu, rel_err, serial};

const FORMATS: [Fp8Format; 2] = [Fp8Format::E4M3, Fp8Format::E5M2];
const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F64];

/// Non-zero values of both signs whose magnitudes span 2^-30 .. 2^10, from `seed`: with one scale
/// per row or tensor, they reach every kind of code (zero, subnormal, normal, the largest).
fn wide(n: usize, seed: u64) -> Vec<f64> {
    let v = testutil::gpu::vals(n, seed);
    v.iter()
        .enumerate()
        .map(|(i, x)| {
            let e = (engine::rng::hash(seed ^ 0xF8, i as u64) % 41) as i32 - 30;
            x * 2f64.powi(e)
        })
        .collect()
}

/// `[r, c]` values with exact ties and edge cases once multiplied by FMAX / amax = 1 (each row
/// starts with ±`fmax`, the format's largest value, so its amax): halfway between codes, subnormal
/// codes, the rounding of the largest subnormal into the smallest normal, tiny f32 subnormals,
/// signed zeros; then the same times 0.75, 0.75², ..
fn edges(fmax: f64, (r, c): (usize, usize)) -> Vec<f64> {
    let base = [
        fmax,
        1.0625,
        1.1875,
        -1.1875,
        2f64.powi(-10),
        1.5 * 2f64.powi(-9),
        2f64.powi(-11),
        7.9 * 2f64.powi(-9),
        -0.0,
        1e-40,
        -3.0 * 2f64.powi(-17),
        2f64.powi(-16),
        1.125,
        -1.375,
        2.5 * 2f64.powi(-16),
        3.5 * 2f64.powi(-16),
        57344.0 * 0.999,
        448.0 * 0.97,
        -fmax,
        0.0,
    ]
    .map(|v: f64| {
        if v.abs() > fmax {
            v.signum() * fmax * 0.999
        } else {
            v
        }
    });
    (0..r)
        .flat_map(|i| {
            let sign = if i % 2 == 1 { -1.0 } else { 1.0 };
            (0..c).map(move |j| sign * base[j % base.len()] * 0.75f64.powi((j / base.len()) as i32))
        })
        .collect()
}

/// The bytes of a u32 code storage.
fn code_bytes(s: &Storage, words: usize) -> Vec<u8> {
    s.to_f64_vec(&Layout::contiguous([words]))
        .expect("read codes")
        .iter()
        .flat_map(|&w| (w as u32).to_le_bytes())
        .collect()
}

/// NaN codes (`S.1111111` in both formats, as encoded) without their sign.
fn nan_blind(c: u8) -> u8 {
    if c & 0x7F == 0x7F {
        0x7F
    } else {
        c
    }
}

/// The first position where the codes differ (NaN codes of either sign agreeing), if any.
fn first_code_diff(want: &[u8], got: &[u8]) -> Option<String> {
    if want.len() != got.len() {
        return Some(format!("{} codes vs {}", want.len(), got.len()));
    }
    want.iter()
        .zip(got)
        .position(|(&w, &g)| nan_blind(w) != nan_blind(g))
        .map(|i| format!("code {i}: cpu {:#04x} gpu {:#04x}", want[i], got[i]))
}

/// f32 scales read back as bits (NaNs of any payload agreeing).
fn scale_bits(s: &Storage, n: usize) -> Vec<u32> {
    s.to_f64_vec(&Layout::contiguous([n]))
        .expect("read scales")
        .iter()
        .map(|&x| {
            let x = x as f32;
            if x.is_nan() {
                f32::NAN.to_bits()
            } else {
                x.to_bits()
            }
        })
        .collect()
}

/// `data` on `dev` as `dt`, viewed as `[r, c]`: contiguous, or (`strided`) the transposed view of
/// a `[c, r]` buffer holding the same values.
fn matrix(
    dev: Device,
    data: &[f64],
    (r, c): (usize, usize),
    dt: DType,
    strided: bool,
) -> (Storage, Layout) {
    if !strided {
        return (
            Storage::upload_f64(dev, data, dt).expect("upload"),
            Layout::contiguous([r, c]),
        );
    }
    let mut t = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = data[i * c + j];
        }
    }
    (
        Storage::upload_f64(dev, &t, dt).expect("upload"),
        Layout::contiguous([c, r]).transpose(0, 1),
    )
}

/// (codes, scales) of the quantisation of `data ⊙ col` `[r, c]` with one scale a row, on `dev`.
fn rows_case(
    dev: Device,
    data: &[f64],
    rc: (usize, usize),
    dt: DType,
    strided: bool,
    col: Option<&[f64]>,
    f: Fp8Format,
) -> (Vec<u8>, Vec<u32>) {
    let (s, l) = matrix(dev, data, rc, dt, strided);
    let cs = col.map(|c| Storage::upload_f64(dev, c, DType::F32).expect("upload col"));
    let cl = Layout::contiguous([rc.1]);
    let (c, sc) = prim::quantize_rows(
        QuantizeRows {
            w: Operand::new(&s, &l),
            col: cs.as_ref().map(|c| Operand::new(c, &cl)),
        },
        f,
    )
    .expect("quantize_rows");
    (code_bytes(&c, rc.0 * rc.1 / 4), scale_bits(&sc, rc.0))
}

const SHAPES: [(usize, usize); 7] = [
    (1, 64),
    (3, 96),
    (17, 256),
    (100, 64),
    (4, 4),
    (33, 1028),
    (300, 1024),
];

#[test]
fn quantisation_gives_the_cpus_codes_and_scales_bit_for_bit() {
    let _lock = serial();
    let Some(gpu) = gpu() else { return };
    let mut failures = Vec::new();
    let mut cases = 0;
    for (si, &(r, c)) in SHAPES.iter().enumerate() {
        let n = r * c;
        let inputs = [
            ("wide", wide(n, 10 + si as u64)),
            ("edges e4m3", edges(448.0, (r, c))),
            ("edges e5m2", edges(57344.0, (r, c))),
        ];
        let col: Vec<f64> = testutil::gpu::pos(c, 70 + si as u64)
            .iter()
            .map(|x| x * 3.0)
            .collect();
        for (what, data) in &inputs {
            for dt in FLOATS {
                for strided in [false, true] {
                    for f in FORMATS {
                        for col in [None, Some(&col[..])] {
                            cases += 1;
                            let name = format!(
                                "[{r}, {c}] {what} {dt}{} {f}{}",
                                if strided { " strided" } else { "" },
                                if col.is_some() { " col" } else { "" }
                            );
                            let (wc, ws) =
                                rows_case(Device::Cpu, data, (r, c), dt, strided, col, f);
                            let (gc, gs) = rows_case(gpu, data, (r, c), dt, strided, col, f);
                            if let Some(d) = first_code_diff(&wc, &gc) {
                                failures.push(format!("{name}: {d}"));
                            }
                            if let Some(i) = (0..ws.len().min(gs.len())).find(|&i| ws[i] != gs[i]) {
                                failures.push(format!(
                                    "{name}: scale {i} cpu {:e} gpu {:e}",
                                    f32::from_bits(ws[i]),
                                    f32::from_bits(gs[i])
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    eprintln!("{cases} cases, {} failures", failures.len());
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn weights_quantised_on_the_gpu_equal_the_cpus() {
    let _lock = serial();
    let Some(gpu) = gpu() else { return };
    for dt in FLOATS {
        let w = Tensor::from_f64(&wide(64 * 96, 3), [64, 96], dt, Device::Cpu).unwrap();
        let qc = Fp8Weight::quantize(&w).unwrap();
        let qg = Fp8Weight::quantize(&w.to_device(gpu).unwrap()).unwrap();
        assert_eq!(qg.device(), gpu);
        assert_eq!(
            qc.codes().to_vec_u32().unwrap(),
            qg.codes().to_vec_u32().unwrap(),
            "{dt} codes"
        );
        let bits = |t: &Tensor| {
            t.to_vec_f32()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(qc.scales()), bits(qg.scales()), "{dt} scales");
    }
}

#[test]
fn transposed_codes_equal_the_cpus() {
    let _lock = serial();
    let Some(gpu) = gpu() else { return };
    for (r, c) in [(4, 4), (64, 96), (100, 256), (36, 68), (260, 12), (8, 1028)] {
        let words: Vec<f64> = (0..r * c / 4)
            .map(|i| (engine::rng::hash(5, i as u64) as u32) as f64)
            .collect();
        let l = Layout::contiguous([r, c / 4]);
        let run = |dev: Device| {
            let s = Storage::upload_f64(dev, &words, DType::U32).unwrap();
            let t = prim::transpose_codes(
                TransposeCodes {
                    codes: Operand::new(&s, &l),
                },
                CodeDims { rows: r, cols: c },
            )
            .unwrap();
            code_bytes(&t, r * c / 4)
        };
        let (want, got) = (run(Device::Cpu), run(gpu));
        assert_eq!(want, got, "[{r}, {c}]");
        // The definition: out[j, i] = in[i, j].
        let bytes: Vec<u8> = words
            .iter()
            .flat_map(|&w| (w as u32).to_le_bytes())
            .collect();
        assert!(
            (0..r).all(|i| (0..c).all(|j| got[j * r + i] == bytes[i * c + j])),
            "[{r}, {c}]"
        );
    }
}

/// The relative error allowed for products of dtype `dt` (the sums' order differs; bf16 rounds).
fn gemm_tol(dt: DType) -> f64 {
    if dt == DType::BF16 {
        1e-2
    } else {
        1e-3
    }
}

/// Whether a relative error passes (a NaN never does).
fn within(e: f64, tol: f64) -> bool {
    e <= tol
}

/// The GEMM primitive on the CPU's codes, copied to `dev`: `a` `[m, k]` in `fa` and `b` `[n, k]`
/// in e4m3, each with its row scales, `b`'s applied (`sb`) or not, as `out`.
fn gemm_case(
    dev: Device,
    (m, n, k): (usize, usize, usize),
    fa: Fp8Format,
    sb: bool,
    out: DType,
    seed: u64,
) -> engine::Result<Vec<f64>> {
    let cpu = Device::Cpu;
    let x = Storage::upload_f64(cpu, &wide(m * k, seed), DType::F32)?;
    let w = Storage::upload_f64(cpu, &testutil::gpu::vals(n * k, seed + 1), DType::F32)?;
    let (xl, wl) = (Layout::contiguous([m, k]), Layout::contiguous([n, k]));
    let quant = |s: &Storage, l: &Layout, f: Fp8Format| {
        prim::quantize_rows(
            QuantizeRows {
                w: Operand::new(s, l),
                col: None,
            },
            f,
        )
    };
    let (a, sa) = quant(&x, &xl, fa)?;
    let (b, bs) = quant(&w, &wl, Fp8Format::E4M3)?;
    let (al, bl) = (
        Layout::contiguous([m, k / 4]),
        Layout::contiguous([n, k / 4]),
    );
    let (ml, nl) = (Layout::contiguous([m]), Layout::contiguous([n]));
    let (a, sa) = (a.to_device(&al, dev)?, sa.to_device(&ml, dev)?);
    let (b, bs) = (b.to_device(&bl, dev)?, bs.to_device(&nl, dev)?);
    let y = prim::gemm_fp8(
        GemmFp8 {
            a: Operand::new(&a, &al),
            sa: Operand::new(&sa, &ml),
            b: Operand::new(&b, &bl),
            sb: sb.then(|| Operand::new(&bs, &nl)),
        },
        CodeDims { rows: m, cols: k },
        CodeDims { rows: n, cols: k },
        fa,
        out,
    )?;
    assert_eq!(y.dtype(), out);
    y.to_f64_vec(&Layout::contiguous([m, n]))
}

#[test]
fn the_gemm_on_the_same_codes_matches_the_cpu() {
    let _lock = serial();
    let Some(gpu) = gpu() else { return };
    let mut failures = Vec::new();
    let mut cases = 0;
    for (si, &(n, k)) in [(64, 96), (96, 256), (256, 64), (16, 16)]
        .iter()
        .enumerate()
    {
        for m in [1, 3, 17, 100] {
            for fa in FORMATS {
                for sb in [false, true] {
                    for out in FLOATS {
                        cases += 1;
                        let seed = 100 * si as u64 + m as u64;
                        let name = format!("a [{m}, {k}] {fa} b [{n}, {k}] sb {sb} -> {out}");
                        match (
                            gemm_case(Device::Cpu, (m, n, k), fa, sb, out, seed),
                            gemm_case(gpu, (m, n, k), fa, sb, out, seed),
                        ) {
                            (Ok(want), Ok(got)) => {
                                let e = rel_err(&want, &got);
                                if want.iter().all(|&v| v == 0.0) || !within(e, gemm_tol(out)) {
                                    failures.push(format!("{name}: rel err {e:e}"));
                                }
                            }
                            (w, g) => failures.push(format!(
                                "{name}: cpu {:?} gpu {:?}",
                                w.err(),
                                g.err()
                            )),
                        }
                    }
                }
            }
        }
    }
    eprintln!("{cases} cases, {} failures", failures.len());
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn fp8_weight_products_and_linear_fp8_match_the_cpu() {
    let _lock = serial();
    let Some(gpu) = gpu() else { return };
    let mut failures = Vec::new();
    let f64s = |t: &Tensor| t.to_vec_f64().unwrap();
    for (si, &(out, inp)) in [(64, 96), (96, 256), (256, 64)].iter().enumerate() {
        for dt in FLOATS {
            let w = Tensor::from_f64(
                &testutil::gpu::vals(out * inp, 7 + si as u64),
                [out, inp],
                dt,
                Device::Cpu,
            )
            .unwrap();
            let qc = Fp8Weight::quantize(&w).unwrap();
            let qg = Fp8Weight::quantize(&w.to_device(gpu).unwrap()).unwrap();
            for m in [1, 3, 17, 100] {
                let name = format!("W [{out}, {inp}] {dt} M {m}");
                let seed = 1000 * si as u64 + m as u64;
                let x = Tensor::from_f64(&wide(m * inp, seed), [m, inp], dt, Device::Cpu).unwrap();
                let g = Tensor::from_f64(
                    &testutil::gpu::vals(m * out, seed + 1),
                    [m, out],
                    dt,
                    Device::Cpu,
                )
                .unwrap();
                let (xg, gg) = (x.to_device(gpu).unwrap(), g.to_device(gpu).unwrap());
                let y = (qc.x_wt(&x).unwrap(), qg.x_wt(&xg).unwrap());
                let dx = (qc.g_w(&g).unwrap(), qg.g_w(&gg).unwrap());
                assert_eq!((y.1.dims(), y.1.dtype()), (&[m, out][..], dt));
                assert_eq!((dx.1.dims(), dx.1.dtype()), (&[m, inp][..], dt));
                for (what, (c, g)) in [("x_wt", y), ("g_w", dx)] {
                    let e = rel_err(&f64s(&c), &f64s(&g));
                    if !within(e, gemm_tol(dt)) {
                        failures.push(format!("{name} {what}: rel err {e:e}"));
                    }
                }
                // Tensor::linear_fp8 on [2, m, in]: the value and the input's gradient.
                let run = |q: &Fp8Weight, dev: Device| {
                    let x3 = Tensor::from_f64(&wide(2 * m * inp, seed + 2), [2, m, inp], dt, dev)
                        .unwrap()
                        .to_var()
                        .unwrap();
                    let g3 = Tensor::from_f64(
                        &testutil::gpu::vals(2 * m * out, seed + 3),
                        [2, m, out],
                        dt,
                        dev,
                    )
                    .unwrap();
                    let y3 = x3.linear_fp8(q).unwrap();
                    engine::backward_many(&[(y3.clone(), g3)]).unwrap();
                    (f64s(&y3), f64s(&x3.grad().unwrap()))
                };
                let (yc, dxc) = run(&qc, Device::Cpu);
                let (yg, dxg) = run(&qg, gpu);
                for (what, c, g) in [("linear_fp8", yc, yg), ("linear_fp8 backward", dxc, dxg)] {
                    let e = rel_err(&c, &g);
                    if !within(e, gemm_tol(dt)) {
                        failures.push(format!("{name} {what}: rel err {e:e}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Whether every value of row `r` of `v` (rows of `n`) is NaN, and every other row's is finite.
fn only_row_nan(v: &[f64], n: usize, r: usize) -> bool {
    v.chunks(n).enumerate().all(|(i, row)| {
        row.iter()
            .all(|y| if i == r { y.is_nan() } else { y.is_finite() })
    })
}

#[test]
fn a_nan_reaches_the_outputs_of_its_row_on_the_gpu() {
    let _lock = serial();
    let Some(gpu) = gpu() else { return };
    let (out, inp, m) = (32, 64, 5);
    let w = Tensor::from_f64(
        &testutil::gpu::vals(out * inp, 1),
        [out, inp],
        DType::F32,
        gpu,
    )
    .unwrap();
    let q = Fp8Weight::quantize(&w).unwrap();
    // In x's row 2: that row of x Wᵀ is NaN, the others (scales of their own) are not.
    let mut xv = testutil::gpu::vals(m * inp, 2);
    xv[2 * inp + 7] = f64::NAN;
    let x = Tensor::from_f64(&xv, [m, inp], DType::F32, gpu).unwrap();
    let y = q.x_wt(&x).unwrap().to_vec_f64().unwrap();
    assert!(only_row_nan(&y, out, 2), "x_wt: {y:?}");
    // In g's row 4 (bf16): that row of g W.
    let mut gv = testutil::gpu::vals(m * out, 3);
    gv[4 * out + 3] = f64::NAN;
    let g = Tensor::from_f64(&gv, [m, out], DType::BF16, gpu).unwrap();
    let qb = Fp8Weight::quantize(&w.to_dtype(DType::BF16).unwrap()).unwrap();
    let dx = qb.g_w(&g).unwrap().to_vec_f64().unwrap();
    assert!(only_row_nan(&dx, inp, 4), "g_w: {dx:?}");
    // In the weight's row 5: its scale, so output column 5 of every row.
    let mut wv = testutil::gpu::vals(out * inp, 4);
    wv[5 * inp + 9] = f64::NAN;
    let qn =
        Fp8Weight::quantize(&Tensor::from_f64(&wv, [out, inp], DType::F32, gpu).unwrap()).unwrap();
    assert!(qn.scales().to_vec_f32().unwrap()[5].is_nan());
    let x = Tensor::from_f64(&testutil::gpu::vals(m * inp, 5), [m, inp], DType::F32, gpu).unwrap();
    let y = qn.x_wt(&x).unwrap().to_vec_f64().unwrap();
    for r in 0..m {
        for o in 0..out {
            assert_eq!(
                y[r * out + o].is_nan(),
                o == 5,
                "row {r} col {o}: {}",
                y[r * out + o]
            );
        }
    }
}

#[test]
fn shapes_cublaslt_cannot_take_are_refused_with_what_it_needs() {
    let _lock = serial();
    let Some(gpu) = gpu() else { return };
    // Dims that are multiples of 4 (enough on the CPU) but not of 16.
    let w = Tensor::from_f64(&testutil::gpu::vals(20 * 64, 1), [20, 64], DType::F32, gpu).unwrap();
    let q = Fp8Weight::quantize(&w).unwrap();
    let x = Tensor::from_f64(&testutil::gpu::vals(3 * 64, 2), [3, 64], DType::F32, gpu).unwrap();
    let e = q.x_wt(&x).unwrap_err().to_string();
    assert!(e.contains("multiples of 16") && !e.contains('\n'), "{e}");
    // A code view that starts 4 bytes into its buffer.
    let (m, n, k) = (2, 16, 16);
    let words: Vec<f64> = (0..1 + m * k / 4)
        .map(|i| f64::from(0x3838_3838u32 + i as u32 % 2))
        .collect();
    let a = Storage::upload_f64(gpu, &words, DType::U32).unwrap();
    let al = Layout::new([m, k / 4].into(), vec![k / 4, 1], 1);
    let b =
        Storage::upload_f64(gpu, &vec![f64::from(0x3838_3838u32); n * k / 4], DType::U32).unwrap();
    let bl = Layout::contiguous([n, k / 4]);
    let sa = Storage::upload_f64(gpu, &vec![1.0; m], DType::F32).unwrap();
    let ml = Layout::contiguous([m]);
    let e = prim::gemm_fp8(
        GemmFp8 {
            a: Operand::new(&a, &al),
            sa: Operand::new(&sa, &ml),
            b: Operand::new(&b, &bl),
            sb: None,
        },
        CodeDims { rows: m, cols: k },
        CodeDims { rows: n, cols: k },
        Fp8Format::E4M3,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("16-byte aligned"), "{e}");
}

#[test]
fn a_product_recorded_in_a_cuda_graph_replays_as_it_runs_eagerly() {
    use engine::backend::cuda::{capture, CudaDevice};
    let _lock = serial();
    let Some(gpu) = gpu() else { return };
    let Device::Cuda(ordinal) = gpu else {
        unreachable!("a GPU test")
    };
    let dev = CudaDevice::get(ordinal).unwrap();
    let (out, inp, m) = (64, 96, 17);
    let w = Tensor::from_f64(
        &testutil::gpu::vals(out * inp, 1),
        [out, inp],
        DType::F32,
        gpu,
    )
    .unwrap();
    let q = Fp8Weight::quantize(&w).unwrap();
    let x = Tensor::from_f64(&wide(m * inp, 2), [m, inp], DType::F32, gpu).unwrap();
    let g = Tensor::from_f64(&testutil::gpu::vals(m * out, 3), [m, out], DType::F32, gpu).unwrap();
    // Eagerly first: kernels load, the cuBLASLt handle and the shapes' algorithms are made.
    q.x_wt(&x).unwrap();
    q.g_w(&g).unwrap();
    let (graph, (y, dx)) = capture(&dev, || Ok((q.x_wt(&x)?, q.g_w(&g)?))).unwrap();
    let bits = |t: &Tensor| {
        t.to_vec_f32()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    for seed in [10, 11] {
        x.assign(&Tensor::from_f64(&wide(m * inp, seed), [m, inp], DType::F32, gpu).unwrap())
            .unwrap();
        g.assign(
            &Tensor::from_f64(
                &testutil::gpu::vals(m * out, seed + 1),
                [m, out],
                DType::F32,
                gpu,
            )
            .unwrap(),
        )
        .unwrap();
        graph.replay().unwrap();
        assert_eq!(bits(&y), bits(&q.x_wt(&x).unwrap()), "x_wt, inputs {seed}");
        assert_eq!(bits(&dx), bits(&q.g_w(&g).unwrap()), "g_w, inputs {seed}");
        // And against the CPU.
        let qc = Fp8Weight::quantize(&w.to_device(Device::Cpu).unwrap()).unwrap();
        let want = qc
            .x_wt(&x.to_device(Device::Cpu).unwrap())
            .unwrap()
            .to_vec_f64()
            .unwrap();
        let e = rel_err(&want, &y.to_vec_f64().unwrap());
        assert!(e <= 1e-3, "replayed x_wt vs the CPU: rel err {e:e}");
    }
}
