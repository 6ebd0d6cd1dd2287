// Fused cross-entropy, forward and backward. Logits are read in place through their rank-2 view
// (row stride s0, column stride s1, offset off); f32 and bf16 compute in float, f64 in double.
// One block per row. A target that is neither `ignore` nor below v gives NaN (the host cannot
// check ids without a round trip), never an out-of-bounds read.

// Row statistics: (max, Σ exp(x − max)) of logits row r, on every thread of the block, in one pass
// over the row (online log-sum-exp): each thread keeps a running max m and Σ exp(x − m) of its
// elements, rescaling the sum when the max grows (s·exp(m − x) + 1); the block then takes the
// global max M and sums the threads' s·exp(m − M). One exponential per element, as with two
// passes, but the row is read once.
template <typename T>
__device__ void ce_row_stats(u32 v, u32 s1, const T* xr, typename Acc<T>::type* m_out, typename Acc<T>::type* s_out) {
    typedef typename Acc<T>::type A;
    A m = neg_inf<A>();
    A s = (A)0;
    for (u32 j = threadIdx.x; j < v; j += blockDim.x) {
        const A x = to_acc(xr[(size_t)j * s1]);
        if (x > m) {
            s = s * m_exp(m - x) + (A)1;
            m = x;
        } else if (x != m || x != neg_inf<A>()) {
            // (−∞ seen while the max is still −∞ adds nothing; NaN propagates.)
            s += m_exp(x - m);
        }
    }
    const A mx = block_reduce(m, MaxOp(), neg_inf<A>());
    // A thread without elements (or only −∞) adds nothing; NaN sums stay NaN.
    s = s == (A)0 ? (A)0 : s * m_exp(m - mx);
    s = block_reduce(s, SumOp(), (A)0);
    *m_out = mx;
    *s_out = s;
}

// cross_entropy_{dtype}(n, v, s0, s1, off, x, t, ignore, loss)
//   x: [n, v] logits; t: [n] u32; loss: [n] float (double for f64):
//   loss[r] = logsumexp(x[r]) − x[r, t[r]], 0 where t[r] == ignore.
template <typename T>
__device__ void ce_forward(u32 n, u32 v, u32 s0, u32 s1, u32 off, const T* x, const u32* t, u32 ignore,
                           typename Acc<T>::type* loss) {
    typedef typename Acc<T>::type A;
    const size_t r = blockIdx.x;
    if (r >= n) return;
    const u32 tr = t[r];
    if (tr == ignore) {
        if (threadIdx.x == 0) loss[r] = (A)0;
        return;
    }
    const T* xr = x + off + r * s0;
    A m, s;
    ce_row_stats<T>(v, s1, xr, &m, &s);
    if (threadIdx.x == 0) {
        loss[r] = tr < v ? m + m_log(s) - to_acc(xr[(size_t)tr * s1]) : nan_v<A>();
    }
}

// cross_entropy_backward_{dtype}(n, v, s0, s1, off, x, t, ignore, g, dx)
//   g: [n] float (double for f64) contiguous; dx: [n, v] contiguous:
//   dx[r, j] = (softmax(x[r])[j] − [j == t[r]]) · g[r], a zero row where t[r] == ignore.
template <typename T>
__device__ void ce_backward(u32 n, u32 v, u32 s0, u32 s1, u32 off, const T* x, const u32* t, u32 ignore,
                            const typename Acc<T>::type* g, T* dx) {
    typedef typename Acc<T>::type A;
    const size_t r = blockIdx.x;
    if (r >= n) return;
    const u32 tr = t[r];
    T* dr = dx + r * v;
    if (tr == ignore) {
        for (u32 j = threadIdx.x; j < v; j += blockDim.x) dr[j] = from_acc<T>((A)0);
        return;
    }
    const T* xr = x + off + r * s0;
    A m, s;
    ce_row_stats<T>(v, s1, xr, &m, &s);
    const A gr = g[r];
    const A scale = tr < v ? gr / s : nan_v<A>();
    for (u32 j = threadIdx.x; j < v; j += blockDim.x) {
        A o = m_exp(to_acc(xr[(size_t)j * s1]) - m) * scale;
        if (j == tr) o = o - gr;
        dr[j] = from_acc<T>(o);
    }
}

#define CE(T, SUF) \
    extern "C" __global__ void cross_entropy_##SUF(u32 n, u32 v, u32 s0, u32 s1, u32 off, const T* x, const u32* t, \
                                                   u32 ignore, Acc<T>::type* loss) { \
        ce_forward<T>(n, v, s0, s1, off, x, t, ignore, loss); \
    } \
    extern "C" __global__ void cross_entropy_backward_##SUF(u32 n, u32 v, u32 s0, u32 s1, u32 off, const T* x, \
                                                            const u32* t, u32 ignore, const Acc<T>::type* g, T* dx) { \
        ce_backward<T>(n, v, s0, s1, off, x, t, ignore, g, dx); \
    }

CE(float, f32)
CE(bf16, bf16)
CE(double, f64)

// ----- cross-entropy over vocabulary chunks (the chunked linear cross-entropy) ---------------------

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
