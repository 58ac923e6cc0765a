// CUDA kernels of autoprune_ext: apply_mask, mask_backward and the auxiliary Adam step.
//
// No torch header: raw pointers, the launcher API of autoprune_kernels.h, cuda_runtime / cuda_bf16 /
// cuda_fp16 only (compiles with `nvcc -c -I csrc`). Every kernel is a grid-stride loop over groups of
// 8 elements with 64-bit indices; a group is read with 16-byte vector loads when it is whole and its
// pointer 16-byte aligned (the common case: torch allocations are), element by element otherwise.
// Dtypes are runtime arguments (uniform branches, negligible against memory traffic), so one kernel
// per compute type (float / double) serves every combination of fp32 / bf16 / fp16 / fp64 tensors.
// Formulas and rounding order follow autoprune_ext/reference.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "../nm_group.h"
#include "autoprune_kernels.h"

namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;                                     // elements per thread and iteration
constexpr int kMultiIters = 4;                              // multi-tensor Adam: groups per thread
constexpr int64_t kMultiChunk = kThreads * kVec * kMultiIters;  // elements per block
constexpr int kUnitThreadElems = 16;
constexpr int64_t kUnitChunk = kThreads * kUnitThreadElems;  // unit-granularity reduction: columns per block
constexpr int kMultiMaxTensors = 20;
constexpr int kMultiMaxBlocks = 160;

// ------------------------------------------------------------------------------------------------
// conversions
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }

__device__ __forceinline__ void put(float* d, float v) { *d = v; }
__device__ __forceinline__ void put(float* d, double v) { *d = static_cast<float>(v); }
__device__ __forceinline__ void put(double* d, float v) { *d = static_cast<double>(v); }
__device__ __forceinline__ void put(double* d, double v) { *d = v; }
__device__ __forceinline__ void put(__nv_bfloat16* d, float v) { *d = __float2bfloat16_rn(v); }
__device__ __forceinline__ void put(__nv_bfloat16* d, double v) { *d = __float2bfloat16_rn(static_cast<float>(v)); }
__device__ __forceinline__ void put(__half* d, float v) { *d = __float2half_rn(v); }
__device__ __forceinline__ void put(__half* d, double v) { *d = __float2half_rn(static_cast<float>(v)); }

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// elements [i0, i0 + 8) of p (those below n) as CT
template <typename T, typename CT>
__device__ __forceinline__ void load8_t(const T* __restrict__ p, int64_t i0, int64_t n, CT (&out)[kVec]) {
  if (i0 + kVec <= n && aligned16(p)) {
    alignas(16) T tmp[kVec];
    constexpr int nq = static_cast<int>(sizeof(T)) * kVec / 16;
    const uint4* src = reinterpret_cast<const uint4*>(p + i0);
#pragma unroll
    for (int q = 0; q < nq; ++q) reinterpret_cast<uint4*>(tmp)[q] = src[q];
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = static_cast<CT>(widen(tmp[k]));
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = i0 + k < n ? static_cast<CT>(widen(p[i0 + k])) : CT(0);
  }
}

template <typename T, typename CT>
__device__ __forceinline__ void store8_t(T* __restrict__ p, int64_t i0, int64_t n, const CT (&v)[kVec]) {
  if (i0 + kVec <= n && aligned16(p)) {
    alignas(16) T tmp[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) put(&tmp[k], v[k]);
    constexpr int nq = static_cast<int>(sizeof(T)) * kVec / 16;
    uint4* dst = reinterpret_cast<uint4*>(p + i0);
#pragma unroll
    for (int q = 0; q < nq; ++q) dst[q] = reinterpret_cast<const uint4*>(tmp)[q];
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (i0 + k < n) put(&p[i0 + k], v[k]);
  }
}

