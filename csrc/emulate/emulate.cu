// Host emulation of the kernels, for the CPU test tier (no GPU needed).
//
// Built by `build_cuda.build_emulator()` into libgrpo_core_cuda_emulate.so (host code only) and
// driven from tests/test_cuda_build.py with CPU tensors. It runs the SAME __host__ __device__
// functions as the kernels (softmax.cuh, group_stats.cuh): each "thread" tid of a block of
// `nthreads` walks its share of the row (scalar head, 16-byte vectors, scalar tail) exactly as on
// the GPU; only the warp-shuffle/shared-memory merge is replaced by a sequential merge.
// Not emulated: block_merge/block_sum themselves, grid-stride loops, streams.
#include "../group_stats.cuh"
#include "../softmax.cuh"

#include <vector>

using namespace grpo;

namespace {

template <typename T, bool kEntropy>
void fwd(const void* logits, int64_t T_, int64_t V, int64_t sn, int64_t st, const int64_t* rows,
         const int64_t* labels, int64_t K, float temperature, float* logp, float* lse,
         float* entropy, int nthreads) {
  const float inv_temp = 1.0f / temperature;
  for (int64_t k = 0; k < K; ++k) {
    const T* row = static_cast<const T*>(logits) + row_offset(rows[k], T_, sn, st);
    State acc = empty_state();
    for (int tid = 0; tid < nthreads; ++tid)
      merge<kEntropy>(acc, thread_state<T, kEntropy>(row, V, inv_temp, tid, nthreads));
    finish_token<T, kEntropy>(acc, row, V, labels[k], inv_temp, logp + k, lse + k,
                              kEntropy ? entropy + k : nullptr);
  }
}

template <typename T, bool kEntropy>
void bwd(const void* logits, int64_t T_, int64_t V, int64_t sn, int64_t st, const int64_t* rows,
         const int64_t* labels, const float* lse, const float* g, const float* H, const float* gH,
         int64_t K, float temperature, void* grad, int64_t gsn, int64_t gst, int nthreads) {
  const float inv_temp = 1.0f / temperature;
  for (int64_t k = 0; k < K; ++k) {
    const T* row = static_cast<const T*>(logits) + row_offset(rows[k], T_, sn, st);
    T* grow = static_cast<T*>(grad) + row_offset(rows[k], T_, gsn, gst);
    for (int tid = 0; tid < nthreads; ++tid)
      thread_grad<T, kEntropy>(row, grow, V, labels[k], inv_temp, lse[k], g[k] * inv_temp,
                               kEntropy ? gH[k] * inv_temp : 0.f, kEntropy ? H[k] : 0.f, tid,
                               nthreads);
  }
}

template <typename T>
void fwd_any(bool ent, const void* x, int64_t T_, int64_t V, int64_t sn, int64_t st,
             const int64_t* rows, const int64_t* ys, int64_t K, float temp, float* logp,
             float* lse, float* entropy, int nt) {
  if (ent) fwd<T, true>(x, T_, V, sn, st, rows, ys, K, temp, logp, lse, entropy, nt);
  else fwd<T, false>(x, T_, V, sn, st, rows, ys, K, temp, logp, lse, entropy, nt);
}

template <typename T>
void bwd_any(const void* x, int64_t T_, int64_t V, int64_t sn, int64_t st, const int64_t* rows,
             const int64_t* ys, const float* lse, const float* g, const float* H, const float* gH,
             int64_t K, float temp, void* grad, int64_t gsn, int64_t gst, int nt) {
  if (gH != nullptr) bwd<T, true>(x, T_, V, sn, st, rows, ys, lse, g, H, gH, K, temp, grad, gsn, gst, nt);
  else bwd<T, false>(x, T_, V, sn, st, rows, ys, lse, g, H, gH, K, temp, grad, gsn, gst, nt);
}

}  // namespace

