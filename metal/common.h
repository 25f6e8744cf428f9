// Shared helpers for the CLSA kernels: written once, compiled for Metal and CUDA
// after dialect_metal.h or dialect_cuda.h.

// Order-preserving map of an fp32 score to uint32: a > b  <=>  key(a) > key(b).
// -0.0 and +0.0 map to the same key, so they tie like they compare. Every NaN maps to 0,
// below -inf: which NaN a sum yields depends on the hardware and the order of the sum.
// Bit tests, not f != f, which fast math may fold away.
FN uint score_key(float f) {
  uint u = AS_UINT(f);
  if (u == 0x80000000u) u = 0u;
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of v over a threadgroup of NWARPS * 32 threads.
// ws holds NWARPS + 1 words; after the call ws[NWARPS] is the threadgroup total
// (valid until the next call). Every thread of the group must call it.
template <int NWARPS>
FN uint block_excl_scan(uint v, uint lane, uint warp, SHARED_PTR(uint) ws) {
  static_assert(NWARPS >= 1 && NWARPS <= 32, "one warp scans the warp totals");
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

// Row layouts of the routing work buffers (uint32 words, zeroed by MLX before each pass),
// each row a hist_row first: C chunk histograms of one digit and the row's total (256 bins
// each). Score work [R, score_row]: the top digit's hist_row, then the T score keys (when
// the kernel scores; from a matmul the passes read the fp32 scores and key them as they go).
// Level work [R, level_row]: the next digit's hist_row (at the last level: per digit, the
// chunk's keys at or above it), the state (prefix, remaining k, 0, 0), and each chunk's
// count of keys above. Every buffer a launch indexes holds fewer than 2^31 elements
// (kernels.py bounds a launch's rows by bytes), so offsets are 32-bit.
FN uint hist_row(int C) { return (uint)(C + 1) * 256u; }
FN uint score_row(int T, int C) { return hist_row(C) + (uint)T; }
FN uint level_row(int C) { return hist_row(C) + 4u + (uint)C; }
FN uint as_key(uint key) { return key; }
FN uint as_key(float score) { return score_key(score); }

// Threadgroup histograms are HC copies of 256 bins: warp w counts into copy w % HC, so the
// few bins that take most keys (a score key's top byte is its sign and exponent) spread their
// atomics over HC addresses (an enumerator: Metal takes program-scope variables only in
// `constant` memory, a word CUDA lacks).
enum { HC = 4 };
template <typename H>
FN uint bin_count(H h, uint j) {
  uint v = 0u;
  for (int i = 0; i < HC; ++i) v += ATOMIC_LOAD(&h[(uint)i * 256u + j]);
  return v;
}

// Writes one chunk's threadgroup histogram h to hist and adds it into the row's total
// (device atomics, zero bins skipped), so the next pass reads 256 totals instead of summing
// every chunk's histogram. ADD: several groups share the chunk, so they add into its
// (zeroed) histogram too.
template <int TG, bool ADD, typename H, typename O>
FN void flush_hist(H h, O hist, O tot, uint tid) {
  for (uint j = tid; j < 256u; j += (uint)TG) {
    const uint v = bin_count(h, j);
    if (!ADD) hist[j] = v;
    if (v) {
      if (ADD) DEVICE_ATOMIC_ADD(&hist[j], v);
      DEVICE_ATOMIC_ADD(&tot[j], v);
    }
  }
}
