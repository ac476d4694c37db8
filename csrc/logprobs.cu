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
// Deviation from the reference: exp is computed as exp2f((z − m) · log2 e) (one MUFU op); the
// reference uses torch's expf. Differences are at the fp32 rounding level (tests hold them).
#include "common.cuh"

namespace grpo {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float fast_exp(float d) { return exp2f(d * kLog2e); }

// Where row p = n·T + t of an (N, T, V) tensor with strides (stride_n, stride_t, 1) starts.
struct Layout {
  int64_t T, V, stride_n, stride_t;
  __device__ __forceinline__ int64_t offset(int64_t p) const {
    return (p / T) * stride_n + (p % T) * stride_t;
  }
};

// Online softmax state over some z values:  m = max z,  s = Σ e^(z − m),
// u = Σ e^(z − m) (z − m)  (entropy only).  Then lse = m + log s and H = log s − u / s.
struct State {
  float m, s, u;
};

// Fold K more values into the state; one rescale per call, not per element.
template <bool kEntropy, int K>
__device__ __forceinline__ void absorb(State& st, const float (&z)[K]) {
  float cm = z[0];
#pragma unroll
  for (int k = 1; k < K; ++k) cm = fmaxf(cm, z[k]);
  if (cm != cm) st.s = NAN;  // all-NaN chunk: fmaxf would hide it
  if (cm > st.m) {           // new max: s·e^(m_old − m_new); u shifts by (m_old − m_new)·s too
    if (st.m != -INFINITY) {
      const float c = fast_exp(st.m - cm);
      if (kEntropy) st.u = c * (st.u + (st.m - cm) * st.s);
      st.s *= c;
    }
    st.m = cm;
  }
  if (st.m == -INFINITY) return;  // only −inf logits so far: they add nothing
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = z[k] - st.m;
    const float e = fast_exp(d);
    st.s += e;
    if (kEntropy) st.u += e > 0.f ? e * d : 0.f;  // e = 0 for z = −inf: 0·(−inf) would be NaN
  }
}

template <bool kEntropy>
__device__ __forceinline__ void merge(State& a, const State& b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return;  // both empty
  const float ca = a.m == -INFINITY ? 0.f : fast_exp(a.m - m);
  const float cb = b.m == -INFINITY ? 0.f : fast_exp(b.m - m);
  if (kEntropy) {
    const float ua = a.m == -INFINITY ? 0.f : ca * (a.u + (a.m - m) * a.s);
    const float ub = b.m == -INFINITY ? 0.f : cb * (b.u + (b.m - m) * b.s);
    a.u = ua + ub;
  }
  a.s = a.s * ca + b.s * cb;
  a.m = m;
}

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
    st = lane < int(blockDim.x / kWarp) ? smem[lane] : State{-INFINITY, 0.f, 0.f};
    warp_merge<kEntropy>(st);
  }
  return st;
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
logprobs_fwd_kernel(const T* __restrict__ logits, Layout lay, const int64_t* __restrict__ rows,
                    const int64_t* __restrict__ labels, int64_t K, float inv_temp,
                    float* __restrict__ logp, float* __restrict__ lse, float* __restrict__ entropy) {
  __shared__ State smem[kWarp];
  constexpr int kN = Vec<T>::kN;
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const T* row = logits + lay.offset(rows[k]);
    const RowSplit sp = split_row<T>(row, lay.V);
    State st{-INFINITY, 0.f, 0.f};
    for (int64_t j = threadIdx.x; j < sp.head; j += blockDim.x) {
      const float z[1] = {to_float(row[j]) * inv_temp};
      absorb<kEntropy>(st, z);
    }
    for (int64_t j = sp.tail + threadIdx.x; j < lay.V; j += blockDim.x) {
      const float z[1] = {to_float(row[j]) * inv_temp};
      absorb<kEntropy>(st, z);
    }
    const Vec<T>* vrow = reinterpret_cast<const Vec<T>*>(row + sp.head);
    for (int64_t i = threadIdx.x; i < sp.nvec; i += int64_t(kUnroll) * blockDim.x) {
      Vec<T> v[kUnroll];  // issue all loads first, then compute: kUnroll × 16 B in flight
#pragma unroll
      for (int r = 0; r < kUnroll; ++r)
        if (i + r * blockDim.x < sp.nvec) v[r] = vrow[i + r * blockDim.x];
#pragma unroll
      for (int r = 0; r < kUnroll; ++r) {
        if (i + r * blockDim.x >= sp.nvec) break;
        float z[kN];
#pragma unroll
        for (int e = 0; e < kN; ++e) z[e] = to_float(v[r].v[e]) * inv_temp;
        absorb<kEntropy>(st, z);
      }
    }
    st = block_merge<kEntropy>(st, smem);
    if (threadIdx.x == 0) {
      const float log_s = logf(st.s);
      const float l = st.m + log_s;  // lse = m + log Σ e^(z − m)
      lse[k] = l;
      const int64_t y = labels[k];
      logp[k] = (y >= 0 && y < lay.V) ? to_float(row[y]) * inv_temp - l : NAN;
      if (kEntropy) entropy[k] = log_s - st.u / st.s;  // H = log s − Σ p (z − m)
    }
  }
}

