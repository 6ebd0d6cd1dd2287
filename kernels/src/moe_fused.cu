// The fused MixLoRA FFN (path 3 of MIXLORA.md): the maths is in engine/src/ops/moe_fused.rs, the
// CPU reference in engine/src/backend/cpu/moe_fused.rs. TB is the base type (f32, bf16, f64), A
// its accumulation type (float, or double for f64), which is also the adapter dtype: adapter
// weights, routing weights and rank-r codes are A. T tokens, K slots per token, E experts, rank
// R, hidden H, intermediate I; slot p = t·K + j goes to expert ids[p].
//
// moe_act_forward_{dtype}        grid T, one block per token:
//     g = G[t] + s·B_g,e Z_g[t,e], u = U[t] + s·B_u,e Z_u[t,e], a = silu(g)·u (never stored);
//     abar[t] = Σ_j w_j a_j   [T, I] TB,   zd[t, j] = A_d,e drop(a_j)   [T, K, R] A
// moe_down_forward_{dtype}       grid T: y[t] = y0[t] + s Σ_j w_j B_d,e zd[t, j]   [T, H] TB
// moe_down_backward_{dtype}      grid T: q = B_d,eᵀ dy[t]; dzd = s·w_j·q [T, K, R]; dw = s⟨q, zd⟩ [T, K]
// moe_act_backward_{dtype}       grid T: recomputes g, u, a; dG, dU [T, I] TB; dZ_g, dZ_u [T, E·R]
//                                (zero off the token's experts); dw = ⟨dĀ, a_j⟩ [T, K]
// moe_act_weight_grads_{dtype}   grid (⌈I/256⌉, E), one thread per (expert, column i), looping over
//                                the expert's slots perm[offsets[e] .. offsets[e+1]]:
//                                dB_g, dB_u [E, I, R], dA_d [E, R, I]
// moe_down_weight_grad_{dtype}   grid (⌈H/256⌉, E), one thread per (expert, row h):
//                                dB_d [E, H, R] = s Σ w_p dy[t_p] ⊗ zd[p]
//
// moe_act_forward, moe_act_backward and moe_act_weight_grads also come as `_k2r16_{dtype}`: the
// same code with K = 2 and R = 16 known at compile time (the default MixLoRA shape), so that the
// per-thread partials stay in registers instead of local memory.
//
// G and U are read with a row stride (ldg, ldu: views of one [T, 2I] product); every other operand
// is contiguous. Dropout on a_j: element i of slot p is kept unless uniform(seed, p·I + i) < pdrop,
// and scaled by `keep` = 1/(1 − pdrop) (engine/src/rng.rs, bit-identical to the CPU's).
// Limits (checked on the host): K ≤ MOE_MAX_K, K·R ≤ MOE_MAX_KR.

#define MOE_MAX_K 8
#define MOE_MAX_KR 64
#define MOE_MAX_R 64
// Partials reduced over a block: 2·K·R codes and K dot products at most.
#define MOE_MAX_RED (2 * MOE_MAX_KR + MOE_MAX_K)

typedef unsigned long long u64;

__device__ __forceinline__ u64 moe_splitmix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// uniform(seed, i) of engine/src/rng.rs, exactly.
__device__ __forceinline__ double moe_uniform(u64 seed, u64 i) {
    const u64 h = moe_splitmix64(moe_splitmix64(seed) ^ (i * 0xD6E8FEB86659FD93ull));
    return __dmul_rn((double)(h >> 11), 1.0 / 9007199254740992.0);
}

template <typename A>
__device__ __forceinline__ A moe_keep(double pdrop, A keep, u64 seed, u64 idx) {
    if (pdrop == 0.0) return A(1);
    return moe_uniform(seed, idx) < pdrop ? A(0) : keep;
}

template <typename A> __device__ __forceinline__ A moe_sigmoid(A x) {
    return A(1) / (A(1) + m_exp(-x));
}

template <typename A> __device__ __forceinline__ A moe_dot(const A* a, const A* b, u32 n) {
    A s = A(0);
#pragma unroll
    for (u32 c = 0; c < n; ++c) s += a[c] * b[c];
    return s;
}

