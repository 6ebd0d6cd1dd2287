// The fused MixLoRA FFN (the `fused` method of docs/DESIGN.md): the maths is in
// engine/src/fused/moe_ffn/ (forward.rs, backward.rs), the CPU reference in its cpu.rs. T tokens,
// K slots per token, E experts, rank R, intermediate I; slot p = t·K + j goes to expert ids[p].
// A is the accumulation type (float, or double for f64).
//
// Every rank-r expansion and projection of the op runs as a dense tensor-core GEMM over "block
// codes": a [rows, E·R] matrix whose row holds a slot's R codes in its expert's column block and
// zeros elsewhere. These kernels move codes in and out of that layout and do the SwiGLU
// elementwise work, which is memory-bound: every operand is read once, coalesced, through 16-byte
// vector loads when the rows allow.
//
// moe_gather_codes_{dtype}(T, K, E, R, per_slot, src, ids, out)
//     out[t, j, c] = src[row, ids[t·K + j]·R + c]  (row = t·K + j when per_slot, else t)
//     src [T·K or T, E·R] dtype, out [T, K, R] A
// moe_expand_codes_{dtype}(T, K, E, R, sum_slots, codes, ids, out)
//     per slot  (sum_slots = 0): out [T·K, E·R], row p holds codes[p] in block ids[p], zeros elsewhere
//     summed    (sum_slots = 1): out [T, E·R], row t holds Σ_j codes[t, j] in block ids[t·K + j]
// moe_block_codes_{src}_{out}(T, K, E, R, summed, scale, src, ids, w, out)
//     scaled block codes in one pass, computed in A = Acc<src> as the separate ops (gather,
//     affine, mul, expand, conversion) compute them, with roundings that the compiler may not
//     contract (m_mul, m_add: the CPU's bits):
//     per slot (summed = 0): out [T·K, E·R], in block ids[p] of row p = t·K + j:
//         0 + (src[t, c]·s + 0), or with weights (w non-null, [T·K] A) 0 + src[t, c]·(w[p]·s + 0);
//     summed (summed = 1): out [T, E·R], in block ids[t·K + j] of row t: 0 + (src[t·K + j, c]·s + 0);
//     zeros elsewhere. src [T or T·K, E·R] in its dtype.
// moe_swiglu_forward_{dtype}(T, K, I, t0, G, ldg, U, ldu, dG, dU, w, abar, am, pdrop, keep, seed,
//                            key)
//     g = G[t] + dG[p], u = U[t] + dU[p], a = silu(g)·u:
//     abar[t] = Σ_j w[p] a  [T, I],  am[p] = m(p)·a  [T·K, I]
// moe_swiglu_backward_{dtype}(T, K, I, t0, G, ldg, U, ldu, dG, dU, dD, dabar, w, dGU, dg, du, am,
//                             dw, pdrop, keep, seed, key)
//     da = w[p]·dabar[t] + m(p)·dD[p], dg = da·u·silu'(g), du = da·silu(g):
//     dGU [T, 2I] = [Σ_j dg | Σ_j du], dg, du [T·K, I], am [T·K, I] = m(p)·a, dw [T, K] = ⟨dabar[t], a⟩
//
// G and U are read through a row stride (ldg, ldu: they are column halves of one [T, 2I] product);
// every other operand is contiguous. Dropout: element i of slot p is dropped when
// dropout_bits(seed ^ *key, ((t0 + t)·K + j)·I + i) < round(pdrop · 2^16) (t0: the first token of
// this chunk of the op's tokens; key: the device's dropout key, common.cuh), else scaled by
// `keep` = 1/(1 − pdrop) (engine/src/rng.rs, bit-identical to the CPU's).
// One block per token row for the SwiGLU kernels (grid-stride over rows); K ≤ MOE_MAX_K (checked
// on the host). Each SwiGLU kernel also comes as `..._k2_{dtype}` for K ≤ 2 (top-1 and top-2
// routing, the common case): its per-slot arrays hold 2 entries, not 8, which keeps the kernel
// near half the registers and so doubles the blocks an SM holds. The bf16 kernels take the
// sigmoid through the fast exponential and division (`__expf`, `__fdividef`): a few ulp of f32,
// far below a bf16 result's rounding; the f32 and f64 kernels keep the accurate ones.

