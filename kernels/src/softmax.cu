// Softmax: softmax / log-softmax over the last dim, the causal, key- or segment-masked, scaled
// softmax of attention scores, and the fused softmax backward (used by both).
//
// {softmax,log_softmax}_{f32,bf16,f64}(rows, n, x, y)
//   One block per row of a contiguous [rows, n] input; output [rows, n].
// causal_softmax_{f32,bf16,f64}(rows, h, t, s, q_offset, scale, x, mask, y)
//   x, y: [b, h, t, s] contiguous (rows = b·h·t); mask: [b, s] u32 (0 padding, else the token's
//   segment), or null for none. One block per row (bi, hi, i); the query's segment is
//   sq = mask[bi, q_offset + i] (0 past the keys or without a mask). Key j is visible when
//   j < limit = min(s, q_offset + i + 1), mask[bi, j] != 0 and, when sq != 0, mask[bi, j] == sq
//   (packed sequences never see each other; a 0/1 mask is plain padding); over the visible keys
//   y = exp(scale·x − m) / Σ exp(scale·x − m) (m their maximum), y = 0 at every other key, and
//   the whole row is 0 when no key is visible. Masked scores are never read. One pass keeps a running (max, Σ exp) per thread (the online softmax),
//   merged over the block; a second pass over the row (just read, so in cache) writes y.
//   Statistics in float for f32/bf16, double for f64.
// softmax_backward_{f32,bf16,f64}(rows, n, scale, y, g, dx)
//   y, g, dx: [rows, n] contiguous; one block per row: dx = scale · y ⊙ (g − Σ_j g ⊙ y), the row
//   sum in float (double for f64).
//
// Warp-per-row fast path: the same two ops, same arguments and results, for rows that fit in the
// registers of one warp.
// causal_softmax_warp{C}_{f32,bf16,f64}(rows, h, t, s, q_offset, scale, x, mask, y)
// softmax_backward_warp{C}_{f32,bf16,f64}(rows, n, scale, y, g, dx)
//   C ∈ {1, 2, 4, 8}. A row of n (= s) elements is n / V chunks of V = 16 / sizeof(T) elements
//   (bf16 8, f32 4, f64 2: one 16-byte word each); lane l of the row's warp holds chunks
//   c = 32·k + l for k < C, chunk c covering elements [c·V, c·V + V), read and written with one
//   16-byte access. The host takes this path when V divides n, n / V ≤ 32·C, and every pointer is
//   16-byte aligned (so is every row and chunk; the mask chunk of V u32s then is aligned to
//   min(16, 4·V) bytes). Grid: blocks of SOFTMAX_WARPS warps, row r = blockIdx.x · SOFTMAX_WARPS
//   + warp; warps past `rows` exit whole. Reductions are warp shuffles in a fixed order; no shared
//   memory, no barrier.
//   causal_softmax: chunks starting at or past the causal limit are not read (they hold invisible
//   keys) and are written as zeros; within a chunk that is read, keys at or past the limit and
//   masked keys (padding, or another segment's) get score −∞ by selection, so their values never
//   reach the result. Two passes over the registers: the maximum m, then Σ exp(v − m).

// ----- softmax / log-softmax over the last dim -----------------------------------------------------

// x, y: [rows, n] contiguous; one block per row. softmax: e = exp(x - max), y = e * (1 / Σ e).
// log_softmax: y = x - (max + log Σ exp(x - max)).
template <typename T, bool LOG>
__device__ void softmax_row(u32 rows, u32 n, const T* x, T* y) {
    typedef typename Acc<T>::type A;
    const size_t r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + r * n;
    T* yr = y + r * n;
    A m = neg_inf<A>();
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) m = m_max(m, to_acc(xr[j]));
    m = block_reduce(m, MaxOp(), neg_inf<A>());
    A s = (A)0;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) s += m_exp(to_acc(xr[j]) - m);
    s = block_reduce(s, SumOp(), (A)0);
    if (LOG) {
        const A lse = m + m_log(s);
        for (u32 j = threadIdx.x; j < n; j += blockDim.x) yr[j] = from_acc<T>(to_acc(xr[j]) - lse);
    } else {
        const A inv = (A)1 / s;
        for (u32 j = threadIdx.x; j < n; j += blockDim.x) yr[j] = from_acc<T>(m_exp(to_acc(xr[j]) - m) * inv);
    }
}

#define SOFTMAX(T, SUF) \
    extern "C" __global__ void softmax_##SUF(u32 rows, u32 n, const T* x, T* y) { softmax_row<T, false>(rows, n, x, y); } \
    extern "C" __global__ void log_softmax_##SUF(u32 rows, u32 n, const T* x, T* y) { softmax_row<T, true>(rows, n, x, y); }

