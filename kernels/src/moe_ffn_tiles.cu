// The fused MixLoRA FFN on the tensor cores, for a bf16 base: the rank-r expansions, the SwiGLU
// over the slots and the rank-r projections of one tile of slots in one kernel, so that no
// [T·K, I] tensor is ever written. Follows moe_ffn.cu in the same module (it uses MoeDrop,
// moe_sigmoid and moe_slot_grads); the maths is in engine/src/fused/moe_ffn/.
//
// Slot rows p = t·K + j (t < T tokens of this chunk, K slots a token), expert ids[p] < E, rank R,
// ER = E·R ≤ MT_ER, a multiple of 8; I a multiple of 8; K one of 1, 2, 4, 8 (a token's slots
// then lie in one 8-row half of a 16-row mma tile); G, U row strides multiples of 8; every
// pointer 16-byte aligned (all checked on the host).
//
// Operands
//     G, U [T, I] bf16 (row strides ldg, ldu): the base gate and up projections;
//     cg, cu, cd [T·K, R] bf16: a slot's scaled codes (s·Z_g, s·Z_u, and dZ_d = s·w·B_dᵀ dY);
//     Bg, Bu [I, ER] bf16: every expert's B, row i holding expert e's row i in columns e·R .. ;
//     Ad [ER, I] bf16: every expert's A_down, stacked;
//     w [T·K] f32: the routing weights; dabar [T, I] bf16 (contiguous).
// A slot's codes in "block" form are a row of ER values with its R codes in its expert's block
// and zeros elsewhere; dense products against Bg, Bu, Ad then give every slot its own expert's
// term (the zeros cost tensor-core time, which is cheap, instead of a sort by expert).
//
// moe_tiles_forward_bf16(T, K, I, E, R, t0, G, ldg, U, ldu, cg, cu, ids, Bg, Bu, Ad, w, abar, zd,
//                        pdrop, keep, seed, key)
//     g = G[t] + Cg[p] Bgᵀ, u = U[t] + Cu[p] Buᵀ, a = silu(g)·u (f32);
//     abar [T, I] = Σ_j w[p]·a (bf16), zd [T·K, R] f32 = expert block of bf16(m(p)·a) Adᵀ.
// moe_tiles_rows_bf16(T, K, I, E, R, t0, G, ldg, U, ldu, cg, cu, cd, ids, Bg, Bu, Ad, dabar, w,
//                     dgu, dzg, dzu, dw, pdrop, keep, seed, key)
//     with ld = Cd[p] Ad and (a, dg, du) = moe_slot_grads(g, u, w·dabar[t], ld, m):
//     dgu [T, 2I] bf16 = [Σ_j dg | Σ_j du]; dzg, dzu [T·K, R] f32 = expert block of bf16(dg) Bg,
//     bf16(du) Bu; dw [T·K] f32 = ⟨dabar[t], a⟩.
// moe_tiles_cols_bf16(same operands as rows, then dBg, dBu, dAd, pdrop, keep, seed, key)
//     dBg [I, ER] f32 = Σ_p bf16(dg[p])ᵀ Cg[p], dBu likewise, dAd [ER, I] f32 = Σ_p Cd[p]ᵀ
//     bf16(m·a[p]) (the block form makes each expert's block sum only its own slots).
//
// Dropout (on the down projection's input, as in moe_ffn.cu): element i of slot p is dropped
// when dropout_bits(seed ^ *key, ((t0 + t)·K + j)·I + i) < round(pdrop·2^16), else scaled by keep
// (key: the device's dropout key, common.cuh).
//
// Tiling: 256 threads (8 warps), MT_ROWS = 64 slot rows by MT_COLS = 32 columns of I a step;
// operand tiles stream into shared memory with cp.async, MT_STAGES steps in flight. forward and
// rows: one block per 64 rows, looping over I; cols: one block per 32 columns of I, looping over
// the rows. Each block starts its loop at its own offset (and wraps around), so that the blocks
// do not all read the same tile of B (or of codes) at once: that would queue them on a few L2
// slices. mma.sync m16n8k16 (bf16 in, f32 accumulate); fragments through ldmatrix from padded
// rows (strides of an odd number of 16-byte units, so the 8 rows of an 8×8 matrix hit distinct
// banks).

#define MT_ROWS 64
#define MT_COLS 32
#define MT_ER 128
#define MT_CS (MT_ER + 8)   // row stride (bf16) of [*, MT_ER] tiles
#define MT_TS (MT_COLS + 8) // row stride (bf16) of [*, MT_COLS] tiles
#define MT_THREADS 256
#define MT_STAGES 3