// d x_j for one element; g and gh are already divided by temp.
template <bool kEntropy>
__device__ __forceinline__ float dlogit(float x, bool is_label, float inv_temp, float lse, float g,
                                        float gh, float H) {
  const float logp = x * inv_temp - lse;  // log p_j
  const float p = fast_exp(logp);
  float d = (is_label ? g : 0.f) - g * p;  // g (1[j = y] − p_j)
  if (kEntropy && p > 0.f) d -= gh * p * (logp + H);  // − g_H p_j (log p_j + H)
  return d;
}

template <typename T, bool kEntropy>
__global__ void __launch_bounds__(kThreads)
logprobs_bwd_kernel(const T* logits, Layout lay, const int64_t* __restrict__ rows,
                    const int64_t* __restrict__ labels, const float* __restrict__ lse,
                    const float* __restrict__ grad_logp, const float* __restrict__ entropy,
                    const float* __restrict__ grad_entropy, int64_t K, float inv_temp, T* grad,
                    int64_t gstride_n, int64_t gstride_t) {
  // logits and grad may alias (in-place backward): every element is read, then written, by the
  // same thread, so no __restrict__ on them and no hazard.
  constexpr int kN = Vec<T>::kN;
  for (int64_t k = blockIdx.x; k < K; k += gridDim.x) {
    const int64_t p = rows[k];
    const T* row = logits + lay.offset(p);
    T* grow = grad + (p / lay.T) * gstride_n + (p % lay.T) * gstride_t;
    const int64_t y = labels[k];
    const float l = lse[k], g = grad_logp[k] * inv_temp;
    const float gh = kEntropy ? grad_entropy[k] * inv_temp : 0.f;
    const float H = kEntropy ? entropy[k] : 0.f;
    const RowSplit sp = split_row<T>(row, lay.V, grow);
    for (int64_t j = threadIdx.x; j < sp.head; j += blockDim.x)
      grow[j] = from_float<T>(dlogit<kEntropy>(to_float(row[j]), j == y, inv_temp, l, g, gh, H));
    for (int64_t j = sp.tail + threadIdx.x; j < lay.V; j += blockDim.x)
      grow[j] = from_float<T>(dlogit<kEntropy>(to_float(row[j]), j == y, inv_temp, l, g, gh, H));
    const Vec<T>* vrow = reinterpret_cast<const Vec<T>*>(row + sp.head);
    Vec<T>* vgrow = reinterpret_cast<Vec<T>*>(grow + sp.head);
    for (int64_t i = threadIdx.x; i < sp.nvec; i += int64_t(kUnroll) * blockDim.x) {
      Vec<T> v[kUnroll];
#pragma unroll
      for (int r = 0; r < kUnroll; ++r)
        if (i + r * blockDim.x < sp.nvec) v[r] = vrow[i + r * blockDim.x];
#pragma unroll
      for (int r = 0; r < kUnroll; ++r) {
        const int64_t vi = i + r * blockDim.x;
        if (vi >= sp.nvec) break;
        const int64_t j0 = sp.head + vi * kN;  // column of the first element of this vector
#pragma unroll
        for (int e = 0; e < kN; ++e)
          v[r].v[e] = from_float<T>(
              dlogit<kEntropy>(to_float(v[r].v[e]), j0 + e == y, inv_temp, l, g, gh, H));
        vgrow[vi] = v[r];
      }
    }
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
