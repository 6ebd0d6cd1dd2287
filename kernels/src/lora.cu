// The LoRA primitives' rank-r products for a bf16 base with f32 adapters and rank R ∈ {8, 16}
// (engine/src/backend/cuda/lora.rs picks them; every other case runs on cuBLAS), on the CUDA
// cores: lora_mma.cu has the tensor-core versions that serve rows of 16-byte runs. They read the
// bf16 operand directly, drawing the dropout mask on the fly (dropout_bits of engine/src/rng.rs
// over the row-major [M, N] elements), so no f32 copy of x, no mask and no product tensor is
// written; the f32 cuBLAS products with one dimension R ran on CUDA cores at ~20% of the memory
// rate.
//
// Layout: a warp owns 128 consecutive columns (4 per lane: one 8-byte load, one hash); a lane
// holds the R × 4 adapter values of its columns in registers for the whole kernel. N (columns)
// and the row stride of x are multiples of 4, x is 8-byte aligned (checked on the host).
//
// lora_codes_bf16_r{R}(M, N, x, ldx, A, a_t, part, rows_per_block, seed, key, thr, keep, drop)
//     part[chunk, m, r] = Σ_{c in chunk} drop(x)[m, c] · A[r, c]   (chunk = 128 columns)
//     x [M, N] bf16 (row stride ldx), A [R, N] f32, part [ceil(N/128), M, R] f32;
//     grid (ceil(N/128), ceil(M/rows_per_block)), 256 threads
// lora_grad_a_bf16_r{R}(M, N, x, ldx, dz, part, rows_per_warp, seed, key, thr, keep, drop)
//     part[g, r, c] = Σ_{m in rows of g} dz[m, r] · drop(x)[m, c]   (g = blockIdx.y: 8 warps of
//     rows_per_warp consecutive rows each); dz [M, R] f32, part [gridDim.y, R, N] f32;
//     grid (ceil(N/128), G), 256 threads
// lora_grad_x_bf16_r{R}(M, N, dz, A, a_t, dx, rows_per_block, seed, key, thr, keep, drop)
//     dx[m, c] = bf16(mask[m, c] · Σ_r dz[m, r] · A[r, c])   dx [M, N] bf16 contiguous
//     grid (ceil(N/128), ceil(M/rows_per_block)), 256 threads
// lora_expand_add_bf16_r{R}(M, N, zs, Bt, bt_t, y, ldy, out, rows_per_block)
//     out[m, c] = bf16(y[m, c] + Σ_r zs[m, r] · Bt[r, c])   zs [M, R] f32 (codes times the
//     scale), Bt [R, N] f32 (B transposed), y [M, N] bf16 (row stride ldy), out [M, N] bf16
// lora_sum_partials_f32(P, rows, cols, transpose, scale, part, out)
//     s = scale · Σ_p part[p, i, j] over part [P, rows, cols], in order of p (deterministic);
//     out[i, j] = s, or out[j, i] when transpose
//
// A [R, N] (and Bt) is row-major, or with a_t (bt_t) stored as its transpose [N, R], as a LoRA
// B [N, R] is: read as Bᵀ without a copy. Small f32 operands (A, Bt, dz, zs) are 16-byte aligned.
//
// Dropout: drop = 0 multiplies by nothing (x exactly); else element i is dropped when
// dropout_bits(seed ^ *key, i) < thr (key: the device's dropout key, common.cuh) and the kept
// ones are scaled by keep = 1/(1 − p).

#define LORA_COLS 128
#define LORA_WARPS 8

// Four consecutive bf16 (8 bytes) widened to f32.
__device__ __forceinline__ void lora_load4(const bf16* p, float (&v)[4]) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const bf16* e = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] = __bfloat162float(e[q]);
}

// The dropout multipliers of elements idx .. idx + 3 (idx a multiple of 4: one hash).
__device__ __forceinline__ void lora_mask4(u64 mixed, u32 thr, float keep, u64 idx, float (&m)[4]) {
    const u64 h = rng_hash_mixed(mixed, idx >> 2);
#pragma unroll
    for (int q = 0; q < 4; ++q) m[q] = (((u32)(h >> (16 * q)) & 0xFFFFu) < thr) ? 0.0f : keep;
}

