/* grpo_core CUDA kernels: the C ABI of libgrpo_core_cuda.so.
 *
 * Every launcher takes raw device pointers, sizes, strides (in elements) and a cudaStream_t, and
 * returns a cudaError_t as int (0 = success; the launch is asynchronous on `stream`).
 * grpo_core/kernels/cuda.py binds these with ctypes; keep both in step and bump
 * GRPO_CORE_CUDA_ABI_VERSION when a signature changes (Python refuses a library of another ABI).
 */
#ifndef GRPO_CORE_CUDA_H_
#define GRPO_CORE_CUDA_H_

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
#define GRPO_API extern "C" __attribute__((visibility("default")))
#else
#define GRPO_API __attribute__((visibility("default")))
#endif

#define GRPO_CORE_CUDA_ABI_VERSION 1

/* dtype tags of the logits / gradient buffers */
#define GRPO_DTYPE_FLOAT32 0
#define GRPO_DTYPE_BFLOAT16 1
#define GRPO_DTYPE_FLOAT16 2

/* advantage scales, as grpo_core.advantages.SCALES */
#define GRPO_SCALE_GROUP 0
#define GRPO_SCALE_BATCH 1
#define GRPO_SCALE_NONE 2

/* ---- library facts (no CUDA calls: safe without a GPU) ---- */
GRPO_API int grpo_core_cuda_abi_version(void);
GRPO_API int grpo_core_cuda_runtime_version(void); /* CUDART_VERSION it was built against */
GRPO_API const char* grpo_core_cuda_error_string(int code);

/* Can the kernels run on `device`? Checks driver >= runtime and that a kernel image exists for the
 * device's architecture. Restores the calling thread's current device. */
GRPO_API int grpo_core_cuda_probe(int device);

/* ---- group advantages (csrc/advantages.cu) ----
 * rewards (num_groups * group_size,) fp32, consecutive groups -> advantages (same shape) fp32.
 * workspace: grpo_group_advantages_workspace_size(num_groups) doubles (only used by scale=batch;
 * may be NULL for the other scales). */
GRPO_API int64_t grpo_group_advantages_workspace_size(int64_t num_groups);
GRPO_API int grpo_group_advantages(const float* rewards, float* advantages, double* workspace,
                                   int64_t num_groups, int64_t group_size, int scale, float eps,
                                   cudaStream_t stream);

/* ---- token log-probs (csrc/logprobs.cu) ----
 * logits: (N, T, V) with strides (stride_n, stride_t, 1), dtype tag as above.
 * rows (K,) int64: flat positions p = n*T + t of the valid tokens; labels (K,) int64 their ids.
 * Forward writes per valid token k: logp[k] = x_y/temp - lse[k], lse[k] = logsumexp(x/temp),
 * entropy[k] (if not NULL) = -sum_j p_j log p_j.  All fp32, length K. */
GRPO_API int grpo_token_logprobs_fwd(const void* logits, int dtype, int64_t T, int64_t V,
                                     int64_t stride_n, int64_t stride_t, const int64_t* rows,
                                     const int64_t* labels, int64_t num_valid, float temperature,
                                     float* logp, float* lse, float* entropy, cudaStream_t stream);

/* Backward: for each valid token k (row p = rows[k]), with p_j = softmax(x/temp)_j:
 *   d x_j = ( g[k] (1[j = y] - p_j) - gH[k] p_j (log p_j + H[k]) ) / temp
 * written in the logits' dtype into grad_logits (strides grad_stride_n, grad_stride_t, 1); rows
 * not listed are not touched (zero-initialise them). grad_entropy/entropy may be NULL (gH = 0).
 * grad_logits may alias logits (same strides) for an in-place backward. */
GRPO_API int grpo_token_logprobs_bwd(const void* logits, int dtype, int64_t T, int64_t V,
                                     int64_t stride_n, int64_t stride_t, const int64_t* rows,
                                     const int64_t* labels, const float* lse, const float* grad_logp,
                                     const float* entropy, const float* grad_entropy,
                                     int64_t num_valid, float temperature, void* grad_logits,
                                     int64_t grad_stride_n, int64_t grad_stride_t,
                                     cudaStream_t stream);

#endif /* GRPO_CORE_CUDA_H_ */
