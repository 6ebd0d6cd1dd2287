//! The backward of the CPU tile primitives (see the parent module): per tile of tokens, the
//! rows' gradients (`dG|dU`, the codes' `dZ_g`, `dZ_u`, the routing weights') and, when asked
//! for, the expert matrices' column gradients, in one pass over the tile's slots.

use super::*;

/// The row results of one tile (each in the tile's token or slot order).
struct RowsOut<'a, C> {
    dgu: &'a mut [C], // [tokens, 2I]
    dzg: &'a mut [C], // [slots, r]
    dzu: &'a mut [C], // [slots, r]
    dw: &'a mut [C],  // [slots]
}

/// The column results, summed over tiles.
struct Cols<C> {
    dbg: Vec<C>, // [I, E·r]
    dbu: Vec<C>, // [I, E·r]
    dad: Vec<C>, // [E·r, I]
}

impl<C: MoeFloat> Cols<C> {
    fn zeros(d: &MoeDims) -> Self {
        let n = d.i * d.e * d.r;
        Cols {
            dbg: vec![C::zero(); n],
            dbu: vec![C::zero(); n],
            dad: vec![C::zero(); n],
        }
    }
    fn add(mut self, o: Cols<C>) -> Self {
        for (a, b) in [
            (&mut self.dbg, o.dbg),
            (&mut self.dbu, o.dbu),
            (&mut self.dad, o.dad),
        ] {
            a.iter_mut().zip(b).for_each(|(x, y)| *x = *x + y);
        }
        self
    }
}

fn backward_ctx<'a, C: MoeFloat>(
    op: &'static str,
    o: &TilesBackward<'a, CpuStorage>,
    d: &MoeDims,
) -> Result<Ctx<'a, C>> {
    let ops = [o.g, o.u, o.cg, o.cu, o.ids, o.bg, o.bu, o.ad, o.w];
    Ctx::new(op, common(ops), Some(o.cd), Some(o.dabar), d)
}

/// The row results and, with `cols`, the column results of the backward in one pass over the
/// tiles (the CUDA kernels split them in two; here the second pass would recompute the first).
type Backward = (
    TileRowGrads<CpuStorage>,
    Option<(CpuStorage, CpuStorage, CpuStorage)>,
);

pub(in crate::fused::moe_ffn) fn backward(
    o: &TilesBackward<'_, CpuStorage>,
    d: &MoeDims,
    cols: bool,
) -> Result<Backward> {
    if is_f64(o.w) {
        backward_t::<f64>(o, d, cols)
    } else {
        backward_t::<f32>(o, d, cols)
    }
}

fn backward_t<C: MoeFloat>(
    o: &TilesBackward<'_, CpuStorage>,
    d: &MoeDims,
    cols: bool,
) -> Result<Backward> {
    let c = backward_ctx::<C>("moe_tiles_backward", o, d)?;
    let (k, r, ni) = (d.k, d.r, d.i);
    let mut dgu = vec![C::zero(); d.t * 2 * ni];
    let mut dzg = vec![C::zero(); d.t * k * r];
    let mut dzu = vec![C::zero(); d.t * k * r];
    let mut dw = vec![C::zero(); d.t * k];
    let slots = (TILE_TOKENS * k).max(1);
    let sums = dgu
        .par_chunks_mut((TILE_TOKENS * 2 * ni).max(1))
        .zip(dzg.par_chunks_mut(slots * r.max(1)))
        .zip(dzu.par_chunks_mut(slots * r.max(1)))
        .zip(dw.par_chunks_mut(slots))
        .enumerate()
        .fold(
            || cols.then(|| Cols::zeros(d)),
            |mut acc, (tile, (((dgu, dzg), dzu), dw))| {
                let out = RowsOut { dgu, dzg, dzu, dw };
                let tokens = out.dw.len() / k.max(1);
                backward_tile(&c, tile * TILE_TOKENS, tokens, out, acc.as_mut());
                acc
            },
        )
        .reduce(
            || None,
            |a, b| match (a, b) {
                (Some(a), Some(b)) => Some(a.add(b)),
                (a, b) => a.or(b),
            },
        );
    let (base, adapter) = (o.g.s.dtype(), o.w.s.dtype());
    let rows = TileRowGrads {
        dgu: C::wrap(dgu, base),
        dzg: C::wrap(dzg, adapter),
        dzu: C::wrap(dzu, adapter),
        dw: C::wrap(dw, adapter),
    };
    let cols = cols.then(|| {
        let s = sums.unwrap_or_else(|| Cols::zeros(d));
        (
            C::wrap(s.dbg, adapter),
            C::wrap(s.dbu, adapter),
            C::wrap(s.dad, adapter),
        )
    });
    Ok((rows, cols))
}

pub(in crate::fused::moe_ffn) fn rows(
    o: &TilesBackward<'_, CpuStorage>,
    d: &MoeDims,
) -> Result<TileRowGrads<CpuStorage>> {
    Ok(backward(o, d, false)?.0)
}

pub(in crate::fused::moe_ffn) fn cols(
    o: &TilesBackward<'_, CpuStorage>,
    d: &MoeDims,
) -> Result<(CpuStorage, CpuStorage, CpuStorage)> {
    let (_, cols) = backward(o, d, true)?;
    Ok(cols.expect("asked for the columns"))
}

