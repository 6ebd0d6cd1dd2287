// Index kernels: index_select, index_add, gather, scatter_add, top-k. Operands are contiguous
// and seen as [outer, size, inner] around the indexed dim. An id that is out of range reads as
// zero and adds nothing (the host cannot check ids without a round trip); never out of bounds.
// Accumulating kernels (index_add, scatter_add) use atomicAdd and exist for f32 and f64; bf16
// accumulates through f32 on the host side, as the CPU does.

// index_select_{dtype}(n_out, size, inner, n_ids, src, ids, out)
//   src: [outer, size, inner]; ids: [n_ids]; out: [outer, n_ids, inner]:
//   out[o, j, i] = src[o, ids[j], i].
template <typename T>
__device__ void index_select_k(u32 n_out, u32 size, u32 inner, u32 n_ids, const T* src, const u32* ids, T* out) {
    FOR_EACH(k, n_out) {
        const u32 i = (u32)(k % inner);
        const u32 j = (u32)((k / inner) % n_ids);
        const size_t o = k / ((size_t)inner * n_ids);
        const u32 id = ids[j];
        out[k] = id < size ? src[(o * size + id) * inner + i] : T();
    }
}

// gather_{dtype}(n_out, size, m, inner, src, ids, out)
//   src: [outer, size, inner]; ids, out: [outer, m, inner]: out[o, j, i] = src[o, ids[o, j, i], i].
template <typename T>
__device__ void gather_k(u32 n_out, u32 size, u32 m, u32 inner, const T* src, const u32* ids, T* out) {
    FOR_EACH(k, n_out) {
        const u32 i = (u32)(k % inner);
        const size_t o = k / ((size_t)m * inner);
        const u32 id = ids[k];
        out[k] = id < size ? src[(o * size + id) * inner + i] : T();
    }
}

#define COPY_INDEX(T, SUF) \
    extern "C" __global__ void index_select_##SUF(u32 n_out, u32 size, u32 inner, u32 n_ids, const T* src, \
                                                  const u32* ids, T* out) { \
        index_select_k<T>(n_out, size, inner, n_ids, src, ids, out); \
    } \
    extern "C" __global__ void gather_##SUF(u32 n_out, u32 size, u32 m, u32 inner, const T* src, const u32* ids, \
                                            T* out) { \
        gather_k<T>(n_out, size, m, inner, src, ids, out); \
    }

COPY_INDEX(float, f32)
COPY_INDEX(bf16, bf16)
COPY_INDEX(double, f64)
COPY_INDEX(u32, u32)

// index_add_{dtype}(n_src, size, inner, n_ids, src, ids, out)
//   src: [outer, n_ids, inner]; out: [outer, size, inner], already holding the base tensor:
//   out[o, ids[j], i] += src[o, j, i].
template <typename T>
__device__ void index_add_k(u32 n_src, u32 size, u32 inner, u32 n_ids, const T* src, const u32* ids, T* out) {
    FOR_EACH(k, n_src) {
        const u32 i = (u32)(k % inner);
        const u32 j = (u32)((k / inner) % n_ids);
        const size_t o = k / ((size_t)inner * n_ids);
        const u32 id = ids[j];
        if (id < size) atomicAdd(&out[(o * size + id) * inner + i], src[k]);
    }
}

// scatter_add_{dtype}(n_src, size, m, inner, src, ids, out)
//   src, ids: [outer, m, inner]; out: [outer, size, inner], already holding the base tensor:
//   out[o, ids[o, j, i], i] += src[o, j, i].
template <typename T>
__device__ void scatter_add_k(u32 n_src, u32 size, u32 m, u32 inner, const T* src, const u32* ids, T* out) {
    FOR_EACH(k, n_src) {
        const u32 i = (u32)(k % inner);
        const size_t o = k / ((size_t)m * inner);
        const u32 id = ids[k];
        if (id < size) atomicAdd(&out[(o * size + id) * inner + i], src[k]);
    }
}

#define ADD_INDEX(T, SUF) \
    extern "C" __global__ void index_add_##SUF(u32 n_src, u32 size, u32 inner, u32 n_ids, const T* src, \
                                               const u32* ids, T* out) { \
        index_add_k<T>(n_src, size, inner, n_ids, src, ids, out); \
    } \
    extern "C" __global__ void scatter_add_##SUF(u32 n_src, u32 size, u32 m, u32 inner, const T* src, const u32* ids, \
                                                 T* out) { \
        scatter_add_k<T>(n_src, size, m, inner, src, ids, out); \
    }

ADD_INDEX(float, f32)
ADD_INDEX(double, f64)

// ----- top-k ---------------------------------------------------------------------------------------

// True when (x, i) comes before (y, j) in top-k order: NaN first (it counts as the largest value),
// then larger values, equal values by lower index. A total order, so the result is deterministic.
__device__ __forceinline__ bool topk_before(double x, u32 i, double y, u32 j) {
    const bool xn = isnan(x), yn = isnan(y);
    if (xn != yn) return xn;
    if (!xn && x != y) return x > y;
    return i < j;
}

// topk_{dtype}(rows, n, k, x, out)
//   x: [rows, n] contiguous; out: [rows, k] u32, the indices of the k first elements of each row
//   in top-k order. One warp per row, k passes; pass p picks the first element (in that order)
//   that comes after pass p−1's pick. O(k · n / 32) per row: meant for small k.
template <typename T>
__device__ void topk_row(u32 rows, u32 n, u32 k, const T* x, u32* out) {
    const u32 NONE = 0xffffffffu;
    const u32 lane = threadIdx.x & 31;
    const size_t r = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    const T* xr = x + r * n;
    u32 prev_i = NONE;
    double prev_v = 0.0;
    for (u32 p = 0; p < k; ++p) {
        u32 bi = NONE;
        double bv = 0.0;
        for (u32 j = lane; j < n; j += 32) {
            const double v = to_f64(xr[j]);
            if (prev_i != NONE && !topk_before(prev_v, prev_i, v, j)) continue;
            if (bi == NONE || topk_before(v, j, bv, bi)) {
                bi = j;
                bv = v;
            }
        }
        for (int s = 16; s > 0; s >>= 1) {
            const u32 oi = __shfl_xor_sync(0xffffffffu, bi, s);
            const double ov = __shfl_xor_sync(0xffffffffu, bv, s);
            if (oi != NONE && (bi == NONE || topk_before(ov, oi, bv, bi))) {
                bi = oi;
                bv = ov;
            }
        }
        if (lane == 0) out[r * k + p] = bi == NONE ? 0u : bi;
        prev_i = bi;
        prev_v = bv;
    }
}

#define TOPK(T, SUF) \
    extern "C" __global__ void topk_##SUF(u32 rows, u32 n, u32 k, const T* x, u32* out) { topk_row<T>(rows, n, k, x, out); }

TOPK(float, f32)
TOPK(bf16, bf16)
TOPK(double, f64)
TOPK(u32, u32)
