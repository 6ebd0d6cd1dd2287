//! The fused MixLoRA FFN's tile primitives on the CPU: what the op runs there, for every size and
//! dtype. Tokens are split into tiles of [`TILE_TOKENS`], one rayon task each; inside a tile the
//! slots are grouped by expert, and every rank-r product of a group is one small GEMM of the
//! `gemm` crate (the CPU backend's matmul) against that expert's block of `B_g,all`, `B_u,all`
//! or `A_d,all`. Between the GEMMs one fused elementwise pass over the tile's slots does the
//! SwiGLU (or its backward), the dropout mask on `a_j` and the sums over a token's slots, so no
//! `[T·k, I]` tensor is ever written: a tile's `[slots, I]` scratch lives in its task.
//!
//! Everything computes in `C` (f64 under an f64 base, else f32); base operands are widened on
//! read (borrowed without a copy where they already are `C` with unit column stride) and results
//! rounded once on write. The rank-r products run at rank r, not over the `E·r` block codes of
//! the block-code GEMMs, which spend E times their multiply-adds on zeros. The backward's tile
//! passes are in `backward.rs`.

use std::borrow::Cow;

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::cpu::{check_len, is_f64, read, read_ids, MoeFloat, Op};
use super::primitives::{MoeDims, TileRowGrads, TilesBackward, TilesForward};
use crate::backend::cpu::{simd, CpuStorage};
use crate::backend::BackendStorage;
use crate::{rng, Result};

mod backward;
pub(in crate::fused::moe_ffn) use backward::{backward, cols, rows};

/// Tokens per task: 64 tokens give each of 8 experts some 16 slots per GEMM at top-2, and their
/// `[slots, I]` scratch stays within a core's cache at small `I`.
const TILE_TOKENS: usize = 64;

/// The CPU serves every size.
pub(super) fn supported(_: &MoeDims) -> bool {
    true
}

/// `n`-element rows of a `[rows, n]` operand: borrowed when it is `C` with unit column stride
/// (a row stride allowed), else a contiguous copy in `C`.
struct Rows<'a, C: Clone> {
    data: Cow<'a, [C]>,
    off: usize,
    stride: usize,
    n: usize,
}

impl<'a, C: MoeFloat> Rows<'a, C> {
    fn new(op: &'static str, a: Op<'a>, rows: usize, n: usize) -> Result<Self> {
        let l = a.l;
        if let Some(s) = C::slice(a.s) {
            let unit_cols = n <= 1 || l.strides()[1] == 1;
            if l.dims() == [rows, n] && unit_cols && l.max_extent() <= s.len() {
                let stride = if rows > 1 { l.strides()[0] } else { n };
                return Ok(Rows {
                    data: Cow::Borrowed(s),
                    off: l.offset(),
                    stride,
                    n,
                });
            }
        }
        let v = read::<C>(op, a)?;
        check_len(op, v.len(), rows * n)?;
        Ok(Rows {
            data: Cow::Owned(v),
            off: 0,
            stride: n,
            n,
        })
    }

    #[inline(always)]
    fn row(&self, t: usize) -> &[C] {
        let a = self.off + t * self.stride;
        &self.data[a..a + self.n]
    }
}

/// The operands of the tile primitives in `C`, checked.
struct Ctx<'a, C: MoeFloat> {
    d: MoeDims,
    g: Rows<'a, C>,             // [T, I]
    u: Rows<'a, C>,             // [T, I]
    cg: Vec<C>,                 // [T·k, r]
    cu: Vec<C>,                 // [T·k, r]
    ids: Vec<u32>,              // [T, k]
    bg: Vec<C>,                 // [I, E·r]
    bu: Vec<C>,                 // [I, E·r]
    ad: Vec<C>,                 // [E·r, I]
    w: Vec<C>,                  // [T, k]
    cd: Vec<C>,                 // [T·k, r] (backward only)
    dabar: Option<Rows<'a, C>>, // [T, I] (backward only)
}

/// The operands every tile primitive reads.
struct Common<'a> {
    g: Op<'a>,
    u: Op<'a>,
    cg: Op<'a>,
    cu: Op<'a>,
    ids: Op<'a>,
    bg: Op<'a>,
    bu: Op<'a>,
    ad: Op<'a>,
    w: Op<'a>,
}

