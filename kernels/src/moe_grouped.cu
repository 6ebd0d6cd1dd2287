// The grouped-expert kernels (engine/src/fused/moe_grouped/): device-side grouping of (token,
// slot) pairs by expert, row permute / weighted combine, and grouped matmuls over the expert
// segments of a sorted row set. Everything is deterministic: no float atomics, and the grouping
// uses only integer counts whose result does not depend on their order.
//
// Inputs are contiguous (the host makes them so). `A` is the accumulation type (float for f32
// and bf16, double for f64).

// ----- grouping by expert ---------------------------------------------------------------------------
//
// Slots p = 0..S (S = n·k) carry expert ids[p]. Bucket b(p) = min(ids[p], E): an id ≥ E goes to an
// overflow bucket E placed after every expert, so perm stays a permutation of 0..S, offsets[E]
// counts only the slots with a valid id, and nothing is written out of bounds. Three kernels, one
// tile of GROUP_TILE slots per block:
//   count:   cnt[b·nblk + blk] = #slots of tile blk in bucket b (integer shared-memory counts);
//   scan:    one block; exclusive scan of cnt in bucket-major order (so base[b·nblk + blk] is
//            where tile blk's slots of bucket b start) and offsets[b] = base[b·nblk], b ≤ E;
//   scatter: stable placement: a slot's rank among the earlier slots of its tile with its bucket
//            comes from warp match masks and per-warp counts, so perm[base + rank] = p.

#define GROUP_TILE 256

// moe_group_count_u32(s, e, ids, cnt): cnt [(e+1) · nblk].
extern "C" __global__ void moe_group_count_u32(u32 s, u32 e, const u32* ids, u32* cnt) {
    extern __shared__ u32 c_sh[];  // [e + 1]
    for (u32 b = threadIdx.x; b <= e; b += blockDim.x) c_sh[b] = 0;
    __syncthreads();
    const size_t p = (size_t)blockIdx.x * GROUP_TILE + threadIdx.x;
    if (p < s) atomicAdd(&c_sh[min(ids[p], e)], 1u);
    __syncthreads();
    for (u32 b = threadIdx.x; b <= e; b += blockDim.x) cnt[(size_t)b * gridDim.x + blockIdx.x] = c_sh[b];
}

// moe_group_scan_u32(len, nblk, e, cnt, offsets): in-place exclusive scan of cnt [len], then
// offsets[b] = cnt[b · nblk] for b ≤ e. One block of 1024 threads.
extern "C" __global__ void moe_group_scan_u32(u32 len, u32 nblk, u32 e, u32* cnt, u32* offsets) {
    __shared__ u32 warp_tot[32];
    __shared__ u32 carry_sh;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (threadIdx.x == 0) carry_sh = 0;
    __syncthreads();
    for (u32 c0 = 0; c0 < len; c0 += blockDim.x) {
        const u32 i = c0 + threadIdx.x;
        const u32 v = i < len ? cnt[i] : 0u;
        u32 inc = v;
        for (u32 o = 1; o < 32; o <<= 1) {
            const u32 y = __shfl_up_sync(0xffffffffu, inc, o);
            if (lane >= o) inc += y;
        }
        if (lane == 31) warp_tot[warp] = inc;
        __syncthreads();
        if (warp == 0) {
            u32 t = lane < warps ? warp_tot[lane] : 0u;
            for (u32 o = 1; o < 32; o <<= 1) {
                const u32 y = __shfl_up_sync(0xffffffffu, t, o);
                if (lane >= o) t += y;
            }
            if (lane < warps) warp_tot[lane] = t;  // inclusive over warps
        }
        __syncthreads();
        const u32 carry = carry_sh;
        const u32 before = (warp > 0 ? warp_tot[warp - 1] : 0u) + inc - v;
        if (i < len) cnt[i] = carry + before;
        __syncthreads();
        if (threadIdx.x == 0) carry_sh = carry + warp_tot[warps - 1];
        __syncthreads();
    }
    for (u32 b = threadIdx.x; b <= e; b += blockDim.x) offsets[b] = b * nblk < len ? cnt[(size_t)b * nblk] : carry_sh;
}

