// RMSNorm (forward and fused backward) and rotary embedding. Statistics in float for f32/bf16,
// double for f64, as in the CPU reference.

// ----- vector access --------------------------------------------------------------------------

// V elements of T as one word of V·sizeof(T) = 4, 8 or 16 bytes.
template <int N> struct Word;
template <> struct Word<4> { typedef unsigned int type; };
template <> struct Word<8> { typedef uint2 type; };
template <> struct Word<16> { typedef uint4 type; };

template <int V, typename T> __device__ __forceinline__ void load_n(const T* p, T (&out)[V]) {
    typedef typename Word<V * sizeof(T)>::type W;
    const W w = *reinterpret_cast<const W*>(p);
    const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int k = 0; k < V; ++k) out[k] = e[k];
}

template <int V, typename T> __device__ __forceinline__ void store_n(T* p, const T (&v)[V]) {
    typedef typename Word<V * sizeof(T)>::type W;
    W w;
    T* e = reinterpret_cast<T*>(&w);
#pragma unroll
    for (int k = 0; k < V; ++k) e[k] = v[k];
    *reinterpret_cast<W*>(p) = w;
}

template <typename T>
__device__ __forceinline__ bool aligned_to(const T* p, size_t bytes) {
    return ((size_t)p % bytes) == 0;
}

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

// ----- rotary embedding (Hugging Face half-rotation layout) ----------------------------------------

// rope_{dtype}(b, n1, n2, d, bc, tdim, xs, x, cos, sin, y)
//   x: [b, n1, n2, d] read through the strided view `xs` (rank 4, not merged), its positions
//   along dim tdim (1 or 2; t = n1 or n2, the other dim holds the heads); cos, sin: contiguous
//   [bc, t, d/2] with bc 1 or b; y: contiguous [b, n1, n2, d]. One thread per (row, i < d/2):
//   y[i] = x[i] c − x[i+d/2] s,  y[i+d/2] = x[i+d/2] c + x[i] s.
//   Vector path: each thread takes V consecutive pairs i .. i+V through V-element loads of x[i..],
//   x[i+d/2..], cos and sin and V-element stores of both halves of y, V the widest of
//   16 / sizeof(T), halved down to 2, for which x's last stride is 1, d/2, x's offset and its other
//   strides (of dims longer than 1) are multiples of V, and x, cos, sin and y start on a
//   V·sizeof(T) boundary. The same arithmetic per pair (rope_rotate) either way, with its
//   roundings fixed, so both paths give the same bits.

// The rotation of one pair (x1 = x[i], x2 = x[i + d/2]) in the accumulation type, shared by both
// paths. The roundings are spelled out as the one-pair-per-thread kernel compiled for sm_90 had
// them (ptxas contracted `x1 c − x2 s` to fma(x1, c, −x2 s) and `x2 c + x1 s` to
// fma(x1, s, x2 c)), so that neither path depends on how the compiler contracts its own code.
template <typename T>
__device__ __forceinline__ void rope_rotate(T x1, T x2, T c, T s, T& y1, T& y2) {
    typedef typename Acc<T>::type A;
    const A ca = to_acc(c), sa = to_acc(s);
    const A a = to_acc(x1), b = to_acc(x2);
    y1 = from_acc<T>(m_fma(a, ca, -m_mul(b, sa)));
    y2 = from_acc<T>(m_fma(a, sa, m_mul(b, ca)));
}

// The dims of a rope launch: x [b, n1, n2, d] with positions along dim tdim (1 or 2).
struct RopeDims {
    u32 b, n1, n2, d, bc, tdim;
};

// Where row `row` (over b, n1, n2) of x starts (`base`) and where its cos/sin row starts (`tb`).
__device__ __forceinline__ void rope_row(size_t row, const RopeDims& r, u32 half, const Strided& xs, u32& base,
                                         u32& tb) {
    const u32 i2 = (u32)(row % r.n2);
    const u32 i1 = (u32)((row / r.n2) % r.n1);
    const u32 bi = (u32)(row / ((size_t)r.n2 * r.n1));
    const u32 t = r.tdim == 1 ? r.n1 : r.n2, ti = r.tdim == 1 ? i1 : i2;
    base = xs.offset + bi * xs.strides[0] + i1 * xs.strides[1] + i2 * xs.strides[2];
    tb = ((r.bc == 1 ? 0u : bi) * t + ti) * half;
}