impl<'a, C: MoeFloat> Ctx<'a, C> {
    fn new(
        op: &'static str,
        o: Common<'a>,
        cd: Option<Op<'a>>,
        dabar: Option<Op<'a>>,
        d: &MoeDims,
    ) -> Result<Self> {
        let (t, k, r, i, er) = (d.t, d.k, d.r, d.i, d.e * d.r);
        let c = Ctx {
            d: *d,
            g: Rows::new(op, o.g, t, i)?,
            u: Rows::new(op, o.u, t, i)?,
            cg: read(op, o.cg)?,
            cu: read(op, o.cu)?,
            ids: read_ids(op, o.ids, d.e)?,
            bg: read(op, o.bg)?,
            bu: read(op, o.bu)?,
            ad: read(op, o.ad)?,
            w: read(op, o.w)?,
            cd: cd.map(|a| read(op, a)).transpose()?.unwrap_or_default(),
            dabar: dabar.map(|a| Rows::new(op, a, t, i)).transpose()?,
        };
        for (n, want) in [
            (c.cg.len(), t * k * r),
            (c.cu.len(), t * k * r),
            (c.ids.len(), t * k),
            (c.bg.len(), i * er),
            (c.bu.len(), i * er),
            (c.ad.len(), er * i),
            (c.w.len(), t * k),
        ] {
            check_len(op, n, want)?;
        }
        if cd.is_some() {
            check_len(op, c.cd.len(), t * k * r)?;
        }
        Ok(c)
    }
}

/// The slots of one tile grouped by expert: `order[q]` is the tile-local slot at sorted position
/// `q`, and each `(e, start, len)` a run of expert `e`'s slots in `order`.
struct Groups {
    order: Vec<usize>,
    runs: Vec<(usize, usize, usize)>,
}

fn by_expert(ids: &[u32], e: usize) -> Groups {
    let mut count = vec![0usize; e + 1];
    for &x in ids {
        count[x as usize + 1] += 1;
    }
    for x in 0..e {
        count[x + 1] += count[x];
    }
    let runs = (0..e)
        .filter(|&x| count[x + 1] > count[x])
        .map(|x| (x, count[x], count[x + 1] - count[x]))
        .collect();
    let mut order = vec![0; ids.len()];
    for (p, &x) in ids.iter().enumerate() {
        order[count[x as usize]] = p;
        count[x as usize] += 1;
    }
    Groups { order, runs }
}

/// `σ(x)` by the backend's vectorisable `exp` ([`crate::backend::cpu::CpuFloat::fast_exp`]).
#[inline(always)]
fn fast_sigmoid<C: MoeFloat>(x: C) -> C {
    C::one() / (C::one() + (-x).fast_exp())
}

/// `(a, dg, du)` of one slot at one column, as `cpu::slot_grads` with [`fast_sigmoid`].
#[inline(always)]
fn fast_slot_grads<C: MoeFloat>(g: C, u: C, wda: C, ad_dz: C, m: C) -> (C, C, C) {
    let sg = fast_sigmoid(g);
    let silu = g * sg;
    let da = wda + m * ad_dz;
    let dg = da * u * sg * (C::one() + g * (C::one() - sg));
    (silu * u, dg, da * silu)
}

/// A matrix operand of [`product`]: its elements and their row and column strides.
#[derive(Clone, Copy)]
struct Mat<'a, C> {
    v: &'a [C],
    rs: usize,
    cs: usize,
}

