// Products of a bf16 operand with its dropout mask against a wide bf16 one (every MixLoRA
// expert's LoRA-A stacked: E·r = 128 codes), on the tensor cores, where the composition wrote
// drop(x) and cuBLAS then ran a GEMM with one side of only 128 (32 blocks on 132 SMs). Follows
// lora_mma.cu in the LORA module (lm_mma, lm_mask8, lm_word, lm_load16, lm_zero4); the dropout
// mask is dropout_bits(seed ^ *key) of engine/src/rng.rs (key: the device's dropout key,
// common.cuh) over x's row-major [M, K] elements (the kept ones' factor keep = 1/(1 − p) scales
// the sums once; a dropped element is an exact zero).
//
// lora_codes_wide_bf16(M, N, K, x, ldx, A, lda, part, cols_per_split, seed, key, thr, keep, drop)
//     part[s, m, n] = keep · Σ_{c in split s} mask(x)[m, c] · A[n, c]: x [M, K], A [N, K] bf16
//     (row strides ldx, lda; rows of 16-byte runs: K, the strides multiples of 8, 16-byte
//     aligned), N a multiple of 8, splits of cols_per_split (a multiple of 32) columns;
//     part [splits, M, N] f32; grid (splits, ceil(M / 64), ceil(N / 128)), 128 threads.
// lora_grad_a_wide_bf16(M, N, K, dz, ldz, x, ldx, part, rows_per_split, seed, key, thr, keep, drop)
//     part[s, n, c] = keep · Σ_{m in split s} dz[m, n] · mask(x)[m, c]: dz [M, N], x [M, K] bf16
//     (as above), splits of rows_per_split (a multiple of 32) rows; part [splits, N, K] f32;
//     grid (ceil(K / 64), splits, ceil(N / 128)), 128 threads.
//
// Both stage x's tile in shared memory with its mask applied (each element hashed once per
// launch), double-buffered with one barrier a step; the next step's global loads go out before
// the current step's products.

#define LW_THREADS 128

__device__ __forceinline__ void lw_ldsm4(u32 (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((u32)__cvta_generic_to_shared(p)));
}
__device__ __forceinline__ void lw_ldsm4_t(u32 (&r)[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((u32)__cvta_generic_to_shared(p)));
}

