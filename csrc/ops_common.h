// Host-side helpers shared by the CPU registration (ops.cpp) and the CUDA binding
// (cuda/binding.cpp): argument checks, dtype / name codes, output allocation. Includes torch.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>

#include "autoprune_types.h"

namespace autoprune {

inline int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return AP_F32;
    case at::kBFloat16: return AP_BF16;
    case at::kHalf: return AP_F16;
    case at::kDouble: return AP_F64;
    default:
      TORCH_CHECK_TYPE(false, name, ": expected dtype in (float16, bfloat16, float32, float64), got ",
                       t.scalar_type());
  }
  return AP_F32;
}

inline int surrogate_code(c10::string_view name) {
  static const char* const names[] = {"softplus", "sigmoid", "identity", "leaky_relu", "leaky_relu_reversed", "relu"};
  for (int i = 0; i < 6; ++i)
    if (name == c10::string_view(names[i])) return i;
  TORCH_CHECK_VALUE(false, "surrogate: expected one of ('softplus', 'sigmoid', 'identity', 'leaky_relu', "
                    "'leaky_relu_reversed', 'relu'), got '", std::string(name.data(), name.size()), "'");
  return 0;
}

inline int rule_code(c10::string_view name) {
  if (name == c10::string_view("sign")) return AP_RULE_SIGN;
  if (name == c10::string_view("chain")) return AP_RULE_CHAIN;
  TORCH_CHECK_VALUE(false, "rule: expected one of ('sign', 'chain'), got '", std::string(name.data(), name.size()), "'");
  return 0;
}

inline void check_alpha(double alpha) {
  TORCH_CHECK_VALUE(std::isfinite(alpha), "alpha: expected a finite float, got ", alpha);
}

inline void check_device(const at::Tensor& t, const char* name, c10::DeviceType type) {
  TORCH_CHECK(t.device().type() == type, name, ": expected a ", c10::DeviceTypeName(type), " tensor, got one on ",
              t.device());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " (the device of ",
                    ref_name, "), got ", t.device());
}

// true: unit granularity (aux has shape [W.shape[0]]); false: weight granularity (same shape)
inline bool check_mask_pair(const at::Tensor& weight, const at::Tensor& aux) {
  dtype_code(weight, "weight");
  dtype_code(aux, "aux");
  check_same_device(aux, "aux", weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() >= 1, "weight: expected a tensor with at least one dimension, got a scalar");
  if (aux.sizes() == weight.sizes()) return false;
  TORCH_CHECK_VALUE(aux.dim() == 1 && aux.size(0) == weight.size(0), "aux: expected shape ", weight.sizes(),
                    " (weight granularity) or (", weight.size(0), ",) (unit granularity) to match weight, got ",
                    aux.sizes());
  return true;
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  dtype_code(t, name);
  check_same_device(t, name, ref, ref_name);
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " (that of ", ref_name, "), got ",
                    t.sizes());
}

// aux_adam_step_multi_: every list has one entry per aux tensor; returns that count
inline size_t check_multi_lengths(size_t n, size_t exp_avg, size_t exp_avg_sq, size_t grads, size_t weights,
                                  size_t steps, size_t penalty_scales) {
  TORCH_CHECK_VALUE(exp_avg == n && exp_avg_sq == n && grads == n && weights == n && steps == n && penalty_scales == n,
                    "aux_adam_step_multi_: expected exp_avg, exp_avg_sq, grads, weights, steps and penalty_scales "
                    "to have one entry per aux tensor (",
                    n, ")");
  return n;
}

inline void check_adam_scalars(int64_t step, double lr, double beta1, double beta2, double eps) {
  TORCH_CHECK_VALUE(step >= 1, "step: expected an integer >= 1, got ", step);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
                    "betas: expected each in [0, 1), got (", beta1, ", ", beta2, ")");
  TORCH_CHECK_VALUE(lr >= 0.0 && eps >= 0.0, "lr, eps: expected non-negative values, got lr=", lr, ", eps=", eps);
}

// the penalty's scalars of an Adam step of aux (the optimiser checks its groups; the fused ops again)
inline void check_penalty_scalars(double penalty_scale, double rho) {
  TORCH_CHECK_VALUE(std::isfinite(penalty_scale) && penalty_scale >= 0.0 && std::isfinite(rho) && rho >= 0.0,
                    "penalty_scale, rho: expected non-negative finite values, got ", penalty_scale, ", ", rho);
}

