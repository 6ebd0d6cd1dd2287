// Fused multi-tensor AdamW: one launch updates every parameter, its two moments, from its
// gradient. The host uploads a table of tensors (addresses, length, dtype) and a list of chunks
// (tensor, chunk index); blocks stride over the chunks, threads over a chunk's elements. Each
// element is read and written once: p, m, v read and written, g read.
//
// Math in float for f32 and bf16 parameters (bf16 widened on read, the new value rounded once),
// in double for f64; the moments are float (double for f64). The operations follow the CPU
// reference one by one with rounded intrinsics (no fused multiply-add contraction), so results
// match it bit for bit:
//   g = grad·scale
//   m = m·b1 + g·(1 − b1)            v = v·b2 + g²·(1 − b2)
//   p = p·decay − (m / (√(v·inv_bc2) + eps))·step_size

#define ADAMW_CHUNK 4096

// One row of the tensor table (48 bytes; `ROW_WORDS` in engine/src/fused/adamw/cuda.rs).
struct AdamWTensor {
    unsigned long long p;   // parameter, dtype below
    unsigned long long g;   // gradient, the parameter's dtype
    unsigned long long m;   // first moment, float (double for f64)
    unsigned long long v;   // second moment, likewise
    unsigned long long len; // elements
    u32 dtype;              // 0 f32, 1 bf16, 2 f64
    u32 pad;
};

// One chunk: elements [chunk·ADAMW_CHUNK, min(len, (chunk + 1)·ADAMW_CHUNK)) of tensor `tensor`.
struct AdamWChunk {
    u32 tensor;
    u32 chunk;
};

__device__ __forceinline__ float rn_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double rn_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float rn_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double rn_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float rn_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double rn_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float rn_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double rn_div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float rn_sqrt(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double rn_sqrt(double a) { return __dsqrt_rn(a); }

template <typename A>
struct AdamWCoef {
    A scale, b1, omb1, b2, omb2, inv_bc2, eps, decay, step_size;
};

// `x·a + 0` as the tensor-op formulation computes it (`affine(a, 0)`).
template <typename A>
__device__ __forceinline__ A affine0(A x, A a) {
    return rn_add(rn_mul(x, a), (A)0);
}

template <typename P, typename A>
__device__ void adamw_range(const AdamWTensor& t, size_t start, size_t end, const AdamWCoef<A>& k) {
    P* p = (P*)t.p;
    const P* g = (const P*)t.g;
    A* m = (A*)t.m;
    A* v = (A*)t.v;
    for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        const A gi = affine0(to_acc(g[i]), k.scale);
        const A mi = rn_add(affine0(m[i], k.b1), affine0(gi, k.omb1));
        const A vi = rn_add(affine0(v[i], k.b2), affine0(rn_mul(gi, gi), k.omb2));
        const A denom = rn_add(rn_sqrt(affine0(vi, k.inv_bc2)), k.eps);
        const A upd = affine0(rn_div(mi, denom), k.step_size);
        p[i] = from_acc<P>(rn_sub(affine0(to_acc(p[i]), k.decay), upd));
        m[i] = mi;
        v[i] = vi;
    }
}

template <typename A>
__device__ AdamWCoef<A> adamw_coef(double scale, double b1, double omb1, double b2, double omb2, double inv_bc2,
                                   double eps, double decay, double step_size) {
    AdamWCoef<A> k;
    k.scale = (A)scale;
    k.b1 = (A)b1;
    k.omb1 = (A)omb1;
    k.b2 = (A)b2;
    k.omb2 = (A)omb2;
    k.inv_bc2 = (A)inv_bc2;
    k.eps = (A)eps;
    k.decay = (A)decay;
    k.step_size = (A)step_size;
    return k;
}

// adamw_step_multi(tensors, chunks, n_chunks, scale, scale_ptr, b1, 1 − b1, b2, 1 − b2, 1/(1 − b2ᵗ), eps,
//                  1 − lr·wd, lr/(1 − b1ᵗ))
//   tensors: [T] AdamWTensor; chunks: [n_chunks] AdamWChunk. The coefficients come in double and
//   are rounded to float for float math, as the CPU rounds them.
//   scale_ptr: null, or a double in device memory that replaces `scale` (the clipping factor that
//   clip_factor_f64 wrote, never read back by the host); when it is not finite the launch changes
//   nothing (a step whose gradient norm is NaN or infinite is skipped).
extern "C" __global__ void adamw_step_multi(const AdamWTensor* tensors, const AdamWChunk* chunks, u32 n_chunks,
                                            double scale, const double* scale_ptr, double b1, double omb1,
                                            double b2, double omb2, double inv_bc2, double eps, double decay,
                                            double step_size) {
    if (scale_ptr != nullptr) {
        scale = *scale_ptr;
        if (!isfinite(scale)) return;
    }
    const AdamWCoef<float> kf = adamw_coef<float>(scale, b1, omb1, b2, omb2, inv_bc2, eps, decay, step_size);
    const AdamWCoef<double> kd = adamw_coef<double>(scale, b1, omb1, b2, omb2, inv_bc2, eps, decay, step_size);
    for (u32 c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const AdamWChunk ch = chunks[c];
        const AdamWTensor t = tensors[ch.tensor];
        const size_t start = (size_t)ch.chunk * ADAMW_CHUNK;
        const size_t end = min((size_t)t.len, start + ADAMW_CHUNK);
        switch (t.dtype) {
            case 0: adamw_range<float, float>(t, start, end, kf); break;
            case 1: adamw_range<bf16, float>(t, start, end, kf); break;
            case 2: adamw_range<double, double>(t, start, end, kd); break;
            default: break;
        }
    }
}

