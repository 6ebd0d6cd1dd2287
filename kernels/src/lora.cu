// Fused LoRA: y + s · (drop(x) Aᵀ) Bᵀ and its backward, storing nothing but the rank-r codes.
// The dropout mask is recomputed in every kernel that needs it from the counter-based RNG (the
// same function as engine/src/rng.rs and random.cu): element i = m·in + c of the row-major
// [M, in] is dropped when (hash(seed, i) >> 11) < thr, thr = ceil(p · 2^53) (exactly
// `uniform(seed, i) < p`), else multiplied by keep = 1/(1-p) in the adapter type. thr == 0: no mask.
//
// T is the base dtype (f32, bf16, f64); A = Acc<T> is the adapter dtype (float, double), in which
// every product and sum runs. x/y/g are rank-2 views (s0, s1, off); the adapter operands are
// contiguous. r ≤ LORA_RMAX.
//
// lora_codes_T    out[m][k] = scale · Σ_c drop(x)[m][c] · W(k, c),  W(k, c) = w[k·wk + c·wi]
//                 z = drop(x) Aᵀ (W = A, wk = in, wi = 1), and dz = s · g B (x = g, W(k, o) =
//                 B[o][k]: wk = 1, wi = r, no mask). Block: LORA_CR rows; W chunks staged in
//                 shared memory, each thread LORA_TR rows × LORA_KC outputs in registers, x read
//                 once per LORA_KC outputs (r = 16: once).
// lora_expand_T   out[m][o] = T(y[m][o] + mask · Σ_k (z[m][k] · scale) · W(o, k)),
//                 W(o, k) = w[o·wo + k·wk]; y optional (y == 0: no y term)
//                 y + s · z Bᵀ (W = B: wo = r, wk = 1) and dx = mask ⊙ (dz A) (W(i, k) = A[k][i]:
//                 wo = 1, wk = in, scale 1, no y). One thread per column, LORA_ER rows per block,
//                 the z rows in shared memory, the column of W in registers.
// lora_colsum_T   part[p][k·ok + c·on] = Σ_{m in part p} z[m][k] · drop(x)[m][c]
//                 dB = gᵀ z (x = g, ok = 1, on = r) and dA = dzᵀ drop(x) (ok = in, on = 1):
//                 deterministic partial sums over row ranges, no atomics.
// lora_reduce_A   out[j] = scale · Σ_p part[p·len + j], the parts summed in order.

typedef unsigned long long u64;

#define LORA_RMAX 64
// lora_codes: 8 row groups × 32 lanes, LORA_TR rows per group, LORA_CW columns per chunk.
#define LORA_THREADS 256
#define LORA_LANES 32
#define LORA_TR 2
#define LORA_CR ((LORA_THREADS / LORA_LANES) * LORA_TR)
#define LORA_CW 128
#define LORA_KC 16
// lora_expand: rows per block. lora_colsum: rows staged per step.
#define LORA_ER 32
#define LORA_SR 32

__device__ __forceinline__ u64 lora_splitmix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// 0 or keep for element i (the caller skips it when thr == 0).
template <typename A>
__device__ __forceinline__ A lora_mask(u64 seed_mixed, u64 i, u64 thr, A keep) {
    const u64 h = lora_splitmix64(seed_mixed ^ (i * 0xD6E8FEB86659FD93ull));
    return (h >> 11) < thr ? (A)0 : keep;
}

// drop(x)[row][c] in A.
template <typename T, typename A>
__device__ __forceinline__ A lora_drop(const T* x, u32 s0, u32 s1, u32 off, u32 n, u32 row, u32 c,
                                       u64 seed_mixed, u64 thr, A keep) {
    A v = Cast<A>::of(x[(size_t)off + (size_t)row * s0 + (size_t)c * s1]);
    if (thr) v = v * lora_mask(seed_mixed, (u64)row * n + c, thr, keep);
    return v;
}

