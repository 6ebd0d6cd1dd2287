// The router's fused top-k (engine/src/fused/moe_route/): softmax over the experts, the k most
// probable ones and their renormalised weights, and the weights' backward. One thread per token
// row; no atomics, so the results are deterministic.
//
// Inputs are contiguous (the host makes them so). `A` is the accumulation type (float for f32
// and bf16, double for f64).

// ----- top-k routing ------------------------------------------------------------------------------

// True when (a, ia) comes before (b, ib) in top-k order: larger first, NaN largest, ties (and two
// NaNs) by lower index. The same order as `topk_indices`.
template <typename A>
__device__ __forceinline__ bool topk_before(A a, u32 ia, A b, u32 ib) {
    const bool na = a != a, nb = b != b;
    if (na || nb) return na && nb ? ia < ib : na;
    if (a != b) return a > b;
    return ia < ib;
}

// moe_route_topk_{dtype}(n, e, k, logits, probs, ids, weights)
//   logits: [n, e]; probs: [n, e] = softmax(logits row); ids: [n, k] u32, the k first experts in
//   top-k order of the probabilities (computed in A); weights: [n, k] = p[ids] / Σ_j p[ids[j]].
//   One thread per row (e is small: the row stays in L1).
template <typename T>
__device__ void route_topk(u32 n, u32 e, u32 k, const T* logits, T* probs, u32* ids, T* weights) {
    typedef typename Acc<T>::type A;
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    const T* x = logits + t * e;
    A m = neg_inf<A>();
    for (u32 i = 0; i < e; ++i) m = m_max(m, to_acc(x[i]));
    A s = (A)0;
    for (u32 i = 0; i < e; ++i) s += m_exp(to_acc(x[i]) - m);
    const A inv = (A)1 / s;
    for (u32 i = 0; i < e; ++i) probs[t * e + i] = from_acc<T>(m_exp(to_acc(x[i]) - m) * inv);
    // Selection: the j-th pick is the first element (in top-k order) after the (j-1)-th.
    A prev_v = (A)0, sel_sum = (A)0;
    u32 prev_i = 0xffffffffu;
    for (u32 j = 0; j < k; ++j) {
        A best_v = (A)0;
        u32 best_i = 0xffffffffu;
        for (u32 i = 0; i < e; ++i) {
            const A v = m_exp(to_acc(x[i]) - m) * inv;
            if (prev_i != 0xffffffffu && !topk_before(prev_v, prev_i, v, i)) continue;
            if (best_i == 0xffffffffu || topk_before(v, i, best_v, best_i)) {
                best_v = v;
                best_i = i;
            }
        }
        ids[t * k + j] = best_i;
        sel_sum += best_v;
        prev_v = best_v;
        prev_i = best_i;
    }
    for (u32 j = 0; j < k; ++j) {
        const A v = m_exp(to_acc(x[ids[t * k + j]]) - m) * inv;
        weights[t * k + j] = from_acc<T>(v / sel_sum);
    }
}

// moe_route_topk_backward_{dtype}(n, e, k, weights, ids, gw, dlogits)
//   weights, gw: [n, k]; ids: [n, k] u32; dlogits: [n, e]. The weights are the softmax of the
//   selected logits, so dlogits[t, ids[t, j]] = w[t, j] · (gw[t, j] − Σ_i w[t, i] · gw[t, i]) and
//   0 off the selection. An id ≥ e is skipped. One thread per row.
template <typename T>
__device__ void route_topk_backward(u32 n, u32 e, u32 k, const T* w, const u32* ids, const T* gw, T* dl) {
    typedef typename Acc<T>::type A;
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    A dot = (A)0;
    for (u32 j = 0; j < k; ++j) dot += to_acc(w[t * k + j]) * to_acc(gw[t * k + j]);
    for (u32 i = 0; i < e; ++i) dl[t * e + i] = from_acc<T>((A)0);
    for (u32 j = 0; j < k; ++j) {
        const u32 i = ids[t * k + j];
        if (i < e) dl[t * e + i] = from_acc<T>(to_acc(w[t * k + j]) * (to_acc(gw[t * k + j]) - dot));
    }
}

#define MOE_ROUTE(T, SUF) \
    extern "C" __global__ void moe_route_topk_##SUF(u32 n, u32 e, u32 k, const T* logits, T* probs, u32* ids, \
                                                    T* weights) { \
        route_topk<T>(n, e, k, logits, probs, ids, weights); \
    } \
    extern "C" __global__ void moe_route_topk_backward_##SUF(u32 n, u32 e, u32 k, const T* w, const u32* ids, \
                                                             const T* gw, T* dl) { \
        route_topk_backward<T>(n, e, k, w, ids, gw, dl); \
    }

MOE_ROUTE(float, f32)
MOE_ROUTE(bf16, bf16)
MOE_ROUTE(double, f64)
