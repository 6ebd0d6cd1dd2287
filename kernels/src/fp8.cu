// The FP8 unit (engine/src/fused/fp8/): quantisation of float matrices to e4m3 / e5m2 codes with one
// scale a row, computed on the device; the transpose of a code matrix; the row and column scaling of
// an FP8 GEMM's f32 result. The GEMM itself is cuBLASLt's.
//
// Codes are bytes: code c of a row-major [R, C] code matrix is byte r·C + c of the u32 storage
// (four codes a word, little-endian; C is a multiple of 4, so a word never straddles two rows).
// Scales are f32. `fmt` is 0 for e4m3, 1 for e5m2. Element counts fit 32 bits (the launchers check).
//
// Every value is first read as f32 exactly as the CPU reference does (`view_f32`: bf16 widened,
// f64 rounded to nearest), and every product and quotient of the scale computations is written
// with __fmul_rn / __fdiv_rn, so that NVRTC can neither contract nor approximate them: the codes
// and scales are the CPU's (engine/src/fused/fp8/cpu.rs) bit for bit. The encoding follows
// codec.rs's integer steps (round to nearest, ties to even; saturating to the largest finite
// value, infinities included; NaN stays NaN with its sign) instead of __nv_cvt_float_to_fp8.

// ----- scalars ------------------------------------------------------------------------------------

__device__ __forceinline__ bool fp8_isnan(float x) {
    return (__float_as_uint(x) & 0x7FFFFFFFu) > 0x7F800000u;
}

// |x| as bits: for non-negative floats the order of the bits is the order of the values, and every
// NaN (sign cleared) is above +inf, so the max of these bits is the max of |x|, NaN when any is.
__device__ __forceinline__ u32 fp8_abs_bits(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }

// An element as the CPU reads it (`view_f32`): bf16 widened exactly, f64 rounded to nearest even
// (Rust's `as f32`), a NaN keeping its sign.
__device__ __forceinline__ float fp8_in(float x) { return x; }
__device__ __forceinline__ float fp8_in(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float fp8_in(double x) {
    if (x != x) {
        const u32 sign = (u32)((unsigned long long)__double_as_longlong(x) >> 32) & 0x80000000u;
        return __uint_as_float(0x7FC00000u | sign);
    }
    return __double2float_rn(x);
}

// a · b rounded once; a NaN operand is returned as it is (a first), so that a NaN input keeps its
// sign into its code (the GPU's own NaN result would be the canonical positive one).
__device__ __forceinline__ float fp8_mul(float a, float b) {
    if (fp8_isnan(a)) return a;
    if (fp8_isnan(b)) return b;
    return __fmul_rn(a, b);
}

// `scale_of` of cpu.rs: (amax / FMAX, FMAX / amax), (1, 1) for amax below 2^-100 (0 included:
// such a row encodes as zeros; FMAX / amax could overflow); NaN for both when amax is NaN.
__device__ __forceinline__ void fp8_scale_of(float amax, u32 fmt, float* scale, float* inv) {
    const float fmax = fmt == 0 ? 448.0f : 57344.0f;
    if (amax < __uint_as_float(0x0D800000u)) { // 2^-100
        *scale = 1.0f;
        *inv = 1.0f;
    } else {
        *scale = __fdiv_rn(amax, fmax);
        *inv = __fdiv_rn(fmax, amax);
    }
}

// codec::encode: the code of x in format fmt (e4m3: 3 mantissa bits, bias 7, largest code 0x7E,
// NaN 0x7F; e5m2: 2, 15, 0x7B, 0x7F).
__device__ __forceinline__ u32 fp8_encode(float x, u32 fmt) {
    const u32 mbits = fmt == 0 ? 3u : 2u;
    const u32 bias = fmt == 0 ? 7u : 15u;
    const u32 max_code = fmt == 0 ? 0x7Eu : 0x7Bu;
    const u32 bits = __float_as_uint(x);
    const u32 sign = (bits >> 24) & 0x80u;
    const u32 abits = bits & 0x7FFFFFFFu;
    if (abits > 0x7F800000u) return 0x7Fu | sign;
    u32 code;
    // The smallest normal 2^(1 − B) has the f32 exponent field 128 − B.
    if (abits < ((128u - bias) << 23)) {
        // A multiple of the smallest subnormal 2^(1 − B − M) (exponent field 128 − B − M): the
        // quotient by a power of two is exact; rintf rounds half to even. The count runs on into
        // the smallest normal (count 2^M is exponent 1, mantissa 0).
        const float unit = __uint_as_float((128u - bias - mbits) << 23);
        code = (u32)rintf(__fdiv_rn(__uint_as_float(abits), unit));
    } else if (abits == 0x7F800000u) {
        code = max_code;
    } else {
        const u32 exp = abits >> 23; // biased by 127, at least 128 − B here
        const u32 shift = 23u - mbits;
        const u32 mant = abits & 0x7FFFFFu;
        u32 m = mant >> shift;
        const u32 rem = mant & ((1u << shift) - 1u);
        const u32 half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (m & 1u))) m += 1u; // a carry into the exponent is right
        code = ((exp - 127u + bias) << mbits) + m;
    }
    return min(code, max_code) | sign;
}

struct Fp8UMax {
    __device__ __forceinline__ u32 operator()(u32 a, u32 b) const { return max(a, b); }
};

// ----- quantisation, one scale a row ---------------------------------------------------------------

