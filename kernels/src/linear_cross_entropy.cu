// Cross-entropy over vocabulary chunks (the chunked linear cross-entropy, engine/src/fused/
// linear_cross_entropy/): the online log-sum-exp update of one chunk of logits and the fused
// gradient of one chunk. Logits are read in place through their rank-2 view (row stride s0,
// column stride s1, offset off); f32 and bf16 compute in float, f64 in double. One block per row.
// The row statistics (`ce_row_stats`) are those of cross_entropy.cu, in common.cuh.

// cross_entropy_chunk_update_{dtype}(n, c, s0, s1, off, x, t, ignore, v0, v_total, state)
//   x: [n, c] logits of vocabulary columns v0..v0+c, read through (s0, s1, off); t: [n] u32;
//   state: [n, 3] float (double for f64) contiguous = (running max m, running Σ exp(x − m),
//   target logit), updated in place: m' = max(m, max x), s' = s·exp(m − m') + Σ exp(x − max x)·
//   exp(max x − m'); the target logit is taken when v0 ≤ t < v0 + c. A target ≥ v_total (not
//   ignored) gives a NaN target logit. One block per row.
template <typename T>
__device__ void ce_chunk_update(u32 n, u32 c, u32 s0, u32 s1, u32 off, const T* x, const u32* t, u32 ignore,
                                u32 v0, u32 v_total, typename Acc<T>::type* state) {
    typedef typename Acc<T>::type A;
    const size_t r = blockIdx.x;
    if (r >= n) return;
    const T* xr = x + off + r * s0;
    A cm, cs;
    ce_row_stats<T>(c, s1, xr, &cm, &cs);
    if (threadIdx.x == 0) {
        A* st = state + 3 * r;
        const A m = st[0], s = st[1];
        const A mx = m_max(m, cm);
        st[0] = mx;
        st[1] = s * m_exp(m - mx) + cs * m_exp(cm - mx);
        const u32 tr = t[r];
        if (tr != ignore) {
            if (tr >= v_total) {
                st[2] = nan_v<A>();
            } else if (tr >= v0 && tr - v0 < c) {
                st[2] = to_acc(xr[(size_t)(tr - v0) * s1]);
            }
        }
    }
}

// cross_entropy_chunk_backward_{dtype}(n, c, s0, s1, off, x, t, ignore, v0, lse, g, dx)
//   lse, g: [n] float (double for f64) contiguous; dx: [n, c] contiguous of the logits' dtype:
//   dx[r, j] = (exp(x[r, j] − lse[r]) − [v0 + j == t[r]]) · g[r], a zero row where ignored.
template <typename T>
__device__ void ce_chunk_backward(u32 n, u32 c, u32 s0, u32 s1, u32 off, const T* x, const u32* t, u32 ignore,
                                  u32 v0, const typename Acc<T>::type* lse, const typename Acc<T>::type* g,
                                  T* dx) {
    typedef typename Acc<T>::type A;
    const size_t r = blockIdx.x;
    if (r >= n) return;
    const u32 tr = t[r];
    T* dr = dx + r * c;
    if (tr == ignore) {
        for (u32 j = threadIdx.x; j < c; j += blockDim.x) dr[j] = from_acc<T>((A)0);
        return;
    }
    const T* xr = x + off + r * s0;
    const A l = lse[r], gr = g[r];
    for (u32 j = threadIdx.x; j < c; j += blockDim.x) {
        A o = m_exp(to_acc(xr[(size_t)j * s1]) - l) * gr;
        if (v0 + j == tr) o = o - gr;
        dr[j] = from_acc<T>(o);
    }
}

#define CE_CHUNK(T, SUF) \
    extern "C" __global__ void cross_entropy_chunk_update_##SUF(u32 n, u32 c, u32 s0, u32 s1, u32 off, const T* x, \
                                                                const u32* t, u32 ignore, u32 v0, u32 v_total, \
                                                                Acc<T>::type* state) { \
        ce_chunk_update<T>(n, c, s0, s1, off, x, t, ignore, v0, v_total, state); \
    } \
    extern "C" __global__ void cross_entropy_chunk_backward_##SUF(u32 n, u32 c, u32 s0, u32 s1, u32 off, const T* x, \
                                                                  const u32* t, u32 ignore, u32 v0, \
                                                                  const Acc<T>::type* lse, const Acc<T>::type* g, \
                                                                  T* dx) { \
        ce_chunk_backward<T>(n, c, s0, s1, off, x, t, ignore, v0, lse, g, dx); \
    }

CE_CHUNK(float, f32)
CE_CHUNK(bf16, bf16)
CE_CHUNK(double, f64)
