// The LoRA primitives' rank-r products on the tensor cores (mma.sync m16n8k16: bf16 in, f32
// accumulate), for a bf16 base whose rows are 16-byte runs: N, the row stride and the offset
// multiples of 8 (checked on the host; lora.cu serves the other cases). Follows lora.cu in the
// LORA module.
//
// The f32 adapter operands are split on the fly into two bf16 parts, hi = bf16(v) and lo =
// bf16(v − hi), and every product takes both, so the codes and gradients keep f32-like accuracy
// (about 2^-16 relative) while their multiply-adds move off the CUDA cores, where lora.cu's
// kernels spent 4-6 times the memory time. The bf16 base operand is exact; dropout zeros its
// dropped elements (bit masks, from the same dropout_bits as lora.cu) and the kept ones' factor
// 1/(1 − p) scales the sums once. A dropped element is an exact zero here, where x·0 of a NaN x
// is NaN in lora.cu.
//
// lora_codes_mma_bf16_r{R}(M, N, x, ldx, A, a_t, part, cols_per_split, seed, key, thr, keep, drop)
//     part[s, m, r] = keep · Σ_{c in split s} mask(x)[m, c] · A[r, c], the splits being runs of
//     cols_per_split (a multiple of 32) columns; A [R, N] f32, or (a_t) stored as its transpose
//     [N, R]; grid (splits, ceil(M / 128)), 128 threads.
// lora_grad_a_mma_bf16_r{R}(M, N, x, ldx, dz, part, rows_per_split, seed, key, thr, keep, drop)
//     part[s, r, c] = keep · Σ_{m in split s} dz[m, r] · mask(x)[m, c], runs of rows_per_split (a
//     multiple of 32) rows; dz [M, R] f32 row-major (16-byte aligned); grid (ceil(N / 128),
//     splits), 128 threads.
// lora_expand_mma_bf16_r{R}(M, N, z, Bt, bt_t, y, ldy, out, rows_per_block, seed, key, thr, keep, drop)
//     out[m, c] = bf16(y[m, c] + f(m, c) · Σ_r z[m, r] · Bt[r, c]), y optional (null: none),
//     f = 0 or keep by the mask (drop) or 1; z [M, R] f32 row-major (8-byte aligned); Bt [R, N]
//     f32, or (bt_t) stored as its transpose [N, R] (8-byte aligned); out [M, N] contiguous;
//     grid (ceil(N / 128), ceil(M / rows_per_block)), 128 threads, rows_per_block a multiple of 64.
//
// mma fragments (lane = 4g + tq): A (16×16, row-major) a0 = (row g, k 2tq, 2tq+1), a1 = (g + 8,
// same k), a2 = (g, k 2tq+8, +9), a3 = (g + 8, same); B (16×8) b0 = (k 2tq, 2tq+1; n g), b1 =
// (k 2tq+8, +9; n g); D d0, d1 = (row g; n 2tq, 2tq+1), d2, d3 = (row g + 8, same n). The order
// of the k in a dot product is free, and so is the order of the n of the outputs: the kernels
// choose them so that each lane loads and stores 8 consecutive bf16 (16 bytes) of the base.

#define LM_WARPS 4

__device__ __forceinline__ void lm_mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The transpose of the warp's 8×8 bf16 matrix (lane 4g + tq holds row g, columns 2tq, 2tq + 1):
// afterwards the lane holds row g of the transpose.
__device__ __forceinline__ u32 lm_trans(u32 v) {
    u32 r;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(v));
    return r;
}