// x[m, c0 .. c0 + 4] in f32 with its dropout applied.
__device__ __forceinline__ void lora_dropped4(const bf16* x, u32 ldx, u32 N, u32 m, u32 c0, u64 mixed, u32 thr,
                                             float keep, int drop, float (&v)[4]) {
    lora_load4(x + (size_t)m * ldx + c0, v);
    if (drop) {
        float mk[4];
        lora_mask4(mixed, thr, keep, (u64)m * N + c0, mk);
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q] = v[q] * mk[q];
    }
}

// The lane's R × 4 slice of A [R, N] (zeros past column N): a[r][q] = A[r, c0 + q]. With a_t,
// A is stored as its transpose [N, R] (row c holds A[.., c]: a LoRA B read as Bᵀ without a copy).
template <int R>
__device__ __forceinline__ void lora_slice(const float* A, u32 N, u32 c0, int a_t, float (&a)[R][4]) {
    const bool active = c0 < N;
    if (a_t) {
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int j = 0; j < R / 4; ++j) {
                float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
                if (active) v = *reinterpret_cast<const float4*>(A + (size_t)(c0 + q) * R + 4 * j);
                a[4 * j][q] = v.x;
                a[4 * j + 1][q] = v.y;
                a[4 * j + 2][q] = v.z;
                a[4 * j + 3][q] = v.w;
            }
        return;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (active) v = *reinterpret_cast<const float4*>(A + (size_t)r * N + c0);
        a[r][0] = v.x;
        a[r][1] = v.y;
        a[r][2] = v.z;
        a[r][3] = v.w;
    }
}

// dz[m, 0 .. R] (16-byte aligned rows: R is a multiple of 4).
template <int R> __device__ __forceinline__ void lora_row(const float* dz, u32 m, float (&d)[R]) {
    const float4* p = reinterpret_cast<const float4*>(dz + (size_t)m * R);
#pragma unroll
    for (int j = 0; j < R / 4; ++j) {
        const float4 v = p[j];
        d[4 * j] = v.x;
        d[4 * j + 1] = v.y;
        d[4 * j + 2] = v.z;
        d[4 * j + 3] = v.w;
    }
}

// One halving step of lora_warp_sum_scatter with N values still held (offset 16·N/R), then the
// next; compile-time indices throughout, so v stays in registers.
template <int R, int N> __device__ __forceinline__ void lora_halve(float (&v)[R], u32 lane) {
    if constexpr (N > 1) {
        constexpr int H = N / 2;
        constexpr u32 O = 16u * N / R;
        const bool upper = (lane & O) != 0u;
#pragma unroll
        for (int i = 0; i < H; ++i) {
            const float send = upper ? v[i] : v[i + H];
            const float keep = upper ? v[i + H] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
        }
        lora_halve<R, H>(v, lane);
    }
}