// Warp w owns codes n0 = 128·blockIdx.z + 32w .. + 32 (four n8 tiles) of the block's 64 rows
// (four m16 tiles); a step covers 32 columns. The block loads x's 64 × 32 tile (two 16-byte
// chunks a thread), masks it and stores it as [row][4 chunks]: lane 4g + tq then reads chunk tq
// of rows 16i + g and 16i + g + 8, and mma s (0, 1) takes words 2s, 2s + 1 of those as a0/a1 and
// a2/a3 (k = 2tq + e ↔ column 8tq + 4s + e, k = 2tq + 8 + e ↔ column 8tq + 4s + 2 + e), which
// are the words 2s, 2s + 1 of A's row n0 + 8t + g at the same 8 columns (b0, b1 of tile t).
extern "C" __global__ void __launch_bounds__(LW_THREADS)
    lora_codes_wide_bf16(u32 M, u32 N, u32 K, const bf16* x, u32 ldx, const bf16* A, u32 lda, float* part, u32 cps,
                         u64 seed, const u64* __restrict__ key, u32 thr, float keep, int drop) {
    __shared__ uint4 s_x[2][64 * 4]; // [buffer][row · 4 + chunk]: rows g, g + 1 fall 16 banks apart
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tq = lane & 3;
    const u32 m0 = blockIdx.y * 64, n0 = blockIdx.z * 128 + 32 * warp;
    const u32 c_begin = blockIdx.x * cps, c_end = min(K, c_begin + cps);
    const u64 mixed = dropout_mixed(seed, key);
    const u32 lrow = tid >> 2, lchunk = tid & 3; // this thread's tile chunks: rows lrow, lrow + 32
    auto load_x = [&](u32 c, uint4 (&v)[2]) {
        const u32 col = c + 8 * lchunk;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 row = m0 + lrow + 32 * h;
            v[h] = col < c_end && row < M ? lm_load16(x + (size_t)row * ldx + col) : lm_zero4();
        }
    };
    auto store_x = [&](u32 c, uint4 (&v)[2], uint4* s) {
        const u32 col = c + 8 * lchunk;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 row = m0 + lrow + 32 * h;
            if (drop) v[h] = lm_mask8(v[h], mixed, thr, (u64)row * K + col);
            s[(lrow + 32 * h) * 4 + lchunk] = v[h];
        }
    };
    auto load_a = [&](u32 c, uint4 (&a)[4]) {
        const u32 col = c + 8 * tq;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const u32 n = n0 + 8 * t + g;
            a[t] = n < N && col < c_end ? lm_load16(A + (size_t)n * lda + col) : lm_zero4();
        }
    };
    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int t = 0; t < 4; ++t)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][t][q] = 0.0f;
    uint4 xv[2], av[4];
    load_x(c_begin, xv);
    load_a(c_begin, av);
    store_x(c_begin, xv, s_x[0]);
    __syncthreads();
    u32 buf = 0;
    for (u32 c = c_begin; c < c_end; c += 32) {
        const u32 cn = c + 32;
        uint4 xn[2], an[4];
        load_x(cn, xn); // zeros, without loads, past the split
        load_a(cn, an);
        const uint4* s = s_x[buf];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint4 r0 = s[(16 * i + g) * 4 + tq], r1 = s[(16 * i + g + 8) * 4 + tq];
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                const u32 a0 = lm_word(r0, 2 * k), a1 = lm_word(r1, 2 * k);
                const u32 a2 = lm_word(r0, 2 * k + 1), a3 = lm_word(r1, 2 * k + 1);
#pragma unroll
                for (int t = 0; t < 4; ++t)
                    lm_mma(acc[i][t], a0, a1, a2, a3, lm_word(av[t], 2 * k), lm_word(av[t], 2 * k + 1));
            }
        }
        if (cn < c_end) store_x(cn, xn, s_x[buf ^ 1]); // its last readers finished a step ago
        __syncthreads();
        buf ^= 1;
#pragma unroll
        for (int t = 0; t < 4; ++t) av[t] = an[t];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 row = m0 + 16 * i + g + 8 * h;
            if (row >= M) continue;
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const u32 n = n0 + 8 * t + 2 * tq; // N a multiple of 8: n + 1 < N too
                if (n < N)
                    *reinterpret_cast<float2*>(part + ((size_t)blockIdx.x * M + row) * N + n) =
                        make_float2(keep * acc[i][t][2 * h], keep * acc[i][t][2 * h + 1]);
            }
        }
}

#define LW_XS 72  // row stride (bf16) of the [32, 64] x tile: 9 16-byte units (ldmatrix rows
                  // hit distinct banks)
#define LW_DS 136 // row stride (bf16) of the [32, 128] dz tile: 17 units