__device__ __forceinline__ uint4 lm_zero4() { return make_uint4(0u, 0u, 0u, 0u); }
__device__ __forceinline__ uint4 lm_load16(const bf16* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ u32 lm_word(const uint4& v, int q) { return q == 0 ? v.x : q == 1 ? v.y : q == 2 ? v.z : v.w; }

// A bf16 pair (low element first) widened, and two f32 rounded into one.
__device__ __forceinline__ float2 lm_unpack2(u32 v) {
    return make_float2(__bfloat162float(__ushort_as_bfloat16((unsigned short)(v & 0xFFFFu))),
                       __bfloat162float(__ushort_as_bfloat16((unsigned short)(v >> 16))));
}
__device__ __forceinline__ u32 lm_pack2(float lo, float hi) {
    return (u32)__bfloat16_as_ushort(__float2bfloat16(lo)) | ((u32)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16);
}

// The dropout bits of the 8 elements idx .. idx + 8 (idx a multiple of 8): two hashes.
struct LmBits {
    u64 h0, h1;
};
__device__ __forceinline__ LmBits lm_bits(u64 mixed, u64 idx) {
    return {rng_hash_mixed(mixed, idx >> 2), rng_hash_mixed(mixed, (idx >> 2) + 1)};
}
// Bits of elements 2q and 2q + 1 of the 8, in the low and high halves.
__device__ __forceinline__ u32 lm_pair_bits(const LmBits& b, int q) {
    return (u32)((q < 2 ? b.h0 : b.h1) >> (32 * (q & 1)));
}

// The 8 bf16 with their dropped elements zeroed.
__device__ __forceinline__ uint4 lm_mask8(uint4 v, u64 mixed, u32 thr, u64 idx) {
    const LmBits b = lm_bits(mixed, idx);
    u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const u32 bits = lm_pair_bits(b, q);
        const u32 keep_lo = (bits & 0xFFFFu) >= thr ? 0x0000FFFFu : 0u;
        const u32 keep_hi = (bits >> 16) >= thr ? 0xFFFF0000u : 0u;
        w[q] &= keep_lo | keep_hi;
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Two f32 as bf16 pairs: the high parts and the low parts (v − hi), low element first.
__device__ __forceinline__ void lm_split2(float a, float b, u32& hi, u32& lo) {
    const bf16 h0 = __float2bfloat16(a), h1 = __float2bfloat16(b);
    const bf16 l0 = __float2bfloat16(a - __bfloat162float(h0)), l1 = __float2bfloat16(b - __bfloat162float(h1));
    hi = (u32)__bfloat16_as_ushort(h0) | ((u32)__bfloat16_as_ushort(h1) << 16);
    lo = (u32)__bfloat16_as_ushort(l0) | ((u32)__bfloat16_as_ushort(l1) << 16);
}

// A[r, c .. c + 8] (A [R, N] f32, or with a_t stored [N, R]) split: hi[q], lo[q] hold the pair
// of columns c + 2q, c + 2q + 1; zeros when !in.
template <int R>
__device__ __forceinline__ void lm_row8(const float* A, int a_t, u32 N, u32 r, u32 c, bool in, u32 (&hi)[4],
                                        u32 (&lo)[4]) {
    float v[8];
    if (!in) {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = 0.0f;
    } else if (a_t) {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = A[(size_t)(c + i) * R + r];
    } else {
        const float4 p = *reinterpret_cast<const float4*>(A + (size_t)r * N + c);
        const float4 q = *reinterpret_cast<const float4*>(A + (size_t)r * N + c + 4);
        v[0] = p.x, v[1] = p.y, v[2] = p.z, v[3] = p.w, v[4] = q.x, v[5] = q.y, v[6] = q.z, v[7] = q.w;
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) lm_split2(v[2 * q], v[2 * q + 1], hi[q], lo[q]);
}

// Steps of 32 columns a warp loads before it multiplies any (the loads of the next group go out
// before the products of this one). One measured 10-20% faster than two on the H200, with fewer
// registers (BENCHMARKS.md); -DLM_CODES_UNROLL=N overrides it.
#ifndef LM_CODES_UNROLL
#define LM_CODES_UNROLL 1
#endif

// Warp w of a block owns rows m0 .. m0 + 32 (m0 = 128·blockIdx.y + 32w: two m16 tiles); a step
// covers 32 columns c .. c + 32, lane 4g + tq loading columns c + 8tq .. + 8 of rows m0 + 16i +
// g and m0 + 16i + g + 8. mma s (0, 1) of the step takes words 2s, 2s + 1 of those loads as its
// a0/a1 and a2/a3: its k (2tq + e, 2tq + 8 + e) are columns c + 8tq + 4s + e and c + 8tq + 4s +
// 2 + e, which are the pairs 2s, 2s + 1 of A's row (n = g of tile t: code 8t + g) at the same 8
// columns.
template <int R>
__device__ void lm_codes(u32 M, u32 N, const bf16* x, u32 ldx, const float* A, int a_t, float* part, u32 cps,
                         u64 seed, const u64* __restrict__ key, u32 thr, float keep, int drop) {
    constexpr int NT = R / 8; // n8 tiles of codes
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    const u32 m0 = blockIdx.y * (32 * LM_WARPS) + 32 * warp;
    const u32 c_begin = blockIdx.x * cps, c_end = min(N, c_begin + cps);
    const u64 mixed = dropout_mixed(seed, key);
    float acc[2][NT][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][t][q] = 0.0f;
    // x of the steps at c .. c + 32·LM_CODES_UNROLL: [step][m tile i · 2 + row half h]. The loads
    // of the next steps go out before the products of these (registers as the pipeline).
    auto load = [&](u32 c, uint4 (&xv)[LM_CODES_UNROLL][4]) {
#pragma unroll
        for (int u = 0; u < LM_CODES_UNROLL; ++u) {
            const u32 col = c + 32 * u + 8 * tq;
            const bool in = col < c_end; // N a multiple of 8: the 8 columns are inside or outside
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const u32 row = m0 + 8 * q + g;
                xv[u][q] = in && row < M ? lm_load16(x + (size_t)row * ldx + col) : lm_zero4();
            }
        }
    };
    uint4 xv[LM_CODES_UNROLL][4];
    load(c_begin, xv);
    for (u32 c = c_begin; c < c_end; c += 32 * LM_CODES_UNROLL) {
        uint4 next[LM_CODES_UNROLL][4];
        load(c + 32 * LM_CODES_UNROLL, next);
#pragma unroll
        for (int u = 0; u < LM_CODES_UNROLL; ++u) {
            const u32 col = c + 32 * u + 8 * tq;
            u32 ah[NT][4], al[NT][4];
#pragma unroll
            for (int t = 0; t < NT; ++t) lm_row8<R>(A, a_t, N, 8 * t + g, col, col < c_end, ah[t], al[t]);
#pragma unroll
            for (int q = 0; q < 4; ++q)
                if (drop) xv[u][q] = lm_mask8(xv[u][q], mixed, thr, (u64)(m0 + 8 * q + g) * N + col);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    const u32 a0 = lm_word(xv[u][2 * i], 2 * s), a1 = lm_word(xv[u][2 * i + 1], 2 * s);
                    const u32 a2 = lm_word(xv[u][2 * i], 2 * s + 1), a3 = lm_word(xv[u][2 * i + 1], 2 * s + 1);
#pragma unroll
                    for (int t = 0; t < NT; ++t) {
                        lm_mma(acc[i][t], a0, a1, a2, a3, ah[t][2 * s], ah[t][2 * s + 1]);
                        lm_mma(acc[i][t], a0, a1, a2, a3, al[t][2 * s], al[t][2 * s + 1]);
                    }
                }
        }
#pragma unroll
        for (int u = 0; u < LM_CODES_UNROLL; ++u)
#pragma unroll
            for (int q = 0; q < 4; ++q) xv[u][q] = next[u][q];
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const u32 row = m0 + 8 * q + g, i = q >> 1, h = q & 1;
        if (row >= M) continue;
        float* p = part + ((size_t)blockIdx.x * M + row) * R + 2 * tq;
#pragma unroll
        for (int t = 0; t < NT; ++t)
            *reinterpret_cast<float2*>(p + 8 * t) =
                make_float2(keep * acc[i][t][2 * h], keep * acc[i][t][2 * h + 1]);
    }
}