// moe_group_scatter_u32(s, e, ids, base, perm): base is the scanned cnt.
extern "C" __global__ void moe_group_scatter_u32(u32 s, u32 e, const u32* ids, const u32* base, u32* perm) {
    extern __shared__ u32 w_sh[];  // [GROUP_TILE / 32][e + 1]
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 nb = e + 1;
    for (u32 i = threadIdx.x; i < (GROUP_TILE / 32) * nb; i += blockDim.x) w_sh[i] = 0;
    __syncthreads();
    const size_t p = (size_t)blockIdx.x * GROUP_TILE + threadIdx.x;
    const bool valid = p < s;
    const u32 b = valid ? min(ids[p], e) : 0xffffffffu;
    const u32 peers = __match_any_sync(0xffffffffu, b);
    const u32 rank = __popc(peers & ((1u << lane) - 1u));
    if (valid && lane == (u32)(__ffs(peers) - 1)) w_sh[warp * nb + b] = __popc(peers);
    __syncthreads();
    if (!valid) return;
    u32 pos = base[(size_t)b * gridDim.x + blockIdx.x] + rank;
    for (u32 w = 0; w < warp; ++w) pos += w_sh[w * nb + b];
    perm[pos] = (u32)p;
}

// moe_invert_perm_u32(s, perm, inv): inv[perm[q]] = q (entries ≥ s are skipped).
extern "C" __global__ void moe_invert_perm_u32(u32 s, const u32* perm, u32* inv) {
    FOR_EACH(q, s) {
        const u32 p = perm[q];
        if (p < s) inv[p] = (u32)q;
    }
}

// ----- permute and combine --------------------------------------------------------------------------

// moe_permute_{dtype}(m, h, k, x, perm, scale, y)
//   x: [n, h]; perm: [m] u32 (slot ids, token = slot / k); scale: [n·k] A or null;
//   y[q, :] = scale[perm[q]] · x[perm[q] / k, :] (a slot ≥ m gives a zero row).
template <typename T>
__device__ void permute(u32 m, u32 h, u32 k, const T* x, const u32* perm, const typename Acc<T>::type* scale, T* y) {
    typedef typename Acc<T>::type A;
    FOR_EACH(i, (size_t)m * h) {
        const size_t q = i / h, c = i % h;
        const u32 p = perm[q];
        A v = (A)0;
        if (p < m) {
            v = to_acc(x[(size_t)(p / k) * h + c]);
            if (scale) v *= scale[p];
        }
        y[i] = from_acc<T>(v);
    }
}

// moe_combine_{dtype}(n, h, k, y, inv, w, out)
//   y: [n·k, h] sorted rows; inv: [n·k] u32 (row of slot p); w: [n, k] A;
//   out[t, :] = Σ_j w[t, j] · y[inv[t·k + j], :], summed in slot order in A.
template <typename T>
__device__ void combine(u32 n, u32 h, u32 k, const T* y, const u32* inv, const typename Acc<T>::type* w, T* out) {
    typedef typename Acc<T>::type A;
    const u32 m = n * k;
    FOR_EACH(i, (size_t)n * h) {
        const size_t t = i / h, c = i % h;
        A acc = (A)0;
        for (u32 j = 0; j < k; ++j) {
            const u32 r = inv[t * k + j];
            if (r < m) acc += w[t * k + j] * to_acc(y[(size_t)r * h + c]);
        }
        out[i] = from_acc<T>(acc);
    }
}

// moe_combine_dw_{dtype}(n, h, k, y, inv, g, dw)
//   dw[t, j] = Σ_c g[t, c] · y[inv[t·k + j], c] (A); one block per slot, a fixed-order block sum.
template <typename T>
__device__ void combine_dw(u32 n, u32 h, u32 k, const T* y, const u32* inv, const T* g, typename Acc<T>::type* dw) {
    typedef typename Acc<T>::type A;
    const u32 m = n * k;
    const size_t p = blockIdx.x;
    if (p >= m) return;
    const u32 r = inv[p];
    const size_t t = p / k;
    A acc = (A)0;
    if (r < m) {
        for (u32 c = threadIdx.x; c < h; c += blockDim.x) acc += to_acc(g[t * h + c]) * to_acc(y[(size_t)r * h + c]);
    }
    acc = block_reduce(acc, SumOp(), (A)0);
    if (threadIdx.x == 0) dw[p] = acc;
}

// ----- grouped matmul ---------------------------------------------------------------------------------
//
// y[r, n] = Σ_κ x[r, κ] · W(e(r), n, κ) for the rows r of expert e's segment [off[e], off[e+1]),
// with W(e, n, κ) = w[e·se + n·sn + κ·sk] (a [N, K] view per expert, either orientation). Rows
// outside every segment get 0. The grid tiles M × N; a row tile that spans several segments runs
// once per segment, masking the other rows, so no host needs the segment sizes.
// Offsets are clamped to [0, m]; they must be non-decreasing (moe_group's are).

