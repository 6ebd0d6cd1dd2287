// RMSNorm (forward and fused backward). Statistics in float for f32/bf16, double for f64, as in
// the CPU reference.

// ----- RMSNorm ----------------------------------------------------------------------------------

// rms_norm_{dtype}(rows, n, x, w, y, eps)
//   x, y: [rows, n] contiguous; w: [n]. One block per row:
//   y = x · r · w with r = 1 / sqrt(mean(x²) + eps).
//   Vector path (V = 16 / sizeof(T) elements a load, where n is a multiple of V and x, w, y start
//   on a 16-byte boundary): each thread keeps its first NORM_CACHE vectors of the row in
//   registers between the two passes, so x crosses memory once for rows of up to
//   NORM_CACHE · V · blockDim elements (8192 bf16, 4096 f32 with 256 threads); longer rows read
//   the rest again. The per-element arithmetic is the scalar path's; only the order of the row
//   sums differs.
#define NORM_CACHE 4
// The backward's cache (three arrays a vector: x, g, w): 4096 bf16 or 2048 f32 with 256 threads.
#define NORM_BWD_CACHE 2

template <typename T>
__device__ __forceinline__ bool norm_vec_ok(u32 n, const T* a, const T* b, const T* c, const T* d) {
    constexpr int V = 16 / sizeof(T);
    return n % V == 0 && aligned_to(a, 16) && aligned_to(b, 16) && aligned_to(c, 16) && aligned_to(d, 16);
}

// Σ x² over vectors v = threadIdx.x + c·blockDim.x of the row (this thread's share), keeping the
// first C in `xs`.
template <typename T, int V, int C>
__device__ __forceinline__ typename Acc<T>::type norm_sum_sq_vec(u32 nv, const T* xr, T (&xs)[C][V]) {
    typedef typename Acc<T>::type A;
    A ss = (A)0;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const u32 v = threadIdx.x + c * blockDim.x;
        if (v < nv) load_n(xr + (size_t)v * V, xs[c]);
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const u32 v = threadIdx.x + c * blockDim.x;
        if (v < nv) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const A a = to_acc(xs[c][j]);
                ss += a * a;
            }
        }
    }
    for (u32 v = threadIdx.x + C * blockDim.x; v < nv; v += blockDim.x) {
        T t[V];
        load_n(xr + (size_t)v * V, t);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const A a = to_acc(t[j]);
            ss += a * a;
        }
    }
    return ss;
}

template <typename T>
__device__ void rms_norm_row_vec(u32 n, const T* xr, const T* w, T* yr, double eps) {
    typedef typename Acc<T>::type A;
    constexpr int V = 16 / sizeof(T);
    const u32 nv = n / V;
    T xs[NORM_CACHE][V];
    A ss = norm_sum_sq_vec(nv, xr, xs);
    ss = block_reduce(ss, SumOp(), (A)0);
    const A rs = (A)1 / m_sqrt(ss * (A)(1.0 / (double)n) + (A)eps);
    const auto out = [&](u32 v, const T (&xv)[V]) {
        T wv[V], yv[V];
        load_n(w + (size_t)v * V, wv);
#pragma unroll
        for (int j = 0; j < V; ++j) yv[j] = from_acc<T>(to_acc(xv[j]) * rs * to_acc(wv[j]));
        store_n(yr + (size_t)v * V, yv);
    };
#pragma unroll
    for (int c = 0; c < NORM_CACHE; ++c) {
        const u32 v = threadIdx.x + c * blockDim.x;
        if (v < nv) out(v, xs[c]);
    }
    for (u32 v = threadIdx.x + NORM_CACHE * blockDim.x; v < nv; v += blockDim.x) {
        T t[V];
        load_n(xr + (size_t)v * V, t);
        out(v, t);
    }
}

template <typename T>
__device__ void rms_norm_row(u32 rows, u32 n, const T* x, const T* w, T* y, double eps) {
    typedef typename Acc<T>::type A;
    const size_t r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + r * n;
    T* yr = y + r * n;
    if (norm_vec_ok(n, x, w, y, y)) {
        rms_norm_row_vec(n, xr, w, yr, eps);
        return;
    }
    A ss = (A)0;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) {
        const A v = to_acc(xr[j]);
        ss += v * v;
    }
    ss = block_reduce(ss, SumOp(), (A)0);
    const A rs = (A)1 / m_sqrt(ss * (A)(1.0 / (double)n) + (A)eps);
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) yr[j] = from_acc<T>(to_acc(xr[j]) * rs * to_acc(w[j]));
}

