// The backward kernels of the fused MixLoRA FFN on the tensor cores (moe_tiles_rows_bf16,
// moe_tiles_cols_bf16): their operands, tiling and helpers are described in moe_ffn_tiles.cu,
// which precedes this file in the module.

// ----- backward over rows: dGU, dZ_g, dZ_u, dw ------------------------------------------------------

extern "C" __global__ void __launch_bounds__(MT_THREADS, 1)
    moe_tiles_rows_bf16(u32 T, u32 K, u32 I, u32 E, u32 R, u32 t0, const bf16* G, u32 ldg, const bf16* U, u32 ldu,
                        const bf16* cg, const bf16* cu, const bf16* cd, const u32* ids, const bf16* Bg,
                        const bf16* Bu, const bf16* Ad, const bf16* dabar, const float* w, bf16* dgu, float* dzg,
                        float* dzu, float* dw, double pdrop, double keep_d, u64 seed,
                        const u64* __restrict__ key) {
    extern __shared__ uint4 mt_shared[];
    const MtDims d = {T, K, I, E, R, E * R, T * K, t0};
    const float keep = (float)keep_d;
    const MoeDrop drop(pdrop, seed, key);
    bf16* sc = reinterpret_cast<bf16*>(mt_shared);
    bf16* s_cg = sc;
    bf16* s_cu = sc + MT_ROWS * MT_CS;
    bf16* s_cd = sc + 2 * MT_ROWS * MT_CS;
    unsigned char* st0 = reinterpret_cast<unsigned char*>(mt_shared) + 3 * MT_CODE_BYTES;
    const u32 stage_bytes = 2 * MT_BT_BYTES + MT_AD_BYTES + 3 * MT_ROWT_BYTES;
    bf16* s_dg = reinterpret_cast<bf16*>(st0 + MT_STAGES * stage_bytes);
    bf16* s_du = s_dg + MT_ROWS * MT_TS;
    float* s_dw = reinterpret_cast<float*>(s_du + MT_ROWS * MT_TS); // [2][64]
    auto stage = [&](u32 s, u32 part) -> bf16* {
        const u32 off[6] = {0,
                            MT_BT_BYTES,
                            2 * MT_BT_BYTES,
                            2 * MT_BT_BYTES + MT_AD_BYTES,
                            2 * MT_BT_BYTES + MT_AD_BYTES + MT_ROWT_BYTES,
                            2 * MT_BT_BYTES + MT_AD_BYTES + 2 * MT_ROWT_BYTES};
        return reinterpret_cast<bf16*>(st0 + s * stage_bytes + off[part]);
    };

    const u32 r0 = blockIdx.x * MT_ROWS, tt0 = r0 / K;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    const u32 steps = (I + MT_COLS - 1) / MT_COLS, first = (u32)(((u64)blockIdx.x * steps) / gridDim.x);
    auto col0 = [&](u32 s) { return ((first + s) % steps) * MT_COLS; };
    auto prefetch = [&](u32 s) {
        if (s < steps) {
            const u32 c0 = col0(s), b = s % MT_STAGES;
            mt_load_bt(stage(b, 0), Bg, d, c0);
            mt_load_bt(stage(b, 1), Bu, d, c0);
            mt_load_ad(stage(b, 2), Ad, d, c0);
            mt_load_tok(stage(b, 3), G, ldg, d, tt0, c0);
            mt_load_tok(stage(b, 4), U, ldu, d, tt0, c0);
            mt_load_tok(stage(b, 5), dabar, I, d, tt0, c0);
        }
        mt_commit();
    };
    for (u32 s = 0; s + 1 < MT_STAGES; ++s) prefetch(s);
    mt_zero(sc, 3 * MT_CODE_BYTES);
    __syncthreads();
    mt_codes_scatter(s_cg, cg, ids, d, r0);
    mt_codes_scatter(s_cu, cu, ids, d, r0);
    mt_codes_scatter(s_cd, cd, ids, d, r0);

    // Phase A: rows rg·16, columns ch·16 of the step. Phase B: warps 0-3 dZ_g, 4-7 dZ_u of rows
    // rg·16 .. over all ER columns.
    const u32 rg = warp & 3, ch = warp >> 2;
    float wrow[2], dwp[2] = {0.0f, 0.0f};
    for (int h = 0; h < 2; ++h) {
        const u32 row = r0 + rg * 16 + g + 8 * h;
        wrow[h] = row < d.rows ? w[row] : 0.0f;
    }
    float zacc[16][4];
#pragma unroll
    for (int n = 0; n < 16; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) zacc[n][q] = 0.0f;

    for (u32 s = 0; s < steps; ++s) {
        const u32 b = s % MT_STAGES, c0 = col0(s);
        prefetch(s + MT_STAGES - 1); // into the buffer of step s − 1, which every warp is done with
        mt_wait<MT_STAGES - 1>();
        __syncthreads();
        float acc[3][2][4];
        {
            const bf16* const C[3] = {s_cg, s_cu, s_cd};
            const bf16* const B[3] = {stage(b, 0), stage(b, 1), stage(b, 2)};
            mt_expand<3, 2>(acc, C, B, rg * 16, ch * 16, d.ER);
        }
        const bf16* s_g = stage(b, 3);
        const bf16* s_u = stage(b, 4);
        const bf16* s_da = stage(b, 5);
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            const u32 cl = ch * 16 + n * 8 + 2 * tq, col = c0 + cl;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 rl = rg * 16 + g + 8 * h, row = r0 + rl, tl = rl / K;
                const float2 m = mt_mask(drop, keep, d, row, col);
                const MtGrads r = mt_grads2(s_g, s_u, s_da, tl * MT_TS + cl, acc, n, h, wrow[h], m);
                dwp[h] += r.da.x * r.a.x + r.da.y * r.a.y;
                *reinterpret_cast<u32*>(s_dg + rl * MT_TS + cl) = mt_pack(r.dg.x, r.dg.y);
                *reinterpret_cast<u32*>(s_du + rl * MT_TS + cl) = mt_pack(r.du.x, r.du.y);
                const float sg0 = mt_slot_sum(r.dg.x, K), sg1 = mt_slot_sum(r.dg.y, K);
                const float su0 = mt_slot_sum(r.du.x, K), su1 = mt_slot_sum(r.du.y, K);
                const u32 t = row / K;
                if (g % K == 0 && t < T && col < I) {
                    bf16* o = dgu + (size_t)t * 2 * I + col;
                    *reinterpret_cast<u32*>(o) = mt_pack(sg0, sg1);
                    *reinterpret_cast<u32*>(o + I) = mt_pack(su0, su1);
                }
            }
        }
        __syncthreads();
        {
            const bf16* s_x = ch == 0 ? s_dg : s_du;
            const bf16* s_b = ch == 0 ? stage(b, 0) : stage(b, 1); // Bg or Bu, [col][er]: B(k = col, n = er)
#pragma unroll
            for (u32 k0 = 0; k0 < MT_COLS; k0 += 16) {
                u32 a[4];
                mt_frag_a(a, s_x, MT_TS, rg * 16, k0);
#pragma unroll
                for (int n = 0; n < 16; n += 2) {
                    if ((u32)n * 8 >= d.ER) break; // warp-uniform
                    u32 bb[4];
                    mt_frag_b_t(bb, s_b, MT_CS, n * 8, k0);
                    mt_mma(zacc[n], a, bb[0], bb[1]);
                    mt_mma(zacc[n + 1], a, bb[2], bb[3]);
                }
            }
        }
        __syncthreads();
    }
    float* dz = ch == 0 ? dzg : dzu;
