// Flash attention (engine/src/fused/flash_attention/): causal attention over grouped-query
// heads with a query offset and a key mask (0 padding, else the key's segment: a query of a
// segment sees only the earlier keys of its own segment, a padding query every earlier real
// key), never holding the [b, hq, t, s] scores. f32 and bf16 operands, f32 accumulation; head
// dims 64 and 128 (a template parameter). The CPU op (cpu.rs, cpu_backward.rs) is the reference.
//
// Operands are rank-4 views [b, h, n, d] read through their strides: element (bi, hi, i, e) of a
// view is at off + bi·sb + hi·sh + i·sn + e·sd. Results are contiguous [b, n, h, d] (the layout
// the next projection reads).
//
// Layout of the work: 4 threads per row (a query row, or a key row in dkv), thread part p owning
// the columns e = 4c + p (c < D/4), so that the 4 threads of a row read 4 consecutive floats of a
// shared tile; a dot product over d is the threads' partial sums added with two xor-shuffles
// (the 4 threads of a row are lanes 4r .. 4r + 3 of one warp). Blocks of 32 rows, tiles of 32
// keys (queries in dkv) in shared memory as f32. These kernels run on the CUDA cores.
//
// flash_attention_fwd_d{D}_{T}(B, HQ, HKV, T, S, q_offset, scale, q view, k view, v view, mask,
//     out, lse): out [b, t, hq, d] T, lse [b, hq, t] f32 (−inf on a row with no visible key,
//     whose output is 0). Grid (ceil(T / 32), B·HQ), 128 threads.
// flash_attention_bwd_dq_d{D}_{T}(.., q, k, v, out, grad views, lse, mask, dq, dsum): dq
//     [b, t, hq, d] T; dsum [b, hq, t] f32 = Σ_e grad ∘ out, for the dkv kernel. Same grid.
// flash_attention_bwd_dkv_d{D}_{T}(.., q, k, v, grad views, lse, dsum, mask, dk, dv): dk, dv
//     [b, s, hkv, d] T, each key's gradient summed over the query heads of its group.
//     Grid (ceil(S / 32), B·HKV), 128 threads.

#define FA_ROWS 32
#define FA_TILE 32
#define FA_THREADS 128
#define FA_NEG_INF __int_as_float(0xff800000)

// A view's origin and element strides.
struct FaView {
    u32 off, sb, sh, sn, sd;
};
#define FA_VIEW_ARGS(x) u32 x##_off, u32 x##_sb, u32 x##_sh, u32 x##_sn, u32 x##_sd
#define FA_VIEW(x) FaView{x##_off, x##_sb, x##_sh, x##_sn, x##_sd}

__device__ __forceinline__ size_t fa_at(const FaView& v, u32 bi, u32 hi, u32 i, u32 e) {
    return (size_t)v.off + (size_t)bi * v.sb + (size_t)hi * v.sh + (size_t)i * v.sn + (size_t)e * v.sd;
}

// Whether the query at key position `pos` (segment `sq`) sees key j (segment `kseg`).
__device__ __forceinline__ bool fa_sees(u32 pos, u32 j, u32 sq, u32 kseg, bool masked) {
    if (j > pos) return false;
    if (!masked) return true;
    return kseg != 0 && (sq == 0 || kseg == sq);
}

// The sum of a row's 4 partial sums (lanes 4r .. 4r + 3).
__device__ __forceinline__ float fa_row_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}

// Loads rows n0 .. n0 + 32 of head hi of batch row bi of view x [.., n, D] into tile[32][D] as
// f32 (zeros past n).
template <typename T, int D>
__device__ __forceinline__ void fa_load_tile(float (*tile)[D], const T* x, const FaView& v, u32 bi, u32 hi,
                                             u32 n0, u32 n) {
    for (u32 idx = threadIdx.x; idx < FA_TILE * D; idx += FA_THREADS) {
        const u32 r = idx / D, e = idx % D, i = n0 + r;
        tile[r][e] = i < n ? to_acc(x[fa_at(v, bi, hi, i, e)]) : 0.0f;
    }
}