template <typename CT>
__device__ __forceinline__ void load8(const void* p, int dt, int64_t i0, int64_t n, CT (&out)[kVec]) {
  switch (dt) {
    case AP_F32: load8_t(static_cast<const float*>(p), i0, n, out); break;
    case AP_BF16: load8_t(static_cast<const __nv_bfloat16*>(p), i0, n, out); break;
    case AP_F16: load8_t(static_cast<const __half*>(p), i0, n, out); break;
    default: load8_t(static_cast<const double*>(p), i0, n, out); break;
  }
}

template <typename CT>
__device__ __forceinline__ void store8(void* p, int dt, int64_t i0, int64_t n, const CT (&v)[kVec]) {
  switch (dt) {
    case AP_F32: store8_t(static_cast<float*>(p), i0, n, v); break;
    case AP_BF16: store8_t(static_cast<__nv_bfloat16*>(p), i0, n, v); break;
    case AP_F16: store8_t(static_cast<__half*>(p), i0, n, v); break;
    default: store8_t(static_cast<double*>(p), i0, n, v); break;
  }
}

template <typename CT>
__device__ __forceinline__ CT load1(const void* p, int dt, int64_t i) {
  switch (dt) {
    case AP_F32: return static_cast<CT>(static_cast<const float*>(p)[i]);
    case AP_BF16: return static_cast<CT>(widen(static_cast<const __nv_bfloat16*>(p)[i]));
    case AP_F16: return static_cast<CT>(widen(static_cast<const __half*>(p)[i]));
    default: return static_cast<CT>(static_cast<const double*>(p)[i]);
  }
}

template <typename CT>
__device__ __forceinline__ void store1(void* p, int dt, int64_t i, CT v) {
  switch (dt) {
    case AP_F32: put(static_cast<float*>(p) + i, v); break;
    case AP_BF16: put(static_cast<__nv_bfloat16*>(p) + i, v); break;
    case AP_F16: put(static_cast<__half*>(p) + i, v); break;
    default: put(static_cast<double*>(p) + i, v); break;
  }
}

// raw element copies (apply_mask copies W bit for bit)
template <typename U>
__device__ __forceinline__ void load8_raw(const U* __restrict__ p, int64_t i0, int64_t n, U (&out)[kVec]) {
  if (i0 + kVec <= n && aligned16(p)) {
    constexpr int nq = static_cast<int>(sizeof(U)) * kVec / 16;
    const uint4* src = reinterpret_cast<const uint4*>(p + i0);
#pragma unroll
    for (int q = 0; q < nq; ++q) reinterpret_cast<uint4*>(out)[q] = src[q];
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = i0 + k < n ? p[i0 + k] : U(0);
  }
}
template <typename U>
__device__ __forceinline__ void store8_raw(U* __restrict__ p, int64_t i0, int64_t n, const U (&v)[kVec]) {
  if (i0 + kVec <= n && aligned16(p)) {
    constexpr int nq = static_cast<int>(sizeof(U)) * kVec / 16;
    uint4* dst = reinterpret_cast<uint4*>(p + i0);
#pragma unroll
    for (int q = 0; q < nq; ++q) dst[q] = reinterpret_cast<const uint4*>(v)[q];
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (i0 + k < n) p[i0 + k] = v[k];
  }
}