#define MOE_MAX_K 8
// Threads per block of the SwiGLU kernels (THREADS in engine/src/fused/moe_ffn/cuda.rs).
#define MOE_THREADS 256
// Loops over the slots j < K of a token, unrolled to MOE_MAX_K so that per-slot arrays (weights,
// partial sums) are indexed by constants and stay in registers (a loop to the run-time K would
// put them in local memory).
#define MOE_FOR_SLOTS(j) _Pragma("unroll") for (u32 j = 0; j < MOE_MAX_K; ++j) if (j < K)
// The same to a compile-time bound KM ≤ MOE_MAX_K (the SwiGLU kernels' template parameter).
#define MOE_FOR_SLOTS_KM(j) _Pragma("unroll") for (u32 j = 0; j < KM; ++j) if (j < K)
// Elements per vector load: 8 bf16 (one 16-byte word), 8 f32 (two), 8 f64 (four).
#define MOE_VEC 8

// The dropout of the down projection's input: dropout_bits(seed ^ *key, idx) of engine/src/rng.rs
// against the threshold round(pdrop · 2^16), bit-identical to the CPU's (key: the device's dropout
// key, common.cuh).
struct MoeDrop {
    double p;
    u32 thr;
    u64 mixed;
    __device__ MoeDrop(double pdrop, u64 seed, const u64* __restrict__ key)
        : p(pdrop), thr((u32)fmin(round(pdrop * 65536.0), 65535.0)), mixed(dropout_mixed(seed, key)) {}

    // The multiplier of element idx: 0 when dropped, else keep (1 without dropout).
    template <typename A> __device__ __forceinline__ A at(A keep, u64 idx) const {
        if (p == 0.0) return A(1);
        return dropout_bits(mixed, idx) < thr ? A(0) : keep;
    }

    // The multipliers of elements base .. base + MOE_VEC, base a multiple of 4: two hashes for
    // eight elements.
    template <typename A> __device__ __forceinline__ void at8(A keep, u64 base, A (&m)[MOE_VEC]) const {
        if (p == 0.0) {
#pragma unroll
            for (int x = 0; x < MOE_VEC; ++x) m[x] = A(1);
            return;
        }
#pragma unroll
        for (int h = 0; h < MOE_VEC / 4; ++h) {
            const u64 bits = rng_hash_mixed(mixed, (base >> 2) + h);
#pragma unroll
            for (int q = 0; q < 4; ++q) m[4 * h + q] = (((u32)(bits >> (16 * q)) & 0xFFFFu) < thr) ? A(0) : keep;
        }
    }
};

template <typename A> __device__ __forceinline__ A moe_sigmoid(A x) {
    return A(1) / (A(1) + m_exp(-x));
}

// The sigmoid of the SwiGLU kernels over a base of type TB: fast for bf16 (see the header; for
// x → −∞ the denominator overflows and __fdividef gives 0, the limit), accurate otherwise.
template <typename TB> struct MoeSigmoid {
    template <typename A> static __device__ __forceinline__ A at(A x) { return moe_sigmoid(x); }
};
template <> struct MoeSigmoid<bf16> {
    static __device__ __forceinline__ float at(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }
};

template <typename T> struct MoePack {
    uint4 u[sizeof(T) * MOE_VEC / 16];
};

template <typename T> __device__ __forceinline__ void moe_load(const T* p, typename Acc<T>::type (&out)[MOE_VEC]) {
    const MoePack<T> pk = *reinterpret_cast<const MoePack<T>*>(p);
    const T* e = reinterpret_cast<const T*>(&pk);
#pragma unroll
    for (int k = 0; k < MOE_VEC; ++k) out[k] = to_acc(e[k]);
}

template <typename T> __device__ __forceinline__ void moe_store(T* p, const typename Acc<T>::type (&v)[MOE_VEC]) {
    MoePack<T> pk;
    T* e = reinterpret_cast<T*>(&pk);
#pragma unroll
    for (int k = 0; k < MOE_VEC; ++k) e[k] = from_acc<T>(v[k]);
    *reinterpret_cast<MoePack<T>*>(p) = pk;
}