template <typename T, int D>
__device__ void fa_forward(u32 B, u32 HQ, u32 HKV, u32 T_, u32 S, u32 q_offset, float scale, const T* q,
                           FaView qv, const T* k, FaView kv, const T* v, FaView vv, const u32* mask, T* out,
                           float* lse) {
    constexpr int C = D / 4;
    __shared__ float ks[FA_TILE][D];
    __shared__ float vs[FA_TILE][D];
    __shared__ u32 kseg[FA_TILE];
    const u32 r = threadIdx.x >> 2, p = threadIdx.x & 3;
    const u32 bi = blockIdx.y / HQ, h = blockIdx.y % HQ, kvh = h / (HQ / HKV);
    const u32 i0 = blockIdx.x * FA_ROWS, i = i0 + r;
    const bool row_in = i < T_, masked = mask != nullptr;
    const u32 pos = q_offset + (row_in ? i : i0);
    const u32 sq = masked && row_in ? mask[(size_t)bi * S + pos] : 0;
    float qr[C], acc[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
        qr[c] = row_in ? to_acc(q[fa_at(qv, bi, h, i, 4 * c + p)]) : 0.0f;
        acc[c] = 0.0f;
    }
    float m = FA_NEG_INF, l = 0.0f;
    const u32 last = min(T_, i0 + FA_ROWS) - 1;
    const u32 kend = min(S, q_offset + last + 1);
    for (u32 j0 = 0; j0 < kend; j0 += FA_TILE) {
        __syncthreads(); // the previous tile is consumed
        if (threadIdx.x < FA_TILE) {
            const u32 j = j0 + threadIdx.x;
            kseg[threadIdx.x] = masked ? (j < S ? mask[(size_t)bi * S + j] : 0u) : 1u;
        }
        __syncthreads();
        bool any = false;
        for (u32 jj = p; jj < FA_TILE; jj += 4)
            any |= row_in && j0 + jj < kend && fa_sees(pos, j0 + jj, sq, kseg[jj], masked);
        if (!__syncthreads_or(any)) continue; // a block no query of this block sees
        fa_load_tile<T, D>(ks, k, kv, bi, kvh, j0, S);
        fa_load_tile<T, D>(vs, v, vv, bi, kvh, j0, S);
        __syncthreads();
        float sc[FA_TILE];
        float mx = FA_NEG_INF;
#pragma unroll
        for (int jj = 0; jj < FA_TILE; ++jj) {
            float part = 0.0f;
#pragma unroll
            for (int c = 0; c < C; ++c) part = fmaf(qr[c], ks[jj][4 * c + p], part);
            const float s = fa_row_sum(part);
            const bool vis = row_in && j0 + jj < kend && fa_sees(pos, j0 + jj, sq, kseg[jj], masked);
            sc[jj] = vis ? s * scale : FA_NEG_INF;
            mx = fmaxf(mx, sc[jj]);
        }
        if (mx == FA_NEG_INF) continue; // nothing visible to this row here (no barrier below)
        const float mnew = fmaxf(m, mx);
        const float alpha = m == FA_NEG_INF ? 0.0f : expf(m - mnew);
        float sum = 0.0f;
#pragma unroll
        for (int jj = 0; jj < FA_TILE; ++jj) {
            sc[jj] = sc[jj] == FA_NEG_INF ? 0.0f : expf(sc[jj] - mnew);
            sum += sc[jj];
        }
        l = l * alpha + sum;
        m = mnew;
#pragma unroll
        for (int c = 0; c < C; ++c) {
            float a = acc[c] * alpha;
#pragma unroll
            for (int jj = 0; jj < FA_TILE; ++jj) a = fmaf(sc[jj], vs[jj][4 * c + p], a);
            acc[c] = a;
        }
    }
    if (!row_in) return;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    T* o = out + ((size_t)(bi * T_ + i) * HQ + h) * D;
#pragma unroll
    for (int c = 0; c < C; ++c) o[4 * c + p] = from_float<T>(acc[c] * inv);
    if (p == 0) lse[(size_t)(bi * HQ + h) * T_ + i] = l > 0.0f ? m + logf(l) : FA_NEG_INF;
}