// Sums the n ≤ MOE_MAX_RED per-thread partials `v` over the block into the shared `out` (visible
// to every thread on return). `red` is shared scratch of 32·MOE_MAX_RED. Every thread of the block
// must call it (blockDim.x a multiple of 32).
template <typename A>
__device__ __forceinline__ void moe_block_sum(const A* v, u32 n, A* out, A* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (u32 c = 0; c < n; ++c) {
        const A s = warp_reduce(v[c], SumOp());
        if (lane == 0) red[warp * MOE_MAX_RED + c] = s;
    }
    __syncthreads();
    for (u32 c = threadIdx.x; c < n; c += blockDim.x) {
        A s = A(0);
        for (int w = 0; w < warps; ++w) s += red[w * MOE_MAX_RED + c];
        out[c] = s;
    }
    __syncthreads();
}

// Loads the token's experts and weights, and its slots' codes Z_g[t, e_j], Z_u[t, e_j] (and,
// when dzd is given, dZ_d[t, j]) into shared memory.
template <typename A>
__device__ void moe_load_slots(u32 t, u32 K, u32 E, u32 R, const u32* ids, const A* w,
                               const A* zg, const A* zu, const A* dzd, u32* es, A* ws, A* cg,
                               A* cu, A* cd) {
    for (u32 q = threadIdx.x; q < K * R; q += blockDim.x) {
        const u32 j = q / R, c = q % R;
        const u32 e = ids[(size_t)t * K + j];
        cg[q] = zg[((size_t)t * E + e) * R + c];
        cu[q] = zu[((size_t)t * E + e) * R + c];
        if (dzd) cd[q] = dzd[(size_t)t * K * R + q];
    }
    for (u32 j = threadIdx.x; j < K; j += blockDim.x) {
        es[j] = ids[(size_t)t * K + j];
        ws[j] = w[(size_t)t * K + j];
    }
    __syncthreads();
}

template <typename TB, int KK, int RR>
__device__ __forceinline__ void moe_act_forward(u32 T, u32 K, u32 E, u32 R, u32 I, const TB* G, u32 ldg,
                                const TB* U, u32 ldu, const typename Acc<TB>::type* zg,
                                const typename Acc<TB>::type* zu, const typename Acc<TB>::type* bg,
                                const typename Acc<TB>::type* bu, const typename Acc<TB>::type* ad,
                                const u32* ids, const typename Acc<TB>::type* w, TB* abar,
                                typename Acc<TB>::type* zd, double scale, double pdrop,
                                double keep_d, u64 seed) {
    typedef typename Acc<TB>::type A;
    __shared__ u32 es[MOE_MAX_K];
    __shared__ A ws[MOE_MAX_K];
    __shared__ A cg[MOE_MAX_KR];
    __shared__ A cu[MOE_MAX_KR];
    __shared__ A out[MOE_MAX_RED];
    __shared__ A red[32 * MOE_MAX_RED];
    const u32 t = blockIdx.x;
    if (t >= T) return;
    const A s = (A)scale, keep = (A)keep_d;
    // Compile-time K and R (KK, RR > 0) keep the per-thread partials in registers.
    const u32 K_ = KK ? KK : K, R_ = RR ? RR : R;
    K = K_;
    R = R_;
    moe_load_slots<A>(t, K, E, R, ids, w, zg, zu, (const A*)0, es, ws, cg, cu, (A*)0);
    A part[(KK && RR) ? KK * RR : MOE_MAX_KR];
#pragma unroll
    for (u32 q = 0; q < K * R; ++q) part[q] = A(0);
    for (u32 i = threadIdx.x; i < I; i += blockDim.x) {
        const A gb = to_acc(G[(size_t)t * ldg + i]), ub = to_acc(U[(size_t)t * ldu + i]);
        A acc = A(0);
#pragma unroll
        for (u32 j = 0; j < K; ++j) {
            const u32 e = es[j];
            const size_t row = ((size_t)e * I + i) * R;
            const A g = gb + s * moe_dot(bg + row, cg + j * R, R);
            const A u = ub + s * moe_dot(bu + row, cu + j * R, R);
            const A a = g * moe_sigmoid(g) * u;
            acc += ws[j] * a;
            const A am = a * moe_keep(pdrop, keep, seed, ((u64)t * K + j) * I + i);
#pragma unroll
            for (u32 c = 0; c < R; ++c) part[j * R + c] += ad[((size_t)e * R + c) * I + i] * am;
        }
        abar[(size_t)t * I + i] = from_acc<TB>(acc);
    }
    moe_block_sum(part, K * R, out, red);
    for (u32 q = threadIdx.x; q < K * R; q += blockDim.x) zd[(size_t)t * K * R + q] = out[q];
}

