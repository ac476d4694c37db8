// Online softmax over one logits row, split across the threads of a block: what ONE thread does.
//
// Everything here is __host__ __device__: the kernels in logprobs.cu call it with threadIdx.x,
// the host emulator (csrc/emulate/emulate.cu) calls it for every tid in turn, so the CPU tests
// check this exact arithmetic (alignment split, vectors, −inf/NaN handling) without a GPU.
//
//   z = x / temp,  state over some z:  m = max z,  s = Σ e^(z − m),  u = Σ e^(z − m)(z − m)
//   lse = m + log s,   H = −Σ p log p = log s − u / s           (u only when entropy is wanted)
//   two states merge as  s = s_a e^(m_a − m) + s_b e^(m_b − m),
//                        u = e^(m_a − m)(u_a + (m_a − m) s_a) + (same for b)
//   backward:  d x_j = ( g (1[j = y] − p_j) − g_H p_j (log p_j + H) ) / temp
#pragma once

#include "common.cuh"

namespace grpo {

constexpr int kUnroll = 4;  // vectors loaded before any is used: kUnroll × 16 B in flight
constexpr float kLog2e = 1.4426950408889634f;

// e^d as one MUFU ex2; the reference uses expf: differences are fp32 rounding.
__host__ __device__ __forceinline__ float fast_exp(float d) { return exp2f(d * kLog2e); }

struct State {
  float m, s, u;
};

__host__ __device__ __forceinline__ State empty_state() { return State{-INFINITY, 0.f, 0.f}; }

// Fold K more values into the state; one rescale per call, not per element.
template <bool kEntropy, int K>
__host__ __device__ __forceinline__ void absorb(State& st, const float (&z)[K]) {
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
__host__ __device__ __forceinline__ void merge(State& a, const State& b) {
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

template <typename T, bool kEntropy>
__host__ __device__ __forceinline__ void absorb_vec(State& st, const Vec<T>& v, float inv_temp) {
  float z[Vec<T>::kN];
#pragma unroll
  for (int e = 0; e < Vec<T>::kN; ++e) z[e] = to_float(v.v[e]) * inv_temp;
  absorb<kEntropy>(st, z);
}

// The part of a row of V logits that thread `tid` of `nthreads` reads: its scalar head/tail
// elements and every nthreads-th 16-byte vector (coalesced across the block).
template <typename T, bool kEntropy>
__host__ __device__ __forceinline__ State thread_state(const T* row, int64_t V, float inv_temp,
                                                       int tid, int nthreads) {
  const RowSplit sp = split_row<T>(row, V);
  State st = empty_state();
  for (int64_t j = tid; j < sp.head; j += nthreads) {
    const float z[1] = {to_float(row[j]) * inv_temp};
    absorb<kEntropy>(st, z);
  }
  for (int64_t j = sp.tail + tid; j < V; j += nthreads) {
    const float z[1] = {to_float(row[j]) * inv_temp};
    absorb<kEntropy>(st, z);
  }
  const Vec<T>* vrow = reinterpret_cast<const Vec<T>*>(row + sp.head);
  // Whole groups of kUnroll vectors (all loads issued before any is used), then the remainder one
  // vector at a time. No bounds test inside a group: with one, ptxas kept the group in local
  // memory for some types/targets (the compile check's spill column, bench/compile_check.py).
  const int64_t group = int64_t(kUnroll) * nthreads;
  int64_t i = tid;
  for (; i + (kUnroll - 1) * int64_t(nthreads) < sp.nvec; i += group) {
    Vec<T> v[kUnroll];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) v[r] = vrow[i + r * nthreads];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) absorb_vec<T, kEntropy>(st, v[r], inv_temp);
  }
  for (; i < sp.nvec; i += nthreads) absorb_vec<T, kEntropy>(st, vrow[i], inv_temp);
  return st;
}

// Outputs of one token from the merged state of its row.
template <typename T, bool kEntropy>
__host__ __device__ __forceinline__ void finish_token(const State& st, const T* row, int64_t V,
                                                      int64_t y, float inv_temp, float* logp,
                                                      float* lse, float* entropy) {
  const float log_s = logf(st.s);
  const float l = st.m + log_s;  // lse = m + log Σ e^(z − m)
  *lse = l;
  *logp = (y >= 0 && y < V) ? to_float(row[y]) * inv_temp - l : NAN;
  if (kEntropy) *entropy = log_s - st.u / st.s;  // H = log s − Σ p (z − m)
}

// d x_j for one element; g and gh are already divided by temp.
template <bool kEntropy>
__host__ __device__ __forceinline__ float dlogit(float x, bool is_label, float inv_temp, float lse,
                                                 float g, float gh, float H) {
  const float logp = x * inv_temp - lse;  // log p_j
  const float p = fast_exp(logp);
  float d = (is_label ? g : 0.f) - g * p;              // g (1[j = y] − p_j)
  if (kEntropy && p > 0.f) d -= gh * p * (logp + H);  // − g_H p_j (log p_j + H)
  return d;
}

// Thread `tid`'s share of the backward of one row: same split as thread_state. row and grow may
// alias (in-place): each element is read, then written, by the same thread.
template <typename T, bool kEntropy>
__host__ __device__ __forceinline__ void thread_grad(const T* row, T* grow, int64_t V, int64_t y,
                                                     float inv_temp, float l, float g, float gh,
                                                     float H, int tid, int nthreads) {
  constexpr int kN = Vec<T>::kN;
  const RowSplit sp = split_row<T>(row, V, grow);
  for (int64_t j = tid; j < sp.head; j += nthreads)
    grow[j] = from_float<T>(dlogit<kEntropy>(to_float(row[j]), j == y, inv_temp, l, g, gh, H));
  for (int64_t j = sp.tail + tid; j < V; j += nthreads)
    grow[j] = from_float<T>(dlogit<kEntropy>(to_float(row[j]), j == y, inv_temp, l, g, gh, H));
  const Vec<T>* vrow = reinterpret_cast<const Vec<T>*>(row + sp.head);
  Vec<T>* vgrow = reinterpret_cast<Vec<T>*>(grow + sp.head);
  // d x of vector vi, written back in place of its logits
  auto grad_vec = [&](Vec<T>& v, int64_t vi) {
    const int64_t j0 = sp.head + vi * kN;  // column of the vector's first element
#pragma unroll
    for (int e = 0; e < kN; ++e)
      v.v[e] = from_float<T>(dlogit<kEntropy>(to_float(v.v[e]), j0 + e == y, inv_temp, l, g, gh, H));
    vgrow[vi] = v;
  };
  const int64_t group = int64_t(kUnroll) * nthreads;  // whole groups, then the remainder (as above)
  int64_t i = tid;
  for (; i + (kUnroll - 1) * int64_t(nthreads) < sp.nvec; i += group) {
    Vec<T> v[kUnroll];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) v[r] = vrow[i + r * nthreads];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) grad_vec(v[r], i + r * nthreads);
  }
  for (; i < sp.nvec; i += nthreads) {
    Vec<T> v = vrow[i];
    grad_vec(v, i);
  }
}

// Where row p = n·T + t of an (N, T, V) tensor with strides (stride_n, stride_t, 1) starts.
__host__ __device__ __forceinline__ int64_t row_offset(int64_t p, int64_t T, int64_t stride_n,
                                                       int64_t stride_t) {
  return (p / T) * stride_n + (p % T) * stride_t;
}

}  // namespace grpo