template <typename T>
__device__ void lora_codes_impl(u32 m, u32 n, u32 r, u32 s0, u32 s1, u32 off, const T* x,
                                u32 wk, u32 wi, const typename Acc<T>::type* w, u64 seed, u64 thr,
                                double keep_d, double scale_d, typename Acc<T>::type* out) {
    typedef typename Acc<T>::type A;
    __shared__ A ws[LORA_KC][LORA_CW + 1];
    const A keep = (A)keep_d, scale = (A)scale_d;
    const u64 sm = lora_splitmix64(seed);
    const u32 lane = threadIdx.x % LORA_LANES, grp = threadIdx.x / LORA_LANES;
    const u32 row0 = blockIdx.x * LORA_CR + grp * LORA_TR;
    for (u32 k0 = 0; k0 < r; k0 += LORA_KC) {
        A acc[LORA_TR][LORA_KC];
#pragma unroll
        for (int t = 0; t < LORA_TR; ++t)
#pragma unroll
            for (int kk = 0; kk < LORA_KC; ++kk) acc[t][kk] = (A)0;
        for (u32 c0 = 0; c0 < n; c0 += LORA_CW) {
            __syncthreads();
            // Stage W[k0 .. k0 + KC][c0 .. c0 + CW] (zeros past the edges).
            for (u32 t = threadIdx.x; t < LORA_KC * LORA_CW; t += blockDim.x) {
                const u32 kk = t / LORA_CW, cc = t % LORA_CW, k = k0 + kk, c = c0 + cc;
                ws[kk][cc] = (k < r && c < n) ? w[(size_t)k * wk + (size_t)c * wi] : (A)0;
            }
            __syncthreads();
#pragma unroll
            for (u32 j = 0; j < LORA_CW / LORA_LANES; ++j) {
                const u32 cc = lane + j * LORA_LANES, c = c0 + cc;
                if (c < n) {
                    A xv[LORA_TR];
#pragma unroll
                    for (int t = 0; t < LORA_TR; ++t) {
                        const u32 row = row0 + t;
                        xv[t] = row < m ? lora_drop(x, s0, s1, off, n, row, c, sm, thr, keep) : (A)0;
                    }
#pragma unroll
                    for (int kk = 0; kk < LORA_KC; ++kk) {
                        const A wv = ws[kk][cc];
#pragma unroll
                        for (int t = 0; t < LORA_TR; ++t) acc[t][kk] += xv[t] * wv;
                    }
                }
            }
        }
        // Sum the 32 lanes of each row group (one warp) in a fixed order.
#pragma unroll
        for (int t = 0; t < LORA_TR; ++t) {
#pragma unroll
            for (int kk = 0; kk < LORA_KC; ++kk) {
                const A v = warp_reduce(acc[t][kk], SumOp());
                const u32 row = row0 + t, k = k0 + kk;
                if (lane == 0 && row < m && k < r) out[(size_t)row * r + k] = v * scale;
            }
        }
    }
}

template <typename T>
__device__ void lora_expand_impl(u32 m, u32 n, u32 r, u32 s0, u32 s1, u32 off, const T* y,
                                 const typename Acc<T>::type* z, u32 wo, u32 wk,
                                 const typename Acc<T>::type* w, double scale_d, u64 seed, u64 thr,
                                 double keep_d, T* out) {
    typedef typename Acc<T>::type A;
    __shared__ A zs[LORA_ER][LORA_RMAX];
    const A keep = (A)keep_d, scale = (A)scale_d;
    const u64 sm = lora_splitmix64(seed);
    const u32 row0 = blockIdx.y * LORA_ER;
    for (u32 t = threadIdx.x; t < LORA_ER * r; t += blockDim.x) {
        const u32 rr = t / r, k = t % r, row = row0 + rr;
        zs[rr][k] = row < m ? z[(size_t)row * r + k] * scale : (A)0;
    }
    __syncthreads();
    const u32 o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= n) return;
    A wr[LORA_RMAX];
#pragma unroll
    for (int k = 0; k < LORA_RMAX; ++k) wr[k] = (u32)k < r ? w[(size_t)o * wo + (size_t)k * wk] : (A)0;
    for (u32 rr = 0; rr < LORA_ER; ++rr) {
        const u32 row = row0 + rr;
        if (row >= m) break;
        A acc = (A)0;
#pragma unroll
        for (int k = 0; k < LORA_RMAX; ++k)
            if ((u32)k < r) acc += zs[rr][k] * wr[k];
        if (thr) acc = acc * lora_mask(sm, (u64)row * n + o, thr, keep);
        const A yv = y ? Cast<A>::of(y[(size_t)off + (size_t)row * s0 + (size_t)o * s1]) : (A)0;
        out[(size_t)row * n + o] = Cast<T>::of(yv + acc);
    }
}

