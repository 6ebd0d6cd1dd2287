// Elementwise kernels over strided views: unary maps, broadcasting binary ops, comparisons,
// select, casts, strided copies and fills. One thread per output element (grid-stride); outputs
// are contiguous `[n]` unless stated.
//
// Unary:   {op}_{f32,bf16,f64}(n, l, x, y, p0, p1)        y[i] = op(x[at(l, i)]; p0, p1)
// Binary:  {op}_{f32,bf16,f64}(n, la, lb, a, b, y)        y[i] = a[at(la, i)] op b[at(lb, i)]
// Compare: {op}_{f32,bf16,f64,u32}(n, la, lb, a, b, y)    y: [n] u32 0/1
// Select:  where_{cond}_{val}(n, lc, lt, lf, c, t, f, y)  y[i] = c[..] != 0 ? t[..] : f[..]
// Cast:    cast_{src}_{dst}(n, l, x, y)                   Rust `as` semantics
// Copy:    copy_{dtype}(n, ls, ld, src, dst)              dst[at(ld, i)] = src[at(ls, i)]
// Add to:  add_to_{f32,bf16,f64}(n, ls, ld, src, dst)     dst[at(ld, i)] += src[at(ls, i)] (in place)
// Units:   copy_{u128,u64}(n, ls, ld, src, dst)           the same over 16- or 8-byte units, any dtype
// Fill:    fill_{dtype}(n, y, v)                          y[i] = v

// ----- contiguous fast path -------------------------------------------------------------------------
// When every operand is one contiguous run (rank 1, stride 1) starting on a 16-byte boundary, each
// thread maps VEC consecutive elements through 16-byte loads and stores (one bf16 element per
// thread per load reaches only a fraction of the memory bandwidth); the last n % VEC elements go
// through the scalar loop. The host sizes the grid for n / VEC threads; the grid-stride loops
// cover any n either way.

#define VEC 8

__device__ __forceinline__ bool is_run(const Strided& l) { return l.rank == 1 && l.strides[0] == 1; }

template <typename T> __device__ __forceinline__ bool aligned16(const T* p) { return ((size_t)p & 15) == 0; }

// VEC elements of T as whole 16-byte words (bf16: 1, f32 and u32: 2, f64: 4).
template <typename T> struct Pack {
    uint4 u[sizeof(T) * VEC / 16];
};

template <typename T> __device__ __forceinline__ void load_vec(const T* p, T (&out)[VEC]) {
    const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(p);
    const T* e = reinterpret_cast<const T*>(&pk);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = e[k];
}

template <typename T> __device__ __forceinline__ void store_vec(T* p, const T (&v)[VEC]) {
    Pack<T> pk;
    T* e = reinterpret_cast<T*>(&pk);
#pragma unroll
    for (int k = 0; k < VEC; ++k) e[k] = v[k];
    *reinterpret_cast<Pack<T>*>(p) = pk;
}

// The first index of the scalar tail loop and its stride, after the vector loop over n / VEC.
#define TAIL_FOR(i, n) \
    for (size_t i = ((size_t)(n) / VEC) * VEC + (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n); \
         i += (size_t)blockDim.x * gridDim.x)

// ----- unary ---------------------------------------------------------------------------------------

#define UNARY_FUNCTOR(NAME, EXPR) \
    struct Op_##NAME { \
        template <typename A> __device__ __forceinline__ A operator()(A x, A p0, A p1) const { return (EXPR); } \
    };

UNARY_FUNCTOR(neg, -x)
UNARY_FUNCTOR(exp, m_exp(x))
UNARY_FUNCTOR(log, m_log(x))
UNARY_FUNCTOR(silu, x / ((A)1 + m_exp(-x)))
UNARY_FUNCTOR(sigmoid, (A)1 / ((A)1 + m_exp(-x)))
UNARY_FUNCTOR(sqrt, m_sqrt(x))
UNARY_FUNCTOR(recip, (A)1 / x)
UNARY_FUNCTOR(sqr, x * x)
UNARY_FUNCTOR(abs, m_abs(x))
UNARY_FUNCTOR(tanh, m_tanh(x))
UNARY_FUNCTOR(cos, m_cos(x))
UNARY_FUNCTOR(sin, m_sin(x))
UNARY_FUNCTOR(affine, x * p0 + p1)
UNARY_FUNCTOR(powf, m_pow(x, p0))
UNARY_FUNCTOR(max_scalar, m_max(x, p0))
UNARY_FUNCTOR(min_scalar, m_min(x, p0))