template <typename TB>
__device__ void moe_down_forward(u32 T, u32 K, u32 R, u32 H, const TB* y0,
                                 const typename Acc<TB>::type* zd, const typename Acc<TB>::type* w,
                                 const u32* ids, const typename Acc<TB>::type* bd, TB* y,
                                 double scale) {
    typedef typename Acc<TB>::type A;
    __shared__ u32 es[MOE_MAX_K];
    __shared__ A sz[MOE_MAX_KR];
    const u32 t = blockIdx.x;
    if (t >= T) return;
    const A s = (A)scale;
    for (u32 q = threadIdx.x; q < K * R; q += blockDim.x) {
        sz[q] = s * w[(size_t)t * K + q / R] * zd[(size_t)t * K * R + q];
    }
    for (u32 j = threadIdx.x; j < K; j += blockDim.x) es[j] = ids[(size_t)t * K + j];
    __syncthreads();
    for (u32 h = threadIdx.x; h < H; h += blockDim.x) {
        A acc = A(0);
        for (u32 j = 0; j < K; ++j) acc += moe_dot(bd + ((size_t)es[j] * H + h) * R, sz + j * R, R);
        y[(size_t)t * H + h] = from_acc<TB>(to_acc(y0[(size_t)t * H + h]) + acc);
    }
}

template <typename TB>
__device__ void moe_down_backward(u32 T, u32 K, u32 R, u32 H, const TB* dy,
                                  const typename Acc<TB>::type* zd, const typename Acc<TB>::type* w,
                                  const u32* ids, const typename Acc<TB>::type* bd,
                                  typename Acc<TB>::type* dzd, typename Acc<TB>::type* dw,
                                  double scale) {
    typedef typename Acc<TB>::type A;
    __shared__ u32 es[MOE_MAX_K];
    __shared__ A out[MOE_MAX_RED];
    __shared__ A red[32 * MOE_MAX_RED];
    const u32 t = blockIdx.x;
    if (t >= T) return;
    const A s = (A)scale;
    for (u32 j = threadIdx.x; j < K; j += blockDim.x) es[j] = ids[(size_t)t * K + j];
    __syncthreads();
    A part[MOE_MAX_KR];
    for (u32 q = 0; q < K * R; ++q) part[q] = A(0);
    for (u32 h = threadIdx.x; h < H; h += blockDim.x) {
        const A g = to_acc(dy[(size_t)t * H + h]);
        for (u32 j = 0; j < K; ++j) {
            const A* b = bd + ((size_t)es[j] * H + h) * R;
            for (u32 c = 0; c < R; ++c) part[j * R + c] += b[c] * g;
        }
    }
    moe_block_sum(part, K * R, out, red); // out[j·R + c] = (B_d,eᵀ dy[t])[c]
    for (u32 q = threadIdx.x; q < K * R; q += blockDim.x) {
        dzd[(size_t)t * K * R + q] = s * w[(size_t)t * K + q / R] * out[q];
    }
    for (u32 j = threadIdx.x; j < K; j += blockDim.x) {
        dw[(size_t)t * K + j] = s * moe_dot(out + j * R, zd + ((size_t)t * K + j) * R, R);
    }
}

// The gradients of one slot at one column: a, dg, du from w_j·dĀ, A_d,eᵀ dZ_d and the dropout
// multiplier m (the CPU's `slot_grads`).
template <typename A>
__device__ __forceinline__ void moe_slot_grads(A g, A u, A wda, A ad_dz, A m, A& a, A& dg, A& du) {
    const A sg = moe_sigmoid(g);
    const A silu = g * sg;
    a = silu * u;
    const A da = wda + m * ad_dz;
    dg = da * u * sg * (A(1) + g * (A(1) - sg));
    du = da * silu;
}

