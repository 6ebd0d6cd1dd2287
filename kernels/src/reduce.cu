// Reductions over one dim.
//
// {sum,max,min}_{f32,bf16,f64,u32}(n_out, len, stride, lo, x, y)
//   One warp per output element. `lo` is the view with the reduced dim narrowed to 1, so
//   `at(lo, o)` is where row `o` starts; its elements are `stride` apart. y: [n_out], same dtype.
//   Float sums accumulate in double (as the CPU does); u32 sums wrap; max/min propagate NaN.
// {argmax,argmin}_{f32,bf16,f64,u32}(n_out, len, stride, lo, x, y)
//   y: [n_out] u32, the index of the first extreme value. Like the CPU's sequential scan, NaN
//   elements never win, except a NaN at index 0 (nothing compares greater than it), which does.

#define WARPS_PER_BLOCK 8

__device__ __forceinline__ bool is_nan_v(float x) { return isnan(x); }
__device__ __forceinline__ bool is_nan_v(double x) { return isnan(x); }
__device__ __forceinline__ bool is_nan_v(u32) { return false; }

// NaN-sticky max/min in the order-free form: the result is NaN when any input is.
template <typename A> __device__ __forceinline__ A nan_max(A a, A b) { return (is_nan_v(a) || b <= a) ? a : b; }
template <typename A> __device__ __forceinline__ A nan_min(A a, A b) { return (is_nan_v(a) || b >= a) ? a : b; }

// Widened value used by max/min/arg kernels: float for f32/bf16, double for f64, u32 for u32.
__device__ __forceinline__ float red_val(float x) { return x; }
__device__ __forceinline__ float red_val(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double red_val(double x) { return x; }
__device__ __forceinline__ u32 red_val(u32 x) { return x; }

#define ROW_SETUP \
    const u32 lane = threadIdx.x & 31; \
    const size_t o = (size_t)blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5); \
    if (o >= n_out) return; \
    const u32 start = strided_at(lo, (u32)o);

// ----- sum -----------------------------------------------------------------------------------------

template <typename T>
__device__ void sum_rows(u32 n_out, u32 len, u32 stride, const Strided& lo, const T* x, T* y) {
    ROW_SETUP
    double acc = 0.0;
    for (u32 j = lane; j < len; j += 32) acc += to_f64(x[start + j * stride]);
    acc = warp_reduce(acc, SumOp());
    if (lane == 0) y[o] = from_double<T>(acc);
}

__device__ void sum_rows_u32(u32 n_out, u32 len, u32 stride, const Strided& lo, const u32* x, u32* y) {
    ROW_SETUP
    u32 acc = 0;
    for (u32 j = lane; j < len; j += 32) acc += x[start + j * stride];
    acc = warp_reduce(acc, SumOp());
    if (lane == 0) y[o] = acc;
}

// ----- max / min -----------------------------------------------------------------------------------

template <typename T, typename V, bool MAX>
__device__ void extreme_rows(u32 n_out, u32 len, u32 stride, const Strided& lo, const T* x, T* y, V init) {
    ROW_SETUP
    V acc = init;
    for (u32 j = lane; j < len; j += 32) {
        const V v = red_val(x[start + j * stride]);
        acc = MAX ? nan_max(acc, v) : nan_min(acc, v);
    }
    for (int s = 16; s > 0; s >>= 1) {
        const V other = __shfl_xor_sync(0xffffffffu, acc, s);
        acc = MAX ? nan_max(acc, other) : nan_min(acc, other);
    }
    if (lane == 0) y[o] = Cast<T>::of(acc);
}

// ----- argmax / argmin -----------------------------------------------------------------------------

template <typename T, bool MAX>
__device__ void arg_rows(u32 n_out, u32 len, u32 stride, const Strided& lo, const T* x, u32* y) {
    ROW_SETUP
    const u32 NONE = 0xffffffffu;
    u32 best = NONE;
    double bv = 0.0;
    for (u32 j = lane; j < len; j += 32) {
        const double v = to_f64(x[start + j * stride]);
        if (isnan(v)) continue;
        if (best == NONE || (MAX ? v > bv : v < bv)) {
            best = j;
            bv = v;
        }
    }
    for (int s = 16; s > 0; s >>= 1) {
        const u32 ob = __shfl_xor_sync(0xffffffffu, best, s);
        const double ov = __shfl_xor_sync(0xffffffffu, bv, s);
        const bool take = ob != NONE &&
            (best == NONE || (MAX ? ov > bv : ov < bv) || (ov == bv && ob < best));
        if (take) {
            best = ob;
            bv = ov;
        }
    }
    if (lane == 0) {
        const bool first_nan = len > 0 && isnan(to_f64(x[start]));
        y[o] = (first_nan || best == NONE) ? 0u : best;
    }
}

#define REDUCE_ARGS u32 n_out, u32 len, u32 stride, Strided lo
#define REDUCE_FLOAT(T, SUF, V) \
    extern "C" __global__ void sum_##SUF(REDUCE_ARGS, const T* x, T* y) { sum_rows<T>(n_out, len, stride, lo, x, y); } \
    extern "C" __global__ void max_##SUF(REDUCE_ARGS, const T* x, T* y) { \
        extreme_rows<T, V, true>(n_out, len, stride, lo, x, y, neg_inf<V>()); \
    } \
    extern "C" __global__ void min_##SUF(REDUCE_ARGS, const T* x, T* y) { \
        extreme_rows<T, V, false>(n_out, len, stride, lo, x, y, -neg_inf<V>()); \
    } \
    extern "C" __global__ void argmax_##SUF(REDUCE_ARGS, const T* x, u32* y) { arg_rows<T, true>(n_out, len, stride, lo, x, y); } \
    extern "C" __global__ void argmin_##SUF(REDUCE_ARGS, const T* x, u32* y) { arg_rows<T, false>(n_out, len, stride, lo, x, y); }

REDUCE_FLOAT(float, f32, float)
REDUCE_FLOAT(bf16, bf16, float)
REDUCE_FLOAT(double, f64, double)

extern "C" __global__ void sum_u32(REDUCE_ARGS, const u32* x, u32* y) { sum_rows_u32(n_out, len, stride, lo, x, y); }
extern "C" __global__ void max_u32(REDUCE_ARGS, const u32* x, u32* y) {
    extreme_rows<u32, u32, true>(n_out, len, stride, lo, x, y, 0u);
}
extern "C" __global__ void min_u32(REDUCE_ARGS, const u32* x, u32* y) {
    extreme_rows<u32, u32, false>(n_out, len, stride, lo, x, y, 0xffffffffu);
}
extern "C" __global__ void argmax_u32(REDUCE_ARGS, const u32* x, u32* y) { arg_rows<u32, true>(n_out, len, stride, lo, x, y); }
extern "C" __global__ void argmin_u32(REDUCE_ARGS, const u32* x, u32* y) { arg_rows<u32, false>(n_out, len, stride, lo, x, y); }
