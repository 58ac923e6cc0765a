// The `autoprune_cpp` operator library: the same schemas as the `autoprune` ops of
// autoprune_ext/ops.py, implemented by C++ kernels. This file defines the library, the CPU
// kernels' registration (TORCH_LIBRARY_IMPL(autoprune_cpp, CPU)), Meta (shape-only) kernels for
// tracing / torch.compile, and the masked-linear ops composed from the mask ops and the library GEMM
// (CompositeExplicitAutograd: every device). The CUDA kernels register themselves in
// cuda/binding.cpp, compiled only when CUDA is available.
//
// Contract (autoprune_ext/backends/base.py): inputs may be non-contiguous; outputs are new
// contiguous tensors (T / dW in weight's dtype, dM in aux's dtype); unrequested gradients come
// back as empty (0-element) tensors; aux_adam_step_ updates aux, exp_avg and exp_avg_sq in place.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"
#include "nm_group.h"
#include "ops_common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace autoprune {
namespace {

constexpr int64_t kGrain = 32768;           // elements per parallel chunk at least
// the coarse-gradient pass and the Adam step cost a softplus (an exp and a log1p) per entry, about
// 1.5-2 ns: a small layer's 20k entries are worth two threads there, and the Adam tasks of a small
// model's few tensors balance over the threads only when cut this fine
constexpr int64_t kGrainSoftplus = 8192;
constexpr int64_t kAdamTask = 8192;         // elements per multi-tensor Adam task

using cpu::kernel_table;

// Fresh outputs of several MiB are new mmap-ed pages: on Linux the first touch of every 4 KiB page
// faults, which costs more than the kernel itself (about 5 ms per 16 MiB on a small VM). Asking for
// transparent huge pages on the untouched buffer (what torch does for every allocation under
// THP_MEM_ALLOC_ENABLE=1) makes that one fault per 2 MiB. AUTOPRUNE_CPU_HUGEPAGES=0 switches it off.
bool huge_pages_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("AUTOPRUNE_CPU_HUGEPAGES");
    return v == nullptr || !(v[0] == '0' && v[1] == '\0');
  }();
  return on;
}

at::Tensor new_output(const at::Tensor& like) {
  at::Tensor out = empty_like_contiguous(like);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t nbytes = static_cast<uintptr_t>(out.nbytes());
  if (nbytes >= 4 * kHuge && huge_pages_enabled()) {
    const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t hi = (begin + nbytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only: errors ignored
  }
#endif
  return out;
}

// ------------------------------------------------------------------------------------------------
// CPU kernels
// ------------------------------------------------------------------------------------------------
[[noreturn]] void throw_nonfinite_aux() {
  // the message of autoprune_ext._checks.check_finite(aux, "aux")
  TORCH_CHECK_VALUE(false, "aux: expected finite values, found NaN or inf");
  __builtin_unreachable();
}

// unit granularity: aux has one entry per row, a short serial loop
bool all_finite_rows(const at::Tensor& a) {
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "aux_all_finite", [&] {
    const scalar_t* p = a.const_data_ptr<scalar_t>();
    for (int64_t i = 0; ok && i < a.numel(); ++i) ok = std::isfinite(static_cast<double>(p[i]));
  });
  return ok;
}

// T; with `check_finite`, first (unit granularity) or in the same pass (weight granularity) the
// functional API's test that aux holds no NaN/inf, raised as its ValueError
at::Tensor apply_mask_into(const at::Tensor& weight, const at::Tensor& aux, bool unit, bool check_finite) {
  const at::Tensor a = aux.contiguous();
  if (check_finite && unit && !all_finite_rows(a)) throw_nonfinite_aux();
  at::Tensor out = new_output(weight);
  const int64_t numel = weight.numel();
  if (numel == 0) return out;
  const at::Tensor w = weight.contiguous();
  int32_t nonfinite = 0;
  cpu::ApplyMaskArgs args{};
  args.weight = w.const_data_ptr();
  args.weight_dt = dtype_code(w, "weight");
  args.aux = a.const_data_ptr();
  args.aux_dt = dtype_code(a, "aux");
  args.out = out.mutable_data_ptr();
  args.numel = numel;
  args.row_len = unit ? numel / weight.size(0) : 0;
  args.nonfinite = check_finite && !unit ? &nonfinite : nullptr;
  const auto& k = kernel_table();
  at::parallel_for(0, numel, kGrain, [&](int64_t b, int64_t e) { k.apply_mask(args, b, e); });
  if (nonfinite) throw_nonfinite_aux();
  return out;
}

at::Tensor apply_mask_cpu(const at::Tensor& weight, const at::Tensor& aux, c10::string_view surrogate,
                          c10::string_view rule, double alpha) {
  const bool unit = check_mask_call(nullptr, weight, aux, surrogate, rule, alpha, c10::DeviceType::CPU).unit;
  return apply_mask_into(weight, aux, unit, false);
}