template <typename TB, int KK, int RR>
__device__ __forceinline__ void moe_act_backward(u32 T, u32 K, u32 E, u32 R, u32 I, const TB* G, u32 ldg,
                                 const TB* U, u32 ldu, const typename Acc<TB>::type* zg,
                                 const typename Acc<TB>::type* zu, const typename Acc<TB>::type* bg,
                                 const typename Acc<TB>::type* bu, const typename Acc<TB>::type* ad,
                                 const u32* ids, const typename Acc<TB>::type* w, const TB* dabar,
                                 const typename Acc<TB>::type* dzd, TB* dG, TB* dU,
                                 typename Acc<TB>::type* dzg, typename Acc<TB>::type* dzu,
                                 typename Acc<TB>::type* dw, double scale, double pdrop,
                                 double keep_d, u64 seed) {
    typedef typename Acc<TB>::type A;
    __shared__ u32 es[MOE_MAX_K];
    __shared__ A ws[MOE_MAX_K];
    __shared__ A cg[MOE_MAX_KR];
    __shared__ A cu[MOE_MAX_KR];
    __shared__ A cd[MOE_MAX_KR];
    __shared__ A out[MOE_MAX_RED];
    __shared__ A red[32 * MOE_MAX_RED];
    const u32 t = blockIdx.x;
    if (t >= T) return;
    const A s = (A)scale, keep = (A)keep_d;
    const u32 K_ = KK ? KK : K, R_ = RR ? RR : R;
    K = K_;
    R = R_;
    moe_load_slots<A>(t, K, E, R, ids, w, zg, zu, dzd, es, ws, cg, cu, cd);
    const u32 KR = K * R;
    // part[0, KR): dZ_g codes, [KR, 2KR): dZ_u codes, [2KR, 2KR + K): dw.
    A part[(KK && RR) ? 2 * KK * RR + KK : MOE_MAX_RED];
#pragma unroll
    for (u32 q = 0; q < 2 * KR + K; ++q) part[q] = A(0);
    for (u32 i = threadIdx.x; i < I; i += blockDim.x) {
        const A gb = to_acc(G[(size_t)t * ldg + i]), ub = to_acc(U[(size_t)t * ldu + i]);
        const A dab = to_acc(dabar[(size_t)t * I + i]);
        A sdg = A(0), sdu = A(0);
#pragma unroll
        for (u32 j = 0; j < K; ++j) {
            const u32 e = es[j];
            const size_t row = ((size_t)e * I + i) * R;
            const A g = gb + s * moe_dot(bg + row, cg + j * R, R);
            const A u = ub + s * moe_dot(bu + row, cu + j * R, R);
            A ad_dz = A(0);
#pragma unroll
            for (u32 c = 0; c < R; ++c) ad_dz += ad[((size_t)e * R + c) * I + i] * cd[j * R + c];
            const A m = moe_keep(pdrop, keep, seed, ((u64)t * K + j) * I + i);
            A a, dgv, duv;
            moe_slot_grads(g, u, ws[j] * dab, ad_dz, m, a, dgv, duv);
            part[2 * KR + j] += dab * a;
            sdg += dgv;
            sdu += duv;
#pragma unroll
            for (u32 c = 0; c < R; ++c) {
                part[j * R + c] += s * bg[row + c] * dgv;
                part[KR + j * R + c] += s * bu[row + c] * duv;
            }
        }
        dG[(size_t)t * I + i] = from_acc<TB>(sdg);
        dU[(size_t)t * I + i] = from_acc<TB>(sdu);
    }
    // Zero the token's rows of dZ_g, dZ_u, then add each slot's codes in its expert's columns
    // (one thread per column c, slots in order: no race even if two slots shared an expert).
    for (u32 q = threadIdx.x; q < E * R; q += blockDim.x) {
        dzg[(size_t)t * E * R + q] = A(0);
        dzu[(size_t)t * E * R + q] = A(0);
    }
    moe_block_sum(part, 2 * KR + K, out, red); // its barriers also order the zeroing
    for (u32 c = threadIdx.x; c < R; c += blockDim.x) {
        for (u32 j = 0; j < K; ++j) {
            const size_t at = ((size_t)t * E + es[j]) * R + c;
            dzg[at] += out[j * R + c];
            dzu[at] += out[KR + j * R + c];
        }
    }
    for (u32 j = threadIdx.x; j < K; j += blockDim.x) dw[(size_t)t * K + j] = out[2 * KR + j];
}