template <typename T>
__device__ void lora_colsum_impl(u32 m, u32 n, u32 r, u32 rows_per_part, u32 s0, u32 s1, u32 off,
                                 const T* x, const typename Acc<T>::type* z, u64 seed, u64 thr,
                                 double keep_d, u32 ok, u32 on, typename Acc<T>::type* part) {
    typedef typename Acc<T>::type A;
    __shared__ A zsh[LORA_SR][LORA_RMAX];
    const A keep = (A)keep_d;
    const u64 sm = lora_splitmix64(seed);
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    const u32 m_begin = blockIdx.y * rows_per_part;
    const u32 m_end = min(m, m_begin + rows_per_part);
    A acc[LORA_RMAX];
#pragma unroll
    for (int k = 0; k < LORA_RMAX; ++k) acc[k] = (A)0;
    for (u32 m0 = m_begin; m0 < m_end; m0 += LORA_SR) {
        __syncthreads();
        for (u32 t = threadIdx.x; t < LORA_SR * r; t += blockDim.x) {
            const u32 rr = t / r, k = t % r, row = m0 + rr;
            zsh[rr][k] = row < m_end ? z[(size_t)row * r + k] : (A)0;
        }
        __syncthreads();
        if (c < n) {
            const u32 rows = min((u32)LORA_SR, m_end - m0);
            for (u32 rr = 0; rr < rows; ++rr) {
                const A xv = lora_drop(x, s0, s1, off, n, m0 + rr, c, sm, thr, keep);
#pragma unroll
                for (int k = 0; k < LORA_RMAX; ++k)
                    if ((u32)k < r) acc[k] += zsh[rr][k] * xv;
            }
        }
    }
    if (c >= n) return;
    A* dst = part + (size_t)blockIdx.y * r * n;
#pragma unroll
    for (int k = 0; k < LORA_RMAX; ++k)
        if ((u32)k < r) dst[(size_t)k * ok + (size_t)c * on] = acc[k];
}

#define LORA(T, A, SUF) \
    extern "C" __global__ void __launch_bounds__(LORA_THREADS) lora_codes_##SUF( \
        u32 m, u32 n, u32 r, u32 s0, u32 s1, u32 off, const T* x, u32 wk, u32 wi, const A* w, \
        u64 seed, u64 thr, double keep, double scale, A* out) { \
        lora_codes_impl<T>(m, n, r, s0, s1, off, x, wk, wi, w, seed, thr, keep, scale, out); \
    } \
    extern "C" __global__ void lora_expand_##SUF( \
        u32 m, u32 n, u32 r, u32 s0, u32 s1, u32 off, const T* y, const A* z, u32 wo, u32 wk, \
        const A* w, double scale, u64 seed, u64 thr, double keep, T* out) { \
        lora_expand_impl<T>(m, n, r, s0, s1, off, y, z, wo, wk, w, scale, seed, thr, keep, out); \
    } \
    extern "C" __global__ void lora_colsum_##SUF( \
        u32 m, u32 n, u32 r, u32 rows_per_part, u32 s0, u32 s1, u32 off, const T* x, const A* z, \
        u64 seed, u64 thr, double keep, u32 ok, u32 on, A* part) { \
        lora_colsum_impl<T>(m, n, r, rows_per_part, s0, s1, off, x, z, seed, thr, keep, ok, on, \
                            part); \
    }

LORA(float, float, f32)
LORA(bf16, float, bf16)
LORA(double, double, f64)

#define LORA_REDUCE(A, SUF) \
    extern "C" __global__ void lora_reduce_##SUF(u32 parts, u32 len, const A* part, double scale, \
                                                 A* out) { \
        FOR_EACH(j, len) { \
            A s = (A)0; \
            for (u32 p = 0; p < parts; ++p) s += part[(size_t)p * len + j]; \
            out[j] = s * (A)scale; \
        } \
    }

LORA_REDUCE(float, f32)
LORA_REDUCE(double, f64)
