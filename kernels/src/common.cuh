// Shared by every kernel module (prepended to each source): element types, conversions to the
// accumulation type, the strided-view argument, warp/block reductions and the cross-entropy row
// statistics.
//
// Accumulation types follow the CPU reference: f32 and bf16 compute in float (bf16 is widened on
// read and rounded once on write), f64 in double.
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef unsigned int u32;

#define MAX_DIMS 8

// A strided view with at most MAX_DIMS dims after merging (the host drops size-1 dims and merges
// dims that are contiguous with each other). Element `i` (row-major over `dims`) lives at
// `offset + Σ idx[d] * strides[d]`. Layout matches `StridedArg` in engine/src/backend/cuda/layout.rs.
struct Strided {
    u32 rank;
    u32 offset;
    u32 dims[MAX_DIMS];
    u32 strides[MAX_DIMS];
};

__device__ __forceinline__ u32 strided_at(const Strided& l, u32 i) {
    if (l.rank == 1 && l.strides[0] == 1) {
        return l.offset + i;
    }
    // Unrolled with constant indices so the view stays in registers (a loop indexed by `rank`
    // would copy the parameter struct to local memory).
    u32 off = l.offset;
#pragma unroll
    for (int d = MAX_DIMS - 1; d >= 0; --d) {
        if (d < (int)l.rank) {
            const u32 n = l.dims[d];
            off += (i % n) * l.strides[d];
            i /= n;
        }
    }
    return off;
}

// ----- counter-based dropout (engine/src/rng.rs) --------------------------------------------------

typedef unsigned long long u64;

// SplitMix64 finaliser.
__device__ __forceinline__ u64 rng_mix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// `rng_mix64` of the seed a dropout kernel draws from: its `seed` argument XOR the device's
// dropout key (engine::set_dropout_key), 8 bytes of device memory read when the kernel runs, so
// that a replayed CUDA graph (whose recorded seeds never change) draws the masks of the key set
// before the replay. Called once per thread (the key is uniform); key 0 leaves `seed` as it is.
__device__ __forceinline__ u64 dropout_mixed(u64 seed, const u64* __restrict__ key) { return rng_mix64(seed ^ *key); }

// hash(seed, j) of engine/src/rng.rs with `mixed = rng_mix64(seed)` hoisted by the caller.
__device__ __forceinline__ u64 rng_hash_mixed(u64 mixed, u64 j) {
    return rng_mix64(mixed ^ (j * 0xD6E8FEB86659FD93ull));
}

// dropout_bits(seed, i) of engine/src/rng.rs: bits 16·(i mod 4) .. +16 of hash(seed, i / 4).
// Element i is dropped when these are below the threshold round(p · 2^16).
__device__ __forceinline__ u32 dropout_bits(u64 mixed, u64 i) {
    return (u32)(rng_hash_mixed(mixed, i >> 2) >> ((i & 3) * 16)) & 0xFFFFu;
}

// Grid-stride loop over `n` elements.
#define FOR_EACH(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); \
         i += (size_t)blockDim.x * gridDim.x)

// ----- accumulation types and conversions -------------------------------------------------------

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ double from_float<double>(float x) { return (double)x; }

template <typename T> __device__ __forceinline__ T from_double(double x);
template <> __device__ __forceinline__ float from_double<float>(double x) { return (float)x; }
template <> __device__ __forceinline__ bf16 from_double<bf16>(double x) { return __double2bfloat16(x); }
template <> __device__ __forceinline__ double from_double<double>(double x) { return x; }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_acc<bf16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }

// Widening of any element to double (exact for every dtype).
__device__ __forceinline__ double to_f64(float x) { return (double)x; }
__device__ __forceinline__ double to_f64(bf16 x) { return (double)__bfloat162float(x); }
__device__ __forceinline__ double to_f64(double x) { return x; }
__device__ __forceinline__ double to_f64(u32 x) { return (double)x; }

// Rust's `as u32` from a float: truncation toward zero, saturating, NaN to 0.
__device__ __forceinline__ u32 sat_u32(double x) {
    if (!(x > 0.0)) return 0u;
    if (x >= 4294967295.0) return 4294967295u;
    return (u32)x;
}