// apply_mask (default options) that raises the functional API's ValueError if aux holds NaN/inf
at::Tensor apply_mask_checked_cpu(const at::Tensor& weight, const at::Tensor& aux) {
  const bool unit = check_mask_call(nullptr, weight, aux, "softplus", "sign", 0.1, c10::DeviceType::CPU).unit;
  return apply_mask_into(weight, aux, unit, true);
}

at::Tensor masked_linear_checked_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& aux,
                                     const std::optional<at::Tensor>& bias) {
  return at::linear(input, apply_mask_checked_cpu(weight, aux), bias);
}

// the kernel arguments of mask_backward (weight granularity fields; unit granularity adds its own):
// `weight` is read (and must then be contiguous) only when `read_weight`; dW / dM null when not wanted
cpu::BackwardArgs backward_args(const at::Tensor& grad, const at::Tensor& weight, bool read_weight,
                                const at::Tensor& aux, void* dW, void* dM, const MaskCall& c, double alpha) {
  cpu::BackwardArgs args{};
  args.grad = grad.const_data_ptr();
  args.grad_dt = dtype_code(grad, "grad");
  args.weight = read_weight ? weight.const_data_ptr() : nullptr;
  args.weight_dt = dtype_code(weight, "weight");
  args.aux = aux.const_data_ptr();
  args.aux_dt = dtype_code(aux, "aux");
  args.dW = dW;
  args.dM = dM;
  args.numel = weight.numel();
  args.surrogate = c.surrogate;
  args.rule = c.rule;
  args.alpha = alpha;
  args.f64 = is_f64(grad) || is_f64(weight) || is_f64(aux);
  return args;
}

std::tuple<at::Tensor, at::Tensor> mask_backward_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                                     const at::Tensor& aux, c10::string_view surrogate,
                                                     c10::string_view rule, double alpha, bool need_weight_grad,
                                                     bool need_aux_grad) {
  const MaskCall c = check_mask_call(&grad, weight, aux, surrogate, rule, alpha, c10::DeviceType::CPU);
  at::Tensor dW = need_weight_grad ? new_output(weight) : empty0(weight);
  at::Tensor dM = need_aux_grad ? new_output(aux) : empty0(aux);
  if (!need_weight_grad && !need_aux_grad) return {dW, dM};
  const int64_t numel = weight.numel();
  const at::Tensor g = grad.contiguous();
  const at::Tensor a = aux.contiguous();
  // the weight itself is read only for dM
  const at::Tensor w = need_aux_grad ? weight.contiguous() : weight;
  cpu::BackwardArgs args = backward_args(g, w, need_aux_grad, a, need_weight_grad ? dW.mutable_data_ptr() : nullptr,
                                         need_aux_grad ? dM.mutable_data_ptr() : nullptr, c, alpha);
  const auto& k = kernel_table();
  if (!c.unit) {
    if (numel > 0)
      at::parallel_for(0, numel, kGrainSoftplus, [&](int64_t b, int64_t e) { k.backward_weight(args, b, e); });
    return {dW, dM};
  }
  const int64_t rows = aux.numel();
  if (rows == 0) return {dW, dM};
  const int64_t K = numel / rows;
  args.rows = rows;
  args.row_len = K;
  args.tasks_per_row = K == 0 ? 1 : (K + cpu::kUnitColumns - 1) / cpu::kUnitColumns;
  const int64_t tasks = rows * args.tasks_per_row;
  at::Tensor partial;
  if (need_aux_grad) {
    partial = at::empty({tasks}, a.options().dtype(at::kDouble));
    args.partial = partial.mutable_data_ptr<double>();
  }
  const int64_t cols = K < cpu::kUnitColumns ? (K > 0 ? K : 1) : cpu::kUnitColumns;
  const int64_t task_grain = std::max<int64_t>(1, kGrain / cols);
  at::parallel_for(0, tasks, task_grain, [&](int64_t b, int64_t e) { k.backward_unit(args, b, e); });
  if (need_aux_grad)
    at::parallel_for(0, rows, 4096, [&](int64_t b, int64_t e) { k.backward_unit_finish(args, b, e); });
  return {dW, dM};
}

