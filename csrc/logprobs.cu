// Token log-probs on logits, forward and backward: the CUDA twin of grpo_core/logprobs.py.
//
//   z = x / temp,  lse = log Σ_j exp(z_j),  logp = z_y − lse,  H = −Σ_j p_j log p_j,  p = softmax(z)
//   backward:  d x_j = ( g (1[j = y] − p_j) − g_H p_j (log p_j + H) ) / temp
//
// Work only on valid tokens: the launchers take `rows`, the flat positions n·T + t of the K
// counted tokens (padding is never read), and the grid is 1-D over those K tokens, one block of
// kThreads per token (grid-stride, so no 65,535 limit). Each block streams its row once in 16-byte
// vectors (8 bf16/fp16 or 4 fp32 per load, kUnroll loads in flight per thread) and keeps an online
// softmax state in fp32 (running max m, rescaled sum s; Milakov & Gimelshein 2018), merged across
// the block with warp shuffles and shared memory. Rows need not be 16-byte aligned (V = 1000 in
// bf16 is 2000 bytes): a short scalar head reaches the boundary, then vectors, then a scalar tail.
// Cost per valid token: forward reads V elements, writes 2–3 floats; backward reads V and writes
// V elements (ideal fused traffic: 6 bytes per bf16 logit for forward + backward).
//
// What one thread does with its share of a row (split, vectors, online softmax, backward formula)
// lives in softmax.cuh, shared with the host emulator the CPU tests run; this file adds the block
// merge, the kernels and the C launchers.
//
// Deviation from the reference: exp is computed as exp2f((z − m) · log2 e) (one MUFU op); the
// reference uses torch's expf. Differences are at the fp32 rounding level (tests hold them).
#include "softmax.cuh"

namespace grpo {
namespace {

constexpr int kThreads = 256;

struct Layout {
  int64_t T, V, stride_n, stride_t;
};

template <bool kEntropy>
__device__ __forceinline__ void warp_merge(State& st) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    State o;
    o.m = __shfl_xor_sync(0xffffffffu, st.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, st.s, off);
    o.u = __shfl_xor_sync(0xffffffffu, st.u, off);
    merge<kEntropy>(st, o);
  }
}

// Merge the states of the whole block; the result is valid in thread 0.
template <bool kEntropy>
__device__ __forceinline__ State block_merge(State st, State* smem) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  warp_merge<kEntropy>(st);
  __syncthreads();  // the previous token's merge may still be reading smem
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < int(blockDim.x / kWarp) ? smem[lane] : empty_state();
    warp_merge<kEntropy>(st);
  }
  return st;
}

// One block per valid token k (grid-stride over the K tokens).
template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
logprobs_fwd_kernel(const T* __restrict__ logits, Layout lay, const int64_t* __restrict__ rows,
                    const int64_t* __restrict__ labels, int64_t K, float inv_temp,
                    float* __restrict__ logp, float* __restrict__ lse, float* __restrict__ entropy) {
  __shared__ State smem[kWarp];
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const T* row = logits + row_offset(rows[k], lay.T, lay.stride_n, lay.stride_t);
    State st = thread_state<T, kEntropy>(row, lay.V, inv_temp, threadIdx.x, blockDim.x);
    st = block_merge<kEntropy>(st, smem);
    if (threadIdx.x == 0)
      finish_token<T, kEntropy>(st, row, lay.V, labels[k], inv_temp, logp + k, lse + k,
                                kEntropy ? entropy + k : nullptr);
  }
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
logprobs_bwd_kernel(const T* logits, Layout lay, const int64_t* __restrict__ rows,
                    const int64_t* __restrict__ labels, const float* __restrict__ lse,
                    const float* __restrict__ grad_logp, const float* __restrict__ entropy,
                    const float* __restrict__ grad_entropy, int64_t K, float inv_temp, T* grad,
                    int64_t gstride_n, int64_t gstride_t) {
  // logits and grad may alias (in-place backward), hence no __restrict__ on them.
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const int64_t p = rows[k];
    const T* row = logits + row_offset(p, lay.T, lay.stride_n, lay.stride_t);
    T* grow = grad + row_offset(p, lay.T, gstride_n, gstride_t);
    const float gh = kEntropy ? grad_entropy[k] * inv_temp : 0.f;
    const float H = kEntropy ? entropy[k] : 0.f;
    thread_grad<T, kEntropy>(row, grow, lay.V, labels[k], inv_temp, lse[k], grad_logp[k] * inv_temp,
                             gh, H, threadIdx.x, blockDim.x);
  }
}

