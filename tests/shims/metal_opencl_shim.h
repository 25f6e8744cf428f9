// The Metal names the CLSA kernels use, for clang's C++ for OpenCL 2021 with the generic
// address space turned off: Metal's address spaces map to OpenCL's, so clang refuses a
// pointer passed to the wrong one, an atomic outside threadgroup or device memory, and a
// store through `constant`. Types and builtins are declarations only (nothing runs).
// bfloat16_t stands in as half: tests/shims/metal_shim.h keeps the two types apart.
#pragma once
#pragma OPENCL EXTENSION cl_khr_fp16 : enable

#define device __global
#define constant __constant
#define threadgroup __local
#define thread __private

typedef long int64_t;
typedef ulong uint64_t;
typedef int int32_t;
typedef uint uint32_t;
typedef ushort uint16_t;
typedef half float16_t;
typedef half bfloat16_t;

#include "metal_builtins.h"
// atomic_uint, memory_order and INFINITY are OpenCL's own; atomics only on threadgroup or device memory.
namespace metal {
uint atomic_fetch_add_explicit(threadgroup atomic_uint*, uint, memory_order);
uint atomic_fetch_add_explicit(device atomic_uint*, uint, memory_order);
void atomic_store_explicit(threadgroup atomic_uint*, uint, memory_order);
void atomic_store_explicit(device atomic_uint*, uint, memory_order);
uint atomic_load_explicit(threadgroup atomic_uint*, memory_order);
uint atomic_load_explicit(device atomic_uint*, memory_order);
} // namespace metal
using namespace metal;
