// RMSNorm (forward and fused backward) and rotary embedding. Statistics in float for f32/bf16,
// double for f64, as in the CPU reference.

// rms_norm_{dtype}(rows, n, x, w, y, eps)
//   x, y: [rows, n] contiguous; w: [n]. One block per row:
//   y = x · r · w with r = 1 / sqrt(mean(x²) + eps).
template <typename T>
__device__ void rms_norm_row(u32 rows, u32 n, const T* x, const T* w, T* y, double eps) {
    typedef typename Acc<T>::type A;
    const size_t r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + r * n;
    T* yr = y + r * n;
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
template <typename T>
__device__ void rms_norm_backward_row(u32 rows, u32 n, const T* x, const T* w, const T* g, T* dx,
                                      typename Acc<T>::type* rstd, double eps) {
    typedef typename Acc<T>::type A;
    const size_t r = blockIdx.x;
    if (r >= rows) return;
    const T* xr = x + r * n;
    const T* gr = g + r * n;
    T* dxr = dx + r * n;
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

// ----- rotary embedding (Hugging Face half-rotation layout) ----------------------------------------

// rope_{dtype}(b, h, t, d, bc, xs, x, cos, sin, y)
//   x: [b, h, t, d] read through the strided view `xs` (rank 4, not merged); cos, sin: contiguous
//   [bc, t, d/2] with bc 1 or b; y: contiguous [b, h, t, d]. One thread per (row, i < d/2):
//   y[i] = x[i] c − x[i+d/2] s,  y[i+d/2] = x[i+d/2] c + x[i] s.
template <typename T>
__device__ void rope_pairs(u32 b, u32 h, u32 t, u32 d, u32 bc, const Strided& xs, const T* x, const T* cs,
                           const T* sn, T* y) {
    typedef typename Acc<T>::type A;
    const u32 half = d / 2;
    const size_t total = (size_t)b * h * t * half;
    FOR_EACH(k, total) {
        const u32 i = (u32)(k % half);
        const size_t row = k / half;
        const u32 ti = (u32)(row % t);
        const u32 bi = (u32)(row / ((size_t)t * h));
        const u32 hi = (u32)((row / t) % h);
        const u32 base = xs.offset + bi * xs.strides[0] + hi * xs.strides[1] + ti * xs.strides[2];
        const u32 tb = ((bc == 1 ? 0u : bi) * t + ti) * half;
        const A c = to_acc(cs[tb + i]), s = to_acc(sn[tb + i]);
        const A x1 = to_acc(x[base + i * xs.strides[3]]);
        const A x2 = to_acc(x[base + (i + half) * xs.strides[3]]);
        T* yr = y + row * d;
        yr[i] = from_acc<T>(x1 * c - x2 * s);
        yr[i + half] = from_acc<T>(x2 * c + x1 * s);
    }
}

#define ROPE(T, SUF) \
    extern "C" __global__ void rope_##SUF(u32 b, u32 h, u32 t, u32 d, u32 bc, Strided xs, const T* x, const T* cs, \
                                          const T* sn, T* y) { \
        rope_pairs<T>(b, h, t, d, bc, xs, x, cs, sn, y); \
    }

ROPE(float, f32)
ROPE(bf16, bf16)
ROPE(double, f64)