template <typename T>
int launch_fwd(const void* logits, Layout lay, const int64_t* rows, const int64_t* labels,
               int64_t K, float inv_temp, float* logp, float* lse, float* entropy,
               cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  if (entropy != nullptr)
    logprobs_fwd_kernel<T, true><<<grid_for(K), kThreads, 0, stream>>>(x, lay, rows, labels, K,
                                                                        inv_temp, logp, lse, entropy);
  else
    logprobs_fwd_kernel<T, false><<<grid_for(K), kThreads, 0, stream>>>(x, lay, rows, labels, K,
                                                                         inv_temp, logp, lse, entropy);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_bwd(const void* logits, Layout lay, const int64_t* rows, const int64_t* labels,
               const float* lse, const float* g, const float* H, const float* gH, int64_t K,
               float inv_temp, void* grad, int64_t gsn, int64_t gst, cudaStream_t stream) {
  const T* x = static_cast<const T*>(logits);
  T* dx = static_cast<T*>(grad);
  if (gH != nullptr)
    logprobs_bwd_kernel<T, true><<<grid_for(K), kThreads, 0, stream>>>(
        x, lay, rows, labels, lse, g, H, gH, K, inv_temp, dx, gsn, gst);
  else
    logprobs_bwd_kernel<T, false><<<grid_for(K), kThreads, 0, stream>>>(
        x, lay, rows, labels, lse, g, H, gH, K, inv_temp, dx, gsn, gst);
  return static_cast<int>(cudaGetLastError());
}

bool bad_args(int64_t T, int64_t V, float temperature) {
  return T < 1 || V < 1 || !(temperature > 0.f) || temperature == INFINITY;
}

}  // namespace
}  // namespace grpo

GRPO_API int grpo_token_logprobs_fwd(const void* logits, int dtype, int64_t T, int64_t V,
                                     int64_t stride_n, int64_t stride_t, const int64_t* rows,
                                     const int64_t* labels, int64_t num_valid, float temperature,
                                     float* logp, float* lse, float* entropy, cudaStream_t stream) {
  using namespace grpo;
  if (num_valid == 0) return cudaSuccess;
  if (num_valid < 0 || bad_args(T, V, temperature)) return cudaErrorInvalidValue;
  const Layout lay{T, V, stride_n, stride_t};
  const float inv_temp = 1.0f / temperature;
  switch (dtype) {
    case GRPO_DTYPE_FLOAT32:
      return launch_fwd<float>(logits, lay, rows, labels, num_valid, inv_temp, logp, lse, entropy, stream);
    case GRPO_DTYPE_BFLOAT16:
      return launch_fwd<__nv_bfloat16>(logits, lay, rows, labels, num_valid, inv_temp, logp, lse,
                                       entropy, stream);
    case GRPO_DTYPE_FLOAT16:
      return launch_fwd<__half>(logits, lay, rows, labels, num_valid, inv_temp, logp, lse, entropy, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

GRPO_API int grpo_token_logprobs_bwd(const void* logits, int dtype, int64_t T, int64_t V,
                                     int64_t stride_n, int64_t stride_t, const int64_t* rows,
                                     const int64_t* labels, const float* lse, const float* grad_logp,
                                     const float* entropy, const float* grad_entropy,
                                     int64_t num_valid, float temperature, void* grad_logits,
                                     int64_t grad_stride_n, int64_t grad_stride_t,
                                     cudaStream_t stream) {
  using namespace grpo;
  if (num_valid == 0) return cudaSuccess;
  if (num_valid < 0 || bad_args(T, V, temperature)) return cudaErrorInvalidValue;
  if (grad_entropy != nullptr && entropy == nullptr) return cudaErrorInvalidValue;
  const Layout lay{T, V, stride_n, stride_t};
  const float inv_temp = 1.0f / temperature;
  switch (dtype) {
    case GRPO_DTYPE_FLOAT32:
      return launch_bwd<float>(logits, lay, rows, labels, lse, grad_logp, entropy, grad_entropy,
                               num_valid, inv_temp, grad_logits, grad_stride_n, grad_stride_t, stream);
    case GRPO_DTYPE_BFLOAT16:
      return launch_bwd<__nv_bfloat16>(logits, lay, rows, labels, lse, grad_logp, entropy,
                                       grad_entropy, num_valid, inv_temp, grad_logits,
                                       grad_stride_n, grad_stride_t, stream);
    case GRPO_DTYPE_FLOAT16:
      return launch_bwd<__half>(logits, lay, rows, labels, lse, grad_logp, entropy, grad_entropy,
                                num_valid, inv_temp, grad_logits, grad_stride_n, grad_stride_t, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