#pragma unroll
    for (int n = 0; n < 16; ++n)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 row = r0 + rg * 16 + g + 8 * h;
            if (row >= d.rows) continue;
            const u32 e = ids[row];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const u32 er = n * 8 + 2 * tq + q;
                if (er < d.ER && er / R == e) dz[(size_t)row * R + er % R] = zacc[n][2 * h + q];
            }
        }
    // dw: the quad's columns, then the two column halves (warps rg and rg + 4), in a fixed order.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float v = dwp[h];
        v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
        v += __shfl_xor_sync(0xFFFFFFFFu, v, 2);
        if (tq == 0) s_dw[ch * MT_ROWS + rg * 16 + g + 8 * h] = v;
    }
    __syncthreads();
    if (threadIdx.x < MT_ROWS && r0 + threadIdx.x < d.rows)
        dw[r0 + threadIdx.x] = s_dw[threadIdx.x] + s_dw[MT_ROWS + threadIdx.x];
}

// ----- backward over columns: dB_g, dB_u, dA_d ----------------------------------------------------

// The compact codes of rows r0 .. r0 + 64 of one code matrix ([rows, R]) → S [64·R], and (when
// ids_dst) their experts → ids_dst [64]; zeros past the last row. 16-byte copies where a whole
// unit lies inside the matrix; the one unit that straddles its end is copied element by element
// (visible after the next barrier, like the asynchronous copies after their wait).
__device__ __forceinline__ void mt_load_codes(bf16* S, const bf16* codes, const MtDims& d, u32 r0) {
    const size_t end = (size_t)d.rows * d.R, e_first = (size_t)r0 * d.R;
    for (u32 q = threadIdx.x; q < MT_ROWS * d.R / 8; q += MT_THREADS) {
        const size_t e0 = e_first + (size_t)q * 8;
        if (e0 + 8 <= end) {
            mt_cp16(S + q * 8, codes + e0, true);
        } else if (e0 >= end) {
            mt_cp16(S + q * 8, codes, false);
        } else {
            for (u32 x = 0; x < 8; ++x) S[q * 8 + x] = e0 + x < end ? codes[e0 + x] : __float2bfloat16(0.0f);
        }
    }
}
__device__ __forceinline__ void mt_load_ids(u32* S, const u32* ids, const MtDims& d, u32 r0) {
    if (threadIdx.x < MT_ROWS) {
        const u32 row = r0 + threadIdx.x;
        mt_cp4(S + threadIdx.x, row < d.rows ? ids + row : ids, row < d.rows);
    }
}