// Bytes of the tiles.
#define MT_CODE_BYTES (MT_ROWS * MT_CS * 2)   // [64, 136] codes in block form
#define MT_BT_BYTES (MT_COLS * MT_CS * 2)     // [32, 136] a column tile of Bg or Bu
#define MT_AD_BYTES (MT_ER * MT_TS * 2)       // [128, 40] a column tile of Ad
#define MT_ROWT_BYTES (MT_ROWS * MT_TS * 2)   // [64, 40] a row × column tile (G, U, dĀ, dg, ...)

__device__ __forceinline__ u32 mt_smem(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// 16 bytes global → shared, asynchronously; zeros when !valid (src is then not read).
__device__ __forceinline__ void mt_cp16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(mt_smem(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
// 4 bytes global → shared, asynchronously; zeros when !valid.
__device__ __forceinline__ void mt_cp4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(mt_smem(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void mt_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void mt_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void mt_ldsm4(u32 (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(mt_smem(p)));
}
__device__ __forceinline__ void mt_ldsm4_t(u32 (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(mt_smem(p)));
}

// d += a·b for one m16n8k16 tile (bf16 in, f32 accumulate).
__device__ __forceinline__ void mt_mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Fragment loads (lane l addresses row l % 8 of 8×8 matrix l / 8). S has row stride ld.
// A (16×16 at rows m0, cols k0) of a row-major [m][k] tile.
__device__ __forceinline__ void mt_frag_a(u32 (&a)[4], const bf16* S, u32 ld, u32 m0, u32 k0) {
    const u32 l = threadIdx.x & 31, mi = l >> 3;
    mt_ldsm4(a, S + (m0 + (l & 7) + ((mi & 1) ? 8 : 0)) * ld + k0 + ((mi & 2) ? 8 : 0));
}
// A (16×16 at m0, k0) of a tile stored transposed, [k][m].
__device__ __forceinline__ void mt_frag_a_t(u32 (&a)[4], const bf16* S, u32 ld, u32 m0, u32 k0) {
    const u32 l = threadIdx.x & 31, mi = l >> 3;
    mt_ldsm4_t(a, S + (k0 + (l & 7) + ((mi & 2) ? 8 : 0)) * ld + m0 + ((mi & 1) ? 8 : 0));
}
// B of two n8 tiles (n0, n0 + 8; k0 .. k0 + 16) of a tile stored [n][k]: b[0], b[1] for the
// first, b[2], b[3] for the second.
__device__ __forceinline__ void mt_frag_b(u32 (&b)[4], const bf16* S, u32 ld, u32 n0, u32 k0) {
    const u32 l = threadIdx.x & 31, mi = l >> 3;
    mt_ldsm4(b, S + (n0 + (l & 7) + ((mi & 2) ? 8 : 0)) * ld + k0 + ((mi & 1) ? 8 : 0));
}
// The same of a tile stored [k][n].
__device__ __forceinline__ void mt_frag_b_t(u32 (&b)[4], const bf16* S, u32 ld, u32 n0, u32 k0) {
    const u32 l = threadIdx.x & 31, mi = l >> 3;
    mt_ldsm4_t(b, S + (k0 + (l & 7) + ((mi & 1) ? 8 : 0)) * ld + n0 + ((mi & 2) ? 8 : 0));
}

__device__ __forceinline__ u32 mt_pack(float lo, float hi) {
    const bf16 l = __float2bfloat16(lo), h = __float2bfloat16(hi);
    return (u32)__bfloat16_as_ushort(l) | ((u32)__bfloat16_as_ushort(h) << 16);
}
__device__ __forceinline__ float2 mt_unpack(u32 v) {
    return make_float2(__bfloat162float(__ushort_as_bfloat16((unsigned short)(v & 0xFFFFu))),
                       __bfloat162float(__ushort_as_bfloat16((unsigned short)(v >> 16))));
}

// The problem of one launch.
struct MtDims {
    u32 T, K, I, E, R, ER, rows, t0;
};

// Writes (zero = false) or clears (zero = true) the block-form codes of rows r0 .. r0 + 64 into
// the [64, MT_CS] tile S (whose other entries are zero).
// Writes the block-form codes of rows r0 .. r0 + 64 (from global memory) into the zeroed [64,
// MT_CS] tile S, loading 8 values a thread at once (the loads would otherwise wait one by one).
__device__ __forceinline__ void mt_codes_scatter(bf16* S, const bf16* codes, const u32* ids, const MtDims& d,
                                                 u32 r0) {
    for (u32 q0 = 0; q0 < MT_ROWS * d.R; q0 += 8 * MT_THREADS) {
        bf16 v[8];
        u32 at[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) {
            const u32 q = q0 + x * MT_THREADS + threadIdx.x, p = q / d.R, c = q % d.R, row = r0 + p;
            const bool ok = q < MT_ROWS * d.R && row < d.rows;
            at[x] = ok ? p * MT_CS + ids[row] * d.R + c : 0xFFFFFFFFu;
            v[x] = ok ? codes[(size_t)row * d.R + c] : __float2bfloat16(0.0f);
        }
#pragma unroll
        for (int x = 0; x < 8; ++x)
            if (at[x] != 0xFFFFFFFFu) S[at[x]] = v[x];
    }
}

__device__ __forceinline__ void mt_zero(bf16* S, u32 bytes) {
    for (u32 q = threadIdx.x; q < bytes / 16; q += MT_THREADS) reinterpret_cast<uint4*>(S)[q] = make_uint4(0, 0, 0, 0);
}

// Column tile c0 .. c0 + 32 of B [I, ER] → S [32, MT_CS] (zeros past I or ER).
__device__ __forceinline__ void mt_load_bt(bf16* S, const bf16* B, const MtDims& d, u32 c0) {
    for (u32 q = threadIdx.x; q < MT_COLS * (MT_ER / 8); q += MT_THREADS) {
        const u32 n = q / (MT_ER / 8), k8 = (q % (MT_ER / 8)) * 8;
        const bool ok = c0 + n < d.I && k8 < d.ER;
        mt_cp16(S + n * MT_CS + k8, ok ? B + (size_t)(c0 + n) * d.ER + k8 : B, ok);
    }
}
// Column tile c0 .. c0 + 32 of Ad [ER, I] → S [MT_ER, MT_TS] (zeros past ER or I).
__device__ __forceinline__ void mt_load_ad(bf16* S, const bf16* Ad, const MtDims& d, u32 c0) {
    for (u32 q = threadIdx.x; q < MT_ER * (MT_COLS / 8); q += MT_THREADS) {
        const u32 k = q / (MT_COLS / 8), c8 = (q % (MT_COLS / 8)) * 8;
        const bool ok = k < d.ER && c0 + c8 < d.I;
        mt_cp16(S + k * MT_TS + c8, ok ? Ad + (size_t)k * d.I + c0 + c8 : Ad, ok);
    }
}
// Token rows tt0 .. tt0 + 64/K, columns c0 .. c0 + 32 of X [T, I] (row stride ld) → S [64, MT_TS].
__device__ __forceinline__ void mt_load_tok(bf16* S, const bf16* X, u32 ld, const MtDims& d, u32 tt0, u32 c0) {
    const u32 ntok = MT_ROWS / d.K;
    for (u32 q = threadIdx.x; q < ntok * (MT_COLS / 8); q += MT_THREADS) {
        const u32 r = q / (MT_COLS / 8), c8 = (q % (MT_COLS / 8)) * 8;
        const bool ok = tt0 + r < d.T && c0 + c8 < d.I;
        mt_cp16(S + r * MT_TS + c8, ok ? X + (size_t)(tt0 + r) * ld + c0 + c8 : X, ok);
    }
}

// The dropout multipliers of elements (row, col) and (row, col + 1), col even.
__device__ __forceinline__ float2 mt_mask(const MoeDrop& drop, float keep, const MtDims& d, u32 row, u32 col) {
    if (drop.p == 0.0) return make_float2(1.0f, 1.0f);
    const u64 idx = ((u64)d.t0 * d.K + row) * d.I + col; // even: both in one group of four
    const u64 bits = rng_hash_mixed(drop.mixed, idx >> 2);
    const u32 q = (u32)(idx & 3);
    const float m0 = ((u32)(bits >> (16 * q)) & 0xFFFFu) < drop.thr ? 0.0f : keep;
    const float m1 = ((u32)(bits >> (16 * (q + 1))) & 0xFFFFu) < drop.thr ? 0.0f : keep;
    return make_float2(m0, m1);
}

// Sum over the K slots of a token: rows g and g ^ 1, 2, 4 are lanes 4 apart, 8 apart, 16 apart.
__device__ __forceinline__ float mt_slot_sum(float v, u32 K) {
    for (u32 o = 1; o < K; o <<= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, 4 * o);
    return v;
}

// Phase A of a step: the warp's 16 rows (m0) × 16 columns (n0, two n8 tiles) of Cx Bxᵀ for each
// of the NP code tiles C[x] against the B column tiles B[x] (stored [n][k]); x < NB use B
// stored [n][k] (Bg, Bu); NP > NB uses Ad stored [k][n] for the last.
template <int NP, int NB>
__device__ __forceinline__ void mt_expand(float (&acc)[NP][2][4], const bf16* const (&C)[NP], const bf16* const (&B)[NP],
                                          u32 m0, u32 n0, u32 ER) {
#pragma unroll
    for (int x = 0; x < NP; ++x)
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[x][n][q] = 0.0f;
#pragma unroll
    for (u32 k0 = 0; k0 < MT_ER; k0 += 16) {
        if (k0 >= ER) break; // warp-uniform
#pragma unroll
        for (int x = 0; x < NP; ++x) {
            u32 a[4], b[4];
            mt_frag_a(a, C[x], MT_CS, m0, k0);
            if (x < NB)
                mt_frag_b(b, B[x], MT_CS, n0, k0);
            else
                mt_frag_b_t(b, B[x], MT_TS, n0, k0);
            mt_mma(acc[x][0], a, b[0], b[1]);
            mt_mma(acc[x][1], a, b[2], b[3]);
        }
    }
}

// The SwiGLU backward of one slot row at two adjacent columns of a step (.x, .y): from its
// token's G, U, dĀ tiles at `at`, the phase-A products lg, lu, ld of those columns (acc[x][n],
// row half h), its routing weight and the dropout multipliers: a, dg, du, and dĀ itself.
struct MtGrads {
    float2 a, dg, du, da;
};
__device__ __forceinline__ MtGrads mt_grads2(const bf16* s_g, const bf16* s_u, const bf16* s_da, u32 at,
                                             const float (&acc)[3][2][4], int n, int h, float w, float2 m) {
    const float2 gb = mt_unpack(*reinterpret_cast<const u32*>(s_g + at));
    const float2 ub = mt_unpack(*reinterpret_cast<const u32*>(s_u + at));
    MtGrads r;
    r.da = mt_unpack(*reinterpret_cast<const u32*>(s_da + at));
    moe_slot_grads(gb.x + acc[0][n][2 * h], ub.x + acc[1][n][2 * h], w * r.da.x, acc[2][n][2 * h], m.x, r.a.x,
                   r.dg.x, r.du.x);
    moe_slot_grads(gb.y + acc[0][n][2 * h + 1], ub.y + acc[1][n][2 * h + 1], w * r.da.y, acc[2][n][2 * h + 1], m.y,
                   r.a.y, r.dg.y, r.du.y);
    return r;
}

// ----- forward -------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(MT_THREADS, 1)
    moe_tiles_forward_bf16(u32 T, u32 K, u32 I, u32 E, u32 R, u32 t0, const bf16* G, u32 ldg, const bf16* U,
                           u32 ldu, const bf16* cg, const bf16* cu, const u32* ids, const bf16* Bg, const bf16* Bu,
                           const bf16* Ad, const float* w, bf16* abar, float* zd, double pdrop, double keep_d,
                           u64 seed, const u64* __restrict__ key) {
    extern __shared__ uint4 mt_shared[];
    const MtDims d = {T, K, I, E, R, E * R, T * K, t0};
    const float keep = (float)keep_d;
    const MoeDrop drop(pdrop, seed, key);
    bf16* sc = reinterpret_cast<bf16*>(mt_shared);
    bf16* s_cg = sc;
    bf16* s_cu = sc + MT_ROWS * MT_CS;
    unsigned char* st0 = reinterpret_cast<unsigned char*>(mt_shared) + 2 * MT_CODE_BYTES;
    const u32 stage_bytes = 2 * MT_BT_BYTES + MT_AD_BYTES + 2 * MT_ROWT_BYTES;
    bf16* s_am = reinterpret_cast<bf16*>(st0 + MT_STAGES * stage_bytes);
    auto stage = [&](u32 s, u32 part) -> bf16* {
        const u32 off[5] = {0, MT_BT_BYTES, 2 * MT_BT_BYTES, 2 * MT_BT_BYTES + MT_AD_BYTES,
                            2 * MT_BT_BYTES + MT_AD_BYTES + MT_ROWT_BYTES};
        return reinterpret_cast<bf16*>(st0 + s * stage_bytes + off[part]);
    };

    const u32 r0 = blockIdx.x * MT_ROWS, tt0 = r0 / K;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    const u32 steps = (I + MT_COLS - 1) / MT_COLS, first = (u32)(((u64)blockIdx.x * steps) / gridDim.x);
    // Step s covers columns col0(s) .. + 32 and lives in stage buffer s % MT_STAGES.
    auto col0 = [&](u32 s) { return ((first + s) % steps) * MT_COLS; };
    auto prefetch = [&](u32 s) {
        if (s < steps) {
            const u32 c0 = col0(s), b = s % MT_STAGES;
            mt_load_bt(stage(b, 0), Bg, d, c0);
            mt_load_bt(stage(b, 1), Bu, d, c0);
            mt_load_ad(stage(b, 2), Ad, d, c0);
            mt_load_tok(stage(b, 3), G, ldg, d, tt0, c0);
            mt_load_tok(stage(b, 4), U, ldu, d, tt0, c0);
        }
        mt_commit(); // possibly empty: one group a step keeps the wait counts right
    };
    for (u32 s = 0; s + 1 < MT_STAGES; ++s) prefetch(s);
    mt_zero(sc, 2 * MT_CODE_BYTES);
    __syncthreads();
    mt_codes_scatter(s_cg, cg, ids, d, r0);
    mt_codes_scatter(s_cu, cu, ids, d, r0);

    // Phase A role: rows rg·16 .., columns ch·16 .. of the step; phase B: rows rg·16, ER columns
    // eh·64 .. eh·64 + 64.
    const u32 rg = warp & 3, ch = warp >> 2, eh = warp >> 2;
    float wrow[2];
    for (int h = 0; h < 2; ++h) {
        const u32 row = r0 + rg * 16 + g + 8 * h;
        wrow[h] = row < d.rows ? w[row] : 0.0f;
    }
    float zacc[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) zacc[n][q] = 0.0f;

    for (u32 s = 0; s < steps; ++s) {
        const u32 b = s % MT_STAGES, c0 = col0(s);
        prefetch(s + MT_STAGES - 1); // into the buffer of step s − 1, which every warp is done with
        mt_wait<MT_STAGES - 1>();
        __syncthreads();
        float acc[2][2][4];
        {
            const bf16* const C[2] = {s_cg, s_cu};
            const bf16* const B[2] = {stage(b, 0), stage(b, 1)};
            mt_expand<2, 2>(acc, C, B, rg * 16, ch * 16, d.ER);
        }
        const bf16* s_g = stage(b, 3);
        const bf16* s_u = stage(b, 4);
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            const u32 cl = ch * 16 + n * 8 + 2 * tq, col = c0 + cl;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 rl = rg * 16 + g + 8 * h, row = r0 + rl, tl = rl / K;
                const float2 gb = mt_unpack(*reinterpret_cast<const u32*>(s_g + tl * MT_TS + cl));
                const float2 ub = mt_unpack(*reinterpret_cast<const u32*>(s_u + tl * MT_TS + cl));
                const float g0 = gb.x + acc[0][n][2 * h], g1 = gb.y + acc[0][n][2 * h + 1];
                const float u0 = ub.x + acc[1][n][2 * h], u1 = ub.y + acc[1][n][2 * h + 1];
                const float a0 = g0 * moe_sigmoid(g0) * u0, a1 = g1 * moe_sigmoid(g1) * u1;
                const float2 m = mt_mask(drop, keep, d, row, col);
                *reinterpret_cast<u32*>(s_am + rl * MT_TS + cl) = mt_pack(a0 * m.x, a1 * m.y);
                const float s0 = mt_slot_sum(wrow[h] * a0, K), s1 = mt_slot_sum(wrow[h] * a1, K);
                const u32 t = row / K;
                if (g % K == 0 && t < T && col < I)
                    *reinterpret_cast<u32*>(abar + (size_t)t * I + col) = mt_pack(s0, s1);
            }
        }
        __syncthreads();
        if (eh * 64 < d.ER) {
            const bf16* s_ad = stage(b, 2);
#pragma unroll
            for (u32 k0 = 0; k0 < MT_COLS; k0 += 16) {
                u32 a[4];
                mt_frag_a(a, s_am, MT_TS, rg * 16, k0);
#pragma unroll
                for (int n = 0; n < 8; n += 2) {
                    u32 bb[4];
                    mt_frag_b(bb, s_ad, MT_TS, eh * 64 + n * 8, k0);
                    mt_mma(zacc[n], a, bb[0], bb[1]);
                    mt_mma(zacc[n + 1], a, bb[2], bb[3]);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 row = r0 + rg * 16 + g + 8 * h;
            if (row >= d.rows) continue;
            const u32 e = ids[row];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const u32 er = eh * 64 + n * 8 + 2 * tq + q;
                if (er < d.ER && er / R == e) zd[(size_t)row * R + er % R] = zacc[n][2 * h + q];
            }
        }
}