template <typename TB, int KK, int RR>
__device__ __forceinline__ void moe_act_weight_grads(u32 K, u32 E, u32 R, u32 I, const TB* G, u32 ldg,
                                     const TB* U, u32 ldu, const typename Acc<TB>::type* zg,
                                     const typename Acc<TB>::type* zu,
                                     const typename Acc<TB>::type* bg,
                                     const typename Acc<TB>::type* bu,
                                     const typename Acc<TB>::type* ad,
                                     const typename Acc<TB>::type* w, const TB* dabar,
                                     const typename Acc<TB>::type* dzd, const u32* perm,
                                     const u32* offsets, typename Acc<TB>::type* dbg,
                                     typename Acc<TB>::type* dbu, typename Acc<TB>::type* dad,
                                     double scale, double pdrop, double keep_d, u64 seed) {
    typedef typename Acc<TB>::type A;
    const u32 e = blockIdx.y;
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E || i >= I) return; // no barrier below
    const A s = (A)scale, keep = (A)keep_d;
    const u32 K_ = KK ? KK : K, R_ = RR ? RR : R;
    K = K_;
    R = R_;
    const size_t row = ((size_t)e * I + i) * R;
    A acc_g[RR ? RR : MOE_MAX_R], acc_u[RR ? RR : MOE_MAX_R], acc_d[RR ? RR : MOE_MAX_R];
#pragma unroll
    for (u32 c = 0; c < R; ++c) acc_g[c] = acc_u[c] = acc_d[c] = A(0);
    // With a compile-time R, this thread's rows of B_g, B_u and column of A_d live in registers
    // for the whole loop over the expert's slots (read from memory per slot otherwise).
    A rg[RR ? RR : 1], ru[RR ? RR : 1], rd[RR ? RR : 1];
    if (RR) {
#pragma unroll
        for (u32 c = 0; c < R; ++c) {
            rg[c] = bg[row + c];
            ru[c] = bu[row + c];
            rd[c] = ad[((size_t)e * R + c) * I + i];
        }
    }
    for (u32 q = offsets[e]; q < offsets[e + 1]; ++q) {
        const u32 p = perm[q];
        const u32 t = p / K;
        const A* zgt = zg + ((size_t)t * E + e) * R;
        const A* zut = zu + ((size_t)t * E + e) * R;
        const A* dz = dzd + (size_t)p * R;
        A dot_g = A(0), dot_u = A(0), ad_dz = A(0);
#pragma unroll
        for (u32 c = 0; c < R; ++c) {
            dot_g += (RR ? rg[c] : bg[row + c]) * zgt[c];
            dot_u += (RR ? ru[c] : bu[row + c]) * zut[c];
            ad_dz += (RR ? rd[c] : ad[((size_t)e * R + c) * I + i]) * dz[c];
        }
        const A g = to_acc(G[(size_t)t * ldg + i]) + s * dot_g;
        const A u = to_acc(U[(size_t)t * ldu + i]) + s * dot_u;
        const A m = moe_keep(pdrop, keep, seed, (u64)p * I + i);
        A a, dgv, duv;
        moe_slot_grads(g, u, w[p] * to_acc(dabar[(size_t)t * I + i]), ad_dz, m, a, dgv, duv);
        const A am = a * m;
#pragma unroll
        for (u32 c = 0; c < R; ++c) {
            acc_g[c] += s * dgv * zgt[c];
            acc_u[c] += s * duv * zut[c];
            acc_d[c] += dz[c] * am;
        }
    }
#pragma unroll
    for (u32 c = 0; c < R; ++c) {
        dbg[row + c] = acc_g[c];
        dbu[row + c] = acc_u[c];
        dad[((size_t)e * R + c) * I + i] = acc_d[c];
    }
}