// ------------------------------------------------------------------------------------------------
// math
// ------------------------------------------------------------------------------------------------
__device__ __forceinline__ float softplus_(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
__device__ __forceinline__ double softplus_(double x) { return x > 20.0 ? x : log1p(exp(x)); }
__device__ __forceinline__ float sigmoid_(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double sigmoid_(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }
__device__ __forceinline__ float abs_(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_(double x) { return fabs(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }

// reference.surrogate: alpha in the compute precision (CT)
template <typename CT>
__device__ __forceinline__ CT surrogate(CT m, int kind, CT alpha) {
  switch (kind) {
    case AP_SOFTPLUS: return softplus_(m);
    case AP_SIGMOID: return sigmoid_(m);
    case AP_IDENTITY: return CT(1);
    case AP_LEAKY_RELU: return m > CT(0) ? CT(1) : alpha;
    case AP_LEAKY_RELU_REVERSED: return m > CT(0) ? alpha : CT(1);
    default: return m > CT(0) ? CT(1) : CT(0);
  }
}

// s(m) and s(-m) with one exp / log1p for softplus and sigmoid
template <typename CT>
__device__ __forceinline__ void surrogate_pair(CT x, int kind, CT alpha, CT& sp, CT& sn) {
  if (kind == AP_SOFTPLUS) {
    const CT l = log1p_(exp_(-abs_(x)));
    sp = x > CT(20) ? x : (x > CT(0) ? x : CT(0)) + l;
    sn = -x > CT(20) ? -x : (x < CT(0) ? -x : CT(0)) + l;
  } else if (kind == AP_SIGMOID) {
    const CT e = exp_(-abs_(x));
    const CT den = CT(1) + e;
    sp = (x >= CT(0) ? CT(1) : e) / den;
    sn = (-x >= CT(0) ? CT(1) : e) / den;
  } else {
    sp = surrogate(x, kind, alpha);
    sn = surrogate(-x, kind, alpha);
  }
}

template <typename CT>
__device__ __forceinline__ CT sign_(CT w) {
  return (w > CT(0) ? CT(1) : CT(0)) - (w < CT(0) ? CT(1) : CT(0));
}

__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }
__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// ------------------------------------------------------------------------------------------------
// apply_mask
// ------------------------------------------------------------------------------------------------
struct MaskParams {
  const void* weight;
  const void* aux;
  void* out;
  const void* grad;
  void* dW;
  void* dM;
  int64_t numel;
  int64_t row_len;  // 0: weight granularity
  int weight_dt, aux_dt, grad_dt;
  int surrogate, rule;
  double alpha;
};

// M values (as CM) of group i0: elementwise (weight granularity) or per row (unit)
template <typename CM>
__device__ __forceinline__ void load_mask8(const MaskParams& p, int64_t i0, CM (&m)[kVec]) {
  if (p.row_len == 0) {
    load8(p.aux, p.aux_dt, i0, p.numel, m);
    return;
  }
  int64_t r = i0 / p.row_len;
  int64_t next = (r + 1) * p.row_len;
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const int64_t idx = i0 + k;
    while (idx >= next) {
      ++r;
      next += p.row_len;
    }
    m[k] = idx < p.numel ? load1<CM>(p.aux, p.aux_dt, r) : CM(0);
  }
}

template <typename U, typename CM>
__global__ void __launch_bounds__(kThreads) apply_mask_kernel(MaskParams p) {
  const int64_t groups = (p.numel + kVec - 1) / kVec;
  const U* w = static_cast<const U*>(p.weight);
  U* out = static_cast<U*>(p.out);
  for (int64_t gi = global_thread(); gi < groups; gi += grid_stride()) {
    const int64_t i0 = gi * kVec;
    CM m[kVec];
    load_mask8(p, i0, m);
    alignas(16) U wv[kVec];
    alignas(16) U o[kVec];
    load8_raw(w, i0, p.numel, wv);
#pragma unroll
    for (int k = 0; k < kVec; ++k) o[k] = m[k] >= CM(0) ? wv[k] : U(0);
    store8_raw(out, i0, p.numel, o);
  }
}

// ------------------------------------------------------------------------------------------------
// mask_backward: elementwise part (dW for both granularities, dM for weight granularity)
// ------------------------------------------------------------------------------------------------
template <typename CT>
__global__ void __launch_bounds__(kThreads) backward_kernel(MaskParams p) {
  const int64_t groups = (p.numel + kVec - 1) / kVec;
  const CT alpha = static_cast<CT>(p.alpha);
  const bool need_m = p.dM != nullptr && p.row_len == 0;  // unit-granularity dM: unit_reduce_kernel
  for (int64_t gi = global_thread(); gi < groups; gi += grid_stride()) {
    const int64_t i0 = gi * kVec;
    CT g[kVec], m[kVec], o[kVec];
    load8(p.grad, p.grad_dt, i0, p.numel, g);
    load_mask8(p, i0, m);
    if (p.dW != nullptr) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) o[k] = g[k] * (m[k] >= CT(0) ? CT(1) : CT(0));
      store8(p.dW, p.weight_dt, i0, p.numel, o);
    }
    if (need_m) {
      CT w[kVec];
      load8(p.weight, p.weight_dt, i0, p.numel, w);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const CT c = p.rule == AP_RULE_SIGN ? sign_(w[k]) : w[k];
        o[k] = (g[k] * c) * surrogate(m[k], p.surrogate, alpha);
      }
      store8(p.dM, p.aux_dt, i0, p.numel, o);
    }
  }
}

