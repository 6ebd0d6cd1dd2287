// Dropout: masks and masked products drawn from the counter-based hash of engine/src/rng.rs,
// bit-identical to the CPU's (element i is dropped when its 16 bits of hash(seed, i / 4) fall
// below `thr`, the 16-bit threshold round(p · 2^16); kept elements are scaled by `keep`).
//
// Every kernel here draws from `seed ^ *key`, `key` the device's dropout key (8 bytes of device
// memory, common.cuh: dropout_mixed): the CPU's `seed ^ key` of the calling thread.
//
// dropout_mask_{dtype}(n, y, seed, key, thr, keep)
//     y[i] = dropout_bits(seed ^ *key, i) < thr ? 0 : keep
//   y: [n] contiguous, dtype f32, bf16 or f64; `thr` passed as a double; one thread handles four
//   consecutive elements (one hash).
//
// dropout_cast_{in}_{out}(n, x, y, seed, key, thr, keep)
//     y[i] = out(C(x[i]) · (dropout_bits(seed ^ *key, i) < thr ? 0 : keep)), C the compute type
//     (float, or double for f64): the cast to the LoRA adapter dtype, the mask and the product in one
//     pass, bit-identical to the three separate kernels (bf16 → bf16: Tensor::dropout's product
//     with a bf16 mask, `keep` rounded to bf16 by the host). x, y: [n] contiguous.

// add_dropped2_bf16(n, base, a, b, seed_a, seed_b, key, thr, keep, out)
//     out[i] = bf16(bf16(base[i] + da[i]) + db[i]) with dv[i] = bf16(v[i] · (dropout_bits(seed_v ^
//     *key, i) < thr ? 0 : keep)), keep rounded to bf16 by the host: `base + a.dropout(p, seed_a) +
//     b.dropout(p, seed_b)` of bf16 tensors bit for bit (each step rounded as the separate
//     kernels round it), in one pass where they took four. All [n] contiguous, 8-byte aligned.

#define DROPOUT_MASK(T, SUF) \
    extern "C" __global__ void dropout_mask_##SUF(u32 n, T* y, u64 seed, const u64* __restrict__ key, \
                                                  double thr, double keep) { \
        const u64 mixed = dropout_mixed(seed, key); \
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

DROPOUT_MASK(float, f32)
DROPOUT_MASK(bf16, bf16)
DROPOUT_MASK(double, f64)

// Four consecutive elements, aligned to their size (one 8-, 16- or 32-byte access).
template <typename T> struct alignas(4 * sizeof(T)) Quad {
    T v[4];
};

template <typename I, typename O, typename C>
__device__ __forceinline__ void dropout_cast(u32 n, const I* x, O* y, u64 seed, const u64* __restrict__ key, u32 t,
                                             C keep) {
    const u64 mixed = dropout_mixed(seed, key);
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
    extern "C" __global__ void dropout_cast_##NAME(u32 n, const I* x, O* y, u64 seed, const u64* __restrict__ key, \
                                                   u32 thr, double keep) { \
        dropout_cast<I, O, C>(n, x, y, seed, key, thr, (C)keep); \
    }

DROPOUT_CAST(bf16, float, float, bf16_f32)
DROPOUT_CAST(float, float, float, f32_f32)
DROPOUT_CAST(float, bf16, float, f32_bf16)
DROPOUT_CAST(bf16, bf16, float, bf16_bf16)
DROPOUT_CAST(double, double, double, f64_f64)

extern "C" __global__ void add_dropped2_bf16(u32 n, const bf16* base, const bf16* a, const bf16* b, u64 seed_a,
                                             u64 seed_b, const u64* __restrict__ key, u32 thr, float keep, bf16* out) {
    const u64 mixed_a = dropout_mixed(seed_a, key), mixed_b = dropout_mixed(seed_b, key);
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