extern "C" __global__ void __launch_bounds__(MT_THREADS, 1)
    moe_tiles_cols_bf16(u32 T, u32 K, u32 I, u32 E, u32 R, u32 t0, const bf16* G, u32 ldg, const bf16* U, u32 ldu,
                        const bf16* cg, const bf16* cu, const bf16* cd, const u32* ids, const bf16* Bg,
                        const bf16* Bu, const bf16* Ad, const bf16* dabar, const float* w, float* dBg, float* dBu,
                        float* dAd, double pdrop, double keep_d, u64 seed,
                        const u64* __restrict__ key) {
    extern __shared__ uint4 mt_shared[];
    const MtDims d = {T, K, I, E, R, E * R, T * K, t0};
    const float keep = (float)keep_d;
    const MoeDrop drop(pdrop, seed, key);
    unsigned char* base = reinterpret_cast<unsigned char*>(mt_shared);
    bf16* s_bg = reinterpret_cast<bf16*>(base);
    bf16* s_bu = reinterpret_cast<bf16*>(base + MT_BT_BYTES);
    bf16* s_ad = reinterpret_cast<bf16*>(base + 2 * MT_BT_BYTES);
    bf16* s_cg = reinterpret_cast<bf16*>(base + 2 * MT_BT_BYTES + MT_AD_BYTES);
    bf16* s_cu = s_cg + MT_ROWS * MT_CS;
    bf16* s_cd = s_cu + MT_ROWS * MT_CS;
    bf16* s_x = s_cd + MT_ROWS * MT_CS;                        // dg, du, m·a: [3][64, MT_TS]
    u32* s_prev = reinterpret_cast<u32*>(s_x + 3 * MT_ROWS * MT_TS); // [2][64]: the experts in the code tiles
    unsigned char* st0 = reinterpret_cast<unsigned char*>(s_prev + 2 * MT_ROWS);
    // A stage: G, U, dĀ tiles, the three compact code tiles [64·R] and the 64 experts.
    const u32 code_bytes = MT_ROWS * R * 2;
    const u32 stage_bytes = 3 * MT_ROWT_BYTES + 3 * code_bytes + MT_ROWS * 4;
    auto stage = [&](u32 s, u32 part) -> unsigned char* {
        return st0 + s * stage_bytes + (part < 3 ? part * MT_ROWT_BYTES : 3 * MT_ROWT_BYTES + (part - 3) * code_bytes);
    };

    const u32 c0 = blockIdx.x * MT_COLS;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    const u32 tiles = (d.rows + MT_ROWS - 1) / MT_ROWS, first = (u32)(((u64)blockIdx.x * tiles) / gridDim.x);
    auto row0 = [&](u32 s) { return ((first + s) % tiles) * MT_ROWS; };
    mt_load_bt(s_bg, Bg, d, c0);
    mt_load_bt(s_bu, Bu, d, c0);
    mt_load_ad(s_ad, Ad, d, c0);
    auto prefetch = [&](u32 s) {
        if (s < tiles) {
            const u32 r0 = row0(s), tt0 = r0 / K, b = s % MT_STAGES;
            mt_load_tok(reinterpret_cast<bf16*>(stage(b, 0)), G, ldg, d, tt0, c0);
            mt_load_tok(reinterpret_cast<bf16*>(stage(b, 1)), U, ldu, d, tt0, c0);
            mt_load_tok(reinterpret_cast<bf16*>(stage(b, 2)), dabar, I, d, tt0, c0);
            mt_load_codes(reinterpret_cast<bf16*>(stage(b, 3)), cg, d, r0);
            mt_load_codes(reinterpret_cast<bf16*>(stage(b, 4)), cu, d, r0);
            mt_load_codes(reinterpret_cast<bf16*>(stage(b, 5)), cd, d, r0);
            mt_load_ids(reinterpret_cast<u32*>(stage(b, 6)), ids, d, r0);
        }
        mt_commit();
    };
    for (u32 s = 0; s + 1 < MT_STAGES; ++s) prefetch(s); // the first with the B tiles in its group
    mt_zero(s_cg, 3 * MT_CODE_BYTES);
    if (threadIdx.x < MT_ROWS) s_prev[MT_ROWS + threadIdx.x] = 0; // "step −1": nothing written

    // Phase A: rows rg·16, columns ch·16 of the tile. Phase B: columns mt·16 .. of the block,
    // ER columns eq·32 .. eq·32 + 32, for each of dB_g, dB_u, dA_dᵀ.
    const u32 rg = warp & 3, ch = warp >> 2, mt = warp & 1, eq = warp >> 1;
    float bacc[3][4][4];
#pragma unroll
    for (int x = 0; x < 3; ++x)
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
            for (int q = 0; q < 4; ++q) bacc[x][n][q] = 0.0f;

    for (u32 s = 0; s < tiles; ++s) {
        const u32 b = s % MT_STAGES, r0 = row0(s);
        prefetch(s + MT_STAGES - 1);
        mt_wait<MT_STAGES - 1>();
        __syncthreads();
        {
            // The code tiles in block form: each thread clears the entries it wrote for the
            // previous tile (its (p, c) are the same every step) and writes this tile's.
            const bf16* cc[3] = {reinterpret_cast<const bf16*>(stage(b, 3)), reinterpret_cast<const bf16*>(stage(b, 4)),
                                 reinterpret_cast<const bf16*>(stage(b, 5))};
            const u32* ids_now = reinterpret_cast<const u32*>(stage(b, 6));
            const u32* prev = s_prev + ((s + 1) & 1) * MT_ROWS;
            u32* next = s_prev + (s & 1) * MT_ROWS;
            const bf16 z = __float2bfloat16(0.0f);
            for (u32 q = threadIdx.x; q < MT_ROWS * R; q += MT_THREADS) {
                const u32 p = q / R, c = q % R, old = prev[p] * R + c, now = ids_now[p] * R + c;
                s_cg[p * MT_CS + old] = z;
                s_cu[p * MT_CS + old] = z;
                s_cd[p * MT_CS + old] = z;
                s_cg[p * MT_CS + now] = cc[0][q];
                s_cu[p * MT_CS + now] = cc[1][q];
                s_cd[p * MT_CS + now] = cc[2][q];
            }
            if (threadIdx.x < MT_ROWS) next[threadIdx.x] = ids_now[threadIdx.x];
        }
        __syncthreads();
        float acc[3][2][4];
        {
            const bf16* const C[3] = {s_cg, s_cu, s_cd};
            const bf16* const B[3] = {s_bg, s_bu, s_ad};
            mt_expand<3, 2>(acc, C, B, rg * 16, ch * 16, d.ER);
        }
        const bf16* s_g = reinterpret_cast<const bf16*>(stage(b, 0));
        const bf16* s_u = reinterpret_cast<const bf16*>(stage(b, 1));
        const bf16* s_da = reinterpret_cast<const bf16*>(stage(b, 2));
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            const u32 cl = ch * 16 + n * 8 + 2 * tq, col = c0 + cl;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 rl = rg * 16 + g + 8 * h, row = r0 + rl, tl = rl / K;
                const float wr = row < d.rows ? w[row] : 0.0f;
                const float2 m = mt_mask(drop, keep, d, row, col);
                const MtGrads r = mt_grads2(s_g, s_u, s_da, tl * MT_TS + cl, acc, n, h, wr, m);
                const u32 o = rl * MT_TS + cl;
                *reinterpret_cast<u32*>(s_x + o) = mt_pack(r.dg.x, r.dg.y);
                *reinterpret_cast<u32*>(s_x + MT_ROWS * MT_TS + o) = mt_pack(r.du.x, r.du.y);
                *reinterpret_cast<u32*>(s_x + 2 * MT_ROWS * MT_TS + o) = mt_pack(r.a.x * m.x, r.a.y * m.y);
            }
        }
        __syncthreads();
        if (eq * 32 < d.ER) {
            const bf16* const C[3] = {s_cg, s_cu, s_cd};
#pragma unroll
            for (u32 k0 = 0; k0 < MT_ROWS; k0 += 16) {
#pragma unroll
                for (int x = 0; x < 3; ++x) {
                    u32 a[4];
                    mt_frag_a_t(a, s_x + x * MT_ROWS * MT_TS, MT_TS, mt * 16, k0); // Xᵀ: m = col, k = row
#pragma unroll
                    for (int n = 0; n < 4; n += 2) {
                        u32 bb[4];
                        mt_frag_b_t(bb, C[x], MT_CS, eq * 32 + n * 8, k0); // C stored [row][er]
                        mt_mma(bacc[x][n], a, bb[0], bb[1]);
                        mt_mma(bacc[x][n + 1], a, bb[2], bb[3]);
                    }
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 col = c0 + mt * 16 + g + 8 * h;
            if (col >= I) continue;
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const u32 er = eq * 32 + n * 8 + 2 * tq + q;
                if (er >= d.ER) continue;
                dBg[(size_t)col * d.ER + er] = bacc[0][n][2 * h + q];
                dBu[(size_t)col * d.ER + er] = bacc[1][n][2 * h + q];
                dAd[(size_t)er * I + col] = bacc[2][n][2 * h + q];
            }
        }
}