// Sums v[k] over the warp's 32 lanes for every k < R (R a power of two, at most 32) with R
// shuffles where R independent butterflies take 5·R: each halving step sends half of the values
// still held to the partner lane and keeps the other half (offsets 16, 8, .. down to 32 / R),
// then plain butterflies (offsets below 32 / R) finish the sums. Lane l returns the total of
// k = l / (32 / R); the order of the additions is fixed (deterministic).
template <int R> __device__ __forceinline__ float lora_warp_sum_scatter(float (&v)[R], u32 lane) {
    lora_halve<R, R>(v, lane);
    float s = v[0];
#pragma unroll
    for (int o = 16 / R; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// Rows a warp loads before it reduces any (memory requests in flight per lane).
#define LORA_UNROLL 4

template <int R>
__device__ void lora_codes(u32 M, u32 N, const bf16* x, u32 ldx, const float* A, int a_t, float* part,
                           u32 rows_per_block, u64 seed, const u64* __restrict__ key, u32 thr, float keep, int drop) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 chunk = blockIdx.x;
    const u32 c0 = chunk * LORA_COLS + lane * 4;
    const bool active = c0 < N;
    float a[R][4];
    lora_slice<R>(A, N, c0, a_t, a);
    const u64 mixed = dropout_mixed(seed, key);
    const u32 m0 = blockIdx.y * rows_per_block;
    const u32 m1 = min(M, m0 + rows_per_block);
    constexpr u32 SPREAD = 32 / R; // lanes holding each code after the reduction
    // Warp-uniform loop (every lane shuffles): rows m + u·LORA_WARPS for u < LORA_UNROLL.
    for (u32 m = m0 + warp; m < m1; m += LORA_WARPS * LORA_UNROLL) {
        float v[LORA_UNROLL][4];
#pragma unroll
        for (int u = 0; u < LORA_UNROLL; ++u) {
            const u32 row = m + u * LORA_WARPS;
            if (active && row < m1) {
                lora_dropped4(x, ldx, N, row, c0, mixed, thr, keep, drop, v[u]);
            } else {
#pragma unroll
                for (int q = 0; q < 4; ++q) v[u][q] = 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < LORA_UNROLL; ++u) {
            const u32 row = m + u * LORA_WARPS;
            if (row >= m1) break; // warp-uniform
            float z[R];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                z[r] = 0.0f;
#pragma unroll
                for (int q = 0; q < 4; ++q) z[r] += v[u][q] * a[r][q];
            }
            const float total = lora_warp_sum_scatter<R>(z, lane);
            if (lane % SPREAD == 0u) part[((size_t)chunk * M + row) * R + lane / SPREAD] = total;
        }
    }
}

template <int R>
__device__ void lora_grad_a(u32 M, u32 N, const bf16* x, u32 ldx, const float* dz, float* part, u32 rows_per_warp,
                            u64 seed, const u64* __restrict__ key, u32 thr, float keep, int drop) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 c0 = blockIdx.x * LORA_COLS + lane * 4;
    const bool active = c0 < N; // no early return: the block synchronises below
    const u64 mixed = dropout_mixed(seed, key);
    // Warp w of block row g owns rows [(8g + w)·rows_per_warp, +rows_per_warp).
    const size_t start = ((size_t)blockIdx.y * LORA_WARPS + warp) * rows_per_warp;
    const u32 m0 = (u32)min((size_t)M, start);
    const u32 m1 = active ? (u32)min((size_t)M, start + rows_per_warp) : m0;
    float acc[R][4];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[r][q] = 0.0f;
    for (u32 m = m0; m < m1; ++m) {
        float v[4], d[R];
        lora_dropped4(x, ldx, N, m, c0, mixed, thr, keep, drop, v);
        lora_row<R>(dz, m, d);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[r][q] += d[r] * v[q];
    }
    // The block's 8 warps add their sums in warp order (deterministic) into shared memory, then
    // the block writes its partial part[g, r, chunk columns].
    __shared__ float4 block_sum[R][LORA_COLS / 4];
#pragma unroll 1
    for (u32 w = 0; w < LORA_WARPS; ++w) {
        if (warp == w) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                float4 t = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
                if (w > 0) {
                    const float4 prev = block_sum[r][lane];
                    t = make_float4(prev.x + t.x, prev.y + t.y, prev.z + t.z, prev.w + t.w);
                }
                block_sum[r][lane] = t;
            }
        }
        __syncthreads();
    }
    for (u32 k = threadIdx.x; k < (u32)R * (LORA_COLS / 4); k += blockDim.x) {
        const u32 r = k / (LORA_COLS / 4), l4 = k % (LORA_COLS / 4);
        const u32 c = blockIdx.x * LORA_COLS + l4 * 4;
        if (c < N) *reinterpret_cast<float4*>(part + ((size_t)blockIdx.y * R + r) * N + c) = block_sum[r][l4];
    }
}

template <int R>
__device__ void lora_grad_x(u32 M, u32 N, const float* dz, const float* A, int a_t, bf16* dx, u32 rows_per_block,
                            u64 seed, const u64* __restrict__ key, u32 thr, float keep, int drop) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 c0 = blockIdx.x * LORA_COLS + lane * 4;
    if (c0 >= N) return;
    float a[R][4];
    lora_slice<R>(A, N, c0, a_t, a);
    const u64 mixed = dropout_mixed(seed, key);
    const u32 m0 = blockIdx.y * rows_per_block;
    const u32 m1 = min(M, m0 + rows_per_block);
    // Two rows per step: both rows' dz loads go out before the products.
    for (u32 m = m0 + warp; m < m1; m += 2 * LORA_WARPS) {
        float d[2][R];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            if (m + u * LORA_WARPS < m1) lora_row<R>(dz, m + u * LORA_WARPS, d[u]);
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const u32 row = m + u * LORA_WARPS;
            if (row >= m1) break;
            float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int q = 0; q < 4; ++q) o[q] += d[u][r] * a[r][q];
            if (drop) {
                float mk[4];
                lora_mask4(mixed, thr, keep, (u64)row * N + c0, mk);
#pragma unroll
                for (int q = 0; q < 4; ++q) o[q] = o[q] * mk[q];
            }
            uint2 raw;
            bf16* e = reinterpret_cast<bf16*>(&raw);