template <typename T> __device__ __forceinline__ bool moe_aligned(const T* p) { return ((size_t)p & 15) == 0; }

// ----- code layouts ------------------------------------------------------------------------------

// Both index with 32-bit arithmetic: T·K·E·R < 2^32 (checked on the host), and a 64-bit division
// by the run-time R costs several times a 32-bit one.
template <typename TS>
__device__ void moe_gather_codes(u32 T, u32 K, u32 E, u32 R, u32 per_slot, const TS* src, const u32* ids,
                                 typename Acc<TS>::type* out) {
    const size_t n = (size_t)T * K * R;
    for (size_t q = (size_t)blockIdx.x * blockDim.x + threadIdx.x; q < n; q += (size_t)blockDim.x * gridDim.x) {
        const u32 q32 = (u32)q, p = q32 / R, c = q32 - p * R;
        const u32 row = per_slot ? p : p / K;
        out[q] = to_acc(src[(size_t)row * E * R + ids[p] * R + c]);
    }
}

template <typename TC>
__device__ void moe_expand_codes(u32 T, u32 K, u32 E, u32 R, u32 sum_slots, const TC* codes, const u32* ids,
                                 TC* out) {
    typedef typename Acc<TC>::type A;
    const u32 er = E * R;
    const size_t n = (sum_slots ? (size_t)T : (size_t)T * K) * er;
    for (size_t q = (size_t)blockIdx.x * blockDim.x + threadIdx.x; q < n; q += (size_t)blockDim.x * gridDim.x) {
        const u32 q32 = (u32)q, row = q32 / er, col = q32 - row * er, e = col / R, c = col - e * R;
        A v = A(0);
        if (sum_slots) {
            MOE_FOR_SLOTS(j) {
                const u32 p = row * K + j;
                if (ids[p] == e) v += to_acc(codes[p * R + c]);
            }
        } else if (ids[row] == e) {
            v = to_acc(codes[row * R + c]);
        }
        out[q] = from_acc<TC>(v);
    }
}

template <typename TS, typename TO>
__device__ void moe_block_codes(u32 T, u32 K, u32 E, u32 R, u32 summed, double scale, const TS* __restrict__ src,
                                const u32* __restrict__ ids, const typename Acc<TS>::type* __restrict__ w,
                                TO* __restrict__ out) {
    typedef typename Acc<TS>::type A;
    const A s = (A)scale, zero = A(0);
    const u32 er = E * R;
    const size_t n = (summed ? (size_t)T : (size_t)T * K) * er;
    for (size_t q = (size_t)blockIdx.x * blockDim.x + threadIdx.x; q < n; q += (size_t)blockDim.x * gridDim.x) {
        const u32 q32 = (u32)q, row = q32 / er, col = q32 - row * er, e = col / R;
        A v = zero;
        if (summed) {
            MOE_FOR_SLOTS(j) {
                const u32 p = row * K + j;
                if (ids[p] == e) v = m_add(zero, m_add(m_mul(to_acc(src[(size_t)p * er + col]), s), zero));
            }
        } else if (ids[row] == e) {
            const A x = to_acc(src[(size_t)(row / K) * er + col]);
            v = m_add(zero, w ? m_mul(x, m_add(m_mul(w[row], s), zero)) : m_add(m_mul(x, s), zero));
        }
        out[q] = from_acc<TO>(v);
    }
}

// ----- SwiGLU over the slots -----------------------------------------------------------------------