/// The backward of tokens `[t_a, t_a + tokens)`: recomputes `ΔG, ΔU` and `A_d,eᵀ Cd` by GEMMs,
/// then per slot `a`, `dg`, `du` (module doc of `primitives.rs`); writes the row results into
/// `out` and, when given, adds the column results to `cols`.
fn backward_tile<C: MoeFloat>(
    c: &Ctx<'_, C>,
    t_a: usize,
    tokens: usize,
    out: RowsOut<'_, C>,
    cols: Option<&mut Cols<C>>,
) {
    let d = &c.d;
    let (k, r, ni, er) = (d.k, d.r, d.i, d.e * d.r);
    let Some(dabar) = &c.dabar else { return };
    if ni == 0 || tokens == 0 {
        return;
    }
    let (p_a, n) = (t_a * k, tokens * k);
    let g = by_expert(&c.ids[p_a..p_a + n], d.e);
    let mut cgs = vec![C::zero(); n * r];
    let mut cus = vec![C::zero(); n * r];
    let mut cds = vec![C::zero(); n * r];
    gather_rows(&c.cg, r, p_a, &g.order, &mut cgs);
    gather_rows(&c.cu, r, p_a, &g.order, &mut cus);
    gather_rows(&c.cd, r, p_a, &g.order, &mut cds);
    let mut lg = vec![C::zero(); n * ni]; // ΔG, then dg
    let mut lu = vec![C::zero(); n * ni]; // ΔU, then du
    let mut ld = vec![C::zero(); n * ni]; // A_d,eᵀ Cd, then m ⊙ a
    expand(d, &g, &cgs, &c.bg, &mut lg);
    expand(d, &g, &cus, &c.bu, &mut lu);
    for &(e, s, len) in &g.runs {
        product(
            len,
            ni,
            r,
            &mut ld[s * ni..(s + len) * ni],
            ni,
            false,
            Mat {
                v: &cds[s * r..(s + len) * r],
                rs: r,
                cs: 1,
            },
            Mat {
                v: &c.ad[e * r * ni..],
                rs: ni,
                cs: 1,
            },
        );
    }
    simd::vectorized(|| {
        let mut mask = vec![C::one(); ni];
        for (q, &pl) in g.order.iter().enumerate() {
            let (tl, p) = (pl / k, p_a + pl);
            mask_row(d, p, &mut mask);
            let (gr, ur, dab) = (c.g.row(t_a + tl), c.u.row(t_a + tl), dabar.row(t_a + tl));
            let wp = c.w[p];
            let span = q * ni..(q + 1) * ni;
            let (dg, du, am) = (&mut lg[span.clone()], &mut lu[span.clone()], &mut ld[span]);
            // Zipped slices: vectorised passes without bounds checks; `am` holds `a` until the dot.
            for ((((dg, du), am), (&g0, &u0)), (&db, &m)) in dg
                .iter_mut()
                .zip(du.iter_mut())
                .zip(am.iter_mut())
                .zip(gr.iter().zip(ur))
                .zip(dab.iter().zip(&mask))
            {
                let (a, dgv, duv) = fast_slot_grads(g0 + *dg, u0 + *du, wp * db, *am, m);
                (*dg, *du, *am) = (dgv, duv, a);
            }
            out.dw[pl] = dab
                .iter()
                .zip(am.iter())
                .fold(C::zero(), |acc, (&x, &a)| acc + x * a);
            am.iter_mut().zip(&mask).for_each(|(a, &m)| *a = *a * m);
            let (sdg, sdu) = out.dgu[tl * 2 * ni..(tl + 1) * 2 * ni].split_at_mut(ni);
            sdg.iter_mut()
                .zip(dg.iter())
                .for_each(|(s, &v)| *s = *s + v);
            sdu.iter_mut()
                .zip(du.iter())
                .for_each(|(s, &v)| *s = *s + v);
        }
    });
    let mut z = vec![C::zero(); n * r];
    project_b(d, &g, &lg, &c.bg, &mut z); // B_g,eᵀ dg_j
    scatter_rows(&z, r, &g.order, out.dzg);
    project_b(d, &g, &lu, &c.bu, &mut z);
    scatter_rows(&z, r, &g.order, out.dzu);
    if let Some(acc) = cols {
        for &(e, s, len) in &g.runs {
            // dB_g,e += dgᵀ Cg [I, r] in columns e·r.. of [I, E·r]; dB_u,e likewise.
            for (db, m, cs) in [(&mut acc.dbg, &lg, &cgs), (&mut acc.dbu, &lu, &cus)] {
                product(
                    ni,
                    r,
                    len,
                    &mut db[e * r..],
                    er,
                    true,
                    Mat {
                        v: &m[s * ni..(s + len) * ni],
                        rs: 1,
                        cs: ni,
                    },
                    Mat {
                        v: &cs[s * r..(s + len) * r],
                        rs: r,
                        cs: 1,
                    },
                );
            }
            // dA_d,e += Cdᵀ (m ⊙ a) [r, I] in rows e·r.. of [E·r, I].
            product(
                r,
                ni,
                len,
                &mut acc.dad[e * r * ni..(e + 1) * r * ni],
                ni,
                true,
                Mat {
                    v: &cds[s * r..(s + len) * r],
                    rs: 1,
                    cs: r,
                },
                Mat {
                    v: &ld[s * ni..(s + len) * ni],
                    rs: ni,
                    cs: 1,
                },
            );
        }
    }
}