template <typename T, typename F>
__device__ __forceinline__ void unary_map(u32 n, const Strided& l, const T* x, T* y, double p0, double p1) {
    typedef typename Acc<T>::type A;
    const F f;
    const A a0 = (A)p0, a1 = (A)p1;
    if (is_run(l) && aligned16(x + l.offset) && aligned16(y)) {
        const T* px = x + l.offset;
        FOR_EACH(j, n / VEC) {
            T vx[VEC], vy[VEC];
            load_vec(px + j * VEC, vx);
#pragma unroll
            for (int k = 0; k < VEC; ++k) vy[k] = from_acc<T>(f(to_acc(vx[k]), a0, a1));
            store_vec(y + j * VEC, vy);
        }
        TAIL_FOR(i, n) { y[i] = from_acc<T>(f(to_acc(px[i]), a0, a1)); }
        return;
    }
    FOR_EACH(i, n) {
        y[i] = from_acc<T>(f(to_acc(x[strided_at(l, (u32)i)]), a0, a1));
    }
}

#define UNARY_DT(NAME, T, SUF) \
    extern "C" __global__ void NAME##_##SUF(u32 n, Strided l, const T* x, T* y, double p0, double p1) { \
        unary_map<T, Op_##NAME>(n, l, x, y, p0, p1); \
    }
#define UNARY(NAME) UNARY_DT(NAME, float, f32) UNARY_DT(NAME, bf16, bf16) UNARY_DT(NAME, double, f64)

UNARY(neg)
UNARY(exp)
UNARY(log)
UNARY(silu)
UNARY(sigmoid)
UNARY(sqrt)
UNARY(recip)
UNARY(sqr)
UNARY(abs)
UNARY(tanh)
UNARY(cos)
UNARY(sin)
UNARY(affine)
UNARY(powf)
UNARY(max_scalar)
UNARY(min_scalar)

// ----- binary --------------------------------------------------------------------------------------

#define BINARY_FUNCTOR(NAME, EXPR) \
    struct Op_##NAME { \
        template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return (EXPR); } \
    };

BINARY_FUNCTOR(add, a + b)
BINARY_FUNCTOR(sub, a - b)
BINARY_FUNCTOR(mul, a * b)
BINARY_FUNCTOR(div, a / b)
BINARY_FUNCTOR(maximum, m_max(a, b))
BINARY_FUNCTOR(minimum, m_min(a, b))
BINARY_FUNCTOR(silu_mul, a / ((A)1 + m_exp(-a)) * b)

template <typename T, typename F>
__device__ __forceinline__ void binary_map(u32 n, const Strided& la, const Strided& lb, const T* a, const T* b, T* y) {
    const F f;
    if (is_run(la) && is_run(lb) && aligned16(a + la.offset) && aligned16(b + lb.offset) && aligned16(y)) {
        const T* pa = a + la.offset;
        const T* pb = b + lb.offset;
        FOR_EACH(j, n / VEC) {
            T va[VEC], vb[VEC], vy[VEC];
            load_vec(pa + j * VEC, va);
            load_vec(pb + j * VEC, vb);
#pragma unroll
            for (int k = 0; k < VEC; ++k) vy[k] = from_acc<T>(f(to_acc(va[k]), to_acc(vb[k])));
            store_vec(y + j * VEC, vy);
        }
        TAIL_FOR(i, n) { y[i] = from_acc<T>(f(to_acc(pa[i]), to_acc(pb[i]))); }
        return;
    }
    FOR_EACH(i, n) {
        y[i] = from_acc<T>(f(to_acc(a[strided_at(la, (u32)i)]), to_acc(b[strided_at(lb, (u32)i)])));
    }
}

#define BINARY_DT(NAME, T, SUF) \
    extern "C" __global__ void NAME##_##SUF(u32 n, Strided la, Strided lb, const T* a, const T* b, T* y) { \
        binary_map<T, Op_##NAME>(n, la, lb, a, b, y); \
    }
#define BINARY(NAME) BINARY_DT(NAME, float, f32) BINARY_DT(NAME, bf16, bf16) BINARY_DT(NAME, double, f64)