// unit granularity dM, pass 1: block (c, r) sums g * c(W) over columns [c * kUnitChunk, ...) of row r
// into partial[r * gridDim.x + c] (per thread in CT, across the block in double)
template <typename CT>
__global__ void __launch_bounds__(kThreads) unit_reduce_kernel(MaskParams p, int64_t rows, double* partial) {
  __shared__ double warp_sums[kThreads / 32];
  const int64_t K = p.row_len;
  const int64_t c = blockIdx.x;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t lo = r * K + c * kUnitChunk;
    const int64_t hi = r * K + (K < (c + 1) * kUnitChunk ? K : (c + 1) * kUnitChunk);
    CT acc = CT(0);
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      const CT g = load1<CT>(p.grad, p.grad_dt, i);
      const CT w = load1<CT>(p.weight, p.weight_dt, i);
      acc += g * (p.rule == AP_RULE_SIGN ? sign_(w) : w);
    }
    double v = static_cast<double>(acc);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
      double s = 0.0;
#pragma unroll
      for (int j = 0; j < kThreads / 32; ++j) s += warp_sums[j];
      partial[r * gridDim.x + c] = s;
    }
    __syncthreads();
  }
}

// pass 2: dM[r] = (sum of the row's partials, in order) * s(M[r])
template <typename CT>
__global__ void __launch_bounds__(kThreads) unit_finish_kernel(MaskParams p, int64_t rows, int64_t tasks_per_row,
                                                                 const double* partial) {
  const CT alpha = static_cast<CT>(p.alpha);
  for (int64_t r = global_thread(); r < rows; r += grid_stride()) {
    double s = 0.0;
    for (int64_t c = 0; c < tasks_per_row; ++c) s += partial[r * tasks_per_row + c];
    const CT m = load1<CT>(p.aux, p.aux_dt, r);
    store1<CT>(p.dM, p.aux_dt, r, static_cast<CT>(s) * surrogate(m, p.surrogate, alpha));
  }
}

// ------------------------------------------------------------------------------------------------
// auxiliary Adam step
// ------------------------------------------------------------------------------------------------
template <typename CT>
__device__ __forceinline__ void adam_group(const ap_adam_tensor& t, const ap_adam_hyper& h, int64_t i0) {
  const int64_t n = t.numel;
  CT m[kVec], e1[kVec], e2[kVec], g[kVec];
  load8(t.aux, t.aux_dt, i0, n, m);
  load8(t.exp_avg, t.exp_avg_dt, i0, n, e1);
  load8(t.exp_avg_sq, t.exp_avg_sq_dt, i0, n, e2);
  const CT alpha = static_cast<CT>(h.alpha);
  const CT scale = static_cast<CT>(t.penalty_scale), rho = static_cast<CT>(h.rho);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    CT sp, sn;
    surrogate_pair(m[k], h.surrogate, alpha, sp, sn);
    g[k] = scale * (sp - rho * sn);
  }
  if (t.weight != nullptr) {
    CT w[kVec];
    load8(t.weight, t.weight_dt, i0, n, w);
    const CT tiny = static_cast<CT>(AP_INV_ABS_EPS);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const CT aw = abs_(w[k]);
      // g / max(|w|, tiny) where |w| >= tiny is g / |w|; a NaN |w| gives NaN (as torch.clamp_min)
      g[k] = aw < tiny ? CT(0) : g[k] / aw;
    }
  }
  if (t.grad != nullptr) {
    CT gr[kVec];
    load8(t.grad, t.grad_dt, i0, n, gr);
#pragma unroll
    for (int k = 0; k < kVec; ++k) g[k] = g[k] + gr[k];
  }
  const CT beta1 = static_cast<CT>(h.beta1), beta2 = static_cast<CT>(h.beta2);
  const CT omb1 = static_cast<CT>(1.0 - h.beta1), omb2 = static_cast<CT>(1.0 - h.beta2);
  const CT step_size = static_cast<CT>(t.step_size), bias2_sqrt = static_cast<CT>(t.bias2_sqrt);
  const CT eps = static_cast<CT>(h.eps);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    const CT m1 = e1[k] * beta1 + omb1 * g[k];
    const CT m2 = e2[k] * beta2 + omb2 * g[k] * g[k];
    e1[k] = m1;
    e2[k] = m2;
    m[k] = m[k] - step_size * m1 / (sqrt_(m2) / bias2_sqrt + eps);
  }
  store8(t.exp_avg, t.exp_avg_dt, i0, n, e1);
  store8(t.exp_avg_sq, t.exp_avg_sq_dt, i0, n, e2);
  store8(t.aux, t.aux_dt, i0, n, m);
}

