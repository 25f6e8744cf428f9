// CUDA dialect for the CLSA kernels (see metal/README.md). The algorithm text in
// common.h and *.inc is shared with Metal; only these few names differ.
typedef unsigned int uint;
#define FN __device__ __forceinline__
#define SHARED __shared__
#define SHARED_PTR(T) T*
#define BARRIER() __syncthreads()
#define AS_UINT(x) __float_as_uint(x)
#define SHARED_ATOMIC_UINT unsigned int
#define ATOMIC_ADD(p, v) atomicAdd((p), (v))
#define ATOMIC_STORE(p, v) (*(p) = (v))
#define ATOMIC_LOAD(p) (*(p))
#define DEVICE_ATOMIC_ADD(p, v) atomicAdd((p), (v))
#define NEG_INF (-__int_as_float(0x7f800000))
#define EXP(x) expf(x)
#define FMAX(a, b) fmaxf((a), (b))
#define IMIN(a, b) ((a) < (b) ? (a) : (b))
#define IMAX(a, b) ((a) > (b) ? (a) : (b))
#define UMIN(a, b) ((a) < (b) ? (a) : (b))
FN float SIMD_SUM(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
FN float SIMD_MAX(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
#define SIMD_SHUFFLE(x, l) __shfl_sync(0xffffffffu, (x), (l))
FN uint SIMD_PREFIX_EXCL(uint v) {
  uint x = v;
  for (int o = 1; o < 32; o <<= 1) {
    uint y = __shfl_up_sync(0xffffffffu, x, o);
    if ((threadIdx.x & 31u) >= (uint)o) x += y;
  }
  return x - v;
}
