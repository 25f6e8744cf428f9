// The Metal builtins the CLSA kernels call, declared for the two shims (metal_shim.h,
// metal_opencl_shim.h), each of which declares its own address spaces, types and atomics.
#pragma once
namespace metal {
enum class mem_flags { mem_none, mem_device, mem_threadgroup, mem_texture };
void threadgroup_barrier(mem_flags);
float simd_sum(float);
int simd_sum(int);
uint simd_sum(uint);
uint simd_prefix_exclusive_sum(uint);
int simd_prefix_exclusive_sum(int);
float simd_prefix_exclusive_sum(float);
float simd_max(float);
float simd_shuffle(float, ushort);
int simd_shuffle(int, ushort);
template <typename To, typename From>
To as_type(From);
float exp(float);
float max(float, float);
int max(int, int);
uint max(uint, uint);
float min(float, float);
int min(int, int);
uint min(uint, uint);
} // namespace metal