template <typename TB, int KM>
__device__ void moe_swiglu_forward(u32 T, u32 K, u32 I, u32 t0, const TB* __restrict__ G, u32 ldg,
                                   const TB* __restrict__ U, u32 ldu, const TB* __restrict__ dG,
                                   const TB* __restrict__ dU, const typename Acc<TB>::type* __restrict__ w,
                                   TB* __restrict__ abar, TB* __restrict__ am, double pdrop, double keep_d, u64 seed,
                                   const u64* __restrict__ key) {
    typedef typename Acc<TB>::type A;
    const A keep = (A)keep_d;
    const MoeDrop drop(pdrop, seed, key);
    const bool vec = (I % MOE_VEC) == 0 && (ldg % MOE_VEC) == 0 && (ldu % MOE_VEC) == 0 && moe_aligned(G) &&
                     moe_aligned(U) && moe_aligned(dG) && moe_aligned(dU) && moe_aligned(abar) && moe_aligned(am);
    const u32 nv = vec ? I / MOE_VEC : 0;
    for (u32 t = blockIdx.x; t < T; t += gridDim.x) {
        A ws[KM];
        MOE_FOR_SLOTS_KM(j) ws[j] = w[(size_t)t * K + j];
        const TB* gt = G + (size_t)t * ldg;
        const TB* ut = U + (size_t)t * ldu;
        for (u32 v = threadIdx.x; v < nv; v += blockDim.x) {
            const u32 i0 = v * MOE_VEC;
            A gb[MOE_VEC], ub[MOE_VEC], acc[MOE_VEC];
            moe_load(gt + i0, gb);
            moe_load(ut + i0, ub);
#pragma unroll
            for (int x = 0; x < MOE_VEC; ++x) acc[x] = A(0);
            MOE_FOR_SLOTS_KM(j) {
                const size_t p = (size_t)t * K + j;
                A dg[MOE_VEC], du[MOE_VEC];
                moe_load(dG + p * I + i0, dg);
                moe_load(dU + p * I + i0, du);
                A mk[MOE_VEC];
                drop.at8(keep, (((u64)t0 + t) * K + j) * I + i0, mk); // I and i0 are multiples of 8
#pragma unroll
                for (int x = 0; x < MOE_VEC; ++x) {
                    const A g = gb[x] + dg[x], u = ub[x] + du[x];
                    const A a = g * MoeSigmoid<TB>::at(g) * u;
                    acc[x] += ws[j] * a;
                    dg[x] = a * mk[x];
                }
                moe_store(am + p * I + i0, dg);
            }
            moe_store(abar + (size_t)t * I + i0, acc);
        }
        for (u32 i = nv * MOE_VEC + threadIdx.x; i < I; i += blockDim.x) {
            const A gb = to_acc(gt[i]), ub = to_acc(ut[i]);
            A acc = A(0);
            MOE_FOR_SLOTS_KM(j) {
                const size_t p = (size_t)t * K + j;
                const A g = gb + to_acc(dG[p * I + i]), u = ub + to_acc(dU[p * I + i]);
                const A a = g * MoeSigmoid<TB>::at(g) * u;
                acc += ws[j] * a;
                am[p * I + i] = from_acc<TB>(a * drop.at(keep, (((u64)t0 + t) * K + j) * I + i));
            }
            abar[(size_t)t * I + i] = from_acc<TB>(acc);
        }
    }
}

// The gradients of one slot at one column (the CPU's `slot_grads`): a, dg, du from g, u,
// w_j·dĀ, the LoRA-down term dD and the dropout multiplier m.
template <typename A, typename TB = A>
__device__ __forceinline__ void moe_slot_grads(A g, A u, A wda, A dd, A m, A& a, A& dg, A& du) {
    const A sg = MoeSigmoid<TB>::at(g);
    const A silu = g * sg;
    a = silu * u;
    const A da = wda + m * dd;
    dg = da * u * sg * (A(1) + g * (A(1) - sg));
    du = da * silu;
}

