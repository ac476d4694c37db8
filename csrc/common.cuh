// Shared pieces of the grpo_core CUDA kernels: dtype tags, 16-byte vectors, warp/block sums.
//
// Plain CUDA C++ only (cuda_runtime.h, cuda_bf16.h, cuda_fp16.h): no torch headers, so the
// library is free of torch's C++ ABI and one build serves every torch version.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "grpo_core_cuda.h"

namespace grpo {

constexpr int kWarp = 32;
constexpr int kVecBytes = 16;  // one 128-bit load/store per thread per step

// ---- element conversions (all math is fp32; storage may be bf16/fp16) -------------------------
// __host__ __device__ pieces also compile into the host emulator (csrc/emulate/), which the
// CPU tests use to check the kernels' per-thread arithmetic without a GPU.
__host__ __device__ __forceinline__ float to_float(float x) { return x; }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__host__ __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __host__ __device__ __forceinline__ T from_float(float x);
template <> __host__ __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);  // round to nearest even, like torch's .to(bfloat16)
}
template <> __host__ __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// 16 bytes of T: 4 fp32 or 8 bf16/fp16, loaded and stored as one ld/st.global.v4.
template <typename T>
struct alignas(kVecBytes) Vec {
  static constexpr int kN = kVecBytes / sizeof(T);
  T v[kN];
};

// A row of V elements split so the middle part is 16-byte aligned:
//   [0, head) scalar | [head, head + nvec*kN) vectors | [tail, V) scalar.
// If a second row (e.g. the gradient row) has a different alignment, the whole row goes scalar.
struct RowSplit {
  int64_t head, nvec, tail;
};

template <typename T>
__host__ __device__ __forceinline__ RowSplit split_row(const void* row, int64_t V, const void* other = nullptr) {
  constexpr int kN = Vec<T>::kN;
  const uintptr_t mis = reinterpret_cast<uintptr_t>(row) % kVecBytes;
  const bool same = other == nullptr || reinterpret_cast<uintptr_t>(other) % kVecBytes == mis;
  int64_t head = mis ? (kVecBytes - mis) / sizeof(T) : 0;
  if (!same || mis % sizeof(T) != 0 || head > V) head = V;  // scalar fallback
  const int64_t nvec = (V - head) / kN;
  return {head, nvec, head + nvec * kN};
}

// ---- reductions --------------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the whole block; every thread gets the result. `smem` holds >= 32 values.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : A(0);
  return warp_sum(v);
}

// A grid large enough to fill the GPU, small enough for grid-stride loops (and gridDim.x limits).
inline unsigned int grid_for(int64_t work_items, int64_t cap = 1 << 20) {
  if (work_items < 1) return 1;
  return static_cast<unsigned int>(work_items < cap ? work_items : cap);
}

}  // namespace grpo