#pragma unroll
            for (int q = 0; q < 4; ++q) e[q] = __float2bfloat16(o[q]);
            *reinterpret_cast<uint2*>(dx + (size_t)row * N + c0) = raw;
        }
    }
}

template <int R>
__device__ void lora_expand_add(u32 M, u32 N, const float* zs, const float* Bt, int bt_t, const bf16* y, u32 ldy,
                                bf16* out, u32 rows_per_block) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const u32 c0 = blockIdx.x * LORA_COLS + lane * 4;
    if (c0 >= N) return;
    float b[R][4];
    lora_slice<R>(Bt, N, c0, bt_t, b);
    const u32 m0 = blockIdx.y * rows_per_block;
    const u32 m1 = min(M, m0 + rows_per_block);
    // Two rows per step: both rows' loads of y go out before the products.
    for (u32 m = m0 + warp; m < m1; m += 2 * LORA_WARPS) {
        float v[2][4];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            if (m + u * LORA_WARPS < m1) lora_load4(y + (size_t)(m + u * LORA_WARPS) * ldy + c0, v[u]);
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const u32 row = m + u * LORA_WARPS;
            if (row >= m1) break;
            float z[R];
            lora_row<R>(zs, row, z);
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int q = 0; q < 4; ++q) d[q] += z[r] * b[r][q];
            uint2 raw;
            bf16* e = reinterpret_cast<bf16*>(&raw);
#pragma unroll
            for (int q = 0; q < 4; ++q) e[q] = __float2bfloat16(v[u][q] + d[q]);
            *reinterpret_cast<uint2*>(out + (size_t)row * N + c0) = raw;
        }
    }
}

#define LORA_RANK(R) \
    extern "C" __global__ void lora_codes_bf16_r##R(u32 M, u32 N, const bf16* x, u32 ldx, const float* A, int a_t, \
                                                     float* part, u32 rows_per_block, u64 seed, \
                                                     const u64* __restrict__ key, u32 thr, float keep, int drop) { \
        lora_codes<R>(M, N, x, ldx, A, a_t, part, rows_per_block, seed, key, thr, keep, drop); \
    } \
    extern "C" __global__ void lora_grad_a_bf16_r##R(u32 M, u32 N, const bf16* x, u32 ldx, const float* dz, \
                                                      float* part, u32 rows_per_warp, u64 seed, \
                                                      const u64* __restrict__ key, u32 thr, float keep, int drop) { \
        lora_grad_a<R>(M, N, x, ldx, dz, part, rows_per_warp, seed, key, thr, keep, drop); \
    } \
    extern "C" __global__ void lora_grad_x_bf16_r##R(u32 M, u32 N, const float* dz, const float* A, int a_t, \
                                                      bf16* dx, u32 rows_per_block, u64 seed, \
                                                      const u64* __restrict__ key, u32 thr, float keep, int drop) { \
        lora_grad_x<R>(M, N, dz, A, a_t, dx, rows_per_block, seed, key, thr, keep, drop); \
    } \
    extern "C" __global__ void lora_expand_add_bf16_r##R(u32 M, u32 N, const float* zs, const float* Bt, int bt_t, \
                                                          const bf16* y, u32 ldy, bf16* out, u32 rows_per_block) { \
        lora_expand_add<R>(M, N, zs, Bt, bt_t, y, ldy, out, rows_per_block); \
    }

LORA_RANK(8)
LORA_RANK(16)

// rows · cols < 2^32 (checked on the host): 32-bit index arithmetic. The loop over the parts is
// unrolled so that a thread's loads are in flight together (a rolled loop waits for each load
// before issuing the next); the additions stay in the order of p.
extern "C" __global__ void lora_sum_partials_f32(u32 P, u32 rows, u32 cols, int transpose, float scale,
                                                  const float* __restrict__ part, float* __restrict__ out) {
    const size_t n = (size_t)rows * cols;
    FOR_EACH(i, n) {
        float s = 0.0f;
#pragma unroll 8
        for (u32 p = 0; p < P; ++p) s += part[(size_t)p * n + i];
        const u32 i32 = (u32)i, row = i32 / cols, col = i32 - row * cols;
        out[transpose ? (size_t)col * rows + row : i] = scale == 1.0f ? s : s * scale;
    }
}
