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

// add_dropped2_bf16(n, base, a, b, seed_a, seed_b, thr, keep, out)
//     out[i] = bf16(bf16(base[i] + da[i]) + db[i]) with dv[i] = bf16(v[i] · (dropout_bits(seed_v,
//     i) < thr ? 0 : keep)), keep rounded to bf16 by the host: `base + a.dropout(p, seed_a) +
//     b.dropout(p, seed_b)` of bf16 tensors bit for bit (each step rounded as the separate
//     kernels round it), in one pass where they took four. All [n] contiguous, 8-byte aligned.

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

extern "C" __global__ void add_dropped2_bf16(u32 n, const bf16* base, const bf16* a, const bf16* b, u64 seed_a,
                                             u64 seed_b, u32 thr, float keep, bf16* out) {
    const u64 mixed_a = rng_mix64(seed_a), mixed_b = rng_mix64(seed_b);
    FOR_EACH(g, ((size_t)n + 3) / 4) {
        const u64 ha = rng_hash_mixed(mixed_a, g), hb = rng_hash_mixed(mixed_b, g);
        const size_t i0 = 4 * g;
        const bool whole = i0 + 4 <= n;
        Quad<bf16> vb, va, vv, o;
        if (whole) {
            vb = *reinterpret_cast<const Quad<bf16>*>(base + i0);
            va = *reinterpret_cast<const Quad<bf16>*>(a + i0);
            vv = *reinterpret_cast<const Quad<bf16>*>(b + i0);
        } else {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const bool in = i0 + q < n;
                vb.v[q] = in ? base[i0 + q] : __float2bfloat16(0.0f);
                va.v[q] = in ? a[i0 + q] : __float2bfloat16(0.0f);
                vv.v[q] = in ? b[i0 + q] : __float2bfloat16(0.0f);
            }
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const float ma = (((u32)(ha >> (16 * q)) & 0xFFFFu) < thr) ? 0.0f : keep;
            const float mb = (((u32)(hb >> (16 * q)) & 0xFFFFu) < thr) ? 0.0f : keep;
            const bf16 da = __float2bfloat16(__bfloat162float(va.v[q]) * ma);
            const bf16 db = __float2bfloat16(__bfloat162float(vv.v[q]) * mb);
            const bf16 s1 = __float2bfloat16(__bfloat162float(vb.v[q]) + __bfloat162float(da));
            o.v[q] = __float2bfloat16(__bfloat162float(s1) + __bfloat162float(db));
        }
        if (whole) {
            *reinterpret_cast<Quad<bf16>*>(out + i0) = o;
        } else {
#pragma unroll
            for (int q = 0; q < 4; ++q)
                if (i0 + q < n) out[i0 + q] = o.v[q];
        }
    }
}