template <typename TB>
__device__ void moe_down_weight_grad(u32 K, u32 E, u32 R, u32 H, const TB* dy,
                                     const typename Acc<TB>::type* zd,
                                     const typename Acc<TB>::type* w, const u32* perm,
                                     const u32* offsets, typename Acc<TB>::type* dbd, double scale) {
    typedef typename Acc<TB>::type A;
    const u32 e = blockIdx.y;
    const u32 h = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E || h >= H) return;
    const A s = (A)scale;
    A acc[MOE_MAX_R];
    for (u32 c = 0; c < R; ++c) acc[c] = A(0);
    for (u32 q = offsets[e]; q < offsets[e + 1]; ++q) {
        const u32 p = perm[q];
        const A c0 = s * w[p] * to_acc(dy[(size_t)(p / K) * H + h]);
        for (u32 c = 0; c < R; ++c) acc[c] += c0 * zd[(size_t)p * R + c];
    }
    for (u32 c = 0; c < R; ++c) dbd[((size_t)e * H + h) * R + c] = acc[c];
}

#define MOE_FUSED(TB, SUF) \
    extern "C" __global__ void moe_act_forward_##SUF( \
        u32 T, u32 K, u32 E, u32 R, u32 I, const TB* G, u32 ldg, const TB* U, u32 ldu, \
        const Acc<TB>::type* zg, const Acc<TB>::type* zu, const Acc<TB>::type* bg, \
        const Acc<TB>::type* bu, const Acc<TB>::type* ad, const u32* ids, \
        const Acc<TB>::type* w, TB* abar, Acc<TB>::type* zd, double scale, double pdrop, \
        double keep, u64 seed) { \
        moe_act_forward<TB, 0, 0>(T, K, E, R, I, G, ldg, U, ldu, zg, zu, bg, bu, ad, ids, w, abar, zd, \
                            scale, pdrop, keep, seed); \
    } \
    extern "C" __global__ void moe_down_forward_##SUF( \
        u32 T, u32 K, u32 R, u32 H, const TB* y0, const Acc<TB>::type* zd, \
        const Acc<TB>::type* w, const u32* ids, const Acc<TB>::type* bd, TB* y, double scale) { \
        moe_down_forward<TB>(T, K, R, H, y0, zd, w, ids, bd, y, scale); \
    } \
    extern "C" __global__ void moe_down_backward_##SUF( \
        u32 T, u32 K, u32 R, u32 H, const TB* dy, const Acc<TB>::type* zd, \
        const Acc<TB>::type* w, const u32* ids, const Acc<TB>::type* bd, Acc<TB>::type* dzd, \
        Acc<TB>::type* dw, double scale) { \
        moe_down_backward<TB>(T, K, R, H, dy, zd, w, ids, bd, dzd, dw, scale); \
    } \
    extern "C" __global__ void moe_act_backward_##SUF( \
        u32 T, u32 K, u32 E, u32 R, u32 I, const TB* G, u32 ldg, const TB* U, u32 ldu, \
        const Acc<TB>::type* zg, const Acc<TB>::type* zu, const Acc<TB>::type* bg, \
        const Acc<TB>::type* bu, const Acc<TB>::type* ad, const u32* ids, \
        const Acc<TB>::type* w, const TB* dabar, const Acc<TB>::type* dzd, TB* dG, TB* dU, \
        Acc<TB>::type* dzg, Acc<TB>::type* dzu, Acc<TB>::type* dw, double scale, double pdrop, \
        double keep, u64 seed) { \
        moe_act_backward<TB, 0, 0>(T, K, E, R, I, G, ldg, U, ldu, zg, zu, bg, bu, ad, ids, w, dabar, \
                             dzd, dG, dU, dzg, dzu, dw, scale, pdrop, keep, seed); \
    } \
    extern "C" __global__ void moe_act_weight_grads_##SUF( \
        u32 K, u32 E, u32 R, u32 I, const TB* G, u32 ldg, const TB* U, u32 ldu, \
        const Acc<TB>::type* zg, const Acc<TB>::type* zu, const Acc<TB>::type* bg, \
        const Acc<TB>::type* bu, const Acc<TB>::type* ad, const Acc<TB>::type* w, \
        const TB* dabar, const Acc<TB>::type* dzd, const u32* perm, const u32* offsets, \
        Acc<TB>::type* dbg, Acc<TB>::type* dbu, Acc<TB>::type* dad, double scale, double pdrop, \
        double keep, u64 seed) { \
        moe_act_weight_grads<TB, 0, 0>(K, E, R, I, G, ldg, U, ldu, zg, zu, bg, bu, ad, w, dabar, dzd, \
                                 perm, offsets, dbg, dbu, dad, scale, pdrop, keep, seed); \
    } \
    extern "C" __global__ void moe_down_weight_grad_##SUF( \
        u32 K, u32 E, u32 R, u32 H, const TB* dy, const Acc<TB>::type* zd, \
        const Acc<TB>::type* w, const u32* perm, const u32* offsets, Acc<TB>::type* dbd, \
        double scale) { \
        moe_down_weight_grad<TB>(K, E, R, H, dy, zd, w, perm, offsets, dbd, scale); \
    }

