// Counter-based random fills: the same functions as engine/src/rng.rs, so a (seed, index) pair
// gives the same value on the CPU and the GPU. The double arithmetic uses explicitly rounded
// intrinsics (__dmul_rn, __dadd_rn) so that no multiply-add is contracted into an FMA: uniform
// fills are bit-identical to the CPU's; normal samples agree to the last bits of the libm
// log/cos.
//
// randn_{dtype}(n, y, seed, mean, std)          y[i] = mean + std · normal(seed, i)
// rand_uniform_{dtype}(n, y, seed, lo, hi)      y[i] = lo + (hi − lo) · uniform(seed, i)
// y: [n] contiguous, dtype f32, bf16 or f64.

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
    }

RANDOM(float, f32)
RANDOM(bf16, bf16)
RANDOM(double, f64)