// ----- casts ---------------------------------------------------------------------------------------

// Converts one element with Rust's `as` (and half's from_f32/from_f64) semantics: floats round to
// nearest even, float -> u32 truncates and saturates (NaN -> 0).
template <typename D> struct Cast;
template <> struct Cast<float> {
    __device__ static float of(float x) { return x; }
    __device__ static float of(bf16 x) { return __bfloat162float(x); }
    __device__ static float of(double x) { return (float)x; }
    __device__ static float of(u32 x) { return (float)x; }
};
template <> struct Cast<double> {
    __device__ static double of(float x) { return (double)x; }
    __device__ static double of(bf16 x) { return (double)__bfloat162float(x); }
    __device__ static double of(double x) { return x; }
    __device__ static double of(u32 x) { return (double)x; }
};
template <> struct Cast<bf16> {
    __device__ static bf16 of(float x) { return __float2bfloat16(x); }
    __device__ static bf16 of(bf16 x) { return x; }
    __device__ static bf16 of(double x) { return __double2bfloat16(x); }
    __device__ static bf16 of(u32 x) { return __float2bfloat16((float)x); }
};
template <> struct Cast<u32> {
    __device__ static u32 of(float x) { return sat_u32((double)x); }
    __device__ static u32 of(bf16 x) { return sat_u32((double)__bfloat162float(x)); }
    __device__ static u32 of(double x) { return sat_u32(x); }
    __device__ static u32 of(u32 x) { return x; }
};

// ----- math overloads on the accumulation type ----------------------------------------------------

__device__ __forceinline__ float m_exp(float x) { return expf(x); }
__device__ __forceinline__ double m_exp(double x) { return exp(x); }
__device__ __forceinline__ float m_log(float x) { return logf(x); }
__device__ __forceinline__ double m_log(double x) { return log(x); }
__device__ __forceinline__ float m_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double m_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float m_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double m_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float m_cos(float x) { return cosf(x); }
__device__ __forceinline__ double m_cos(double x) { return cos(x); }
__device__ __forceinline__ float m_sin(float x) { return sinf(x); }
__device__ __forceinline__ double m_sin(double x) { return sin(x); }
__device__ __forceinline__ float m_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double m_abs(double x) { return fabs(x); }
__device__ __forceinline__ float m_pow(float x, float e) { return powf(x, e); }
__device__ __forceinline__ double m_pow(double x, double e) { return pow(x, e); }
// A product and a fused multiply-add with their rounding spelled out: the compiler may neither
// fuse the one nor split the other (it may contract a plain `a * b + c`, differently in different
// code).
__device__ __forceinline__ float m_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double m_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float m_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double m_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float m_fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double m_fma(double a, double b, double c) { return __fma_rn(a, b, c); }
// fmax/fmin return the other operand when one is NaN, like Rust's f32::max/min.
__device__ __forceinline__ float m_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double m_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float m_min(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double m_min(double a, double b) { return fmin(a, b); }

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000ll); }
template <typename A> __device__ __forceinline__ A nan_v();
template <> __device__ __forceinline__ float nan_v<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double nan_v<double>() { return __longlong_as_double(0x7ff8000000000000ll); }

// ----- reductions ----------------------------------------------------------------------------------

struct SumOp {
    template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
struct MaxOp {
    template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return m_max(a, b); }
};

template <typename A, typename F>
__device__ __forceinline__ A warp_reduce(A v, F f) {
    for (int o = 16; o > 0; o >>= 1) {
        v = f(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

// Reduces `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. Safe to call several times in a row (the first barrier protects the shared slots).
template <typename A, typename F>
__device__ A block_reduce(A v, F f, A identity) {
    __shared__ A slots[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_reduce(v, f);
    __syncthreads();
    if (lane == 0) slots[warp] = v;
    __syncthreads();
    v = lane < warps ? slots[lane] : identity;
    return warp_reduce(v, f);
}

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

// ----- cross-entropy row statistics (cross_entropy.cu, linear_cross_entropy.cu) ----------------

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