// N:M scores: one group of m values per task (the op layer checked n, m and the row length)
at::Tensor nm_scores_cpu(const at::Tensor& aux, int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(aux.device().is_cpu(), "aux: expected a CPU tensor, got one on ", aux.device());
  TORCH_CHECK_VALUE(1 <= n && n <= m && m <= AP_NM_MAX_M, "n, m: expected 1 <= n <= m <= ", AP_NM_MAX_M,
                    ", got n=", n, ", m=", m);
  TORCH_CHECK_VALUE(aux.numel() % m == 0, "aux: expected a multiple of m=", m, " entries, got ", aux.numel());
  dtype_code(aux, "aux");
  at::Tensor out = new_output(aux);
  const int64_t groups = aux.numel() / m;
  if (groups == 0) return out;
  const at::Tensor a = aux.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "nm_scores_cpu", [&] {
    using CT = at::opmath_type<scalar_t>;
    const scalar_t* src = a.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const CT tiny = static_cast<CT>(std::numeric_limits<scalar_t>::min());
    at::parallel_for(0, groups, std::max<int64_t>(1, kGrain / m), [&](int64_t b, int64_t e) {
      CT v[AP_NM_MAX_M], r[AP_NM_MAX_M];
      for (int64_t g = b; g < e; ++g) {
        for (int64_t j = 0; j < m; ++j) v[j] = static_cast<CT>(src[g * m + j]);
        ap_nm_group<CT>(v, r, static_cast<int>(n), static_cast<int>(m), tiny);
        for (int64_t j = 0; j < m; ++j) dst[g * m + j] = static_cast<scalar_t>(r[j]);
      }
    });
  });
  return out;
}

at::Tensor nm_scores_meta(const at::Tensor& aux, int64_t, int64_t) {
  return at::empty_symint(aux.sym_sizes(), aux.options());
}

// the scalars of one Adam step (bias corrections of `step` included) into a kernel's arguments
void set_adam_scalars(cpu::AdamArgs& a, int64_t step, double lr, double beta1, double beta2, double eps,
                      double penalty_scale, double rho, int surrogate, double alpha) {
  a.penalty_scale = penalty_scale;
  a.rho = rho;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  adam_bias(step, lr, beta1, beta2, &a.step_size, &a.bias2_sqrt);
  a.surrogate = surrogate;
  a.alpha = alpha;
}

struct AdamTensors {
  AdamSet set;
  cpu::AdamArgs args{};
};

// checks one tensor set and prepares its kernel arguments (scalars of one step)
AdamTensors prepare_adam(const at::Tensor& aux, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& weight, int64_t step,
                         double lr, double beta1, double beta2, double eps, double penalty_scale, double rho,
                         int surrogate, double alpha, const std::string& suffix) {
  AdamTensors t{checked_adam_set(aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, suffix), {}};
  const AdamSet& s = t.set;
  cpu::AdamArgs& a = t.args;
  a.aux = s.aux.work.mutable_data_ptr();
  a.aux_dt = dtype_code(aux, "aux");
  a.exp_avg = s.exp_avg.work.mutable_data_ptr();
  a.exp_avg_dt = dtype_code(s.exp_avg.work, "exp_avg");
  a.exp_avg_sq = s.exp_avg_sq.work.mutable_data_ptr();
  a.exp_avg_sq_dt = dtype_code(s.exp_avg_sq.work, "exp_avg_sq");
  a.grad = s.grad.defined() ? s.grad.const_data_ptr() : nullptr;
  a.grad_dt = s.grad.defined() ? dtype_code(s.grad, "grad") : AP_F32;
  a.weight = s.weight.defined() ? s.weight.const_data_ptr() : nullptr;
  a.weight_dt = s.weight.defined() ? dtype_code(s.weight, "weight") : AP_F32;
  a.numel = aux.numel();
  set_adam_scalars(a, step, lr, beta1, beta2, eps, penalty_scale, rho, surrogate, alpha);
  a.f64 = s.f64;
  return t;
}

void aux_adam_step_cpu(const at::Tensor& aux, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                       const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& weight, c10::SymInt step,
                       double lr, double beta1, double beta2, double eps, double penalty_scale, double rho,
                       c10::string_view surrogate, double alpha) {
  const int sur = surrogate_code(surrogate);
  check_alpha(alpha);
  check_device(aux, "aux", c10::DeviceType::CPU);
  AdamTensors t = prepare_adam(aux, exp_avg, exp_avg_sq, grad, weight, step.guard_int(__FILE__, __LINE__), lr, beta1,
                               beta2, eps, penalty_scale, rho, sur, alpha, "");
  if (t.args.numel > 0) {
    const auto& k = kernel_table();
    at::parallel_for(0, t.args.numel, kGrainSoftplus, [&](int64_t b, int64_t e) { k.adam(t.args, b, e); });
  }
  finish(t.set);
}

// aux_adam_step_ for memory="bf16_sr" (optim._sr_adam_step_): bfloat16 aux and moments, the step
// computed in float32 and every write stochastically rounded with the keyed noise of `sr_keys`
// (exp_avg, exp_avg_sq, aux), so that a resumed run repeats it exactly
void aux_adam_step_sr_cpu(const at::Tensor& aux, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                          const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& weight,
                          int64_t step, double lr, double beta1, double beta2, double eps, double penalty_scale,
                          double rho, c10::string_view surrogate, double alpha, at::IntArrayRef sr_keys) {
  const int sur = surrogate_code(surrogate);
  check_alpha(alpha);
  check_device(aux, "aux", c10::DeviceType::CPU);
  check_sr_state(aux, exp_avg, exp_avg_sq, sr_keys, true, false);  // non-contiguous: through InPlace copies
  TORCH_CHECK_TYPE(!is_f64(grad) && !is_f64(weight), "grad, weight: expected no float64 tensors with bf16_sr");
  AdamTensors t = prepare_adam(aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, penalty_scale,
                               rho, sur, alpha, "");
  t.args.sr = true;
  for (int s = 0; s < 3; ++s) t.args.sr_keys[s] = static_cast<uint32_t>(sr_keys[s]);
  if (t.args.numel > 0) {
    const auto& k = kernel_table();
    at::parallel_for(0, t.args.numel, kGrainSoftplus, [&](int64_t b, int64_t e) { k.adam(t.args, b, e); });
  }
  finish(t.set);
}