template <typename TB, int KM>
__device__ void moe_swiglu_backward(u32 T, u32 K, u32 I, u32 t0, const TB* __restrict__ G, u32 ldg,
                                    const TB* __restrict__ U, u32 ldu, const TB* __restrict__ dG,
                                    const TB* __restrict__ dU, const TB* __restrict__ dD,
                                    const TB* __restrict__ dabar, const typename Acc<TB>::type* __restrict__ w,
                                    TB* __restrict__ dGU, TB* __restrict__ dg_out, TB* __restrict__ du_out,
                                    TB* __restrict__ am, typename Acc<TB>::type* __restrict__ dw, double pdrop,
                                    double keep_d, u64 seed, const u64* __restrict__ key) {
    typedef typename Acc<TB>::type A;
    const A keep = (A)keep_d;
    const MoeDrop drop(pdrop, seed, key);
    const bool vec = (I % MOE_VEC) == 0 && (ldg % MOE_VEC) == 0 && (ldu % MOE_VEC) == 0 && moe_aligned(G) &&
                     moe_aligned(U) && moe_aligned(dG) && moe_aligned(dU) && moe_aligned(dD) &&
                     moe_aligned(dabar) && moe_aligned(dGU) && moe_aligned(dg_out) && moe_aligned(du_out) &&
                     moe_aligned(am);
    const u32 nv = vec ? I / MOE_VEC : 0;
    for (u32 t = blockIdx.x; t < T; t += gridDim.x) {
        A ws[KM], part[KM];
        MOE_FOR_SLOTS_KM(j) {
            ws[j] = w[(size_t)t * K + j];
            part[j] = A(0);
        }
        const TB* gt = G + (size_t)t * ldg;
        const TB* ut = U + (size_t)t * ldu;
        TB* dgt = dGU + (size_t)t * 2 * I;
        TB* dut = dgt + I;
        for (u32 v = threadIdx.x; v < nv; v += blockDim.x) {
            const u32 i0 = v * MOE_VEC;
            A gb[MOE_VEC], ub[MOE_VEC], dab[MOE_VEC], sdg[MOE_VEC], sdu[MOE_VEC];
            moe_load(gt + i0, gb);
            moe_load(ut + i0, ub);
            moe_load(dabar + (size_t)t * I + i0, dab);
#pragma unroll
            for (int x = 0; x < MOE_VEC; ++x) sdg[x] = sdu[x] = A(0);
            MOE_FOR_SLOTS_KM(j) {
                const size_t p = (size_t)t * K + j;
                A lg[MOE_VEC], lu[MOE_VEC], ld[MOE_VEC];
                moe_load(dG + p * I + i0, lg);
                moe_load(dU + p * I + i0, lu);
                moe_load(dD + p * I + i0, ld);
                A dot = A(0);
                A mk[MOE_VEC];
                drop.at8(keep, (((u64)t0 + t) * K + j) * I + i0, mk); // I and i0 are multiples of 8
#pragma unroll
                for (int x = 0; x < MOE_VEC; ++x) {
                    const A m = mk[x];
                    A a, dgv, duv;
                    moe_slot_grads<A, TB>(gb[x] + lg[x], ub[x] + lu[x], ws[j] * dab[x], ld[x], m, a, dgv, duv);
                    dot += dab[x] * a;
                    sdg[x] += dgv;
                    sdu[x] += duv;
                    lg[x] = dgv;
                    lu[x] = duv;
                    ld[x] = a * m;
                }
                part[j] += dot;
                moe_store(dg_out + p * I + i0, lg);
                moe_store(du_out + p * I + i0, lu);
                moe_store(am + p * I + i0, ld);
            }
            moe_store(dgt + i0, sdg);
            moe_store(dut + i0, sdu);
        }
        for (u32 i = nv * MOE_VEC + threadIdx.x; i < I; i += blockDim.x) {
            const A gb = to_acc(gt[i]), ub = to_acc(ut[i]), dab = to_acc(dabar[(size_t)t * I + i]);
            A sdg = A(0), sdu = A(0);
            MOE_FOR_SLOTS_KM(j) {
                const size_t p = (size_t)t * K + j;
                const A m = drop.at(keep, (((u64)t0 + t) * K + j) * I + i);
                A a, dgv, duv;
                moe_slot_grads<A, TB>(gb + to_acc(dG[p * I + i]), ub + to_acc(dU[p * I + i]), ws[j] * dab,
                               to_acc(dD[p * I + i]), m, a, dgv, duv);
                part[j] += dab * a;
                sdg += dgv;
                sdu += duv;
                dg_out[p * I + i] = from_acc<TB>(dgv);
                du_out[p * I + i] = from_acc<TB>(duv);
                am[p * I + i] = from_acc<TB>(a * m);
            }
            dgt[i] = from_acc<TB>(sdg);
            dut[i] = from_acc<TB>(sdu);
        }
        MOE_FOR_SLOTS_KM(j) {
            const A s = block_reduce(part[j], SumOp(), A(0));
            if (threadIdx.x == 0) dw[(size_t)t * K + j] = s;
        }
    }
}