// Steps of 32 rows a warp loads before it multiplies any (as LM_CODES_UNROLL; one measured
// slightly faster than two); rows of dz a block stages at once.
#ifndef LM_GRAD_A_UNROLL
#define LM_GRAD_A_UNROLL 1
#endif
#define LM_DZ_ROWS 256
#define LM_DZ_STRIDE (LM_DZ_ROWS + 32) // bf16: rows g and g + 1 fall 16 banks apart

// Warp w of a block owns columns c0 .. c0 + 32 (c0 = 128·blockIdx.x + 32w); lane 4g + tq loads
// and writes columns c0 + 8tq .. + 8. A step covers rows m0 .. m0 + 32 of the split: the mma's
// k are rows, so x's tile is transposed on its way to the B fragments (movmatrix). For mma s
// (0, 1), k = 2tq + e is row m0 + 8tq + 4s + e and k = 2tq + 8 + e is row m0 + 8tq + 4s + 2 + e:
// the pairs 2s, 2s + 1 of dzᵀ's rows g and g + 8 at columns m0 + 8tq .. + 8 (the A fragment),
// which the block stages split in shared memory, LM_DZ_ROWS rows at a time. The 8×8 matrix that
// movmatrix turns into b0 of n-tile j holds, in its row i, word j of the load of row m0 + 8(i /
// 2) + i % 2 + 4s (b1: + 2): lane 4g + tq loads those rows for i = g. n-tile j's column n is then
// c0 + 8(n / 2) + 2j + n % 2, so lane 4g + tq's outputs d0, d1 of the four tiles are columns c0 +
// 8tq .. + 8, in order.
template <int R>
__device__ void lm_grad_a(u32 M, u32 N, const bf16* x, u32 ldx, const float* dz, float* part, u32 rps, u64 seed,
                          const u64* __restrict__ key, u32 thr, float keep, int drop) {
    __shared__ __align__(16) bf16 s_dz[2][R][LM_DZ_STRIDE]; // [hi, lo][code][row of the chunk]
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    const u32 col = blockIdx.x * (32 * LM_WARPS) + 32 * warp + 8 * tq;
    const bool cin = col < N;
    const u32 m_begin = blockIdx.y * rps, m_end = min(M, m_begin + rps);
    const u32 rbase = 8 * (g >> 1) + (g & 1); // + 4s + 2h: the rows this lane loads in a step
    const u64 mixed = dropout_mixed(seed, key);
    float acc[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[j][q] = 0.0f;
    // x of the steps at m .. m + 32·LM_GRAD_A_UNROLL: [step][mma s][b half h]. The loads of the
    // next steps go out before the products of these (registers as the pipeline).
    auto load = [&](u32 m, uint4 (&xv)[LM_GRAD_A_UNROLL][2][2]) {
#pragma unroll
        for (int u = 0; u < LM_GRAD_A_UNROLL; ++u)
#pragma unroll
            for (int s = 0; s < 2; ++s)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const u32 row = m + 32 * u + rbase + 4 * s + 2 * h;
                    xv[u][s][h] = cin && row < m_end ? lm_load16(x + (size_t)row * ldx + col) : lm_zero4();
                }
    };
    uint4 xv[LM_GRAD_A_UNROLL][2][2];
    load(m_begin, xv);
    // LM_DZ_ROWS is a multiple of 32·LM_GRAD_A_UNROLL: a chunk starts with an iteration.
    for (u32 m = m_begin; m < m_end; m += 32 * LM_GRAD_A_UNROLL) {
        const u32 chunk = m_begin + (m - m_begin) / LM_DZ_ROWS * LM_DZ_ROWS;
        if (m == chunk) { // block-uniform: stage the chunk's dz, split and transposed
            __syncthreads(); // every warp is done with the previous chunk
            for (u32 q = threadIdx.x; q < LM_DZ_ROWS * (R / 4); q += 32 * LM_WARPS) {
                const u32 row = q / (R / 4), r4 = (q % (R / 4)) * 4;
                const float4 v = chunk + row < m_end
                                     ? *reinterpret_cast<const float4*>(dz + (size_t)(chunk + row) * R + r4)
                                     : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                const float e[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const bf16 hi = __float2bfloat16(e[k]);
                    s_dz[0][r4 + k][row] = hi;
                    s_dz[1][r4 + k][row] = __float2bfloat16(e[k] - __bfloat162float(hi));
                }
            }
            __syncthreads();
        }
        uint4 next[LM_GRAD_A_UNROLL][2][2];
        load(m + 32 * LM_GRAD_A_UNROLL, next);
#pragma unroll
        for (int u = 0; u < LM_GRAD_A_UNROLL; ++u) {
            const u32 m0 = m + 32 * u;
            if (m0 >= m_end) break; // warp-uniform
            // dzᵀ rows g, g + 8 (zero for R = 8) at chunk columns m0 − chunk + 8tq .. + 8.
            uint4 dh[2], dl[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const bool live = R == 16 || h == 0;
                const u32 at = m0 - chunk + 8 * tq;
                dh[h] = live ? *reinterpret_cast<const uint4*>(&s_dz[0][(g + 8 * h) % R][at]) : lm_zero4();
                dl[h] = live ? *reinterpret_cast<const uint4*>(&s_dz[1][(g + 8 * h) % R][at]) : lm_zero4();
            }
#pragma unroll
            for (int s = 0; s < 2; ++s) {
#pragma unroll
                for (int h = 0; h < 2; ++h)
                    if (drop) {
                        const u32 row = m0 + rbase + 4 * s + 2 * h;
                        xv[u][s][h] = lm_mask8(xv[u][s][h], mixed, thr, (u64)row * N + col);
                    }
                const u32 hi0 = lm_word(dh[0], 2 * s), hi1 = lm_word(dh[1], 2 * s);
                const u32 hi2 = lm_word(dh[0], 2 * s + 1), hi3 = lm_word(dh[1], 2 * s + 1);
                const u32 lo0 = lm_word(dl[0], 2 * s), lo1 = lm_word(dl[1], 2 * s);
                const u32 lo2 = lm_word(dl[0], 2 * s + 1), lo3 = lm_word(dl[1], 2 * s + 1);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const u32 b0 = lm_trans(lm_word(xv[u][s][0], j)), b1 = lm_trans(lm_word(xv[u][s][1], j));
                    lm_mma(acc[j], hi0, hi1, hi2, hi3, b0, b1);
                    lm_mma(acc[j], lo0, lo1, lo2, lo3, b0, b1);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < LM_GRAD_A_UNROLL; ++u)
#pragma unroll
            for (int s = 0; s < 2; ++s)
#pragma unroll
                for (int h = 0; h < 2; ++h) xv[u][s][h] = next[u][s][h];
    }
    if (!cin) return;
#pragma unroll
    for (int h = 0; h < (R == 16 ? 2 : 1); ++h) {
        float* p = part + ((size_t)blockIdx.y * R + g + 8 * h) * N + col;
        *reinterpret_cast<float4*>(p) =
            make_float4(keep * acc[0][2 * h], keep * acc[0][2 * h + 1], keep * acc[1][2 * h], keep * acc[1][2 * h + 1]);
        *reinterpret_cast<float4*>(p + 4) =
            make_float4(keep * acc[2][2 * h], keep * acc[2][2 * h + 1], keep * acc[3][2 * h], keep * acc[3][2 * h + 1]);
    }
}

// m16 tiles a warp loads before it multiplies any.
#define LM_EXPAND_UNROLL 2

// Warp w of a block owns columns c0 .. c0 + 32 (c0 = 128·blockIdx.x + 32w) and holds its B
// fragments for all its rows: n-tile j's column n is c0 + 8(n / 2) + 2j + n % 2, so that lane
// 4g + tq's outputs of the four tiles are columns c0 + 8tq .. + 8 of rows m0 + g and m0 + g + 8
// (one 16-byte load of y and one store each). k = r: z's row gives the A fragment, split into
// hi and lo on the fly; each product is hi·hi + hi·lo + lo·hi (lo·lo is below f32 rounding).
template <int R>
__device__ void lm_expand(u32 M, u32 N, const float* z, const float* Bt, int bt_t, const bf16* y, u32 ldy, bf16* out,
                          u32 rpb, u64 seed, const u64* __restrict__ key, u32 thr, float keep, int drop) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    const u32 c0 = blockIdx.x * (32 * LM_WARPS) + 32 * warp, col = c0 + 8 * tq;
    const bool cin = col < N;
    // b0 = Bt[2tq, 2tq + 1][n], b1 = Bt[2tq + 8, + 9][n] (zero for R = 8), n = this lane's column.
    u32 bh[4][2], bl[4][2];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32 n = c0 + 8 * (g >> 1) + 2 * j + (g & 1);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
            const u32 r = 2 * tq + 8 * q;
            float2 v = make_float2(0.0f, 0.0f);
            if (n < N && (R == 16 || q == 0))
                v = bt_t ? *reinterpret_cast<const float2*>(Bt + (size_t)n * R + r)
                         : make_float2(Bt[(size_t)r * N + n], Bt[(size_t)(r + 1) * N + n]);
            lm_split2(v.x, v.y, bh[j][q], bl[j][q]);
        }
    }
    const u64 mixed = dropout_mixed(seed, key);
    const u32 m_begin = blockIdx.y * rpb, m_end = min(M, m_begin + rpb);
    // z rows m0 + g, m0 + g + 8 at k 2tq, 2tq + 1 and + 8, and y at the lane's 8 columns, of the
    // tiles at m .. m + 16·LM_EXPAND_UNROLL. The loads of the next tiles go out before the
    // products of these (registers as the pipeline).
    struct Tiles {
        float2 z[LM_EXPAND_UNROLL][2][2];
        uint4 y[LM_EXPAND_UNROLL][2];
    };
    auto load = [&](u32 m, Tiles& t) {
#pragma unroll
        for (int u = 0; u < LM_EXPAND_UNROLL; ++u)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 row = m + 16 * u + g + 8 * h;
                const bool live = row < m_end;
                const float* zr = z + (size_t)row * R + 2 * tq;
                t.z[u][h][0] = live ? *reinterpret_cast<const float2*>(zr) : make_float2(0.0f, 0.0f);
                t.z[u][h][1] = live && R == 16 ? *reinterpret_cast<const float2*>(zr + 8) : make_float2(0.0f, 0.0f);
                t.y[u][h] = y != nullptr && live && cin ? lm_load16(y + (size_t)row * ldy + col) : lm_zero4();
            }
    };
    Tiles cur;
    load(m_begin, cur);
    for (u32 m = m_begin; m < m_end; m += 16 * LM_EXPAND_UNROLL) {
        Tiles next;
        load(m + 16 * LM_EXPAND_UNROLL, next);
        const auto& zv = cur.z;
        const auto& yv = cur.y;
#pragma unroll
        for (int u = 0; u < LM_EXPAND_UNROLL; ++u) {
            const u32 m0 = m + 16 * u;
            if (m0 >= m_end) break; // warp-uniform
            u32 ah[4], al[4]; // a0 (row g), a1 (row g + 8), a2, a3 (k + 8)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                lm_split2(zv[u][h][0].x, zv[u][h][0].y, ah[h], al[h]);
                lm_split2(zv[u][h][1].x, zv[u][h][1].y, ah[2 + h], al[2 + h]);
            }
            float acc[4][4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[j][q] = 0.0f;
                lm_mma(acc[j], ah[0], ah[1], ah[2], ah[3], bh[j][0], bh[j][1]);
                lm_mma(acc[j], ah[0], ah[1], ah[2], ah[3], bl[j][0], bl[j][1]);
                lm_mma(acc[j], al[0], al[1], al[2], al[3], bh[j][0], bh[j][1]);
            }
            if (!cin) continue;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const u32 row = m0 + g + 8 * h;
                if (row >= m_end) continue;
                float v[8];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    v[2 * j] = acc[j][2 * h];
                    v[2 * j + 1] = acc[j][2 * h + 1];
                }
                if (drop) {
                    const LmBits b = lm_bits(mixed, (u64)row * N + col);
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const u32 bits = lm_pair_bits(b, q);
                        v[2 * q] *= (bits & 0xFFFFu) < thr ? 0.0f : keep;
                        v[2 * q + 1] *= (bits >> 16) < thr ? 0.0f : keep;
                    }
                }
                if (y != nullptr) {
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        const float2 yy = lm_unpack2(lm_word(yv[u][h], q));
                        v[2 * q] += yy.x;
                        v[2 * q + 1] += yy.y;
                    }
                }
                *reinterpret_cast<uint4*>(out + (size_t)row * N + col) =
                    make_uint4(lm_pack2(v[0], v[1]), lm_pack2(v[2], v[3]), lm_pack2(v[4], v[5]), lm_pack2(v[6], v[7]));
            }
        }
        cur = next;
    }
}

