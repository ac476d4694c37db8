// The formulas of the group advantages, shared by the kernels (advantages.cu) and the host
// emulator (emulate/emulate.cu) so the CPU tests check them without a GPU.
#pragma once

#include "common.cuh"

namespace grpo {

// The divisor of (r − mean_g) for a sample whose std is taken over n rewards with sum of squared
// deviations m2:  group/batch → unbiased std + eps (n = 1 → std 0),  none → 1 (Dr. GRPO).
__host__ __device__ __forceinline__ double scale_denominator(double m2, int64_t n, int scale,
                                                             float eps) {
  if (scale == GRPO_SCALE_NONE) return 1.0;
  return (n > 1 ? sqrt(m2 / double(n - 1)) : 0.0) + double(eps);
}

// One group's share of the batch M2 (Chan et al. merge for equal group sizes G):
//   M2_batch = Σ_g [ M2_g + G (mean_g − mean)^2 ],   mean = mean of the group means.
__host__ __device__ __forceinline__ double chan_term(double mean_g, double m2_g, double mean,
                                                     int64_t G) {
  const double d = mean_g - mean;
  return m2_g + double(G) * d * d;
}

}  // namespace grpo