// Whether the vector path of width V applies (see the header above).
template <int V, typename T>
__device__ __forceinline__ bool rope_vec_ok(u32 d, const Strided& xs, const T* x, const T* cs, const T* sn,
                                            const T* y) {
    const size_t bytes = V * sizeof(T);
    bool ok = xs.strides[3] == 1 && (d / 2) % V == 0 && xs.offset % V == 0;
#pragma unroll
    for (int k = 0; k < 3; ++k) ok = ok && (xs.dims[k] == 1 || xs.strides[k] % V == 0);
    return ok && aligned_to(x, bytes) && aligned_to(cs, bytes) && aligned_to(sn, bytes) && aligned_to(y, bytes);
}

// One thread per V consecutive pairs of one row.
template <int V, typename T>
__device__ __forceinline__ void rope_vec(const RopeDims& r, const Strided& xs, const T* x, const T* cs, const T* sn,
                                         T* y) {
    const u32 d = r.d, half = d / 2, groups = half / V;
    const size_t total = (size_t)r.b * r.n1 * r.n2 * groups;
    FOR_EACH(k, total) {
        const u32 i = (u32)(k % groups) * V;
        const size_t row = k / groups;
        u32 base, tb;
        rope_row(row, r, half, xs, base, tb);
        T x1[V], x2[V], c[V], s[V], y1[V], y2[V];
        load_n(x + base + i, x1);
        load_n(x + base + i + half, x2);
        load_n(cs + tb + i, c);
        load_n(sn + tb + i, s);
#pragma unroll
        for (int j = 0; j < V; ++j) rope_rotate(x1[j], x2[j], c[j], s[j], y1[j], y2[j]);
        T* yr = y + row * d;
        store_n(yr + i, y1);
        store_n(yr + i + half, y2);
    }
}

// One thread per pair, x through all its strides.
template <typename T>
__device__ __forceinline__ void rope_scalar(const RopeDims& r, const Strided& xs, const T* x, const T* cs,
                                            const T* sn, T* y) {
    const u32 d = r.d, half = d / 2;
    const size_t total = (size_t)r.b * r.n1 * r.n2 * half;
    FOR_EACH(k, total) {
        const u32 i = (u32)(k % half);
        const size_t row = k / half;
        u32 base, tb;
        rope_row(row, r, half, xs, base, tb);
        T* yr = y + row * d;
        rope_rotate(x[base + i * xs.strides[3]], x[base + (i + half) * xs.strides[3]], cs[tb + i], sn[tb + i], yr[i],
                    yr[i + half]);
    }
}

// The widest vector path that applies, from V down to 2; else the scalar one.
template <int V, typename T>
__device__ void rope_pairs(const RopeDims& r, const Strided& xs, const T* x, const T* cs, const T* sn, T* y) {
    if (rope_vec_ok<V>(r.d, xs, x, cs, sn, y)) {
        rope_vec<V>(r, xs, x, cs, sn, y);
    } else if constexpr (V > 2) {
        rope_pairs<V / 2>(r, xs, x, cs, sn, y);
    } else {
        rope_scalar(r, xs, x, cs, sn, y);
    }
}

#define ROPE(T, SUF) \
    extern "C" __global__ void rope_##SUF(u32 b, u32 n1, u32 n2, u32 d, u32 bc, u32 tdim, Strided xs, const T* x, \
                                          const T* cs, const T* sn, T* y) { \
        rope_pairs<16 / (int)sizeof(T)>(RopeDims{b, n1, n2, d, bc, tdim}, xs, x, cs, sn, y); \
    }

ROPE(float, f32)
ROPE(bf16, bf16)
ROPE(double, f64)