template <typename T, int D>
__device__ void fa_backward_dq(u32 B, u32 HQ, u32 HKV, u32 T_, u32 S, u32 q_offset, float scale, const T* q,
                               FaView qv, const T* k, FaView kv, const T* v, FaView vv, const T* out, FaView ov,
                               const T* grad, FaView gv, const float* lse, const u32* mask, T* dq, float* dsum) {
    constexpr int C = D / 4;
    __shared__ float ks[FA_TILE][D];
    __shared__ float vs[FA_TILE][D];
    __shared__ u32 kseg[FA_TILE];
    const u32 r = threadIdx.x >> 2, p = threadIdx.x & 3;
    const u32 bi = blockIdx.y / HQ, h = blockIdx.y % HQ, kvh = h / (HQ / HKV);
    const u32 i0 = blockIdx.x * FA_ROWS, i = i0 + r;
    const bool row_in = i < T_, masked = mask != nullptr;
    const u32 pos = q_offset + (row_in ? i : i0);
    const u32 sq = masked && row_in ? mask[(size_t)bi * S + pos] : 0;
    float qr[C], gr[C], acc[C];
    float dpart = 0.0f;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const u32 e = 4 * c + p;
        qr[c] = row_in ? to_acc(q[fa_at(qv, bi, h, i, e)]) : 0.0f;
        gr[c] = row_in ? to_acc(grad[fa_at(gv, bi, h, i, e)]) : 0.0f;
        const float o = row_in ? to_acc(out[fa_at(ov, bi, h, i, e)]) : 0.0f;
        dpart = fmaf(gr[c], o, dpart);
        acc[c] = 0.0f;
    }
    const float drow = fa_row_sum(dpart); // D_i = Σ dO ∘ O
    const float lrow = row_in ? lse[(size_t)(bi * HQ + h) * T_ + i] : 0.0f;
    const u32 last = min(T_, i0 + FA_ROWS) - 1;
    const u32 kend = min(S, q_offset + last + 1);
    for (u32 j0 = 0; j0 < kend; j0 += FA_TILE) {
        __syncthreads();
        if (threadIdx.x < FA_TILE) {
            const u32 j = j0 + threadIdx.x;
            kseg[threadIdx.x] = masked ? (j < S ? mask[(size_t)bi * S + j] : 0u) : 1u;
        }
        __syncthreads();
        bool any = false;
        for (u32 jj = p; jj < FA_TILE; jj += 4)
            any |= row_in && j0 + jj < kend && fa_sees(pos, j0 + jj, sq, kseg[jj], masked);
        if (!__syncthreads_or(any)) continue;
        fa_load_tile<T, D>(ks, k, kv, bi, kvh, j0, S);
        fa_load_tile<T, D>(vs, v, vv, bi, kvh, j0, S);
        __syncthreads();
#pragma unroll 4
        for (int jj = 0; jj < FA_TILE; ++jj) {
            float sp = 0.0f, dpp = 0.0f;
#pragma unroll
            for (int c = 0; c < C; ++c) {
                sp = fmaf(qr[c], ks[jj][4 * c + p], sp);
                dpp = fmaf(gr[c], vs[jj][4 * c + p], dpp);
            }
            const float s = fa_row_sum(sp), dp = fa_row_sum(dpp);
            const bool vis = row_in && j0 + jj < kend && fa_sees(pos, j0 + jj, sq, kseg[jj], masked);
            const float pr = vis ? expf(s * scale - lrow) : 0.0f;
            const float ds = pr * (dp - drow) * scale;
#pragma unroll
            for (int c = 0; c < C; ++c) acc[c] = fmaf(ds, ks[jj][4 * c + p], acc[c]);
        }
    }
    if (!row_in) return;
    T* o = dq + ((size_t)(bi * T_ + i) * HQ + h) * D;
#pragma unroll
    for (int c = 0; c < C; ++c) o[4 * c + p] = from_float<T>(acc[c]);
    if (p == 0) dsum[(size_t)(bi * HQ + h) * T_ + i] = drow;
}