// add_to_{dtype}: the destination view, in place, plus the source view, computed as binary add
// computes it (bf16 in f32, rounded once), so `dst.add_assign(src)` equals `dst.assign(dst + src)`
// bit for bit. The destination view must not overlap itself (a view of distinct elements).
template <typename T>
__device__ __forceinline__ void add_to_map(u32 n, const Strided& ls, const Strided& ld, const T* src, T* dst) {
    const Op_add f;
    if (is_run(ls) && is_run(ld) && aligned16(src + ls.offset) && aligned16(dst + ld.offset)) {
        const T* ps = src + ls.offset;
        T* pd = dst + ld.offset;
        FOR_EACH(j, n / VEC) {
            T vs[VEC], vd[VEC];
            load_vec(ps + j * VEC, vs);
            load_vec(pd + j * VEC, vd);
#pragma unroll
            for (int k = 0; k < VEC; ++k) vd[k] = from_acc<T>(f(to_acc(vd[k]), to_acc(vs[k])));
            store_vec(pd + j * VEC, vd);
        }
        TAIL_FOR(i, n) { pd[i] = from_acc<T>(f(to_acc(pd[i]), to_acc(ps[i]))); }
        return;
    }
    FOR_EACH(i, n) {
        T* d = dst + strided_at(ld, (u32)i);
        *d = from_acc<T>(f(to_acc(*d), to_acc(src[strided_at(ls, (u32)i)])));
    }
}

#define ADD_TO_DT(T, SUF) \
    extern "C" __global__ void add_to_##SUF(u32 n, Strided ls, Strided ld, const T* src, T* dst) { \
        add_to_map<T>(n, ls, ld, src, dst); \
    }
ADD_TO_DT(float, f32)
ADD_TO_DT(bf16, bf16)
ADD_TO_DT(double, f64)

BINARY(add)
BINARY(sub)
BINARY(mul)
BINARY(div)
BINARY(maximum)
BINARY(minimum)
BINARY(silu_mul)

// ----- comparisons ---------------------------------------------------------------------------------

// bf16 compares through float (exact); u32 natively.
__device__ __forceinline__ float cmp_val(float x) { return x; }
__device__ __forceinline__ float cmp_val(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ double cmp_val(double x) { return x; }
__device__ __forceinline__ u32 cmp_val(u32 x) { return x; }

#define CMP_DT(NAME, OPR, T, SUF) \
    extern "C" __global__ void NAME##_##SUF(u32 n, Strided la, Strided lb, const T* a, const T* b, u32* y) { \
        FOR_EACH(i, n) { \
            y[i] = (cmp_val(a[strided_at(la, (u32)i)]) OPR cmp_val(b[strided_at(lb, (u32)i)])) ? 1u : 0u; \
        } \
    }
#define CMP(NAME, OPR) \
    CMP_DT(NAME, OPR, float, f32) CMP_DT(NAME, OPR, bf16, bf16) CMP_DT(NAME, OPR, double, f64) CMP_DT(NAME, OPR, u32, u32)

CMP(eq, ==)
CMP(ne, !=)
CMP(lt, <)
CMP(le, <=)
CMP(gt, >)
CMP(ge, >=)

// ----- where ---------------------------------------------------------------------------------------

// Non-zero is true; NaN is non-zero.
__device__ __forceinline__ bool truthy(float x) { return x != 0.0f; }
__device__ __forceinline__ bool truthy(bf16 x) { return __bfloat162float(x) != 0.0f; }
__device__ __forceinline__ bool truthy(double x) { return x != 0.0; }
__device__ __forceinline__ bool truthy(u32 x) { return x != 0u; }

#define WHERE_DT(C, CS, V, VS) \
    extern "C" __global__ void where_##CS##_##VS(u32 n, Strided lc, Strided lt, Strided lf, const C* c, \
                                                  const V* t, const V* f, V* y) { \
        FOR_EACH(i, n) { \
            y[i] = truthy(c[strided_at(lc, (u32)i)]) ? t[strided_at(lt, (u32)i)] : f[strided_at(lf, (u32)i)]; \
        } \
    }
#define WHERE(C, CS) \
    WHERE_DT(C, CS, float, f32) WHERE_DT(C, CS, bf16, bf16) WHERE_DT(C, CS, double, f64) WHERE_DT(C, CS, u32, u32)

WHERE(float, f32)
WHERE(bf16, bf16)
WHERE(double, f64)
WHERE(u32, u32)

// ----- casts ---------------------------------------------------------------------------------------

