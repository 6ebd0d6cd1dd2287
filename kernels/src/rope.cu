// Rotary position embedding (Hugging Face half-rotation layout). Arithmetic in float for
// f32/bf16, double for f64, as in the CPU reference.

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