template <typename T, int D>
__device__ void fa_backward_dkv(u32 B, u32 HQ, u32 HKV, u32 T_, u32 S, u32 q_offset, float scale, const T* q,
                                FaView qv, const T* k, FaView kv, const T* v, FaView vv, const T* grad, FaView gv,
                                const float* lse, const float* dsum, const u32* mask, T* dk, T* dv) {
    constexpr int C = D / 4;
    __shared__ float qs[FA_TILE][D];
    __shared__ float gs[FA_TILE][D];
    __shared__ float ls[FA_TILE], ds_[FA_TILE];
    __shared__ u32 qseg[FA_TILE];
    const u32 r = threadIdx.x >> 2, p = threadIdx.x & 3;
    const u32 bi = blockIdx.y / HKV, kvh = blockIdx.y % HKV, G = HQ / HKV;
    const u32 j0 = blockIdx.x * FA_ROWS, j = j0 + r;
    const bool key_in = j < S, masked = mask != nullptr;
    const u32 kseg = masked ? (key_in ? mask[(size_t)bi * S + j] : 0u) : 1u;
    float kr[C], vr[C], dka[C], dva[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const u32 e = 4 * c + p;
        kr[c] = key_in ? to_acc(k[fa_at(kv, bi, kvh, j, e)]) : 0.0f;
        vr[c] = key_in ? to_acc(v[fa_at(vv, bi, kvh, j, e)]) : 0.0f;
        dka[c] = 0.0f;
        dva[c] = 0.0f;
    }
    // The first query that may see key j0: q_offset + i ≥ j0.
    const u32 first = j0 > q_offset ? j0 - q_offset : 0u;
    for (u32 hh = 0; hh < G; ++hh) {
        const u32 h = kvh * G + hh;
        for (u32 i0 = first - first % FA_TILE; i0 < T_; i0 += FA_TILE) {
            __syncthreads();
            if (threadIdx.x < FA_TILE) {
                const u32 i = i0 + threadIdx.x;
                const bool in = i < T_;
                const size_t row = (size_t)(bi * HQ + h) * T_ + i;
                qseg[threadIdx.x] = masked && in ? mask[(size_t)bi * S + q_offset + i] : 0u;
                ls[threadIdx.x] = in ? lse[row] : 0.0f;
                ds_[threadIdx.x] = in ? dsum[row] : 0.0f;
            }
            __syncthreads();
            bool any = false;
            for (u32 ii = p; ii < FA_TILE; ii += 4)
                any |= key_in && i0 + ii < T_ && fa_sees(q_offset + i0 + ii, j, qseg[ii], kseg, masked);
            if (!__syncthreads_or(any)) continue;
            fa_load_tile<T, D>(qs, q, qv, bi, h, i0, T_);
            fa_load_tile<T, D>(gs, grad, gv, bi, h, i0, T_);
            __syncthreads();
#pragma unroll 4
            for (int ii = 0; ii < FA_TILE; ++ii) {
                float sp = 0.0f, dpp = 0.0f;
#pragma unroll
                for (int c = 0; c < C; ++c) {
                    sp = fmaf(qs[ii][4 * c + p], kr[c], sp);
                    dpp = fmaf(gs[ii][4 * c + p], vr[c], dpp);
                }
                const float s = fa_row_sum(sp), dp = fa_row_sum(dpp);
                const bool vis = key_in && i0 + ii < T_ && fa_sees(q_offset + i0 + ii, j, qseg[ii], kseg, masked);
                const float pr = vis ? expf(s * scale - ls[ii]) : 0.0f;
                const float dsv = pr * (dp - ds_[ii]) * scale;
#pragma unroll
                for (int c = 0; c < C; ++c) {
                    dva[c] = fmaf(pr, gs[ii][4 * c + p], dva[c]);
                    dka[c] = fmaf(dsv, qs[ii][4 * c + p], dka[c]);
                }
            }
        }
    }
    if (!key_in) return;
    const size_t at = ((size_t)(bi * S + j) * HKV + kvh) * D;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        dk[at + 4 * c + p] = from_float<T>(dka[c]);
        dv[at + 4 * c + p] = from_float<T>(dva[c]);
    }
}