template <typename CT>
__global__ void __launch_bounds__(kThreads) adam_kernel(ap_adam_tensor t, ap_adam_hyper h) {
  const int64_t groups = (t.numel + kVec - 1) / kVec;
  for (int64_t gi = global_thread(); gi < groups; gi += grid_stride()) adam_group<CT>(t, h, gi * kVec);
}

struct MultiParams {
  ap_adam_tensor t[kMultiMaxTensors];
  int block_tensor[kMultiMaxBlocks];
  int block_chunk[kMultiMaxBlocks];
};

// block b: chunk block_chunk[b] (kMultiChunk elements) of tensor block_tensor[b]
template <typename CT>
__global__ void __launch_bounds__(kThreads) adam_multi_kernel(MultiParams p, ap_adam_hyper h) {
  const ap_adam_tensor& t = p.t[p.block_tensor[blockIdx.x]];
  const int64_t start = static_cast<int64_t>(p.block_chunk[blockIdx.x]) * kMultiChunk;
#pragma unroll 1
  for (int it = 0; it < kMultiIters; ++it) {
    const int64_t i0 = start + (static_cast<int64_t>(it) * kThreads + threadIdx.x) * kVec;
    if (i0 < t.numel) adam_group<CT>(t, h, i0);
  }
}

// ------------------------------------------------------------------------------------------------
// launch helpers
// ------------------------------------------------------------------------------------------------
int sm_count() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 80;
  static int cached[128] = {0};
  if (dev >= 0 && dev < 128 && cached[dev] > 0) return cached[dev];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 80;
  if (dev >= 0 && dev < 128) cached[dev] = n;
  return n;
}

// blocks for a grid-stride loop over `items` (groups of kVec elements or rows)
unsigned int grid_for(int64_t items) {
  const int64_t want = (items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 8;
  const int64_t b = want < cap ? want : cap;
  return static_cast<unsigned int>(b > 0 ? b : 1);
}

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// ------------------------------------------------------------------------------------------------
// nm_scores: one thread per group (m <= 32 values in registers); a grid-stride loop over groups
// ------------------------------------------------------------------------------------------------
template <typename T, typename CT>
__global__ void __launch_bounds__(kThreads) nm_scores_kernel(const T* __restrict__ aux, T* __restrict__ out,
                                                             int64_t groups, int n, int m, CT tiny) {
  CT v[AP_NM_MAX_M], r[AP_NM_MAX_M];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    for (int j = 0; j < m; ++j) v[j] = static_cast<CT>(widen(aux[g * m + j]));
    ap_nm_group<CT>(v, r, n, m, tiny);
    for (int j = 0; j < m; ++j) put(&out[g * m + j], r[j]);
  }
}

}  // namespace