// The state of an aux Adam step: memory="standard" (no sr_keys; float32 aux and moments) or "bf16_sr"
// (three noise keys for exp_avg, exp_avg_sq, aux; bfloat16 ones). Checks the keys, the dtypes and,
// where the kernel writes the tensors in place without a copy, that they are contiguous. True for
// bf16_sr.
inline bool check_sr_state(const at::Tensor& aux, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                           at::IntArrayRef sr_keys, bool keys_required, bool contiguous) {
  TORCH_CHECK_VALUE(sr_keys.size() == 3 || (!keys_required && sr_keys.empty()), "sr_keys: expected ",
                    keys_required ? "3 noise keys" : "none or 3", " (exp_avg, exp_avg_sq, aux), got ",
                    sr_keys.size());
  for (const int64_t key : sr_keys)
    TORCH_CHECK_VALUE(key >= 0 && key <= 0xffffffffLL, "sr_keys: expected 32-bit unsigned values, got ", key);
  const bool sr = !sr_keys.empty();
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{aux, "aux"}, {exp_avg, "exp_avg"},
                                {exp_avg_sq, "exp_avg_sq"}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == (sr ? at::kBFloat16 : at::kFloat), name, ": expected ",
                     sr ? "bfloat16 (with sr_keys)" : "float32", ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(!contiguous || t.is_contiguous(), name, ": expected a contiguous tensor (it is updated in place)");
  }
  return sr;
}

// bias corrections of step `step` (reference.aux_adam_step_): (lr / (1 - beta1^step), sqrt(1 - beta2^step))
inline void adam_bias(int64_t step, double lr, double beta1, double beta2, double* step_size, double* bias2_sqrt) {
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  *step_size = lr / bias1;
  *bias2_sqrt = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
}

inline bool is_f64(const at::Tensor& t) { return t.scalar_type() == at::kDouble; }
inline bool is_f64(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() && is_f64(*t); }

inline at::Tensor empty_like_contiguous(const at::Tensor& t) { return at::empty(t.sizes(), t.options()); }
inline at::Tensor empty0(const at::Tensor& like) { return at::empty({0}, like.options()); }

// A tensor updated in place by a kernel that needs contiguous memory: `work` is `target` itself
// when contiguous, else a contiguous copy that finish() writes back.
struct InPlace {
  at::Tensor target;
  at::Tensor work;
  explicit InPlace(const at::Tensor& t) : target(t), work(t.is_contiguous() ? t : t.contiguous()) {}
  void finish() {
    if (!work.is_same(target)) target.copy_(work);
  }
};

// The checks apply_mask and mask_backward share (grad: nullptr for apply_mask), in the order the
// reference's errors come: names, alpha, device, shapes. Returns the codes and the granularity.
struct MaskCall {
  int surrogate;
  int rule;
  bool unit;  // aux has shape [W.shape[0]]
};
inline MaskCall check_mask_call(const at::Tensor* grad, const at::Tensor& weight, const at::Tensor& aux,
                                c10::string_view surrogate, c10::string_view rule, double alpha,
                                c10::DeviceType device) {
  MaskCall c{surrogate_code(surrogate), rule_code(rule), false};
  check_alpha(alpha);
  check_device(weight, "weight", device);
  c.unit = check_mask_pair(weight, aux);
  if (grad != nullptr) check_like(*grad, "grad", weight, "weight");
  return c;
}

// One aux_adam_step_ tensor set after its checks: the in-place tensors, grad / weight contiguous
// (undefined when absent) and whether the reference computes in float64. `suffix` ("" or "[i]")
// names the entry of a multi-tensor call in error messages.
struct AdamSet {
  InPlace aux, exp_avg, exp_avg_sq;
  at::Tensor grad, weight;
  bool f64;
};
inline AdamSet checked_adam_set(const at::Tensor& aux, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                                const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& weight,
                                int64_t step, double lr, double beta1, double beta2, double eps,
                                const std::string& suffix) {
  AdamSet s{InPlace(aux), InPlace(exp_avg), InPlace(exp_avg_sq), {}, {}, false};
  const std::string an = "aux" + suffix;
  dtype_code(aux, an.c_str());
  check_like(exp_avg, ("exp_avg" + suffix).c_str(), aux, an.c_str());
  check_like(exp_avg_sq, ("exp_avg_sq" + suffix).c_str(), aux, an.c_str());
  if (grad.has_value() && grad->defined()) {
    check_like(*grad, ("grad" + suffix).c_str(), aux, an.c_str());
    s.grad = grad->contiguous();
  }
  if (weight.has_value() && weight->defined()) {
    check_like(*weight, ("weight" + suffix).c_str(), aux, an.c_str());
    s.weight = weight->contiguous();
  }
  check_adam_scalars(step, lr, beta1, beta2, eps);
  // reference.compute_dtype(aux, exp_avg, grad, weight)
  s.f64 = is_f64(aux) || is_f64(exp_avg) || is_f64(grad) || is_f64(weight);
  return s;
}

inline void finish(AdamSet& s) {
  s.aux.finish();
  s.exp_avg.finish();
  s.exp_avg_sq.finish();
}

}  // namespace autoprune