// The default MixLoRA shape (k = 2, r = 16) with compile-time sizes: partials in registers.
#define MOE_FUSED_K2R16(TB, SUF) \
    extern "C" __global__ void moe_act_forward_k2r16_##SUF( \
        u32 T, u32 K, u32 E, u32 R, u32 I, const TB* G, u32 ldg, const TB* U, u32 ldu, \
        const Acc<TB>::type* zg, const Acc<TB>::type* zu, const Acc<TB>::type* bg, \
        const Acc<TB>::type* bu, const Acc<TB>::type* ad, const u32* ids, \
        const Acc<TB>::type* w, TB* abar, Acc<TB>::type* zd, double scale, double pdrop, \
        double keep, u64 seed) { \
        moe_act_forward<TB, 2, 16>(T, K, E, R, I, G, ldg, U, ldu, zg, zu, bg, bu, ad, ids, w, abar, zd, \
                            scale, pdrop, keep, seed); \
    } \
    extern "C" __global__ void moe_act_backward_k2r16_##SUF( \
        u32 T, u32 K, u32 E, u32 R, u32 I, const TB* G, u32 ldg, const TB* U, u32 ldu, \
        const Acc<TB>::type* zg, const Acc<TB>::type* zu, const Acc<TB>::type* bg, \
        const Acc<TB>::type* bu, const Acc<TB>::type* ad, const u32* ids, \
        const Acc<TB>::type* w, const TB* dabar, const Acc<TB>::type* dzd, TB* dG, TB* dU, \
        Acc<TB>::type* dzg, Acc<TB>::type* dzu, Acc<TB>::type* dw, double scale, double pdrop, \
        double keep, u64 seed) { \
        moe_act_backward<TB, 2, 16>(T, K, E, R, I, G, ldg, U, ldu, zg, zu, bg, bu, ad, ids, w, dabar, \
                             dzd, dG, dU, dzg, dzu, dw, scale, pdrop, keep, seed); \
    } \
    extern "C" __global__ void moe_act_weight_grads_k2r16_##SUF( \
        u32 K, u32 E, u32 R, u32 I, const TB* G, u32 ldg, const TB* U, u32 ldu, \
        const Acc<TB>::type* zg, const Acc<TB>::type* zu, const Acc<TB>::type* bg, \
        const Acc<TB>::type* bu, const Acc<TB>::type* ad, const Acc<TB>::type* w, \
        const TB* dabar, const Acc<TB>::type* dzd, const u32* perm, const u32* offsets, \
        Acc<TB>::type* dbg, Acc<TB>::type* dbu, Acc<TB>::type* dad, double scale, double pdrop, \
        double keep, u64 seed) { \
        moe_act_weight_grads<TB, 2, 16>(K, E, R, I, G, ldg, U, ldu, zg, zu, bg, bu, ad, w, dabar, dzd, \
                                 perm, offsets, dbg, dbu, dad, scale, pdrop, keep, seed); \
    }

MOE_FUSED(float, f32)
MOE_FUSED(bf16, bf16)
MOE_FUSED(double, f64)
MOE_FUSED_K2R16(float, f32)
MOE_FUSED_K2R16(bf16, bf16)
MOE_FUSED_K2R16(double, f64)