#define FA_KERNELS(D, T, SUF)                                                                                    \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attention_fwd_d##D##_##SUF(                   \
        u32 B, u32 HQ, u32 HKV, u32 T_, u32 S, u32 q_offset, float scale, const T* q, FA_VIEW_ARGS(q),         \
        const T* k, FA_VIEW_ARGS(k), const T* v, FA_VIEW_ARGS(v), const u32* mask, T* out, float* lse) {     \
        fa_forward<T, D>(B, HQ, HKV, T_, S, q_offset, scale, q, FA_VIEW(q), k, FA_VIEW(k), v, FA_VIEW(v), mask, \
                         out, lse);                                                                            \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attention_bwd_dq_d##D##_##SUF(                \
        u32 B, u32 HQ, u32 HKV, u32 T_, u32 S, u32 q_offset, float scale, const T* q, FA_VIEW_ARGS(q),         \
        const T* k, FA_VIEW_ARGS(k), const T* v, FA_VIEW_ARGS(v), const T* o, FA_VIEW_ARGS(o), const T* g,   \
        FA_VIEW_ARGS(g), const float* lse, const u32* mask, T* dq, float* dsum) {                              \
        fa_backward_dq<T, D>(B, HQ, HKV, T_, S, q_offset, scale, q, FA_VIEW(q), k, FA_VIEW(k), v, FA_VIEW(v), o, \
                             FA_VIEW(o), g, FA_VIEW(g), lse, mask, dq, dsum);                                  \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attention_bwd_dkv_d##D##_##SUF(               \
        u32 B, u32 HQ, u32 HKV, u32 T_, u32 S, u32 q_offset, float scale, const T* q, FA_VIEW_ARGS(q),         \
        const T* k, FA_VIEW_ARGS(k), const T* v, FA_VIEW_ARGS(v), const T* g, FA_VIEW_ARGS(g),               \
        const float* lse, const float* dsum, const u32* mask, T* dk, T* dv) {                                  \
        fa_backward_dkv<T, D>(B, HQ, HKV, T_, S, q_offset, scale, q, FA_VIEW(q), k, FA_VIEW(k), v, FA_VIEW(v), \
                              g, FA_VIEW(g), lse, dsum, mask, dk, dv);                                         \
    }

FA_KERNELS(64, float, f32)
FA_KERNELS(64, bf16, bf16)
FA_KERNELS(128, float, f32)
FA_KERNELS(128, bf16, bf16)

// ----- bf16 forward on the tensor cores ------------------------------------------------------------
//
// flash_attention_fwd_mma_d{D}_bf16: as flash_attention_fwd_d{D}_bf16, with both products on
// the tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate). Blocks of 64 queries, 4 warps
// of 16; key tiles of 64 in shared memory, K row-major [key][d] and V transposed [d][key] (rows
// padded by 8 bf16, so that the 8 rows a fragment load touches fall in distinct banks). The
// probabilities are rounded to bf16 for the P·V product (as FlashAttention-2 does); the row sums
// l take them in f32. Grid (ceil(T / 64), B·HQ), 128 threads.
//
// Fragments (lane = 4g + tq; as in lora_mma.cu): A (16×16) a0 = (row g, k 2tq, 2tq+1), a1 = (g + 8,
// same k), a2 = (g, k 2tq+8, +9), a3 = (g + 8, same); B (16×8) b0 = (k 2tq, 2tq+1; n g), b1 = (k
// 2tq+8, +9; n g); D d0, d1 = (row g; n 2tq, 2tq+1), d2, d3 = (row g + 8, same n). The score
// tile of n-tiles 2kk, 2kk + 1 is, element for element, the A fragment of k-step kk of P·V.

#define FA_MMA_ROWS 64
#define FA_MMA_KEYS 64

__device__ __forceinline__ void fa_mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two bf16 as one word, the first in the low half.
__device__ __forceinline__ u32 fa_pack(bf16 lo, bf16 hi) {
    return (u32)__bfloat16_as_ushort(lo) | ((u32)__bfloat16_as_ushort(hi) << 16);
}
__device__ __forceinline__ u32 fa_pack_f(float lo, float hi) {
    return fa_pack(__float2bfloat16(lo), __float2bfloat16(hi));
}

// q rows `row[0]`, `row[1]` (g and g + 8 of the warp's 16; zeros where !in) as the A fragments
// of the k-steps of q·kᵀ: a0, a2 from row g (k 2tq.. and 2tq + 8..), a1, a3 from row g + 8.
template <int D>
__device__ __forceinline__ void fa_mma_load_q(u32 (&qa)[D / 16][4], const bf16* q, const FaView& qv, u32 bi, u32 h,
                                              const u32 (&row)[2], const bool (&in)[2]) {
    const u32 tq = threadIdx.x & 3;
    const bf16 zero = __float2bfloat16(0.0f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int f = 0; f < 4; ++f) {
            const int hf = f & 1;
            const u32 e = 16 * kk + 2 * tq + 8 * (f >> 1);
            const bf16 x0 = in[hf] ? q[fa_at(qv, bi, h, row[hf], e)] : zero;
            const bf16 x1 = in[hf] ? q[fa_at(qv, bi, h, row[hf], e + 1)] : zero;
            qa[kk][f] = fa_pack(x0, x1);
        }
    }
}

