// Stand-in for MLX's JIT header mlx/backend/cuda/device/utils.cuh (compiled into the
// MLX CUDA library, not shipped as a file): just the types the generated kernel
// signature names. Used only by tests/test_kernels_build.py to compile with nvcc.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cstdint>

namespace mlx::core::cu {
#define MAX_NDIM 10
#define WARP_SIZE 32
using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;
} // namespace mlx::core::cu
