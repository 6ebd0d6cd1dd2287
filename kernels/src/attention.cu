// The attention softmax: the causal, key-masked, scaled softmax of attention scores, and the
// fused softmax backward (used by it and by the plain softmax over the last dim).
//
// causal_softmax_{f32,bf16,f64}(rows, h, t, s, q_offset, scale, x, mask, y)
//   x, y: [b, h, t, s] contiguous (rows = b·h·t); mask: [b, s] u32, or null for none. One block
//   per row (bi, hi, i). Key j is visible when j < limit = min(s, q_offset + i + 1) and
//   mask[bi, j] != 0; over the visible keys y = exp(scale·x − m) / Σ exp(scale·x − m) (m their
//   maximum), y = 0 at every other key, and the whole row is 0 when no key is visible. Masked
//   scores are never read. One pass keeps a running (max, Σ exp) per thread (the online softmax),
//   merged over the block; a second pass over the row (just read, so in cache) writes y.
//   Statistics in float for f32/bf16, double for f64.
// softmax_backward_{f32,bf16,f64}(rows, n, scale, y, g, dx)
//   y, g, dx: [rows, n] contiguous; one block per row: dx = scale · y ⊙ (g − Σ_j g ⊙ y), the row
//   sum in float (double for f64).

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

template <typename T>
__device__ void causal_softmax_row(u32 rows, u32 h, u32 t, u32 s, u32 q_offset, double scale,
                                   const T* x, const u32* mask, T* y) {
    typedef typename Acc<T>::type A;
    const size_t r = blockIdx.x;
    if (r >= rows) return;
    const u32 i = (u32)(r % t);
    const size_t bi = r / ((size_t)h * t);
    const size_t lim_wide = (size_t)q_offset + i + 1;
    const u32 lim = lim_wide < (size_t)s ? (u32)lim_wide : s;
    const T* xr = x + r * s;
    const u32* mr = mask ? mask + bi * s : nullptr;
    T* yr = y + r * s;
    const A sc = (A)scale;

    MaxSum<A> st;
    st.m = neg_inf<A>();
    st.d = (A)0;
    for (u32 j = threadIdx.x; j < lim; j += blockDim.x) {
        if (mr && mr[j] == 0u) continue;
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
        if (!none && j < lim && !(mr && mr[j] == 0u)) {
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

#define ATTENTION_SOFTMAX(T, SUF) \
    extern "C" __global__ void causal_softmax_##SUF(u32 rows, u32 h, u32 t, u32 s, u32 q_offset, \
                                                   double scale, const T* x, const u32* mask, T* y) { \
        causal_softmax_row<T>(rows, h, t, s, q_offset, scale, x, mask, y); \
    } \
    extern "C" __global__ void softmax_backward_##SUF(u32 rows, u32 n, double scale, const T* y, \
                                                     const T* g, T* dx) { \
        softmax_backward_row<T>(rows, n, scale, y, g, dx); \
    }

ATTENTION_SOFTMAX(float, f32)
ATTENTION_SOFTMAX(bf16, bf16)
ATTENTION_SOFTMAX(double, f64)