// fp8_quantize_rows_{dtype}(rows, cols, fmt, w, col, codes, scales)
//   w: [rows, cols] contiguous; col: [cols] f32 or null; codes: [rows, cols] bytes in format fmt;
//   scales: [rows] f32. Row r of v = w ⊙ col: amax_r = max |v[r, ·]| (NaN above every number),
//   scales[r] = amax_r / FMAX (1 for 0), codes[r, c] = enc(v[r, c] · (FMAX / amax_r)). One block per
//   row: the amax over the row, then its codes, one u32 word (4 codes) per thread and step.
template <typename T>
__device__ void fp8_quantize_rows(u32 rows, u32 cols, u32 fmt, const T* __restrict__ w,
                                  const float* __restrict__ col, u32* __restrict__ codes,
                                  float* __restrict__ scales) {
    const u32 r = blockIdx.x;
    if (r >= rows) return; // uniform over the block
    const T* x = w + (size_t)r * cols;
    u32 m = 0u;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = fp8_in(x[c]);
        if (col != nullptr) v = fp8_mul(v, col[c]);
        m = max(m, fp8_abs_bits(v));
    }
    m = block_reduce(m, Fp8UMax(), 0u);
    float scale, inv;
    fp8_scale_of(__uint_as_float(m), fmt, &scale, &inv);
    if (threadIdx.x == 0) scales[r] = scale;
    const u32 words = cols / 4u;
    u32* out = codes + (size_t)r * words;
    for (u32 j = threadIdx.x; j < words; j += blockDim.x) {
        u32 word = 0u;
#pragma unroll
        for (u32 k = 0; k < 4u; ++k) {
            float v = fp8_in(x[4u * j + k]);
            if (col != nullptr) v = fp8_mul(v, col[4u * j + k]);
            word |= fp8_encode(fp8_mul(v, inv), fmt) << (8u * k);
        }
        out[j] = word;
    }
}

// ----- the scaling of a GEMM's result -----------------------------------------------------------------

// fp8_scale_product_{dtype}(rows, cols, d, sa, sb, out)
//   out[r, c] = dtype((d[r, c] · sa[r]) · sb[c]), each product in f32 (sb left out when null) and one
//   rounding to the output dtype; d: [rows, cols] f32, sa: [rows] f32, sb: [cols] f32. `out` may be
//   `d` itself (f32): each element is read, then written, by the same thread.
template <typename T>
__device__ void fp8_scale_product(u32 rows, u32 cols, const float* d, const float* __restrict__ sa,
                                  const float* __restrict__ sb, T* out) {
    const size_t n = (size_t)rows * cols;
    FOR_EACH(i, n) {
        const u32 r = (u32)i / cols, c = (u32)i - r * cols; // i < rows · cols < 2^32
        float v = __fmul_rn(d[i], sa[r]);
        if (sb != nullptr) v = __fmul_rn(v, sb[c]);
        out[i] = from_float<T>(v);
    }
}

#define FP8_KERNELS(T, SUF)                                                                                 \
    extern "C" __global__ void fp8_quantize_rows_##SUF(u32 rows, u32 cols, u32 fmt, const T* w,            \
                                                      const float* col, u32* codes, float* scales) {      \
        fp8_quantize_rows<T>(rows, cols, fmt, w, col, codes, scales);                                     \
    }                                                                                                     \
    extern "C" __global__ void fp8_scale_product_##SUF(u32 rows, u32 cols, const float* d, const float* sa, \
                                                      const float* sb, T* out) {                          \
        fp8_scale_product<T>(rows, cols, d, sa, sb, out);                                                 \
    }

FP8_KERNELS(float, f32)
FP8_KERNELS(bf16, bf16)
FP8_KERNELS(double, f64)

// ----- transpose ------------------------------------------------------------------------------------

#define FP8_TILE 32

// fp8_transpose_codes(rows, cols, in, out)
//   in: [rows, cols] bytes; out: [cols, rows] bytes (rows, cols multiples of 4). Tiles of 32 × 32
//   codes through shared memory, 256 threads: each reads one word (4 codes of a row) of the tile
//   and writes one word (4 codes of a column). Blocks stride over the tile rows (gridDim.y is
//   capped at 65535).
extern "C" __global__ void fp8_transpose_codes(u32 rows, u32 cols, const u32* __restrict__ in,
                                               u32* __restrict__ out) {
    __shared__ unsigned char tile[FP8_TILE][FP8_TILE + 4];
    const u32 t = threadIdx.x;
    const u32 in_words = cols / 4u, out_words = rows / 4u;
    const u32 c0 = blockIdx.x * FP8_TILE;
    const u32 tiles_r = (rows + FP8_TILE - 1u) / FP8_TILE;
    for (u32 tr = blockIdx.y; tr < tiles_r; tr += gridDim.y) {
        const u32 r0 = tr * FP8_TILE;
        {
            // Read: tile row t / 8, word t % 8 (codes 4·(t % 8) .. +4 of that row).
            const u32 i = t / 8u, w = t % 8u;
            const u32 r = r0 + i, cw = c0 / 4u + w;
            if (r < rows && cw < in_words) {
                const u32 v = in[(size_t)r * in_words + cw];
#pragma unroll
                for (u32 k = 0; k < 4u; ++k) tile[i][4u * w + k] = (unsigned char)(v >> (8u * k));
            }
        }
        __syncthreads();
        {
            // Write: output row c0 + t / 8 (an input column), word t % 8 (input rows r0 + 4·(t % 8)
            // .. +4).
            const u32 j = t / 8u, w = t % 8u;
            const u32 c = c0 + j, rw = r0 / 4u + w;
            if (c < cols && rw < out_words) {
                u32 v = 0u;
#pragma unroll
                for (u32 k = 0; k < 4u; ++k) v |= (u32)tile[4u * w + k][j] << (8u * k);
                out[(size_t)c * out_words + rw] = v;
            }
        }
        __syncthreads();
    }
}