SOFTMAX(float, f32)
SOFTMAX(bf16, bf16)
SOFTMAX(double, f64)

// (m, d): the maximum of a set of values and Σ exp(v − m); (−∞, 0) for the empty set.
template <typename A> struct MaxSum {
    A m;
    A d;
};

template <typename A>
__device__ __forceinline__ MaxSum<A> max_sum_merge(MaxSum<A> a, MaxSum<A> b) {
    // An empty side leaves the other as it is (and exp(−∞ − (−∞)) is never formed).
    if (a.m == neg_inf<A>()) return b;
    if (b.m == neg_inf<A>()) return a;
    const A m = m_max(a.m, b.m);
    MaxSum<A> r;
    r.m = m;
    r.d = a.d * m_exp(a.m - m) + b.d * m_exp(b.m - m);
    return r;
}

template <typename A>
__device__ __forceinline__ MaxSum<A> max_sum_warp(MaxSum<A> v) {
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum<A> other;
        other.m = __shfl_xor_sync(0xffffffffu, v.m, o);
        other.d = __shfl_xor_sync(0xffffffffu, v.d, o);
        v = max_sum_merge(v, other);
    }
    return v;
}

// Merges every thread's (m, d) over the block (blockDim.x a multiple of 32, at most 1024); every
// thread gets the result.
template <typename A>
__device__ MaxSum<A> max_sum_block(MaxSum<A> v) {
    __shared__ A slot_m[32];
    __shared__ A slot_d[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = max_sum_warp(v);
    __syncthreads();
    if (lane == 0) {
        slot_m[warp] = v.m;
        slot_d[warp] = v.d;
    }
    __syncthreads();
    if (lane < warps) {
        v.m = slot_m[lane];
        v.d = slot_d[lane];
    } else {
        v.m = neg_inf<A>();
        v.d = (A)0;
    }
    return max_sum_warp(v);
}

// Keys 0 .. min(s, q_offset + i + 1) are visible by causality to row r = (bi, hi, i), i = r mod t.
__device__ __forceinline__ u32 causal_limit(size_t r, u32 t, u32 s, u32 q_offset) {
    const size_t lim = (size_t)q_offset + (u32)(r % t) + 1;
    return lim < (size_t)s ? (u32)lim : s;
}

// The segment of row r's query: mr[q_offset + i] (mr the mask row of its sequence), 0 (sees
// every non-padding key) past the keys or without a mask.
__device__ __forceinline__ u32 query_segment(const u32* mr, size_t r, u32 t, u32 s, u32 q_offset) {
    const size_t p = (size_t)q_offset + (u32)(r % t);
    return (mr && p < (size_t)s) ? mr[p] : 0u;
}

// Whether a key of mask word k is visible to a query of segment sq (causality aside).
__device__ __forceinline__ bool key_visible(u32 k, u32 sq) { return k != 0u && (sq == 0u || k == sq); }

template <typename T>
__device__ void causal_softmax_row(u32 rows, u32 h, u32 t, u32 s, u32 q_offset, double scale,
                                   const T* x, const u32* mask, T* y) {
    typedef typename Acc<T>::type A;
    const size_t r = blockIdx.x;
    if (r >= rows) return;
    const u32 lim = causal_limit(r, t, s, q_offset);
    const size_t bi = r / ((size_t)h * t);
    const T* xr = x + r * s;
    const u32* mr = mask ? mask + bi * s : nullptr;
    const u32 sq = query_segment(mr, r, t, s, q_offset);
    T* yr = y + r * s;
    const A sc = (A)scale;

    MaxSum<A> st;
    st.m = neg_inf<A>();
    st.d = (A)0;
    for (u32 j = threadIdx.x; j < lim; j += blockDim.x) {
        if (mr && !key_visible(mr[j], sq)) continue;
        const A v = sc * to_acc(xr[j]);
        if (v > st.m) {
            st.d = st.d * m_exp(st.m - v) + (A)1;
            st.m = v;
        } else if (st.m != neg_inf<A>()) {
            st.d += m_exp(v - st.m);
        }
    }
    st = max_sum_block(st);
    const bool none = st.m == neg_inf<A>(); // no visible key: a zero row
    const A inv = none ? (A)0 : (A)1 / st.d;
    for (u32 j = threadIdx.x; j < s; j += blockDim.x) {
        A o = (A)0;
        if (!none && j < lim && !(mr && !key_visible(mr[j], sq))) {
            o = m_exp(sc * to_acc(xr[j]) - st.m) * inv;
        }
        yr[j] = from_acc<T>(o);
    }
}

template <typename T>
__device__ void softmax_backward_row(u32 rows, u32 n, double scale, const T* y, const T* g, T* dx) {
    typedef typename Acc<T>::type A;
    const size_t r = blockIdx.x;
    if (r >= rows) return;
    const T* yr = y + r * n;
    const T* gr = g + r * n;
    T* dr = dx + r * n;
    A dot = (A)0;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) dot += to_acc(yr[j]) * to_acc(gr[j]);
    dot = block_reduce(dot, SumOp(), (A)0);
    const A sc = (A)scale;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) {
        dr[j] = from_acc<T>(sc * to_acc(yr[j]) * (to_acc(gr[j]) - dot));
    }
}