/// `dst[m, n]` (row stride `dst_rs`, unit columns) `= lhs[m, kk] · rhs[kk, n]`, or `+=` that
/// with `acc`, by the `gemm` crate on this thread.
#[allow(clippy::too_many_arguments)]
fn product<C: MoeFloat>(
    m: usize,
    n: usize,
    kk: usize,
    dst: &mut [C],
    dst_rs: usize,
    acc: bool,
    lhs: Mat<'_, C>,
    rhs: Mat<'_, C>,
) {
    if m == 0 || n == 0 {
        return;
    }
    // The views must lie inside their slices: the gemm call below reads and writes through raw
    // pointers.
    assert!(
        (m - 1) * dst_rs + n <= dst.len(),
        "product: dst out of range"
    );
    if kk > 0 {
        assert!(
            (m - 1) * lhs.rs + (kk - 1) * lhs.cs < lhs.v.len(),
            "product: lhs out of range"
        );
        assert!(
            (kk - 1) * rhs.rs + (n - 1) * rhs.cs < rhs.v.len(),
            "product: rhs out of range"
        );
    }
    // SAFETY: the three views were checked to lie inside their slices; `dst` is borrowed
    // mutably and does not alias `lhs` or `rhs` (shared borrows).
    unsafe {
        gemm(
            m,
            n,
            kk,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            lhs.v.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.v.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            if acc { C::one() } else { C::zero() },
            C::one(),
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// The dropout multipliers of slot `p` (among all the op's slots: `t0·k` plus the chunk's) on
/// its `I` elements, bit for bit `rng::dropped` per element (one hash per four elements).
fn mask_row<C: MoeFloat>(d: &MoeDims, p: usize, out: &mut [C]) {
    if d.dropout == 0.0 {
        out.fill(C::one());
        return;
    }
    let thr = rng::dropout_threshold(d.dropout);
    let kept = C::from(1.0 / (1.0 - d.dropout)).unwrap_or_else(C::one);
    let base = ((d.t0 * d.k + p) * d.i) as u64;
    let (mut group, mut h) = (u64::MAX, 0u64);
    for (i, m) in out.iter_mut().enumerate() {
        let idx = base + i as u64;
        if idx >> 2 != group {
            group = idx >> 2;
            h = rng::hash(d.seed, group);
        }
        let bits = ((h >> ((idx & 3) * 16)) & 0xFFFF) as u32;
        *m = if bits < thr { C::zero() } else { kept };
    }
}

/// One tile's slots `[p_a, p_a + n)` in expert order: their codes out of `src` `[T·k, r]` into
/// `codes` `[n, r]`.
fn gather_rows<C: MoeFloat>(src: &[C], r: usize, p_a: usize, order: &[usize], codes: &mut [C]) {
    for (q, &pl) in order.iter().enumerate() {
        let p = p_a + pl;
        codes[q * r..(q + 1) * r].copy_from_slice(&src[p * r..(p + 1) * r]);
    }
}

/// Rows `[n, r]` in expert order back to the tile's slot order in `out`.
fn scatter_rows<C: MoeFloat>(rows: &[C], r: usize, order: &[usize], out: &mut [C]) {
    for (q, &pl) in order.iter().enumerate() {
        out[pl * r..(pl + 1) * r].copy_from_slice(&rows[q * r..(q + 1) * r]);
    }
}

/// `out[q] = codes[q] · B_eᵀ` `[n, I]` for each expert run, `b` = `B_all` `[I, E·r]`.
fn expand<C: MoeFloat>(d: &MoeDims, g: &Groups, codes: &[C], b: &[C], out: &mut [C]) {
    let (r, ni, er) = (d.r, d.i, d.e * d.r);
    for &(e, s, len) in &g.runs {
        product(
            len,
            ni,
            r,
            &mut out[s * ni..(s + len) * ni],
            ni,
            false,
            Mat {
                v: &codes[s * r..(s + len) * r],
                rs: r,
                cs: 1,
            },
            Mat {
                v: &b[e * r..],
                rs: 1,
                cs: er,
            },
        );
    }
}

/// `out[q] = m[q] · B_e` `[n, r]` for each expert run: `m` `[n, I]`, `b` = `B_all` `[I, E·r]`.
fn project_b<C: MoeFloat>(d: &MoeDims, g: &Groups, m: &[C], b: &[C], out: &mut [C]) {
    let (r, ni, er) = (d.r, d.i, d.e * d.r);
    for &(e, s, len) in &g.runs {
        product(
            len,
            r,
            ni,
            &mut out[s * r..(s + len) * r],
            r,
            false,
            Mat {
                v: &m[s * ni..(s + len) * ni],
                rs: ni,
                cs: 1,
            },
            Mat {
                v: &b[e * r..],
                rs: er,
                cs: 1,
            },
        );
    }
}

// ----- forward -------------------------------------------------------------------------------

pub(super) fn forward(
    o: &TilesForward<'_, CpuStorage>,
    d: &MoeDims,
) -> Result<(CpuStorage, CpuStorage)> {
    if is_f64(o.w) {
        forward_t::<f64>(o, d)
    } else {
        forward_t::<f32>(o, d)
    }
}

fn common<'a>([g, u, cg, cu, ids, bg, bu, ad, w]: [Op<'a>; 9]) -> Common<'a> {
    Common {
        g,
        u,
        cg,
        cu,
        ids,
        bg,
        bu,
        ad,
        w,
    }
}

