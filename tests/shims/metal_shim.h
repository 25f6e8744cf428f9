// Minimal C++ stand-ins for the Metal Shading Language names that MLX's generated
// kernel signature and the CLSA kernels use, so clang can syntax- and type-check the
// Metal instantiation on a machine without Metal. Address spaces expand to nothing:
// this check cannot see address-space mistakes (see metal/README.md).
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

#define device
#define constant
#define threadgroup
#define thread

typedef unsigned int uint;
typedef unsigned short ushort;
struct uint3 {
  uint x, y, z;
};
// 16-bit floats as opaque structs converting to and from float (Metal's half and
// MLX's bfloat16_t both do).
struct half {
  uint16_t bits;
  half() = default;
  half(float f);
  operator float() const;
};
typedef half float16_t;
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float f);
  operator float() const;
};

#include "metal_builtins.h"
namespace metal {
struct atomic_uint {
  uint v;
};
enum memory_order { memory_order_relaxed };
uint atomic_fetch_add_explicit(atomic_uint*, uint, memory_order);
void atomic_store_explicit(atomic_uint*, uint, memory_order);
uint atomic_load_explicit(atomic_uint*, memory_order);
} // namespace metal
using namespace metal;
