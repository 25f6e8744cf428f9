// Metal dialect for the CLSA kernels (see metal/README.md). The algorithm text in
// common.h and *.inc is shared with CUDA; only these few names differ.
#define FN inline
#define SHARED threadgroup
#define SHARED_PTR(T) threadgroup T*
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define SIMD_SUM(x) simd_sum(x)
#define SIMD_PREFIX_EXCL(x) simd_prefix_exclusive_sum(x)
#define SIMD_MAX(x) simd_max(x)
#define SIMD_SHUFFLE(x, l) simd_shuffle((x), (ushort)(l))
#define AS_UINT(x) as_type<uint>(x)
#define SHARED_ATOMIC_UINT atomic_uint
#define ATOMIC_ADD(p, v) atomic_fetch_add_explicit((p), (v), memory_order_relaxed)
#define ATOMIC_STORE(p, v) atomic_store_explicit((p), (v), memory_order_relaxed)
#define ATOMIC_LOAD(p) atomic_load_explicit((p), memory_order_relaxed)
#define DEVICE_ATOMIC_ADD(p, v) atomic_fetch_add_explicit((device atomic_uint*)(p), (v), memory_order_relaxed)
#define NEG_INF (-INFINITY)
#define EXP(x) metal::exp(x)
#define FMAX(a, b) metal::max((a), (b))
#define IMIN(a, b) metal::min((a), (b))
#define IMAX(a, b) metal::max((a), (b))
#define UMIN(a, b) metal::min((a), (b))