fn forward_t<C: MoeFloat>(
    o: &TilesForward<'_, CpuStorage>,
    d: &MoeDims,
) -> Result<(CpuStorage, CpuStorage)> {
    let op = "moe_tiles_forward";
    let ops = [o.g, o.u, o.cg, o.cu, o.ids, o.bg, o.bu, o.ad, o.w];
    let c = Ctx::<C>::new(op, common(ops), None, None, d)?;
    let (k, r, ni) = (d.k, d.r, d.i);
    let mut abar = vec![C::zero(); d.t * ni]; // [T, I]
    let mut zd = vec![C::zero(); d.t * k * r]; // [T·k, r]
    abar.par_chunks_mut((TILE_TOKENS * ni).max(1))
        .zip(zd.par_chunks_mut((TILE_TOKENS * k * r).max(1)))
        .enumerate()
        .for_each(|(tile, (abar, zd))| forward_tile(&c, tile * TILE_TOKENS, abar, zd));
    let base = o.g.s.dtype();
    Ok((C::wrap(abar, base), C::wrap(zd, o.w.s.dtype())))
}

/// Tokens `[t_a, t_a + abar.len() / I)`: `Ā` rows and `Z_d` rows of their slots.
fn forward_tile<C: MoeFloat>(c: &Ctx<'_, C>, t_a: usize, abar: &mut [C], zd: &mut [C]) {
    let d = &c.d;
    let (k, r, ni) = (d.k, d.r, d.i);
    if ni == 0 {
        return;
    }
    let (p_a, n) = (t_a * k, abar.len() / ni * k);
    let g = by_expert(&c.ids[p_a..p_a + n], d.e);
    let mut codes = vec![C::zero(); n * r];
    let mut lg = vec![C::zero(); n * ni];
    let mut lu = vec![C::zero(); n * ni];
    gather_rows(&c.cg, r, p_a, &g.order, &mut codes);
    expand(d, &g, &codes, &c.bg, &mut lg);
    gather_rows(&c.cu, r, p_a, &g.order, &mut codes);
    expand(d, &g, &codes, &c.bu, &mut lu);
    simd::vectorized(|| {
        let mut mask = vec![C::one(); ni];
        for (q, &pl) in g.order.iter().enumerate() {
            let (tl, p) = (pl / k, p_a + pl);
            mask_row(d, p, &mut mask);
            let (gr, ur) = (c.g.row(t_a + tl), c.u.row(t_a + tl));
            let wp = c.w[p];
            let ab = &mut abar[tl * ni..(tl + 1) * ni];
            let am = &mut lg[q * ni..(q + 1) * ni]; // ΔG, overwritten by m ⊙ a
            let du = &lu[q * ni..(q + 1) * ni];
            // Zipped slices: one vectorised pass without bounds checks.
            for ((((ab, am), &du), (&g0, &u0)), &m) in ab
                .iter_mut()
                .zip(am.iter_mut())
                .zip(du)
                .zip(gr.iter().zip(ur))
                .zip(&mask)
            {
                let (gv, uv) = (g0 + *am, u0 + du);
                let a = gv * fast_sigmoid(gv) * uv;
                *ab = *ab + wp * a;
                *am = a * m;
            }
        }
    });
    // Z_d = A_d,e (m ⊙ a_j) [n, r]
    let mut z = vec![C::zero(); n * r];
    for &(e, s, len) in &g.runs {
        product(
            len,
            r,
            ni,
            &mut z[s * r..(s + len) * r],
            r,
            false,
            Mat {
                v: &lg[s * ni..(s + len) * ni],
                rs: ni,
                cs: 1,
            },
            Mat {
                v: &c.ad[e * r * ni..],
                rs: 1,
                cs: ni,
            },
        );
    }
    scatter_rows(&z, r, &g.order, zd);
}
