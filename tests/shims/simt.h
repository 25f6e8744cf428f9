// A SIMT emulator for the CLSA kernel text on a CPU (tests/simt.py builds one unit per
// instantiation): each GPU thread is a fiber, a threadgroup runs its fibers on one CPU
// thread, and they switch only at barriers and SIMD operations. Between two such points
// the fibers of a group run one after another in a random order, and the groups of a
// launch run in a random order, so a missing barrier or an assumption about group order
// shows up as a wrong answer. A barrier not reached by every thread of the group, or a
// SIMD operation not reached by every lane of the warp, or a device buffer read or written
// out of its bounds (buffers are `Ptr`s that check and count every index), stops the launch
// with an error.
#pragma once
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 600  // macOS keeps ucontext behind it (never run here: no Mac)
#endif
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace simt {

enum State { RUN, AT_BARRIER, AT_SIMD, DONE };

struct Fiber {
  ucontext_t ctx;
  State state;
  int site;  // source line of the barrier or SIMD operation it waits at
};

struct Launch {
  std::function<void()> body;
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  ucontext_t sched;
  unsigned group[3];
  int tg = 0;
  int cur = 0;
  float fslot[1024];
  unsigned uslot[1024];
  std::string error;
};

static Launch* L = nullptr;
constexpr size_t STACK = 64 * 1024;

inline void wait(State s, int site) {
  Fiber& f = L->fibers[L->cur];
  f.state = s;
  f.site = site;
  swapcontext(&f.ctx, &L->sched);
}

inline void fiber_main() {
  L->body();
  L->fibers[L->cur].state = DONE;
}

inline unsigned tid() { return (unsigned)L->cur; }

// A device buffer: an index outside [0, n) of the buffer MLX handed over is recorded as the
// launch's error, and reads or writes a scratch element instead of memory it does not own.
template <typename T>
struct Ptr {
  T* base;
  T* p;
  int64_t n;
  const char* name;
  int64_t* accesses;  // elements read or written through this buffer in the launch
  T& operator[](int64_t i) const {
    const int64_t j = (p - base) + i;
    ++*accesses;
    if (j >= 0 && j < n) return p[i];
    out_of_bounds(j);
    static typename std::remove_const<T>::type scratch;
    return scratch;
  }
  Ptr operator+(int64_t d) const { return {base, p + d, n, name, accesses}; }
  void out_of_bounds(int64_t j) const;
};
inline unsigned group(int d) { return L->group[d]; }

inline void barrier(int site) { wait(AT_BARRIER, site); }

// Every lane writes its value, all 32 meet, each reads, all meet again before the slots
// are reused.
inline float simd_sum(float x, int site) {
  const unsigned t = tid(), w0 = t & ~31u;
  L->fslot[t] = x;
  wait(AT_SIMD, site);
  float v[32];
  for (int i = 0; i < 32; ++i) v[i] = L->fslot[w0 + i];
  for (int o = 16; o > 0; o >>= 1) {  // the butterfly order of a GPU's shuffle reduction
    float n[32];
    for (int i = 0; i < 32; ++i) n[i] = v[i] + v[i ^ o];
    std::memcpy(v, n, sizeof v);
  }
  wait(AT_SIMD, site);
  return v[t & 31u];
}

inline float simd_max(float x, int site) {
  const unsigned t = tid(), w0 = t & ~31u;
  L->fslot[t] = x;
  wait(AT_SIMD, site);
  float m = L->fslot[w0];
  for (unsigned i = w0 + 1; i < w0 + 32; ++i) m = std::fmax(m, L->fslot[i]);
  wait(AT_SIMD, site);
  return m;
}

// Lane l's value; every lane meets, as on a GPU, whichever lane it reads.
template <typename T>
inline T simd_shuffle(T x, unsigned l, int site) {
  static_assert(sizeof(T) == 4, "32-bit values");
  const unsigned t = tid(), w0 = t & ~31u;
  std::memcpy(&L->uslot[t], &x, 4);
  wait(AT_SIMD, site);
  T v;
  std::memcpy(&v, &L->uslot[w0 + (l & 31u)], 4);
  wait(AT_SIMD, site);
  return v;
}

inline unsigned simd_prefix_excl(unsigned x, int site) {
  const unsigned t = tid(), w0 = t & ~31u;
  L->uslot[t] = x;
  wait(AT_SIMD, site);
  unsigned s = 0;
  for (unsigned i = w0; i < t; ++i) s += L->uslot[i];
  wait(AT_SIMD, site);
  return s;
}

template <typename T>
void Ptr<T>::out_of_bounds(int64_t j) const {
  if (!L->error.empty()) return;
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s[%lld] is out of bounds (%lld elements), thread %u of group (%u,%u,%u)", name,
                (long long)j, (long long)n, tid(), L->group[0], L->group[1], L->group[2]);
  L->error = buf;
}