// ----- Σ t² over many tensors (the gradient norm) ----------------------------------------------
// sum_squares_multi(tensors, chunks, n_chunks, partials): one double per chunk of SQ_CHUNK
// elements, partials[c] = Σ_{i in chunk c} t[i]² (block reduction); the host adds the partials in
// order. tensors: rows of SqTensor (24 bytes, `SQ_ROW_WORDS` in engine/src/fused/adamw/cuda.rs);
// chunks: AdamWChunk entries (tensor index, chunk index).

#define SQ_CHUNK 4096

struct SqTensor {
    unsigned long long p;   // data, dtype below
    unsigned long long len; // elements
    u32 dtype;              // 0 f32, 1 bf16, 2 f64
    u32 pad;
};

extern "C" __global__ void sum_squares_multi(const SqTensor* tensors, const AdamWChunk* chunks, u32 n_chunks,
                                             double* partials) {
    for (u32 c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const AdamWChunk ch = chunks[c];
        const SqTensor t = tensors[ch.tensor];
        const size_t start = (size_t)ch.chunk * SQ_CHUNK;
        const size_t end = min((size_t)t.len, start + SQ_CHUNK);
        double s = 0.0;
        for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
            double v = 0.0;
            switch (t.dtype) {
                case 0: v = (double)((const float*)t.p)[i]; break;
                case 1: v = (double)__bfloat162float(((const bf16*)t.p)[i]); break;
                case 2: v = ((const double*)t.p)[i]; break;
                default: break;
            }
            s += v * v;
        }
        s = block_reduce(s, SumOp(), 0.0);
        if (threadIdx.x == 0) partials[c] = s;
    }
}

// ----- the gradient norm and its clipping factor, on the device ----------------------------------
// clip_factor_f64(partials, n, max_norm, out): one thread. norm = √(Σ partials in order), the
// value the host gets from sum_squares_multi and a square root; out[0] = norm, out[1] = the
// clipping factor of PyTorch's clip_grad_norm_: max_norm / (norm + 1e-6) when max_norm > 0 and
// norm > max_norm, else 1; NaN when the norm is not finite (adamw_step_multi then skips the step).
// IEEE double throughout (rounded intrinsics), so it equals the host's arithmetic bit for bit.

extern "C" __global__ void clip_factor_f64(const double* partials, u32 n, double max_norm, double* out) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = -0.0; // Rust's f64 `sum` starts there
    for (u32 i = 0; i < n; ++i) s = __dadd_rn(s, partials[i]);
    const double norm = __dsqrt_rn(s);
    double factor = 1.0;
    if (!isfinite(norm)) {
        factor = nan("");
    } else if (max_norm > 0.0 && norm > max_norm) {
        factor = __ddiv_rn(max_norm, __dadd_rn(norm, 1e-6));
    }
    out[0] = norm;
    out[1] = factor;
}

// ----- many tensors added into many others (gradient accumulation) -------------------------------
// add_into_multi(tensors, chunks, n_chunks): for every row, dst[i] = dst[i] + src[i] over its
// `len` elements, in the accumulation type (bf16 widened to float, rounded once; `rn_add` as the
// elementwise add computes it), so one launch equals an `add_to_{dtype}` per row bit for bit.
// tensors: rows of AddTensor (32 bytes, `ADD_ROW_WORDS` in engine/src/fused/adamw/cuda.rs);
// chunks: AdamWChunk entries of ADD_CHUNK elements. The rows' destinations never overlap.

#define ADD_CHUNK 4096

struct AddTensor {
    unsigned long long dst; // written, dtype below
    unsigned long long src; // read, the same dtype
    unsigned long long len; // elements
    u32 dtype;              // 0 f32, 1 bf16, 2 f64
    u32 pad;
};

template <typename T>
__device__ __forceinline__ void add_range(const AddTensor& t, size_t start, size_t end) {
    T* d = (T*)t.dst;
    const T* s = (const T*)t.src;
    for (size_t i = start + threadIdx.x; i < end; i += blockDim.x) {
        d[i] = from_acc<T>(rn_add(to_acc(d[i]), to_acc(s[i])));
    }
}

extern "C" __global__ void add_into_multi(const AddTensor* tensors, const AdamWChunk* chunks, u32 n_chunks) {
    for (u32 c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        const AdamWChunk ch = chunks[c];
        const AddTensor t = tensors[ch.tensor];
        const size_t start = (size_t)ch.chunk * ADD_CHUNK;
        const size_t end = min((size_t)t.len, start + ADD_CHUNK);
        switch (t.dtype) {
            case 0: add_range<float>(t, start, end); break;
            case 1: add_range<bf16>(t, start, end); break;
            case 2: add_range<double>(t, start, end); break;
            default: break;
        }
    }
}