template <typename T, int BM, int BN, int BK, int TM, int TN>
__device__ void gmm(u32 m, u32 nn, u32 kk, u32 ne, const T* x, const T* w, u32 se, u32 sn, u32 sk,
                    const u32* off, T* y) {
    typedef typename Acc<T>::type A;
    // +1 pads: the tile stores walk the first index across a warp, which would otherwise hit
    // one shared-memory bank.
    __shared__ A xs[BK][BM + 1];
    __shared__ A ws[BK][BN + 1];
    const u32 tid = threadIdx.x;
    const u32 tx = tid % (BN / TN), ty = tid / (BN / TN);
    const u32 m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const u32 tile_end = min(m0 + BM, m);
    const u32 first = min(off[0], m), last = min(off[ne], m);
    // Rows of this thread outside every segment: zeros.
    for (int i = 0; i < TM; ++i) {
        const u32 r = m0 + ty * TM + i;
        if (r >= tile_end || (r >= first && r < last)) continue;
        for (int j = 0; j < TN; ++j) {
            const u32 c = n0 + tx * TN + j;
            if (c < nn) y[(size_t)r * nn + c] = from_acc<T>((A)0);
        }
    }
    for (u32 e = 0; e < ne; ++e) {
        const u32 lo = max(min(off[e], m), m0), hi = min(min(off[e + 1], m), tile_end);
        if (lo >= hi) continue;  // uniform over the block
        const T* we = w + (size_t)e * se;
        A acc[TM][TN];
        for (int i = 0; i < TM; ++i)
            for (int j = 0; j < TN; ++j) acc[i][j] = (A)0;
        for (u32 k0 = 0; k0 < kk; k0 += BK) {
            for (u32 i = tid; i < BM * BK; i += blockDim.x) {
                const u32 r = i / BK, c = i % BK;
                const u32 row = m0 + r, col = k0 + c;
                xs[c][r] = (row >= lo && row < hi && col < kk) ? to_acc(x[(size_t)row * kk + col]) : (A)0;
            }
            for (u32 i = tid; i < BN * BK; i += blockDim.x) {
                u32 nI, c;
                if (sk == 1) { nI = i / BK; c = i % BK; } else { c = i / BN; nI = i % BN; }
                const u32 col = n0 + nI, kc = k0 + c;
                ws[c][nI] = (col < nn && kc < kk) ? to_acc(we[(size_t)col * sn + (size_t)kc * sk]) : (A)0;
            }
            __syncthreads();
#pragma unroll
            for (int c = 0; c < BK; ++c) {
                A a[TM], b[TN];
#pragma unroll
                for (int i = 0; i < TM; ++i) a[i] = xs[c][ty * TM + i];
#pragma unroll
                for (int j = 0; j < TN; ++j) b[j] = ws[c][tx * TN + j];
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
            }
            __syncthreads();
        }
        for (int i = 0; i < TM; ++i) {
            const u32 r = m0 + ty * TM + i;
            if (r < lo || r >= hi) continue;
            for (int j = 0; j < TN; ++j) {
                const u32 c = n0 + tx * TN + j;
                if (c < nn) y[(size_t)r * nn + c] = from_acc<T>(acc[i][j]);
            }
        }
    }
}