void aux_adam_step_multi_cpu(at::TensorList aux, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                             const c10::List<std::optional<at::Tensor>>& grads,
                             const c10::List<std::optional<at::Tensor>>& weights, c10::SymIntArrayRef steps,
                             at::ArrayRef<double> penalty_scales, double lr, double beta1, double beta2, double eps,
                             double rho, c10::string_view surrogate, double alpha) {
  const size_t n = check_multi_lengths(aux.size(), exp_avg.size(), exp_avg_sq.size(), grads.size(), weights.size(),
                                       steps.size(), penalty_scales.size());
  const int sur = surrogate_code(surrogate);
  check_alpha(alpha);
  std::vector<AdamTensors> sets;
  sets.reserve(n);
  struct Task {
    size_t set;
    int64_t begin, end;
  };
  std::vector<Task> tasks;
  for (size_t i = 0; i < n; ++i) {
    const std::string suffix = "[" + std::to_string(i) + "]";
    check_device(aux[i], ("aux" + suffix).c_str(), c10::DeviceType::CPU);
    sets.push_back(prepare_adam(aux[i], exp_avg[i], exp_avg_sq[i], grads.get(i), weights.get(i),
                                steps[i].guard_int(__FILE__, __LINE__), lr, beta1, beta2, eps, penalty_scales[i], rho,
                                sur, alpha, suffix));
    const int64_t numel = sets.back().args.numel;
    for (int64_t b = 0; b < numel; b += kAdamTask) tasks.push_back({i, b, std::min(numel, b + kAdamTask)});
  }
  if (!tasks.empty()) {
    const auto& k = kernel_table();
    // one parallel region over all tensors: many small tensors do not pay one fork-join each
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) k.adam(sets[tasks[t].set].args, tasks[t].begin, tasks[t].end);
    });
  }
  for (auto& s : sets) finish(s.set);
}

// ------------------------------------------------------------------------------------------------
// Meta kernels (shapes only) for fake tensors / torch.compile
// ------------------------------------------------------------------------------------------------
at::Tensor apply_mask_meta(const at::Tensor& weight, const at::Tensor& aux, c10::string_view, c10::string_view,
                           double) {
  return at::empty_symint(weight.sym_sizes(), weight.options());
}

at::Tensor apply_mask_checked_meta(const at::Tensor& weight, const at::Tensor&) {
  return at::empty_symint(weight.sym_sizes(), weight.options());
}

at::Tensor masked_linear_checked_meta(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& aux,
                                      const std::optional<at::Tensor>& bias) {
  return at::linear(input, apply_mask_checked_meta(weight, aux), bias);
}

std::tuple<at::Tensor, at::Tensor> mask_backward_meta(const at::Tensor& grad, const at::Tensor& weight,
                                                      const at::Tensor& aux, c10::string_view, c10::string_view,
                                                      double, bool need_weight_grad, bool need_aux_grad) {
  at::Tensor dW = need_weight_grad ? at::empty_symint(weight.sym_sizes(), weight.options()) : empty0(weight);
  at::Tensor dM = need_aux_grad ? at::empty_symint(aux.sym_sizes(), aux.options()) : empty0(aux);
  return {dW, dM};
}

void aux_adam_step_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        const std::optional<at::Tensor>&, c10::SymInt, double, double, double, double, double, double,
                        c10::string_view, double) {}

void aux_adam_step_sr_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, int64_t, double, double, double, double, double, double,
                           c10::string_view, double, at::IntArrayRef) {}

void aux_adam_step_multi_meta(at::TensorList, at::TensorList, at::TensorList,
                              const c10::List<std::optional<at::Tensor>>&, const c10::List<std::optional<at::Tensor>>&,
                              c10::SymIntArrayRef, at::ArrayRef<double>, double, double, double, double, double,
                              c10::string_view, double) {}

// ------------------------------------------------------------------------------------------------
// masked linear: composed from the mask ops (through the dispatcher) and the library GEMM
// ------------------------------------------------------------------------------------------------
at::Tensor call_apply_mask(const at::Tensor& weight, const at::Tensor& aux, c10::string_view surrogate,
                           c10::string_view rule, double alpha) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("autoprune_cpp::apply_mask", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, c10::string_view,
                                         double)>();
  return op.call(weight, aux, surrogate, rule, alpha);
}