// One tile's online-softmax step of the thread's two rows, given the masked, scaled scores `sc`
// (−inf where invisible) and their per-thread maxima `mx`: the new running maxima `m`, the
// rescale `alpha` of the old sums and outputs, the probabilities in place of `sc` (0 where
// invisible) and the running sums `l`. The 4 lanes of a row agree after the xor-shuffles.
template <int NT>
__device__ __forceinline__ void fa_mma_online_softmax(float (&sc)[NT][4], float (&mx)[2], float (&m)[2],
                                                      float (&l)[2], float (&alpha)[2]) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 1));
        mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 2));
        const float mnew = fmaxf(m[hf], mx[hf]);
        alpha[hf] = mnew == FA_NEG_INF ? 1.0f : (m[hf] == FA_NEG_INF ? 0.0f : expf(m[hf] - mnew));
        m[hf] = mnew;
    }
    float sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int f = 0; f < 4; ++f) {
            const int hf = f >> 1;
            const float p = sc[nt][f] == FA_NEG_INF ? 0.0f : expf(sc[nt][f] - m[hf]);
            sc[nt][f] = p;
            sum[hf] += p;
        }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        sum[hf] += __shfl_xor_sync(0xffffffffu, sum[hf], 1);
        sum[hf] += __shfl_xor_sync(0xffffffffu, sum[hf], 2);
        l[hf] = l[hf] * alpha[hf] + sum[hf];
    }
}

template <int D>
__device__ void fa_forward_mma(u32 B, u32 HQ, u32 HKV, u32 T_, u32 S, u32 q_offset, float scale, const bf16* q,
                               FaView qv, const bf16* k, FaView kv, const bf16* v, FaView vv, const u32* mask,
                               bf16* out, float* lse) {
    constexpr int KS = D / 16;  // k-steps of q·kᵀ
    constexpr int DT = D / 8;   // n-tiles of the output
    constexpr int NT = FA_MMA_KEYS / 8; // n-tiles of a score tile
    __shared__ __align__(16) bf16 ks[FA_MMA_KEYS][D + 8];
    __shared__ __align__(16) bf16 vt[D][FA_MMA_KEYS + 8];
    __shared__ u32 kseg[FA_MMA_KEYS];
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    const u32 bi = blockIdx.y / HQ, h = blockIdx.y % HQ, kvh = h / (HQ / HKV);
    const u32 i0 = blockIdx.x * FA_MMA_ROWS;
    const bool masked = mask != nullptr;
    // This thread's two rows: i0 + 16·warp + g (+ 8).
    u32 row[2], pos[2], sq[2];
    bool in[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        row[hf] = i0 + 16 * warp + g + 8 * hf;
        in[hf] = row[hf] < T_;
        pos[hf] = q_offset + (in[hf] ? row[hf] : 0u);
        sq[hf] = masked && in[hf] ? mask[(size_t)bi * S + pos[hf]] : 0u;
    }
    // q as A fragments, per k-step.
    u32 qa[KS][4];
    fa_mma_load_q<D>(qa, q, qv, bi, h, row, in);
    float o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int f = 0; f < 4; ++f) o[dt][f] = 0.0f;
    float m[2] = {FA_NEG_INF, FA_NEG_INF}, l[2] = {0.0f, 0.0f};
    const u32 last = min(T_, i0 + FA_MMA_ROWS) - 1;
    const u32 kend = min(S, q_offset + last + 1);
    for (u32 j0 = 0; j0 < kend; j0 += FA_MMA_KEYS) {
        __syncthreads(); // the previous tile is consumed
        if (threadIdx.x < FA_MMA_KEYS) {
            const u32 j = j0 + threadIdx.x;
            kseg[threadIdx.x] = masked ? (j < S ? mask[(size_t)bi * S + j] : 0u) : 1u;
        }
        __syncthreads();
        // Whether key 8nt + 2tq + e of the tile is visible to row hf.
        auto sees = [&](int hf, u32 jj) {
            const u32 j = j0 + jj;
            return in[hf] && j < kend && fa_sees(pos[hf], j, sq[hf], kseg[jj], masked);
        };
        bool any = false;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) any |= sees(0, 8 * nt + 2 * tq + e) || sees(1, 8 * nt + 2 * tq + e);
        if (!__syncthreads_or(any)) continue;
        for (u32 idx = threadIdx.x; idx < FA_MMA_KEYS * D; idx += FA_THREADS) {
            const u32 jj = idx / D, e = idx % D, j = j0 + jj;
            const bf16 zero = __float2bfloat16(0.0f);
            ks[jj][e] = j < S ? k[fa_at(kv, bi, kvh, j, e)] : zero;
            vt[e][jj] = j < S ? v[fa_at(vv, bi, kvh, j, e)] : zero;
        }
        __syncthreads();
        float sc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int f = 0; f < 4; ++f) sc[nt][f] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                const bf16* kr = &ks[8 * nt + g][16 * kk + 2 * tq];
                const u32 b0 = *reinterpret_cast<const u32*>(kr);
                const u32 b1 = *reinterpret_cast<const u32*>(kr + 8);
                fa_mma(sc[nt], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b0, b1);
            }
        }
        // Mask, scale and the online softmax of the two rows (a row's 4 lanes agree).
        float mx[2] = {FA_NEG_INF, FA_NEG_INF};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int f = 0; f < 4; ++f) {
                const int hf = f >> 1;
                const float x = sees(hf, 8 * nt + 2 * tq + (f & 1)) ? sc[nt][f] * scale : FA_NEG_INF;
                sc[nt][f] = x;
                mx[hf] = fmaxf(mx[hf], x);
            }
        float alpha[2];
        fa_mma_online_softmax<NT>(sc, mx, m, l, alpha);
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int f = 0; f < 4; ++f) o[dt][f] *= alpha[f >> 1];
        // o += P·V: k-step kk takes the score n-tiles 2kk, 2kk + 1 as its A fragment.