// dw[e, n, κ] = Σ_{r in segment e} dy[r, n] · x[r, κ]: dy [m, N], x [m, K], dw [E, N, K]. The grid
// is (N tiles, K tiles, E); each block reduces its expert's rows in chunks of BR, in row order.
template <typename T, int BN, int BK, int TN, int TK, int BR>
__device__ void gmm_dw(u32 m, u32 nn, u32 kk, u32 ne, const T* dy, const T* x, const u32* off, T* dw) {
    typedef typename Acc<T>::type A;
    __shared__ A gs[BR][BN];
    __shared__ A xs[BR][BK];
    const u32 tid = threadIdx.x;
    const u32 tk = tid % (BK / TK), tn = tid / (BK / TK);
    const u32 n0 = blockIdx.x * BN, k0 = blockIdx.y * BK, e = blockIdx.z;
    if (e >= ne) return;
    const u32 lo = min(off[e], m), hi = max(min(off[e + 1], m), lo);
    A acc[TN][TK];
    for (int i = 0; i < TN; ++i)
        for (int j = 0; j < TK; ++j) acc[i][j] = (A)0;
    for (u32 r0 = lo; r0 < hi; r0 += BR) {
        for (u32 i = tid; i < BR * BN; i += blockDim.x) {
            const u32 r = i / BN, c = i % BN;
            gs[r][c] = (r0 + r < hi && n0 + c < nn) ? to_acc(dy[(size_t)(r0 + r) * nn + n0 + c]) : (A)0;
        }
        for (u32 i = tid; i < BR * BK; i += blockDim.x) {
            const u32 r = i / BK, c = i % BK;
            xs[r][c] = (r0 + r < hi && k0 + c < kk) ? to_acc(x[(size_t)(r0 + r) * kk + k0 + c]) : (A)0;
        }
        __syncthreads();
#pragma unroll 4
        for (int r = 0; r < BR; ++r) {
            A a[TN], b[TK];
#pragma unroll
            for (int i = 0; i < TN; ++i) a[i] = gs[r][tn * TN + i];
#pragma unroll
            for (int j = 0; j < TK; ++j) b[j] = xs[r][tk * TK + j];
#pragma unroll
            for (int i = 0; i < TN; ++i)
#pragma unroll
                for (int j = 0; j < TK; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < TN; ++i) {
        const u32 n = n0 + tn * TN + i;
        if (n >= nn) continue;
        for (int j = 0; j < TK; ++j) {
            const u32 c = k0 + tk * TK + j;
            if (c < kk) dw[((size_t)e * nn + n) * kk + c] = from_acc<T>(acc[i][j]);
        }
    }
}

// Tile shapes (256 threads each):
//   narrow: N ≤ 16 (LoRA A forward, K = H; B's input gradient, K = I): 128 × 16 tiles, 4 × 2 per
//           thread; BK = 32 (16 for f64, to keep shared memory small);
//   wide:   everything else (LoRA B forward, N = I, K = r; A's input gradient): 64 × 64, 4 × 4;
//   dw_n16: N ≤ 16 (A's weight gradient): 16 × 128 outputs, 2 × 4 per thread;
//   dw_k16: K ≤ 16 (B's weight gradient): 128 × 16 outputs, 4 × 2 per thread;
//   dw:     64 × 64 outputs, 4 × 4 per thread.
#define MOE_GROUPED(T, SUF, NBK) \
    extern "C" __global__ void moe_permute_##SUF(u32 m, u32 h, u32 k, const T* x, const u32* perm, \
                                                 const Acc<T>::type* scale, T* y) { \
        permute<T>(m, h, k, x, perm, scale, y); \
    } \
    extern "C" __global__ void moe_combine_##SUF(u32 n, u32 h, u32 k, const T* y, const u32* inv, \
                                                 const Acc<T>::type* w, T* out) { \
        combine<T>(n, h, k, y, inv, w, out); \
    } \
    extern "C" __global__ void moe_combine_dw_##SUF(u32 n, u32 h, u32 k, const T* y, const u32* inv, const T* g, \
                                                    Acc<T>::type* dw) { \
        combine_dw<T>(n, h, k, y, inv, g, dw); \
    } \
    extern "C" __global__ void grouped_matmul_narrow_##SUF(u32 m, u32 nn, u32 kk, u32 ne, const T* x, const T* w, \
                                                           u32 se, u32 sn, u32 sk, const u32* off, T* y) { \
        gmm<T, 128, 16, NBK, 4, 2>(m, nn, kk, ne, x, w, se, sn, sk, off, y); \
    } \
    extern "C" __global__ void grouped_matmul_wide_##SUF(u32 m, u32 nn, u32 kk, u32 ne, const T* x, const T* w, \
                                                         u32 se, u32 sn, u32 sk, const u32* off, T* y) { \
        gmm<T, 64, 64, 16, 4, 4>(m, nn, kk, ne, x, w, se, sn, sk, off, y); \
    } \
    extern "C" __global__ void grouped_matmul_dw_n16_##SUF(u32 m, u32 nn, u32 kk, u32 ne, const T* dy, const T* x, \
                                                           const u32* off, T* dw) { \
        gmm_dw<T, 16, 128, 2, 4, 32>(m, nn, kk, ne, dy, x, off, dw); \
    } \
    extern "C" __global__ void grouped_matmul_dw_k16_##SUF(u32 m, u32 nn, u32 kk, u32 ne, const T* dy, const T* x, \
                                                           const u32* off, T* dw) { \
        gmm_dw<T, 128, 16, 4, 2, 32>(m, nn, kk, ne, dy, x, off, dw); \
    } \
    extern "C" __global__ void grouped_matmul_dw_##SUF(u32 m, u32 nn, u32 kk, u32 ne, const T* dy, const T* x, \
                                                       const u32* off, T* dw) { \
        gmm_dw<T, 64, 64, 4, 4, 32>(m, nn, kk, ne, dy, x, off, dw); \
    }

MOE_GROUPED(float, f32, 32)
MOE_GROUPED(bf16, bf16, 32)
MOE_GROUPED(double, f64, 16)