// ----- warp-per-row fast path ----------------------------------------------------------------------

// Warps (rows) per block of the warp-per-row kernels (WARP_ROWS in
// engine/src/backend/cuda/attention.rs).
#define SOFTMAX_WARPS 8

// Elements of T per 16-byte chunk.
template <typename T> struct Chunk {
    static constexpr int V = 16 / (int)sizeof(T);
};

// The V key-mask words of one chunk, aligned as the host guarantees for them.
template <int N> struct alignas(4 * N < 16 ? 4 * N : 16) MaskWords {
    u32 w[N];
};

// The V elements of the 16-byte word `w`, widened to the accumulation type.
template <typename T>
__device__ __forceinline__ void widen(const uint4& w, typename Acc<T>::type (&v)[Chunk<T>::V]) {
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int q = 0; q < Chunk<T>::V; ++q) v[q] = to_acc(e[q]);
}

// V accumulation values rounded to T, as one 16-byte word.
template <typename T>
__device__ __forceinline__ uint4 narrow(const typename Acc<T>::type (&v)[Chunk<T>::V]) {
    uint4 w;
    T* e = reinterpret_cast<T*>(&w);
#pragma unroll
    for (int q = 0; q < Chunk<T>::V; ++q) e[q] = from_acc<T>(v[q]);
    return w;
}

__device__ __forceinline__ uint4 load16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void store16(void* p, uint4 w) { *reinterpret_cast<uint4*>(p) = w; }

// The row of this warp (the same for its 32 lanes).
__device__ __forceinline__ size_t warp_row() {
    return (size_t)blockIdx.x * SOFTMAX_WARPS + (threadIdx.x >> 5);
}

// Scaled scores of the chunk at elements [e0, e0 + V) of row xr (mask row mr, or null; the
// query's segment sq): sc·x at visible keys (e < lim, key_visible), −∞ elsewhere. Reads nothing
// when e0 ≥ lim (which covers chunks past the row's end, as lim ≤ s).
template <typename T>
__device__ __forceinline__ void chunk_scores(const T* xr, const u32* mr, u32 sq, u32 e0, u32 lim,
                                             typename Acc<T>::type sc,
                                             typename Acc<T>::type (&v)[Chunk<T>::V]) {
    typedef typename Acc<T>::type A;
    constexpr int V = Chunk<T>::V;
    if (e0 >= lim) {
#pragma unroll
        for (int q = 0; q < V; ++q) v[q] = neg_inf<A>();
        return;
    }
    widen<T>(load16(xr + e0), v);
    MaskWords<V> mk;
    if (mr) {
        mk = *reinterpret_cast<const MaskWords<V>*>(mr + e0);
    } else {
#pragma unroll
        for (int q = 0; q < V; ++q) mk.w[q] = 1u;
    }
#pragma unroll
    for (int q = 0; q < V; ++q) {
        const bool visible = e0 + q < lim && key_visible(mk.w[q], sq);
        v[q] = visible ? sc * v[q] : neg_inf<A>(); // a select: a masked NaN never spreads
    }
}

template <typename T, int C>
__device__ void causal_softmax_warp(u32 rows, u32 h, u32 t, u32 s, u32 q_offset, double scale,
                                    const T* x, const u32* mask, T* y) {
    typedef typename Acc<T>::type A;
    constexpr int V = Chunk<T>::V;
    const size_t r = warp_row();
    if (r >= rows) return; // the whole warp
    const u32 lane = threadIdx.x & 31;
    const u32 lim = causal_limit(r, t, s, q_offset);
    const size_t bi = r / ((size_t)h * t);
    const u32 chunks = s / V;
    const T* xr = x + r * s;
    const u32* mr = mask ? mask + bi * s : nullptr;
    const u32 sq = query_segment(mr, r, t, s, q_offset);
    T* yr = y + r * s;

    A v[C][V]; // v[k][q]: element (32·k + lane)·V + q of the row
    A m = neg_inf<A>();
#pragma unroll
    for (int k = 0; k < C; ++k) {
        chunk_scores<T>(xr, mr, sq, (32u * k + lane) * V, lim, (A)scale, v[k]);
#pragma unroll
        for (int q = 0; q < V; ++q) m = m_max(m, v[k][q]);
    }
    m = warp_reduce(m, MaxOp());
    const bool none = m == neg_inf<A>(); // no visible key: a zero row (the same for the warp)
    A d = (A)0;
    if (!none) {
#pragma unroll
        for (int k = 0; k < C; ++k) {
#pragma unroll
            for (int q = 0; q < V; ++q) {
                v[k][q] = m_exp(v[k][q] - m); // 0 at invisible keys (exp(−∞))
                d += v[k][q];
            }
        }
    }
    d = warp_reduce(d, SumOp());
    const A inv = none ? (A)0 : (A)1 / d;
#pragma unroll
    for (int k = 0; k < C; ++k) {
        const u32 c = 32u * k + lane;
        if (c >= chunks) continue;
#pragma unroll
        for (int q = 0; q < V; ++q) v[k][q] = none ? (A)0 : v[k][q] * inv;
        store16(yr + c * V, narrow<T>(v[k]));
    }
}

