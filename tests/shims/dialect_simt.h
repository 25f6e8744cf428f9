// SIMT-emulator dialect for the CLSA kernels (tests/shims/simt.h): the names that differ
// between Metal and CUDA, mapped onto the emulator. Threadgroup memory is `static`: one
// copy shared by the fibers of a group (groups run one at a time).
typedef unsigned int uint;
#define FN inline
#define SHARED static
#define SHARED_PTR(T) T*
#define BARRIER() simt::barrier(__LINE__)
#define AS_UINT(x) simt::as_uint(x)
#define SHARED_ATOMIC_UINT unsigned int
#define ATOMIC_ADD(p, v) simt::atomic_add((p), (v))
#define ATOMIC_STORE(p, v) (*(p) = (v))
#define ATOMIC_LOAD(p) (*(p))
#define DEVICE_ATOMIC_ADD(p, v) simt::atomic_add((p), (v))
#define NEG_INF (-INFINITY)
#define EXP(x) std::exp(x)
#define FMAX(a, b) std::fmax((a), (b))
#define IMIN(a, b) ((a) < (b) ? (a) : (b))
#define IMAX(a, b) ((a) > (b) ? (a) : (b))
#define UMIN(a, b) ((a) < (b) ? (a) : (b))
#define SIMD_SUM(x) simt::simd_sum((x), __LINE__)
#define SIMD_PREFIX_EXCL(x) simt::simd_prefix_excl((x), __LINE__)
#define SIMD_MAX(x) simt::simd_max((x), __LINE__)
#define SIMD_SHUFFLE(x, l) simt::simd_shuffle((x), (unsigned)(l), __LINE__)