// The module's kernels of base type TB; K2_BWD_BOUNDS: the launch bounds of the K ≤ 2 SwiGLU
// backward, or nothing. For bf16 it asks for three blocks an SM: 80 registers, against 106
// unbounded (two blocks), at the price of a few bytes of stack.
#define MOE_FUSED(TB, SUF, K2_BWD_BOUNDS) \
    extern "C" __global__ void moe_gather_codes_##SUF(u32 T, u32 K, u32 E, u32 R, u32 per_slot, const TB* src, \
                                                      const u32* ids, Acc<TB>::type* out) { \
        moe_gather_codes<TB>(T, K, E, R, per_slot, src, ids, out); \
    } \
    extern "C" __global__ void moe_expand_codes_##SUF(u32 T, u32 K, u32 E, u32 R, u32 sum_slots, const TB* codes, \
                                                      const u32* ids, TB* out) { \
        moe_expand_codes<TB>(T, K, E, R, sum_slots, codes, ids, out); \
    } \
    MOE_SWIGLU(TB, SUF, MOE_MAX_K, , ) \
    MOE_SWIGLU(TB, SUF, 2, _k2, K2_BWD_BOUNDS)

// The two SwiGLU kernels of base type TB with per-slot arrays of KM entries, named
// moe_swiglu_{forward,backward}{NAME}_{SUF}; BWD_BOUNDS: the backward's launch bounds, or nothing.
#define MOE_SWIGLU(TB, SUF, KM, NAME, BWD_BOUNDS) \
    extern "C" __global__ void moe_swiglu_forward##NAME##_##SUF( \
        u32 T, u32 K, u32 I, u32 t0, const TB* G, u32 ldg, const TB* U, u32 ldu, const TB* dG, const TB* dU, \
        const Acc<TB>::type* w, TB* abar, TB* am, double pdrop, double keep, u64 seed, \
        const u64* __restrict__ key) { \
        moe_swiglu_forward<TB, KM>(T, K, I, t0, G, ldg, U, ldu, dG, dU, w, abar, am, pdrop, keep, seed, key); \
    } \
    extern "C" __global__ void BWD_BOUNDS moe_swiglu_backward##NAME##_##SUF( \
        u32 T, u32 K, u32 I, u32 t0, const TB* G, u32 ldg, const TB* U, u32 ldu, const TB* dG, const TB* dU, \
        const TB* dD, const TB* dabar, const Acc<TB>::type* w, TB* dGU, TB* dg, TB* du, TB* am, Acc<TB>::type* dw, \
        double pdrop, double keep, u64 seed, const u64* __restrict__ key) { \
        moe_swiglu_backward<TB, KM>(T, K, I, t0, G, ldg, U, ldu, dG, dU, dD, dabar, w, dGU, dg, du, am, dw, \
                                    pdrop, keep, seed, key); \
    }

#define MOE_BLOCK_CODES(TS, SS, TO, SO) \
    extern "C" __global__ void moe_block_codes_##SS##_##SO(u32 T, u32 K, u32 E, u32 R, u32 summed, double scale, \
                                                           const TS* src, const u32* ids, const Acc<TS>::type* w, \
                                                           TO* out) { \
        moe_block_codes<TS, TO>(T, K, E, R, summed, scale, src, ids, w, out); \
    }
MOE_BLOCK_CODES(float, f32, float, f32)
MOE_BLOCK_CODES(float, f32, bf16, bf16)
MOE_BLOCK_CODES(bf16, bf16, bf16, bf16)
MOE_BLOCK_CODES(bf16, bf16, float, f32)
MOE_BLOCK_CODES(double, f64, double, f64)

MOE_FUSED(float, f32, )
MOE_FUSED(bf16, bf16, __launch_bounds__(MOE_THREADS, 3))
MOE_FUSED(double, f64, )
