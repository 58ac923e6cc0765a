// CPU kernels of autoprune_ext: raw pointers and element ranges, no torch headers.
//
// Every kernel processes a sub-range [begin, end) of its work items on the calling thread; the
// binding (csrc/ops.cpp) splits the work with at::parallel_for. The kernel bodies live in
// kernels_impl.h and are compiled once per instruction set (kernels_isa_*.cpp, each with its own
// `#pragma GCC target`); kernel_table() picks the best one the running CPU supports, so an
// ahead-of-time build runs everywhere and still uses AVX2 / AVX-512 where they exist.
//
// Arithmetic follows autoprune_ext/reference.py: float32, or float64 when `f64` is set (the binding
// sets it when any tensor argument is float64); loads convert from each tensor's own dtype and stores
// round to the destination's dtype (round to nearest even, as torch's `.to()`).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../autoprune_types.h"

namespace autoprune {
namespace cpu {

// elements per cache-resident block: inputs are converted block by block into small stack buffers
constexpr int64_t kBlock = 512;
// columns of one unit-granularity reduction task (fixed, so that sums do not depend on thread count)
constexpr int64_t kUnitColumns = 16384;

// T = where(h(M), W, 0); weight granularity when row_len == 0, else M[i / row_len] (unit).
struct ApplyMaskArgs {
  const void* weight;
  int weight_dt;
  const void* aux;
  int aux_dt;
  void* out;  // weight's dtype
  int64_t numel;
  int64_t row_len;
  // when set, weight granularity: set to 1 if any aux entry read is NaN or +-inf (the finiteness
  // test of the functional API, fused into the pass that reads aux anyway)
  int32_t* nonfinite;
};

// dW = g * h(M); dM = g * c(W) * s(M) (unit granularity: summed over each row of W first).
struct BackwardArgs {
  const void* grad;
  int grad_dt;
  const void* weight;
  int weight_dt;
  const void* aux;
  int aux_dt;
  void* dW;  // nullptr when not requested; weight's dtype; may be `grad` itself (written in place)
  void* dM;  // nullptr when not requested; aux's dtype
  void* T;   // weight granularity, when set: also T = where(h(M), W, 0) as apply_mask (weight's dtype)
  int64_t numel;
  int64_t rows;     // unit granularity: number of rows (aux.numel())
  int64_t row_len;  // 0: weight granularity
  int64_t tasks_per_row;  // unit granularity: ceil(row_len / kUnitColumns), at least 1
  double* partial;        // unit granularity: rows * tasks_per_row partial sums of g * c(W)
  int surrogate;
  int rule;
  double alpha;
  bool f64;
};

// aux_adam_step_: penalty gradient + task gradient, Adam moments, bias correction, update, in place.
struct AdamArgs {
  void* aux;
  int aux_dt;
  void* exp_avg;
  int exp_avg_dt;
  void* exp_avg_sq;
  int exp_avg_sq_dt;
  const void* grad;  // nullptr: penalty only
  int grad_dt;
  const void* weight;  // nullptr: no inv_abs_weight
  int weight_dt;
  int64_t numel;
  double penalty_scale;
  double rho;
  double beta1;
  double beta2;
  double eps;
  double step_size;   // lr / (1 - beta1^step)
  double bias2_sqrt;  // sqrt(1 - beta2^step)
  int surrogate;
  double alpha;
  bool f64;
  // memory="bf16_sr": bfloat16 aux and moments written with stochastic rounding, the noise of entry k
  // of stream s (0 exp_avg, 1 exp_avg_sq, 2 aux) being lowbias32(k ^ sr_keys[s]) >> 16 (optim._sr_noise)
  bool sr = false;
  uint32_t sr_keys[3] = {0, 0, 0};
};

struct KernelTable {
  const char* isa;
  void (*apply_mask)(const ApplyMaskArgs&, int64_t begin, int64_t end);          // elements
  void (*backward_weight)(const BackwardArgs&, int64_t begin, int64_t end);      // elements
  void (*backward_unit)(const BackwardArgs&, int64_t begin, int64_t end);        // tasks
  void (*backward_unit_finish)(const BackwardArgs&, int64_t begin, int64_t end);  // rows
  void (*adam)(const AdamArgs&, int64_t begin, int64_t end);                     // elements
  // weight granularity, float32 aux and moments, softplus: backward_weight's dW / T, and in place of
  // dM the adam step of aux on dM (AdamArgs: aux, moments and scalars; no grad, no weight). Entries
  // whose dM is NaN/inf keep aux and moments; their number is added to *nonfinite.
  void (*backward_weight_adam)(const BackwardArgs&, const AdamArgs&, int64_t begin, int64_t end,
                               int64_t* nonfinite);  // elements
  // s(m) into out (float32 values), for tests of the vectorised math
  void (*surrogate_f32)(const float* m, float* out, int64_t n, int surrogate, double alpha);
};

// The kernels for the best instruction set of this CPU (or the one forced by set_isa / the
// environment variable AUTOPRUNE_CPU_ISA=default|avx2|avx512).
const KernelTable& kernel_table();
// Names of the instruction sets compiled in and supported by this CPU, best last.
const char* const* supported_isas(int* count);
// Force one ("" or "auto": best available); returns false when it is not supported here.
bool set_isa(const char* name);

// one table per instruction set (kernels_isa_*.cpp); nullptr where not compiled in
const KernelTable* table_default();
const KernelTable* table_avx2();
const KernelTable* table_avx512();

}  // namespace cpu
}  // namespace autoprune