std::tuple<at::Tensor, at::Tensor> call_mask_backward(const at::Tensor& grad, const at::Tensor& weight,
                                                      const at::Tensor& aux, c10::string_view surrogate,
                                                      c10::string_view rule, double alpha, bool need_w, bool need_m) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("autoprune_cpp::mask_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, c10::string_view, c10::string_view,
                                                                 double, bool, bool)>();
  return op.call(grad, weight, aux, surrogate, rule, alpha, need_w, need_m);
}

at::Tensor masked_linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& aux,
                         const std::optional<at::Tensor>& bias, c10::string_view surrogate, c10::string_view rule,
                         double alpha) {
  return at::linear(input, call_apply_mask(weight, aux, surrogate, rule, alpha), bias);
}

// reference.masked_linear_backward: dX = g @ T, dT = g^T X -> mask_backward, db = sum g
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& aux,
    c10::string_view surrogate, c10::string_view rule, double alpha, bool need_input_grad, bool need_weight_grad,
    bool need_aux_grad, bool need_bias_grad) {
  // explicit token count: reshape(-1, 0) is ambiguous for empty tensors
  c10::SymInt tokens(1);
  const c10::SymIntArrayRef xs = input.sym_sizes();
  for (size_t i = 0; i + 1 < xs.size(); ++i) tokens = tokens * xs[i];
  const std::vector<c10::SymInt> g_shape{tokens, weight.sym_size(0)};
  const at::Tensor g2 = grad_out.reshape_symint(g_shape);
  at::Tensor dX, dW, dM, db;
  if (need_input_grad) {
    const at::Tensor T = call_apply_mask(weight, aux, surrogate, rule, alpha).to(g2.scalar_type());
    dX = g2.mm(T).reshape_symint(input.sym_sizes());
  } else {
    dX = empty0(input);
  }
  if (need_weight_grad || need_aux_grad) {
    const std::vector<c10::SymInt> x_shape{tokens, weight.sym_size(1)};
    const at::Tensor dT = g2.t().mm(input.reshape_symint(x_shape).to(g2.scalar_type()));
    std::tie(dW, dM) = call_mask_backward(dT, weight, aux, surrogate, rule, alpha, need_weight_grad, need_aux_grad);
  } else {
    dW = empty0(weight);
    dM = empty0(aux);
  }
  if (need_bias_grad) {
    const std::vector<int64_t> dim0{0};
    db = g2.sum(dim0);
  } else {
    db = empty0(grad_out);
  }
  return {dX, dW, dM, db};
}

// CPU, weight granularity: dT = g^T X first, then one pass over dT, W and M writes dM, T (for
// dX = g @ T) and dW in place of dT -- instead of a second apply_mask pass over W and M and a fresh
// dW. The results are those of the composition above, bit for bit.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& aux,
    c10::string_view surrogate, c10::string_view rule, double alpha, bool need_input_grad, bool need_weight_grad,
    bool need_aux_grad, bool need_bias_grad) {
  const MaskCall c = check_mask_call(nullptr, weight, aux, surrogate, rule, alpha, c10::DeviceType::CPU);
  if (c.unit || !need_input_grad || !(need_weight_grad || need_aux_grad) || weight.numel() == 0 ||
      weight.dim() != 2 || grad_out.scalar_type() != weight.scalar_type() ||
      input.scalar_type() != weight.scalar_type())
    return masked_linear_backward(grad_out, input, weight, aux, surrogate, rule, alpha, need_input_grad,
                                  need_weight_grad, need_aux_grad, need_bias_grad);
  const int64_t in_features = weight.size(1), out_features = weight.size(0);
  const int64_t tokens = in_features == 0 ? 0 : input.numel() / in_features;
  const at::Tensor g2 = grad_out.reshape({tokens, out_features});
  at::Tensor dT = g2.t().mm(input.reshape({tokens, in_features}));  // fresh and contiguous
  const at::Tensor w = weight.contiguous();
  const at::Tensor a = aux.contiguous();
  at::Tensor T = new_output(weight);
  at::Tensor dM = need_aux_grad ? new_output(aux) : empty0(aux);
  cpu::BackwardArgs args = backward_args(dT, w, true, a, need_weight_grad ? dT.mutable_data_ptr() : nullptr,
                                         need_aux_grad ? dM.mutable_data_ptr() : nullptr, c, alpha);
  args.T = T.mutable_data_ptr();
  const auto& k = kernel_table();
  at::parallel_for(0, args.numel, kGrainSoftplus, [&](int64_t b, int64_t e) { k.backward_weight(args, b, e); });
  at::Tensor dX = g2.mm(T).reshape(input.sizes());
  at::Tensor dW = need_weight_grad ? dT : empty0(weight);
  const std::vector<int64_t> dim0{0};
  at::Tensor db = need_bias_grad ? g2.sum(dim0) : empty0(grad_out);
  return {dX, dW, dM, db};
}