GRPO_API int grpo_emulate_token_logprobs_fwd(const void* logits, int dtype, int64_t T, int64_t V,
                                             int64_t stride_n, int64_t stride_t,
                                             const int64_t* rows, const int64_t* labels,
                                             int64_t K, float temperature, float* logp,
                                             float* lse, float* entropy, int nthreads) {
  const bool ent = entropy != nullptr;
  switch (dtype) {
    case GRPO_DTYPE_FLOAT32:
      fwd_any<float>(ent, logits, T, V, stride_n, stride_t, rows, labels, K, temperature, logp, lse, entropy, nthreads);
      return 0;
    case GRPO_DTYPE_BFLOAT16:
      fwd_any<__nv_bfloat16>(ent, logits, T, V, stride_n, stride_t, rows, labels, K, temperature, logp, lse, entropy, nthreads);
      return 0;
    case GRPO_DTYPE_FLOAT16:
      fwd_any<__half>(ent, logits, T, V, stride_n, stride_t, rows, labels, K, temperature, logp, lse, entropy, nthreads);
      return 0;
  }
  return 1;
}

GRPO_API int grpo_emulate_token_logprobs_bwd(const void* logits, int dtype, int64_t T, int64_t V,
                                             int64_t stride_n, int64_t stride_t,
                                             const int64_t* rows, const int64_t* labels,
                                             const float* lse, const float* grad_logp,
                                             const float* entropy, const float* grad_entropy,
                                             int64_t K, float temperature, void* grad,
                                             int64_t grad_stride_n, int64_t grad_stride_t,
                                             int nthreads) {
  switch (dtype) {
    case GRPO_DTYPE_FLOAT32:
      bwd_any<float>(logits, T, V, stride_n, stride_t, rows, labels, lse, grad_logp, entropy, grad_entropy, K, temperature, grad, grad_stride_n, grad_stride_t, nthreads);
      return 0;
    case GRPO_DTYPE_BFLOAT16:
      bwd_any<__nv_bfloat16>(logits, T, V, stride_n, stride_t, rows, labels, lse, grad_logp, entropy, grad_entropy, K, temperature, grad, grad_stride_n, grad_stride_t, nthreads);
      return 0;
    case GRPO_DTYPE_FLOAT16:
      bwd_any<__half>(logits, T, V, stride_n, stride_t, rows, labels, lse, grad_logp, entropy, grad_entropy, K, temperature, grad, grad_stride_n, grad_stride_t, nthreads);
      return 0;
  }
  return 1;
}

// Same two-pass fp64 statistics and formulas as advantages.cu, one group after another.
GRPO_API int grpo_emulate_group_advantages(const float* r, float* adv, int64_t B, int64_t G,
                                           int scale, float eps) {
  std::vector<double> mean(B), m2(B);  // what group_kernel writes to the workspace
  for (int64_t g = 0; g < B; ++g) {
    double sum = 0.0, sq = 0.0;
    for (int64_t i = 0; i < G; ++i) sum += r[g * G + i];
    mean[g] = sum / double(G);
    for (int64_t i = 0; i < G; ++i) sq += (r[g * G + i] - mean[g]) * (r[g * G + i] - mean[g]);
    m2[g] = sq;
  }
  double batch_denom = 1.0;  // batch_std_kernel
  if (scale == GRPO_SCALE_BATCH) {
    double mu = 0.0, total = 0.0;
    for (int64_t g = 0; g < B; ++g) mu += mean[g];
    mu /= double(B);
    for (int64_t g = 0; g < B; ++g) total += chan_term(mean[g], m2[g], mu, G);
    batch_denom = scale_denominator(total, B * G, GRPO_SCALE_BATCH, eps);
  }
  for (int64_t g = 0; g < B; ++g) {
    const double denom = scale == GRPO_SCALE_BATCH ? batch_denom : scale_denominator(m2[g], G, scale, eps);
    for (int64_t i = 0; i < G; ++i) adv[g * G + i] = float((r[g * G + i] - mean[g]) / denom);
  }
  return 0;
}