inline bool fail(const char* what, int site, int count) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s at line %d of the unit (group %u,%u,%u): %d threads", what, site,
                L->group[0], L->group[1], L->group[2], count);
  L->error = buf;
  return false;
}

// Releases whatever every fiber waits at; false when they wait at different places.
inline bool release() {
  const int n = L->tg;
  bool any = false;
  for (int w = 0; w < n; w += 32) {
    int at = 0, same = 0;
    for (int i = w; i < w + 32; ++i) {
      at += L->fibers[i].state == AT_SIMD;
      same += L->fibers[i].state == AT_SIMD && L->fibers[i].site == L->fibers[w].site;
    }
    if (same == 32) {
      for (int i = w; i < w + 32; ++i) L->fibers[i].state = RUN;
      any = true;
    } else if (at) {
      return fail("SIMD operation not reached by every lane of a warp", L->fibers[w].site, at);
    }
  }
  if (any) return true;
  int at = 0, done = 0, site = -1;
  for (auto& f : L->fibers) {
    done += f.state == DONE;
    if (f.state == AT_BARRIER) {
      if (site >= 0 && f.site != site) return fail("threads wait at different barriers", f.site, at);
      site = f.site;
      ++at;
    }
  }
  if (at && done) return fail("barrier not reached by every thread of the group", site, at);
  for (auto& f : L->fibers) f.state = f.state == AT_BARRIER ? RUN : f.state;
  return true;
}

inline bool run_group(std::mt19937& rng) {
  for (int t = 0; t < L->tg; ++t) {
    Fiber& f = L->fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = L->stacks.data() + (size_t)t * STACK;
    f.ctx.uc_stack.ss_size = STACK;
    f.ctx.uc_link = &L->sched;
    makecontext(&f.ctx, fiber_main, 0);
    f.state = RUN;
  }
  std::vector<int> order(L->tg);
  for (int t = 0; t < L->tg; ++t) order[t] = t;
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (int t : order) {
      if (L->fibers[t].state != RUN) continue;
      L->cur = t;
      swapcontext(&L->sched, &L->fibers[t].ctx);
      ran = true;
    }
    if (ran) continue;
    bool done = true;
    for (auto& f : L->fibers) done = done && f.state == DONE;
    if (done) return true;
    if (!release()) return false;
  }
}

// Runs body over groups[0] x groups[1] x groups[2] groups of tg threads, groups in a random
// order. Returns "" or the first error.
inline std::string launch(const unsigned groups[3], int tg, unsigned seed, std::function<void()> body) {
  Launch run;
  if (tg % 32 || tg < 32 || tg > 1024) return "threadgroup size must be whole warps, at most 1024";
  run.body = std::move(body);
  run.tg = tg;
  run.fibers.resize(tg);
  run.stacks.resize((size_t)tg * STACK);
  L = &run;
  std::mt19937 rng(seed);
  std::vector<unsigned> ids((size_t)groups[0] * groups[1] * groups[2]);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = (unsigned)i;
  std::shuffle(ids.begin(), ids.end(), rng);
  for (unsigned id : ids) {
    run.group[0] = id % groups[0];
    run.group[1] = id / groups[0] % groups[1];
    run.group[2] = id / groups[0] / groups[1];
    if (!run_group(rng) || !run.error.empty()) break;
  }
  L = nullptr;
  return run.error;
}

template <typename T>
inline T atomic_add(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}

inline unsigned as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// fp16 and bf16 storage types: round to nearest even on the way in, exact on the way out.
struct float16_t {
  uint16_t bits;
  float16_t() = default;
  float16_t(float f) {
    unsigned u = as_uint(f), sign = (u >> 16) & 0x8000u;
    unsigned a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) {
      bits = (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
    } else if (a >= 0x477ff000u) {
      bits = (uint16_t)(sign | 0x7c00u);
    } else if (a < 0x38800000u) {  // subnormal or zero
      float m = std::fabs(f) * 16777216.0f;  // 2^24: units of the smallest subnormal
      bits = (uint16_t)(sign | (unsigned)std::nearbyint(m));
    } else {
      unsigned r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;
      bits = (uint16_t)(sign | (r >> 13));
    }
  }
  operator float() const {
    unsigned sign = (bits & 0x8000u) << 16, e = (bits >> 10) & 31u, m = bits & 0x3ffu;
    if (e == 0) {
      float v = std::ldexp((float)m, -24);
      return sign ? -v : v;
    }
    return as_float(sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13)));
  }
};

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f) {
    unsigned u = as_uint(f);
    bits = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40u)
                                           : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  operator float() const { return as_float((unsigned)bits << 16); }
};

}  // namespace simt

using simt::bfloat16_t;
using simt::float16_t;