// masked_linear_backward with the aux tensor's Adam step fused in (AuxAdam.fused_step): dX, dW
// and db as masked_linear_backward_cpu (weight granularity, softplus surrogate); instead of dM,
// aux, exp_avg and exp_avg_sq take the aux_adam_step_ of dM (no inv_abs_weight), or with sr_keys
// the aux_adam_step_sr_ (bfloat16 aux and moments), bit for bit what the two ops give. Entries
// whose dM is NaN/inf keep aux and moments; returns how many there were.
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> masked_linear_backward_adam_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& aux,
    const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, c10::string_view rule, bool need_input_grad,
    bool need_weight_grad, bool need_bias_grad, int64_t step, double lr, double beta1, double beta2, double eps,
    double penalty_scale, double rho, at::IntArrayRef sr_keys) {
  const MaskCall c = check_mask_call(nullptr, weight, aux, "softplus", rule, 0.1, c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(!c.unit && weight.dim() == 2,
                    "aux: expected weight granularity (the shape of a 2-D weight), got weight ", weight.sizes(),
                    " and aux ", aux.sizes());
  const at::ScalarType wt = weight.scalar_type();
  TORCH_CHECK_TYPE(wt == at::kFloat || wt == at::kBFloat16, "weight: expected float32 or bfloat16, got ", wt);
  TORCH_CHECK_TYPE(input.scalar_type() == wt && grad_out.scalar_type() == wt,
                   "input, grad_out: expected the dtype of weight (", wt, "), got ", input.scalar_type(), " and ",
                   grad_out.scalar_type());
  check_device(input, "input", c10::DeviceType::CPU);
  check_device(grad_out, "grad_out", c10::DeviceType::CPU);
  const bool sr = check_sr_state(aux, exp_avg, exp_avg_sq, sr_keys, false, true);
  checked_adam_set(aux, exp_avg, exp_avg_sq, std::nullopt, std::nullopt, step, lr, beta1, beta2, eps, "");
  check_penalty_scalars(penalty_scale, rho);
  const at::Tensor w = weight.contiguous();
  // the kernel reads W and rewrites aux and the moments entry by entry, and grad_out is read after it
  // wrote (dX, db): aux and the moments may share memory with none of the others
  const std::pair<const at::Tensor*, const char*> bufs[] = {
      {&aux, "aux"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}, {&w, "weight"}, {&grad_out, "grad_out"}};
  for (size_t i = 0; i < 3; ++i)
    for (size_t j = i + 1; j < 5; ++j) {
      const at::Tensor &x = *bufs[i].first, &y = *bufs[j].first;
      if (x.numel() == 0 || y.numel() == 0) continue;
      const auto* x0 = static_cast<const char*>(x.const_data_ptr());
      const auto* y0 = static_cast<const char*>(y.const_data_ptr());
      TORCH_CHECK_VALUE(!(x0 < y0 + y.nbytes() && y0 < x0 + x.nbytes()), bufs[i].second, ", ", bufs[j].second,
                        ": expected tensors that share no memory");
    }
  const int64_t in_features = weight.size(1), out_features = weight.size(0);
  TORCH_CHECK_VALUE(input.dim() >= 1 && input.size(-1) == in_features, "input: expected last dimension ",
                    in_features, " (weight's in_features), got shape ", input.sizes());
  const int64_t tokens = in_features == 0 ? 0 : input.numel() / in_features;
  TORCH_CHECK_VALUE(grad_out.numel() == tokens * out_features, "grad_out: expected ", tokens, " x ", out_features,
                    " entries, got shape ", grad_out.sizes());
  const at::Tensor g2 = grad_out.reshape({tokens, out_features});
  at::Tensor dT = g2.t().mm(input.reshape({tokens, in_features}));  // fresh and contiguous
  at::Tensor T = need_input_grad ? new_output(weight) : at::Tensor();
  // every output allocated before the kernel writes aux: what can fail fails before the step
  at::Tensor dX = need_input_grad ? at::empty({tokens, in_features}, input.options()) : empty0(input);
  at::Tensor db = need_bias_grad ? at::empty({out_features}, grad_out.options()) : empty0(grad_out);
  cpu::BackwardArgs args = backward_args(dT, w, true, aux, need_weight_grad ? dT.mutable_data_ptr() : nullptr,
                                         nullptr, c, 0.1);
  args.T = need_input_grad ? T.mutable_data_ptr() : nullptr;
  cpu::AdamArgs o{};
  o.aux = aux.mutable_data_ptr();
  o.aux_dt = sr ? AP_BF16 : AP_F32;
  o.exp_avg = exp_avg.mutable_data_ptr();
  o.exp_avg_dt = o.aux_dt;
  o.exp_avg_sq = exp_avg_sq.mutable_data_ptr();
  o.exp_avg_sq_dt = o.aux_dt;
  o.sr = sr;
  for (size_t s = 0; s < sr_keys.size(); ++s) o.sr_keys[s] = static_cast<uint32_t>(sr_keys[s]);
  o.numel = aux.numel();
  set_adam_scalars(o, step, lr, beta1, beta2, eps, penalty_scale, rho, c.surrogate, 0.1);
  int64_t nonfinite = 0;
  const auto& k = kernel_table();
  at::parallel_for(0, args.numel, kGrainSoftplus,
                   [&](int64_t b, int64_t e) { k.backward_weight_adam(args, o, b, e, &nonfinite); });
  if (need_input_grad) at::mm_out(dX, g2, T);
  if (need_bias_grad) at::sum_out(db, g2, std::vector<int64_t>{0});
  at::Tensor dW = need_weight_grad ? dT : empty0(weight);
  return {need_input_grad ? dX.view(input.sizes()) : dX, dW, db, nonfinite};
}

// ------------------------------------------------------------------------------------------------
// nonfinite_indices: which tensors hold a NaN or inf (AuxAdam's test of the gradients on CPU)
// ------------------------------------------------------------------------------------------------
constexpr int64_t kScanTask = 65536;  // elements per task of the one parallel region

// whether any entry has an all-ones exponent (NaN or inf): exact, no sum that could overflow; the
// OR of comparisons has no branch, so the loop vectorises
template <typename Bits>
bool any_nonfinite(const void* data, int64_t begin, int64_t end, Bits exponent) {
  const Bits* p = static_cast<const Bits*>(data);
  Bits hit = 0;
  for (int64_t i = begin; i < end; ++i) hit |= static_cast<Bits>((p[i] & exponent) == exponent);
  return hit != 0;
}

std::vector<int64_t> nonfinite_indices_cpu(at::TensorList tensors) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  std::vector<at::Tensor> work;
  std::vector<int> codes;
  work.reserve(n);
  codes.reserve(n);
  struct Task {
    int64_t tensor, begin, end;
  };
  std::vector<Task> tasks;
  for (int64_t i = 0; i < n; ++i) {
    const std::string name = "tensors[" + std::to_string(i) + "]";
    check_device(tensors[i], name.c_str(), c10::DeviceType::CPU);
    codes.push_back(dtype_code(tensors[i], name.c_str()));
    work.push_back(tensors[i].contiguous());
    const int64_t numel = work.back().numel();
    for (int64_t b = 0; b < numel; b += kScanTask) tasks.push_back({i, b, std::min(numel, b + kScanTask)});
  }
  std::vector<uint8_t> task_bad(tasks.size(), 0);  // one slot per task: no two threads write one byte
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const Task& t = tasks[k];
      const void* data = work[t.tensor].const_data_ptr();
      switch (codes[t.tensor]) {
        case AP_F32: task_bad[k] = any_nonfinite<uint32_t>(data, t.begin, t.end, 0x7f800000u); break;
        case AP_F64: task_bad[k] = any_nonfinite<uint64_t>(data, t.begin, t.end, 0x7ff0000000000000ull); break;
        case AP_BF16: task_bad[k] = any_nonfinite<uint16_t>(data, t.begin, t.end, 0x7f80u); break;
        default: task_bad[k] = any_nonfinite<uint16_t>(data, t.begin, t.end, 0x7c00u); break;  // float16
      }
    }
  });
  std::vector<int64_t> out;
  for (size_t k = 0; k < tasks.size(); ++k)
    if (task_bad[k] && (out.empty() || out.back() != tasks[k].tensor)) out.push_back(tasks[k].tensor);
  return out;
}

