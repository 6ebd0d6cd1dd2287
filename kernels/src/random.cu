// Counter-based random fills: the same functions as engine/src/rng.rs, so a (seed, index) pair
// gives the same value on the CPU and the GPU. The double arithmetic uses explicitly rounded
// intrinsics (__dmul_rn, __dadd_rn) so that no multiply-add is contracted into an FMA: uniform
// fills and dropout masks are bit-identical to the CPU's; normal samples agree to the last bits
// of the libm log/cos.
//
// randn_{dtype}(n, y, seed, mean, std)          y[i] = mean + std · normal(seed, i)
// rand_uniform_{dtype}(n, y, seed, lo, hi)      y[i] = lo + (hi − lo) · uniform(seed, i)
// dropout_mask_{dtype}(n, y, seed, thr, keep)   y[i] = dropout_bits(seed, i) < thr ? 0 : keep
// y: [n] contiguous, dtype f32, bf16 or f64. `thr` is the 16-bit threshold round(p · 2^16),
// passed as a double; one thread handles four consecutive elements (one hash; dropout_cast
// reads and writes them with one vector access each when the buffers are aligned to it).
//
// dropout_cast_{in}_{out}(n, x, y, seed, thr, keep)
//     y[i] = out(C(x[i]) · (dropout_bits(seed, i) < thr ? 0 : keep)), C the compute type (float,
//     or double for f64): the cast to the LoRA adapter dtype, the mask and the product in one
//     pass, bit-identical to the three separate kernels (bf16 → bf16: Tensor::dropout's product
//     with a bf16 mask, `keep` rounded to bf16 by the host). x, y: [n] contiguous.

__device__ __forceinline__ u64 rng_hash(u64 seed, u64 i) { return rng_hash_mixed(rng_mix64(seed), i); }

// Uniform in [0, 1) with 53 random bits (exact: an integer times 2^-53).
__device__ __forceinline__ double rng_uniform(u64 seed, u64 i) {
    return __dmul_rn((double)(rng_hash(seed, i) >> 11), 1.0 / 9007199254740992.0);
}

// Box-Muller over the uniforms 2i and 2i + 1.
__device__ __forceinline__ double rng_normal(u64 seed, u64 i) {
    const double u1 = __dadd_rn(1.0, -rng_uniform(seed, 2 * i));
    const double u2 = rng_uniform(seed, 2 * i + 1);
    const double tau = 6.283185307179586;
    return __dmul_rn(sqrt(__dmul_rn(-2.0, log(u1))), cos(__dmul_rn(tau, u2)));
}

#define RANDOM(T, SUF) \
    extern "C" __global__ void randn_##SUF(u32 n, T* y, u64 seed, double mean, double std) { \
        FOR_EACH(i, n) { y[i] = Cast<T>::of(__dadd_rn(mean, __dmul_rn(std, rng_normal(seed, i)))); } \
    } \
    extern "C" __global__ void rand_uniform_##SUF(u32 n, T* y, u64 seed, double lo, double hi) { \
        const double span = __dadd_rn(hi, -lo); \
        FOR_EACH(i, n) { y[i] = Cast<T>::of(__dadd_rn(lo, __dmul_rn(span, rng_uniform(seed, i)))); } \
    } \
    extern "C" __global__ void dropout_mask_##SUF(u32 n, T* y, u64 seed, double thr, double keep) { \
        const u64 mixed = rng_mix64(seed); \
        const u32 t = (u32)thr; \
        const T kept = Cast<T>::of(keep), zero = Cast<T>::of(0.0); \
        FOR_EACH(g, ((size_t)n + 3) / 4) { \
            const u64 h = rng_hash_mixed(mixed, g); \
            _Pragma("unroll") for (int q = 0; q < 4; ++q) { \
                const size_t i = 4 * g + q; \
                if (i < n) y[i] = (((u32)(h >> (16 * q)) & 0xFFFFu) < t) ? zero : kept; \
            } \
        } \
    }

RANDOM(float, f32)
RANDOM(bf16, bf16)
RANDOM(double, f64)

// Four consecutive elements, aligned to their size (one 8-, 16- or 32-byte access).
template <typename T> struct alignas(4 * sizeof(T)) Quad {
    T v[4];
};

template <typename I, typename O, typename C>
__device__ __forceinline__ void dropout_cast(u32 n, const I* x, O* y, u64 seed, u32 t, C keep) {
    const u64 mixed = rng_mix64(seed);
    // Whole groups of four go through one vector load and store when both buffers allow it.
    const bool vec = ((size_t)x % sizeof(Quad<I>)) == 0 && ((size_t)y % sizeof(Quad<O>)) == 0;
    FOR_EACH(g, ((size_t)n + 3) / 4) {
        const u64 h = rng_hash_mixed(mixed, g);
        // Always a product (x · 0 keeps the sign of zero and NaN, like the mask product).
        const size_t i0 = 4 * g;
        if (vec && i0 + 4 <= n) {
            const Quad<I> in = *reinterpret_cast<const Quad<I>*>(x + i0);
            Quad<O> out;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const C m = (((u32)(h >> (16 * q)) & 0xFFFFu) < t) ? C(0) : keep;
                out.v[q] = Cast<O>::of(C(to_acc(in.v[q])) * m);
            }
            *reinterpret_cast<Quad<O>*>(y + i0) = out;
            continue;
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const size_t i = i0 + q;
            if (i < n) {
                const C m = (((u32)(h >> (16 * q)) & 0xFFFFu) < t) ? C(0) : keep;
                y[i] = Cast<O>::of(C(to_acc(x[i])) * m);
            }
        }
    }
}

#define DROPOUT_CAST(I, O, C, NAME) \
    extern "C" __global__ void dropout_cast_##NAME(u32 n, const I* x, O* y, u64 seed, u32 thr, double keep) { \
        dropout_cast<I, O, C>(n, x, y, seed, thr, (C)keep); \
    }

DROPOUT_CAST(bf16, float, float, bf16_f32)
DROPOUT_CAST(float, float, float, f32_f32)
DROPOUT_CAST(float, bf16, float, f32_bf16)
DROPOUT_CAST(bf16, bf16, float, bf16_bf16)
DROPOUT_CAST(double, double, double, f64_f64)