extern "C" {

int ap_cuda_apply_mask(const void* weight, int weight_dt, const void* aux, int aux_dt, void* out, int64_t numel,
                       int64_t row_len, void* stream) {
  if (numel <= 0) return 0;
  MaskParams p{};
  p.weight = weight;
  p.weight_dt = weight_dt;
  p.aux = aux;
  p.aux_dt = aux_dt;
  p.out = out;
  p.numel = numel;
  p.row_len = row_len;
  const unsigned int blocks = grid_for((numel + kVec - 1) / kVec);
  const bool m64 = aux_dt == AP_F64;  // compare M in its own precision (bf16/fp16 -> float is exact)
  cudaStream_t s = as_stream(stream);
  switch (weight_dt) {
    case AP_F64:
      if (m64) apply_mask_kernel<unsigned long long, double><<<blocks, kThreads, 0, s>>>(p);
      else apply_mask_kernel<unsigned long long, float><<<blocks, kThreads, 0, s>>>(p);
      break;
    case AP_F32:
      if (m64) apply_mask_kernel<uint32_t, double><<<blocks, kThreads, 0, s>>>(p);
      else apply_mask_kernel<uint32_t, float><<<blocks, kThreads, 0, s>>>(p);
      break;
    default:
      if (m64) apply_mask_kernel<uint16_t, double><<<blocks, kThreads, 0, s>>>(p);
      else apply_mask_kernel<uint16_t, float><<<blocks, kThreads, 0, s>>>(p);
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

// unit granularity: blocks per row of the reduction (at least one, so empty rows still get dM = 0 * s(M))
static int64_t unit_tasks_per_row(int64_t row_len) {
  const int64_t t = (row_len + kUnitChunk - 1) / kUnitChunk;
  return t > 0 ? t : 1;
}

size_t ap_cuda_mask_backward_workspace(int64_t rows, int64_t row_len, int need_aux_grad) {
  if (row_len < 0 || !need_aux_grad || rows <= 0) return 0;
  const int64_t tasks_per_row = unit_tasks_per_row(row_len);
  return static_cast<size_t>(rows * tasks_per_row) * sizeof(double);
}

int ap_cuda_mask_backward(const void* grad, int grad_dt, const void* weight, int weight_dt, const void* aux, int aux_dt,
                          void* dW, void* dM, int64_t numel, int64_t rows, int64_t row_len, int surrogate, int rule,
                          double alpha, int compute_f64, void* workspace, void* stream) {
  MaskParams p{};
  p.grad = grad;
  p.grad_dt = grad_dt;
  p.weight = weight;
  p.weight_dt = weight_dt;
  p.aux = aux;
  p.aux_dt = aux_dt;
  p.dW = dW;
  p.dM = dM;
  p.numel = numel;
  p.row_len = row_len;
  p.surrogate = surrogate;
  p.rule = rule;
  p.alpha = alpha;
  cudaStream_t s = as_stream(stream);
  const bool elementwise = numel > 0 && (dW != nullptr || (dM != nullptr && rows == 0));
  if (elementwise) {
    const unsigned int blocks = grid_for((numel + kVec - 1) / kVec);
    if (compute_f64)
      backward_kernel<double><<<blocks, kThreads, 0, s>>>(p);
    else
      backward_kernel<float><<<blocks, kThreads, 0, s>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  if (dM != nullptr && rows > 0) {  // unit granularity
    const int64_t tasks_per_row = unit_tasks_per_row(row_len);
    double* partial = static_cast<double*>(workspace);
    if (tasks_per_row > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
    const dim3 grid(static_cast<unsigned int>(tasks_per_row), static_cast<unsigned int>(rows < 65535 ? rows : 65535));
    if (compute_f64)
      unit_reduce_kernel<double><<<grid, kThreads, 0, s>>>(p, rows, partial);
    else
      unit_reduce_kernel<float><<<grid, kThreads, 0, s>>>(p, rows, partial);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
    const unsigned int blocks = grid_for(rows);
    if (compute_f64)
      unit_finish_kernel<double><<<blocks, kThreads, 0, s>>>(p, rows, tasks_per_row, partial);
    else
      unit_finish_kernel<float><<<blocks, kThreads, 0, s>>>(p, rows, tasks_per_row, partial);
    err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

int ap_cuda_adam(const ap_adam_tensor* t, const ap_adam_hyper* h, void* stream) {
  if (t->numel <= 0) return 0;
  const unsigned int blocks = grid_for((t->numel + kVec - 1) / kVec);
  if (t->compute_f64)
    adam_kernel<double><<<blocks, kThreads, 0, as_stream(stream)>>>(*t, *h);
  else
    adam_kernel<float><<<blocks, kThreads, 0, as_stream(stream)>>>(*t, *h);
  return static_cast<int>(cudaGetLastError());
}

int ap_cuda_adam_multi(const ap_adam_tensor* ts, int count, const ap_adam_hyper* h, void* stream) {
  if (count <= 0) return 0;
  const bool f64 = ts[0].compute_f64 != 0;
  MultiParams p;
  int nt = 0, nb = 0;
  cudaStream_t s = as_stream(stream);
  auto launch = [&]() -> int {
    if (nb == 0) return 0;
    if (f64)
      adam_multi_kernel<double><<<nb, kThreads, 0, s>>>(p, *h);
    else
      adam_multi_kernel<float><<<nb, kThreads, 0, s>>>(p, *h);
    return static_cast<int>(cudaGetLastError());
  };
  for (int i = 0; i < count; ++i) {
    if (ts[i].numel <= 0) continue;
    if ((ts[i].compute_f64 != 0) != f64) return static_cast<int>(cudaErrorInvalidValue);
    const int64_t chunks = (ts[i].numel + kMultiChunk - 1) / kMultiChunk;
    if (chunks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidValue);
    for (int64_t c = 0; c < chunks; ++c) {
      if (nb == kMultiMaxBlocks || (c == 0 && nt == kMultiMaxTensors)) {
        // launch what is queued; a tensor cut in the middle continues in slot 0 of the next launch
        const int err = launch();
        if (err != 0) return err;
        const bool continuing = c > 0;
        nb = 0;
        nt = 0;
        if (continuing) p.t[nt++] = ts[i];
      }
      if (c == 0) p.t[nt++] = ts[i];
      p.block_tensor[nb] = nt - 1;
      p.block_chunk[nb] = static_cast<int>(c);
      ++nb;
    }
  }
  return launch();
}

const char* ap_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int ap_cuda_nm_scores(const void* aux, int aux_dt, void* out, int64_t groups, int n, int m, void* stream) {
  if (groups <= 0) return 0;
  if (n < 1 || n > m || m > AP_NM_MAX_M) return static_cast<int>(cudaErrorInvalidValue);
  const unsigned int blocks = grid_for(groups);
  cudaStream_t s = as_stream(stream);
  switch (aux_dt) {
    case AP_F64:
      nm_scores_kernel<double, double><<<blocks, kThreads, 0, s>>>(static_cast<const double*>(aux),
                                                                  static_cast<double*>(out), groups, n, m,
                                                                  2.2250738585072014e-308);
      break;
    case AP_F32:
      nm_scores_kernel<float, float><<<blocks, kThreads, 0, s>>>(static_cast<const float*>(aux),
                                                                static_cast<float*>(out), groups, n, m,
                                                                1.17549435e-38f);
      break;
    case AP_BF16:
      nm_scores_kernel<__nv_bfloat16, float><<<blocks, kThreads, 0, s>>>(
          static_cast<const __nv_bfloat16*>(aux), static_cast<__nv_bfloat16*>(out), groups, n, m, 1.17549435e-38f);
      break;
    default:
      nm_scores_kernel<__half, float><<<blocks, kThreads, 0, s>>>(static_cast<const __half*>(aux),
                                                                 static_cast<__half*>(out), groups, n, m,
                                                                 6.103515625e-05f);
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