#pragma unroll
        for (int kk = 0; kk < NT / 2; ++kk) {
            const u32 a0 = fa_pack_f(sc[2 * kk][0], sc[2 * kk][1]);
            const u32 a1 = fa_pack_f(sc[2 * kk][2], sc[2 * kk][3]);
            const u32 a2 = fa_pack_f(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
            const u32 a3 = fa_pack_f(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                const bf16* vr = &vt[8 * dt + g][16 * kk + 2 * tq];
                const u32 b0 = *reinterpret_cast<const u32*>(vr);
                const u32 b1 = *reinterpret_cast<const u32*>(vr + 8);
                fa_mma(o[dt], a0, a1, a2, a3, b0, b1);
            }
        }
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
        if (!in[hf]) continue;
        const float inv = l[hf] > 0.0f ? 1.0f / l[hf] : 0.0f;
        bf16* orow = out + ((size_t)(bi * T_ + row[hf]) * HQ + h) * D;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            orow[8 * dt + 2 * tq] = __float2bfloat16(o[dt][2 * hf] * inv);
            orow[8 * dt + 2 * tq + 1] = __float2bfloat16(o[dt][2 * hf + 1] * inv);
        }
        if (tq == 0) lse[(size_t)(bi * HQ + h) * T_ + row[hf]] = l[hf] > 0.0f ? m[hf] + logf(l[hf]) : FA_NEG_INF;
    }
}

#define FA_MMA_KERNEL(D)                                                                                       \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_attention_fwd_mma_d##D##_bf16(              \
        u32 B, u32 HQ, u32 HKV, u32 T_, u32 S, u32 q_offset, float scale, const bf16* q, FA_VIEW_ARGS(q),     \
        const bf16* k, FA_VIEW_ARGS(k), const bf16* v, FA_VIEW_ARGS(v), const u32* mask, bf16* out,          \
        float* lse) {                                                                                        \
        fa_forward_mma<D>(B, HQ, HKV, T_, S, q_offset, scale, q, FA_VIEW(q), k, FA_VIEW(k), v, FA_VIEW(v),   \
                          mask, out, lse);                                                                   \
    }

FA_MMA_KERNEL(64)
FA_MMA_KERNEL(128)