// Warp w owns codes n0 = 128·blockIdx.z + 32w .. + 32 (two m16 tiles of the output) and the
// block's 64 columns (eight n8 tiles); a step covers 32 rows (two k16 steps). The block stages
// x's 32 × 64 tile (masked) and dz's 32 × 128 tile, both [row][column]: the A fragments (dzᵀ)
// and the B fragments (x, k = row) come out of them through ldmatrix.trans.
extern "C" __global__ void __launch_bounds__(LW_THREADS)
    lora_grad_a_wide_bf16(u32 M, u32 N, u32 K, const bf16* dz, u32 ldz, const bf16* x, u32 ldx, float* part,
                          u32 rps, u64 seed, const u64* __restrict__ key, u32 thr, float keep, int drop) {
    __shared__ __align__(16) bf16 s_x[2][32 * LW_XS];
    __shared__ __align__(16) bf16 s_d[2][32 * LW_DS];
    const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, tq = lane & 3;
    const u32 c0 = blockIdx.x * 64, nb = blockIdx.z * 128, n0 = nb + 32 * warp;
    const u32 m_begin = blockIdx.y * rps, m_end = min(M, m_begin + rps);
    const u64 mixed = dropout_mixed(seed, key);
    // x tile: 32 rows × 8 chunks, two a thread (rows xr, xr + 16); dz tile: 32 rows × 16
    // chunks, four a thread (rows dr + 8j).
    const u32 xr = tid >> 3, xc = tid & 7, dr = tid >> 4, dc = tid & 15;
    auto load = [&](u32 m, uint4 (&xv)[2], uint4 (&dv)[4]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 row = m + xr + 16 * h, col = c0 + 8 * xc;
            xv[h] = row < m_end && col < K ? lm_load16(x + (size_t)row * ldx + col) : lm_zero4();
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32 row = m + dr + 8 * j, n = nb + 8 * dc;
            dv[j] = row < m_end && n < N ? lm_load16(dz + (size_t)row * ldz + n) : lm_zero4();
        }
    };
    auto store = [&](u32 m, uint4 (&xv)[2], const uint4 (&dv)[4], u32 b) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 row = m + xr + 16 * h, col = c0 + 8 * xc;
            if (drop) xv[h] = lm_mask8(xv[h], mixed, thr, (u64)row * K + col);
            *reinterpret_cast<uint4*>(&s_x[b][(xr + 16 * h) * LW_XS + 8 * xc]) = xv[h];
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) *reinterpret_cast<uint4*>(&s_d[b][(dr + 8 * j) * LW_DS + 8 * dc]) = dv[j];
    };
    float acc[2][8][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int t = 0; t < 8; ++t)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][t][q] = 0.0f;
    // ldmatrix lane addresses: lane l points at row l % 8 (+8 for matrices 1, 3 or 2, 3).
    const u32 mi = lane >> 3, lr = lane & 7;
    {
        uint4 xv[2], dv[4];
        load(m_begin, xv, dv);
        store(m_begin, xv, dv, 0);
    }
    __syncthreads();
    u32 b = 0;
    for (u32 m = m_begin; m < m_end; m += 32) {
        const u32 mn = m + 32;
        uint4 xn[2], dn[4];
        load(mn, xn, dn); // zeros, without loads, past the split
#pragma unroll
        for (int k0 = 0; k0 < 32; k0 += 16) {
            // A (16 codes × 16 rows) of dzᵀ from the [row][code] tile: matrices (codes +0/+8) ×
            // (rows +0/+8) in the order a0 .. a3.
            u32 a[2][4];
#pragma unroll
            for (int i = 0; i < 2; ++i)
                lw_ldsm4_t(a[i], &s_d[b][(k0 + lr + ((mi & 2) ? 8 : 0)) * LW_DS + (n0 - nb) + 16 * i + ((mi & 1) ? 8 : 0)]);
#pragma unroll
            for (int t = 0; t < 8; t += 2) {
                // B of n8 tiles t, t + 1 (columns 8t ..) from the [row][column] tile.
                u32 bb[4];
                lw_ldsm4_t(bb, &s_x[b][(k0 + lr + ((mi & 1) ? 8 : 0)) * LW_XS + 8 * t + ((mi & 2) ? 8 : 0)]);
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    lm_mma(acc[i][t], a[i][0], a[i][1], a[i][2], a[i][3], bb[0], bb[1]);
                    lm_mma(acc[i][t + 1], a[i][0], a[i][1], a[i][2], a[i][3], bb[2], bb[3]);
                }
            }
        }
        if (mn < m_end) store(mn, xn, dn, b ^ 1); // its last readers finished a step ago
        __syncthreads();
        b ^= 1;
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 n = n0 + 16 * i + g + 8 * h;
            if (n >= N) continue;
#pragma unroll
            for (int t = 0; t < 8; ++t) {
                const u32 col = c0 + 8 * t + 2 * tq; // K a multiple of 8: col + 1 < K too
                if (col < K)
                    *reinterpret_cast<float2*>(part + ((size_t)blockIdx.y * N + n) * K + col) =
                        make_float2(keep * acc[i][t][2 * h], keep * acc[i][t][2 * h + 1]);
            }
        }
}