template <typename S, typename D>
__device__ __forceinline__ void cast_map(u32 n, const Strided& l, const S* x, D* y) {
    if (is_run(l) && aligned16(x + l.offset) && aligned16(y)) {
        const S* px = x + l.offset;
        FOR_EACH(j, n / VEC) {
            S vx[VEC];
            D vy[VEC];
            load_vec(px + j * VEC, vx);
#pragma unroll
            for (int k = 0; k < VEC; ++k) vy[k] = Cast<D>::of(vx[k]);
            store_vec(y + j * VEC, vy);
        }
        TAIL_FOR(i, n) { y[i] = Cast<D>::of(px[i]); }
        return;
    }
    FOR_EACH(i, n) { y[i] = Cast<D>::of(x[strided_at(l, (u32)i)]); }
}

#define CAST_DT(S, SS, D, DS) \
    extern "C" __global__ void cast_##SS##_##DS(u32 n, Strided l, const S* x, D* y) { cast_map<S, D>(n, l, x, y); }
#define CAST(S, SS) \
    CAST_DT(S, SS, float, f32) CAST_DT(S, SS, bf16, bf16) CAST_DT(S, SS, double, f64) CAST_DT(S, SS, u32, u32)

CAST(float, f32)
CAST(bf16, bf16)
CAST(double, f64)
CAST(u32, u32)

// ----- strided copy and fill -----------------------------------------------------------------------
// copy_{dtype} moves one element per thread through the views, or VEC per thread when both views
// are one run (rank 1, stride 1) starting on a 16-byte boundary, like the maps above.
//
// copy_u128 and copy_u64 move whole 16- or 8-byte units, whatever the dtype. The host launches one
// when both views end in a stride-1 dim whose length is a multiple of the unit (u elements), every
// other stride and both offsets are multiples of u, and both buffers start on a unit boundary. `ls`
// and `ld` are then those views counted in units (last dim divided by u, the other strides and the
// offset divided by u), `n` is the element count divided by u, and unit i of either view holds its
// elements i·u .. i·u + u in order, so unit i of the source goes to unit i of the destination. When
// both views are one run, strided_at reduces to `offset + i`: a plain contiguous 16-byte copy.
//
// fill_{dtype} stores VEC elements per thread through 16-byte stores when the output starts on a
// 16-byte boundary (fresh buffers do), the last n % VEC one by one.

template <typename W>
__device__ __forceinline__ void copy_units(u32 n, const Strided& ls, const Strided& ld, const W* src, W* dst) {
    FOR_EACH(i, n) { dst[strided_at(ld, (u32)i)] = src[strided_at(ls, (u32)i)]; }
}

extern "C" __global__ void copy_u128(u32 n, Strided ls, Strided ld, const uint4* src, uint4* dst) {
    copy_units(n, ls, ld, src, dst);
}
extern "C" __global__ void copy_u64(u32 n, Strided ls, Strided ld, const uint2* src, uint2* dst) {
    copy_units(n, ls, ld, src, dst);
}

template <typename T>
__device__ __forceinline__ void copy_map(u32 n, const Strided& ls, const Strided& ld, const T* src, T* dst) {
    if (is_run(ls) && is_run(ld) && aligned16(src + ls.offset) && aligned16(dst + ld.offset)) {
        const T* ps = src + ls.offset;
        T* pd = dst + ld.offset;
        FOR_EACH(j, n / VEC) {
            *reinterpret_cast<Pack<T>*>(pd + j * VEC) = *reinterpret_cast<const Pack<T>*>(ps + j * VEC);
        }
        TAIL_FOR(i, n) { pd[i] = ps[i]; }
        return;
    }
    FOR_EACH(i, n) { dst[strided_at(ld, (u32)i)] = src[strided_at(ls, (u32)i)]; }
}

template <typename T>
__device__ __forceinline__ void fill_map(u32 n, T* y, double v) {
    const T t = Cast<T>::of(v);
    if (aligned16(y)) {
        T vt[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) vt[k] = t;
        FOR_EACH(j, n / VEC) { store_vec(y + j * VEC, vt); }
        TAIL_FOR(i, n) { y[i] = t; }
        return;
    }
    FOR_EACH(i, n) { y[i] = t; }
}

#define COPY_DT(T, SUF) \
    extern "C" __global__ void copy_##SUF(u32 n, Strided ls, Strided ld, const T* src, T* dst) { \
        copy_map<T>(n, ls, ld, src, dst); \
    } \
    extern "C" __global__ void fill_##SUF(u32 n, T* y, double v) { fill_map<T>(n, y, v); }

COPY_DT(float, f32)
COPY_DT(bf16, bf16)
COPY_DT(double, f64)
COPY_DT(u32, u32)
