// Group-relative advantages on the GPU: the CUDA twin of grpo_core/advantages.py.
//
// For N = B·G rewards in B consecutive groups of G:
//     A_i = (r_i − mean_g) / (s + eps)
//   scale "group": s = unbiased std of the group (G − 1 divisor; G = 1 → s = 0 → A = 0)
//   scale "batch": s = unbiased std of all N rewards
//   scale "none":  s = 1, eps = 0 → A_i = r_i − mean_g (Dr. GRPO)
//
// Layout: a team owns one group: a warp when G <= kWarpMaxGroup (each lane strides over G),
// else a whole block. Sums are accumulated in fp64, which makes a group of equal rewards give
// exactly 0 (the fp64 sum of G equal floats is exact, so mean == r) and costs nothing here.
// "batch" needs a grid-wide reduction: kernel 1 writes each group's (mean, M2) to a workspace,
// kernel 2 (one block) merges them (Chan et al.: M2 = Σ M2_g + G Σ (mean_g − mean)^2),
// kernel 3 writes (r − mean_g) / (s + eps). Traffic: read N floats (twice), write N floats.
#include "group_stats.cuh"

namespace grpo {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kWarpMaxGroup = 1024;  // above this a group gets a whole block

template <bool kBlock>
__device__ __forceinline__ double team_sum(double v, double* smem) {
  if constexpr (kBlock) return block_sum(v, smem);
  else return warp_sum(v);
}

// One team per group (grid-stride over groups): mean, M2 = Σ (r − mean)^2, then either the
// advantages (scale group/none) or the group's (mean, M2) for the batch std (scale batch).
template <bool kBlock>
__global__ void __launch_bounds__(kThreads)
group_kernel(const float* __restrict__ r, float* __restrict__ adv, double* __restrict__ ws,
             int64_t B, int64_t G, int scale, float eps) {
  __shared__ double smem[kWarp];
  const int64_t team_size = kBlock ? blockDim.x : kWarp;
  const int64_t rank = kBlock ? threadIdx.x : threadIdx.x % kWarp;
  const int64_t team = kBlock ? blockIdx.x : (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int64_t nteams = kBlock ? gridDim.x : int64_t(gridDim.x) * blockDim.x / kWarp;
  for (int64_t g = team; g < B; g += nteams) {  // uniform per team: shuffles/syncs stay legal
    const float* rg = r + g * G;
    double sum = 0.0;
    for (int64_t i = rank; i < G; i += team_size) sum += rg[i];
    const double mean = team_sum<kBlock>(sum, smem) / double(G);
    double sq = 0.0;
    for (int64_t i = rank; i < G; i += team_size) {
      const double d = double(rg[i]) - mean;
      sq += d * d;
    }
    const double m2 = team_sum<kBlock>(sq, smem);
    if (scale == GRPO_SCALE_BATCH) {
      if (rank == 0) {
        ws[g] = mean;
        ws[B + g] = m2;
      }
      continue;
    }
    // group: (std + eps); none: 1. A group of one has no spread: std 0, centered 0 → A = 0.
    const double denom = scale_denominator(m2, G, scale, eps);
    for (int64_t i = rank; i < G; i += team_size)
      adv[g * G + i] = float((double(rg[i]) - mean) / denom);
  }
}

// One block merges the B group statistics into the batch std; writes ws[2B] = std + eps.
__global__ void __launch_bounds__(1024)
batch_std_kernel(double* __restrict__ ws, int64_t B, int64_t G, float eps) {
  __shared__ double smem[kWarp];
  double s = 0.0;
  for (int64_t g = threadIdx.x; g < B; g += blockDim.x) s += ws[g];
  const double mu = block_sum(s, smem) / double(B);  // equal group sizes: mean of the means
  double m2 = 0.0;
  for (int64_t g = threadIdx.x; g < B; g += blockDim.x) m2 += chan_term(ws[g], ws[B + g], mu, G);
  m2 = block_sum(m2, smem);
  if (threadIdx.x == 0) ws[2 * B] = scale_denominator(m2, B * G, GRPO_SCALE_BATCH, eps);
}

__global__ void __launch_bounds__(kThreads)
apply_batch_kernel(const float* __restrict__ r, float* __restrict__ adv,
                   const double* __restrict__ ws, int64_t B, int64_t G) {
  const double denom = ws[2 * B];
  const int64_t n = B * G;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    adv[i] = float((double(r[i]) - ws[i / G]) / denom);
}

}  // namespace
}  // namespace grpo

GRPO_API int64_t grpo_group_advantages_workspace_size(int64_t num_groups) {
  return 2 * num_groups + 1;  // group means, group M2s, batch (std + eps)
}

GRPO_API int grpo_group_advantages(const float* rewards, float* advantages, double* workspace,
                                   int64_t num_groups, int64_t group_size, int scale, float eps,
                                   cudaStream_t stream) {
  using namespace grpo;
  if (num_groups < 0 || group_size < 1 || scale < GRPO_SCALE_GROUP || scale > GRPO_SCALE_NONE)
    return cudaErrorInvalidValue;
  if (scale == GRPO_SCALE_BATCH && workspace == nullptr) return cudaErrorInvalidValue;
  if (num_groups == 0) return cudaSuccess;
  const int64_t B = num_groups, G = group_size;
  if (G <= kWarpMaxGroup) {
    const int64_t teams_per_block = kThreads / kWarp;
    group_kernel<false><<<grid_for((B + teams_per_block - 1) / teams_per_block), kThreads, 0, stream>>>(
        rewards, advantages, workspace, B, G, scale, eps);
  } else {
    group_kernel<true><<<grid_for(B), kThreads, 0, stream>>>(rewards, advantages, workspace, B, G,
                                                             scale, eps);
  }
  if (scale == GRPO_SCALE_BATCH) {
    batch_std_kernel<<<1, 1024, 0, stream>>>(workspace, B, G, eps);
    apply_batch_kernel<<<grid_for((B * G + kThreads - 1) / kThreads, 65536), kThreads, 0, stream>>>(
        rewards, advantages, workspace, B, G);
  }
  return static_cast<int>(cudaGetLastError());
}
