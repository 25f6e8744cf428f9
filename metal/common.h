// Shared helpers for the CLSA kernels: written once, compiled for Metal and CUDA
// after dialect_metal.h or dialect_cuda.h.

// Order-preserving map of an fp32 score to uint32: a > b  <=>  key(a) > key(b).
// -0.0 and +0.0 map to the same key, so they tie like they compare.
FN uint score_key(float f) {
  uint u = AS_UINT(f);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of v over a threadgroup of NWARPS * 32 threads.
// ws holds NWARPS + 1 words; after the call ws[NWARPS] is the threadgroup total
// (valid until the next call). Every thread of the group must call it.
template <int NWARPS>
FN uint block_excl_scan(uint v, uint lane, uint warp, SHARED_PTR(uint) ws) {
  uint x = SIMD_PREFIX_EXCL(v);
  if (lane == 31u) ws[warp] = x + v;
  BARRIER();
  if (warp == 0u) {
    uint w = lane < (uint)NWARPS ? ws[lane] : 0u;
    uint wx = SIMD_PREFIX_EXCL(w);
    if (lane < (uint)NWARPS) ws[lane] = wx;
    if (lane == (uint)(NWARPS - 1)) ws[NWARPS] = wx + w;
  }
  BARRIER();
  uint r = x + ws[warp];
  BARRIER();
  return r;
}
