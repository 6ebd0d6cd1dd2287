// Fused cross-entropy, forward and backward. Logits are read in place through their rank-2 view
// (row stride s0, column stride s1, offset off); f32 and bf16 compute in float, f64 in double.
// One block per row. A target that is neither `ignore` nor below v gives NaN (the host cannot
// check ids without a round trip), never an out-of-bounds read. The row statistics (`ce_row_stats`,
// shared with linear_cross_entropy.cu) are in common.cuh.

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