#define LORA_MMA_RANK(R) \
    extern "C" __global__ void __launch_bounds__(32 * LM_WARPS) lora_codes_mma_bf16_r##R( \
        u32 M, u32 N, const bf16* x, u32 ldx, const float* A, int a_t, float* part, u32 cps, u64 seed, \
        const u64* __restrict__ key, u32 thr, float keep, int drop) { \
        lm_codes<R>(M, N, x, ldx, A, a_t, part, cps, seed, key, thr, keep, drop); \
    } \
    extern "C" __global__ void __launch_bounds__(32 * LM_WARPS) lora_grad_a_mma_bf16_r##R( \
        u32 M, u32 N, const bf16* x, u32 ldx, const float* dz, float* part, u32 rps, u64 seed, \
        const u64* __restrict__ key, u32 thr, float keep, int drop) { \
        lm_grad_a<R>(M, N, x, ldx, dz, part, rps, seed, key, thr, keep, drop); \
    } \
    extern "C" __global__ void __launch_bounds__(32 * LM_WARPS) lora_expand_mma_bf16_r##R( \
        u32 M, u32 N, const float* z, const float* Bt, int bt_t, const bf16* y, u32 ldy, bf16* out, u32 rpb, u64 seed, \
        const u64* __restrict__ key, u32 thr, float keep, int drop) { \
        lm_expand<R>(M, N, z, Bt, bt_t, y, ldy, out, rpb, seed, key, thr, keep, drop); \
    }

LORA_MMA_RANK(8)
LORA_MMA_RANK(16)