// ------------------------------------------------------------------------------------------------
// information / test helpers
// ------------------------------------------------------------------------------------------------
std::string cpu_isa() { return kernel_table().isa; }

std::vector<std::string> cpu_isas() {
  int count = 0;
  const char* const* names = cpu::supported_isas(&count);
  return std::vector<std::string>(names, names + count);
}

std::string set_cpu_isa(c10::string_view name) {
  const std::string s(name.data(), name.size());
  TORCH_CHECK_VALUE(cpu::set_isa(s.c_str()), "set_cpu_isa: '", s, "' is not compiled in or not supported by this CPU");
  return cpu_isa();
}

// How many threads at::parallel_for uses for `numel` elements with the kernels' grain: compiled
// without OpenMP it silently runs on one thread, which only a test of this can catch.
int64_t parallel_threads(int64_t numel) {
  TORCH_CHECK_VALUE(numel >= 0, "parallel_threads: numel must be >= 0, got ", numel);
  std::atomic<int64_t> chunks{0};
  at::parallel_for(0, numel, kGrain, [&](int64_t, int64_t) { chunks.fetch_add(1); });
  return chunks.load();
}

}  // namespace
}  // namespace autoprune

TORCH_LIBRARY(autoprune_cpp, m) {
  m.def("apply_mask(Tensor weight, Tensor aux, str surrogate, str rule, float alpha) -> Tensor");
  m.def("apply_mask_checked(Tensor weight, Tensor aux) -> Tensor");
  m.def("masked_linear_checked(Tensor input, Tensor weight, Tensor aux, Tensor? bias) -> Tensor");
  m.def(
      "mask_backward(Tensor grad, Tensor weight, Tensor aux, str surrogate, str rule, float alpha, "
      "bool need_weight_grad, bool need_aux_grad) -> (Tensor, Tensor)");
  m.def(
      "masked_linear(Tensor input, Tensor weight, Tensor aux, Tensor? bias, str surrogate, str rule, float alpha) "
      "-> Tensor");
  m.def(
      "masked_linear_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor aux, str surrogate, str rule, "
      "float alpha, bool need_input_grad, bool need_weight_grad, bool need_aux_grad, bool need_bias_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "aux_adam_step_(Tensor(a0!) aux, Tensor(a1!) exp_avg, Tensor(a2!) exp_avg_sq, Tensor? grad, Tensor? weight, "
      "SymInt step, float lr, float beta1, float beta2, float eps, float penalty_scale, float rho, str surrogate, "
      "float alpha) -> ()");
  m.def(
      "aux_adam_step_multi_(Tensor(a0!)[] aux, Tensor(a1!)[] exp_avg, Tensor(a2!)[] exp_avg_sq, Tensor?[] grads, "
      "Tensor?[] weights, SymInt[] steps, float[] penalty_scales, float lr, float beta1, float beta2, float eps, "
      "float rho, str surrogate, float alpha) -> ()");
  m.def(
      "masked_linear_backward_adam_(Tensor grad_out, Tensor input, Tensor weight, Tensor(a0!) aux, "
      "Tensor(a1!) exp_avg, Tensor(a2!) exp_avg_sq, str rule, bool need_input_grad, bool need_weight_grad, "
      "bool need_bias_grad, int step, float lr, float beta1, float beta2, float eps, float penalty_scale, "
      "float rho, int[] sr_keys=[]) -> (Tensor, Tensor, Tensor, int)");
  m.def(
      "aux_adam_step_sr_(Tensor(a0!) aux, Tensor(a1!) exp_avg, Tensor(a2!) exp_avg_sq, Tensor? grad, Tensor? weight, "
      "int step, float lr, float beta1, float beta2, float eps, float penalty_scale, float rho, str surrogate, "
      "float alpha, int[] sr_keys) -> ()");
  m.def("nm_scores(Tensor aux, int n, int m) -> Tensor");
  m.def("nonfinite_indices(Tensor[] tensors) -> int[]");
  m.def("cpu_isa() -> str", &autoprune::cpu_isa);
  m.def("cpu_isas() -> str[]", &autoprune::cpu_isas);
  m.def("set_cpu_isa(str isa) -> str", &autoprune::set_cpu_isa);
  m.def("parallel_threads(int numel) -> int", &autoprune::parallel_threads);
}

TORCH_LIBRARY_IMPL(autoprune_cpp, CPU, m) {
  m.impl("apply_mask", &autoprune::apply_mask_cpu);
  m.impl("apply_mask_checked", &autoprune::apply_mask_checked_cpu);
  m.impl("masked_linear_checked", &autoprune::masked_linear_checked_cpu);
  m.impl("masked_linear_backward", &autoprune::masked_linear_backward_cpu);
  m.impl("masked_linear_backward_adam_", &autoprune::masked_linear_backward_adam_cpu);
  m.impl("nm_scores", &autoprune::nm_scores_cpu);
  m.impl("mask_backward", &autoprune::mask_backward_cpu);
  m.impl("aux_adam_step_", &autoprune::aux_adam_step_cpu);
  m.impl("aux_adam_step_multi_", &autoprune::aux_adam_step_multi_cpu);
  m.impl("aux_adam_step_sr_", &autoprune::aux_adam_step_sr_cpu);
  m.impl("nonfinite_indices", &autoprune::nonfinite_indices_cpu);
}

TORCH_LIBRARY_IMPL(autoprune_cpp, Meta, m) {
  m.impl("apply_mask", &autoprune::apply_mask_meta);
  m.impl("apply_mask_checked", &autoprune::apply_mask_checked_meta);
  m.impl("masked_linear_checked", &autoprune::masked_linear_checked_meta);
  m.impl("nm_scores", &autoprune::nm_scores_meta);
  m.impl("mask_backward", &autoprune::mask_backward_meta);
  m.impl("aux_adam_step_", &autoprune::aux_adam_step_meta);
  m.impl("aux_adam_step_multi_", &autoprune::aux_adam_step_multi_meta);
  m.impl("aux_adam_step_sr_", &autoprune::aux_adam_step_sr_meta);
}

TORCH_LIBRARY_IMPL(autoprune_cpp, CompositeExplicitAutograd, m) {
  m.impl("masked_linear", &autoprune::masked_linear);
  m.impl("masked_linear_backward", &autoprune::masked_linear_backward);
}