template <typename T, int C>
__device__ void softmax_backward_warp(u32 rows, u32 n, double scale, const T* y, const T* g, T* dx) {
    typedef typename Acc<T>::type A;
    constexpr int V = Chunk<T>::V;
    const size_t r = warp_row();
    if (r >= rows) return; // the whole warp
    const u32 lane = threadIdx.x & 31;
    const u32 chunks = n / V;
    const T* yr = y + r * n;
    const T* gr = g + r * n;
    T* dr = dx + r * n;

    uint4 yw[C], gw[C]; // chunk 32·k + lane of the rows of y and g, as stored
    A dot = (A)0;
#pragma unroll
    for (int k = 0; k < C; ++k) {
        const u32 c = 32u * k + lane;
        yw[k] = gw[k] = make_uint4(0u, 0u, 0u, 0u);
        if (c >= chunks) continue;
        yw[k] = load16(yr + c * V);
        gw[k] = load16(gr + c * V);
        A yv[V], gv[V];
        widen<T>(yw[k], yv);
        widen<T>(gw[k], gv);
#pragma unroll
        for (int q = 0; q < V; ++q) dot += yv[q] * gv[q];
    }
    dot = warp_reduce(dot, SumOp());
    const A sc = (A)scale;
#pragma unroll
    for (int k = 0; k < C; ++k) {
        const u32 c = 32u * k + lane;
        if (c >= chunks) continue;
        A yv[V], gv[V];
        widen<T>(yw[k], yv);
        widen<T>(gw[k], gv);
#pragma unroll
        for (int q = 0; q < V; ++q) yv[q] = sc * yv[q] * (gv[q] - dot);
        store16(dr + c * V, narrow<T>(yv));
    }
}

// ----- entry points ----------------------------------------------------------------------------------

#define ATTENTION_SOFTMAX_WARP(T, SUF, C) \
    extern "C" __global__ void __launch_bounds__(SOFTMAX_WARPS * 32) causal_softmax_warp##C##_##SUF( \
        u32 rows, u32 h, u32 t, u32 s, u32 q_offset, double scale, const T* x, const u32* mask, T* y) { \
        causal_softmax_warp<T, C>(rows, h, t, s, q_offset, scale, x, mask, y); \
    } \
    extern "C" __global__ void __launch_bounds__(SOFTMAX_WARPS * 32) softmax_backward_warp##C##_##SUF( \
        u32 rows, u32 n, double scale, const T* y, const T* g, T* dx) { \
        softmax_backward_warp<T, C>(rows, n, scale, y, g, dx); \
    }

#define ATTENTION_SOFTMAX(T, SUF) \
    extern "C" __global__ void causal_softmax_##SUF(u32 rows, u32 h, u32 t, u32 s, u32 q_offset, \
                                                   double scale, const T* x, const u32* mask, T* y) { \
        causal_softmax_row<T>(rows, h, t, s, q_offset, scale, x, mask, y); \
    } \
    extern "C" __global__ void softmax_backward_##SUF(u32 rows, u32 n, double scale, const T* y, \
                                                     const T* g, T* dx) { \
        softmax_backward_row<T>(rows, n, scale, y, g, dx); \
    } \
    ATTENTION_SOFTMAX_WARP(T, SUF, 1) \
    ATTENTION_SOFTMAX_WARP(T, SUF, 2) \
    ATTENTION_SOFTMAX_WARP(T, SUF, 4) \
    ATTENTION_SOFTMAX_WARP(T, SUF, 8)

ATTENTION_SOFTMAX(float, f32)
ATTENTION_SOFTMAX(bf16, bf16)
ATTENTION_SOFTMAX(double, f64)