// rms_norm_backward_{dtype}(rows, n, x, w, g, dx, rstd, eps)
//   Fused backward of rms_norm. With r = (mean(x²) + eps)^(-1/2) per row and y_i = x_i r w_i,
//   ∂r/∂x_j = −r³ x_j / n, so
//     dx_j = r g_j w_j − (r³ / n) x_j Σ_i g_i w_i x_i,
//   and dw_i = Σ_rows g_i x_i r (second kernel, rms_norm_dw, which reads r from `rstd`).
//   x, g, dx: [rows, n]; w: [n]; rstd: [rows] in the accumulation type. One block per row.
//   Vector path as in rms_norm (x, g and w of the first NORM_BWD_CACHE vectors kept in registers).
template <typename T>
__device__ void rms_norm_backward_row_vec(u32 n, const T* xr, const T* w, const T* gr, T* dxr, typename Acc<T>::type& rs_out,
                                          double eps) {
    typedef typename Acc<T>::type A;
    constexpr int V = 16 / sizeof(T);
    const u32 nv = n / V;
    T xs[NORM_BWD_CACHE][V], gs[NORM_BWD_CACHE][V], ws[NORM_BWD_CACHE][V];
#pragma unroll
    for (int c = 0; c < NORM_BWD_CACHE; ++c) {
        const u32 v = threadIdx.x + c * blockDim.x;
        if (v < nv) {
            load_n(gr + (size_t)v * V, gs[c]);
            load_n(w + (size_t)v * V, ws[c]);
        }
    }
    A ss = norm_sum_sq_vec(nv, xr, xs), dot = (A)0;
    const auto dot_of = [&](const T (&xv)[V], const T (&gv)[V], const T (&wv)[V]) {
#pragma unroll
        for (int j = 0; j < V; ++j) dot += to_acc(gv[j]) * to_acc(wv[j]) * to_acc(xv[j]);
    };
#pragma unroll
    for (int c = 0; c < NORM_BWD_CACHE; ++c) {
        const u32 v = threadIdx.x + c * blockDim.x;
        if (v < nv) dot_of(xs[c], gs[c], ws[c]);
    }
    for (u32 v = threadIdx.x + NORM_BWD_CACHE * blockDim.x; v < nv; v += blockDim.x) {
        T xv[V], gv[V], wv[V];
        load_n(xr + (size_t)v * V, xv);
        load_n(gr + (size_t)v * V, gv);
        load_n(w + (size_t)v * V, wv);
        dot_of(xv, gv, wv);
    }
    ss = block_reduce(ss, SumOp(), (A)0);
    dot = block_reduce(dot, SumOp(), (A)0);
    const A n_inv = (A)(1.0 / (double)n);
    const A rs = (A)1 / m_sqrt(ss * n_inv + (A)eps);
    const A c = rs * rs * rs * n_inv * dot;
    const auto out = [&](u32 v, const T (&xv)[V], const T (&gv)[V], const T (&wv)[V]) {
        T d[V];
#pragma unroll
        for (int j = 0; j < V; ++j) d[j] = from_acc<T>(rs * to_acc(gv[j]) * to_acc(wv[j]) - c * to_acc(xv[j]));
        store_n(dxr + (size_t)v * V, d);
    };
#pragma unroll
    for (int k = 0; k < NORM_BWD_CACHE; ++k) {
        const u32 v = threadIdx.x + k * blockDim.x;
        if (v < nv) out(v, xs[k], gs[k], ws[k]);
    }
    for (u32 v = threadIdx.x + NORM_BWD_CACHE * blockDim.x; v < nv; v += blockDim.x) {
        T xv[V], gv[V], wv[V];
        load_n(xr + (size_t)v * V, xv);
        load_n(gr + (size_t)v * V, gv);
        load_n(w + (size_t)v * V, wv);
        out(v, xv, gv, wv);
    }
    rs_out = rs;
}

template <typename T>
__device__ void rms_norm_backward_row(u32 rows, u32 n, const T* x, const T* w, const T* g, T* dx,
                                      typename Acc<T>::type* rstd, double eps) {
    typedef typename Acc<T>::type A;
    const size_t r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + r * n;
    const T* gr = g + r * n;
    T* dxr = dx + r * n;
    if (norm_vec_ok(n, x, w, g, dx)) {
        A rs;
        rms_norm_backward_row_vec(n, xr, w, gr, dxr, rs, eps);
        if (threadIdx.x == 0) rstd[r] = rs;
        return;
    }
    A ss = (A)0, dot = (A)0;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) {
        const A xv = to_acc(xr[j]);
        ss += xv * xv;
        dot += to_acc(gr[j]) * to_acc(w[j]) * xv;
    }
    ss = block_reduce(ss, SumOp(), (A)0);
    dot = block_reduce(dot, SumOp(), (A)0);
    const A n_inv = (A)(1.0 / (double)n);
    const A rs = (A)1 / m_sqrt(ss * n_inv + (A)eps);
    const A c = rs * rs * rs * n_inv * dot;
    for (u32 j = threadIdx.x; j < n; j += blockDim.x) {
        dxr[j] = from_acc<T>(rs * to_acc(gr[j]) * to_acc(w[j]) - c * to_acc(xr[j]));
    }
    if (threadIdx.x == 0) rstd[r] = rs;
}

// rms_norm_dw_{dtype}(rows, n, x, g, rstd, dw): one thread per column j, dw[j] = Σ_r g x r,
// each product in the accumulation type, the sum in double (as the CPU does). dw: [n].
template <typename T>
__device__ void rms_norm_dw_col(u32 rows, u32 n, const T* x, const T* g, const typename Acc<T>::type* rstd, T* dw) {
    typedef typename Acc<T>::type A;
    FOR_EACH(j, n) {
        double acc = 0.0;
        for (u32 r = 0; r < rows; ++r) {
            const size_t e = (size_t)r * n + j;
            const A p = to_acc(g[e]) * to_acc(x[e]) * rstd[r];
            acc += (double)p;
        }
        dw[j] = from_double<T>(acc);
    }
}

#define NORM(T, SUF) \
    extern "C" __global__ void rms_norm_##SUF(u32 rows, u32 n, const T* x, const T* w, T* y, double eps) { \
        rms_norm_row<T>(rows, n, x, w, y, eps); \
    } \
    extern "C" __global__ void rms_norm_backward_##SUF(u32 rows, u32 n, const T* x, const T* w, const T* g, T* dx, \
                                                       Acc<T>::type* rstd, double eps) { \
        rms_norm_backward_row<T>(rows, n, x, w, g, dx, rstd, eps); \
    } \
    extern "C" __global__ void rms_norm_dw_##SUF(u32 rows, u32 n, const T* x, const T* g, const Acc<T>::type* rstd, \
                                                 T* dw) { \
        rms_norm_dw_col<T>(rows, n, x, g, rstd, dw); \
    }

NORM(float, f32)
NORM(bf16, bf16)
NORM(double, f64)
