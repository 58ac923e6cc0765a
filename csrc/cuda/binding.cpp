// CUDA registration of the autoprune_cpp ops: checks the tensors, allocates outputs with torch, and
// calls the launchers of autoprune_kernels.h on the current stream. Compiled only into CUDA builds
// (torch.version.cuda and nvcc present); the kernels themselves (autoprune_kernels.cu) include no
// torch header.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "../nm_group.h"
#include "../ops_common.h"
#include "autoprune_kernels.h"

namespace autoprune {
namespace {

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "autoprune_cpp: CUDA ", what, " failed: ", ap_cuda_error_string(code));
}

void* current_stream(const at::Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

at::Tensor apply_mask_cuda(const at::Tensor& weight, const at::Tensor& aux, c10::string_view surrogate,
                           c10::string_view rule, double alpha) {
  const bool unit = check_mask_call(nullptr, weight, aux, surrogate, rule, alpha, c10::DeviceType::CUDA).unit;
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor out = empty_like_contiguous(weight);
  const int64_t numel = weight.numel();
  if (numel == 0) return out;
  const at::Tensor w = weight.contiguous();
  const at::Tensor a = aux.contiguous();
  check_launch(ap_cuda_apply_mask(w.const_data_ptr(), dtype_code(w, "weight"), a.const_data_ptr(),
                                  dtype_code(a, "aux"), out.mutable_data_ptr(), numel,
                                  unit ? numel / weight.size(0) : 0, current_stream(weight)),
               "apply_mask");
  return out;
}

at::Tensor nm_scores_cuda(const at::Tensor& aux, int64_t n, int64_t m) {
  TORCH_CHECK_VALUE(aux.is_cuda(), "aux: expected a CUDA tensor, got one on ", aux.device());
  TORCH_CHECK_VALUE(1 <= n && n <= m && m <= AP_NM_MAX_M, "n, m: expected 1 <= n <= m <= ", AP_NM_MAX_M,
                    ", got n=", n, ", m=", m);
  TORCH_CHECK_VALUE(aux.numel() % m == 0, "aux: expected a multiple of m=", m, " entries, got ", aux.numel());
  const c10::cuda::CUDAGuard guard(aux.device());
  at::Tensor out = empty_like_contiguous(aux);
  if (aux.numel() == 0) return out;
  const at::Tensor a = aux.contiguous();
  check_launch(ap_cuda_nm_scores(a.const_data_ptr(), dtype_code(a, "aux"), out.mutable_data_ptr(), a.numel() / m,
                                 static_cast<int>(n), static_cast<int>(m), current_stream(aux)),
               "nm_scores");
  return out;
}

std::tuple<at::Tensor, at::Tensor> mask_backward_cuda(const at::Tensor& grad, const at::Tensor& weight,
                                                      const at::Tensor& aux, c10::string_view surrogate,
                                                      c10::string_view rule, double alpha, bool need_weight_grad,
                                                      bool need_aux_grad) {
  const MaskCall c = check_mask_call(&grad, weight, aux, surrogate, rule, alpha, c10::DeviceType::CUDA);
  const bool unit = c.unit;
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor dW = need_weight_grad ? empty_like_contiguous(weight) : empty0(weight);
  at::Tensor dM = need_aux_grad ? empty_like_contiguous(aux) : empty0(aux);
  if (!need_weight_grad && !need_aux_grad) return {dW, dM};
  const int64_t numel = weight.numel();
  const int64_t rows = unit ? aux.numel() : 0;
  const int64_t row_len = unit ? (rows > 0 ? numel / rows : 0) : 0;
  if (unit && rows == 0) return {dW, dM};
  const at::Tensor g = grad.contiguous();
  const at::Tensor a = aux.contiguous();
  const at::Tensor w = need_aux_grad ? weight.contiguous() : weight;
  const bool f64 = is_f64(grad) || is_f64(weight) || is_f64(aux);
  const size_t ws_bytes = ap_cuda_mask_backward_workspace(rows, row_len, need_aux_grad ? 1 : 0);
  at::Tensor workspace;
  if (ws_bytes > 0)
    workspace = at::empty({static_cast<int64_t>((ws_bytes + 7) / 8)}, a.options().dtype(at::kDouble));
  check_launch(ap_cuda_mask_backward(g.const_data_ptr(), dtype_code(g, "grad"),
                                     need_aux_grad ? w.const_data_ptr() : nullptr, dtype_code(weight, "weight"),
                                     a.const_data_ptr(), dtype_code(a, "aux"),
                                     need_weight_grad ? dW.mutable_data_ptr() : nullptr,
                                     need_aux_grad ? dM.mutable_data_ptr() : nullptr,
                                     numel, rows, row_len, c.surrogate, c.rule, alpha, f64 ? 1 : 0,
                                     ws_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, current_stream(weight)),
               "mask_backward");
  return {dW, dM};
}

struct CudaAdamSet {
  AdamSet set;
  ap_adam_tensor t{};
};

// checks one tensor set and fills its launcher descriptor (scalars of one step)
CudaAdamSet prepare(const at::Tensor& aux, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                    const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& weight, int64_t step,
                    double lr, double beta1, double beta2, double eps, double penalty_scale, const std::string& suffix) {
  CudaAdamSet c{checked_adam_set(aux, exp_avg, exp_avg_sq, grad, weight, step, lr, beta1, beta2, eps, suffix), {}};
  const AdamSet& s = c.set;
  ap_adam_tensor& t = c.t;
  t.aux = s.aux.work.mutable_data_ptr();
  t.exp_avg = s.exp_avg.work.mutable_data_ptr();
  t.exp_avg_sq = s.exp_avg_sq.work.mutable_data_ptr();
  t.grad = s.grad.defined() ? s.grad.const_data_ptr() : nullptr;
  t.weight = s.weight.defined() ? s.weight.const_data_ptr() : nullptr;
  t.numel = aux.numel();
  t.aux_dt = dtype_code(aux, "aux");
  t.exp_avg_dt = dtype_code(s.exp_avg.work, "exp_avg");
  t.exp_avg_sq_dt = dtype_code(s.exp_avg_sq.work, "exp_avg_sq");
  t.grad_dt = s.grad.defined() ? dtype_code(s.grad, "grad") : AP_F32;
  t.weight_dt = s.weight.defined() ? dtype_code(s.weight, "weight") : AP_F32;
  t.compute_f64 = s.f64 ? 1 : 0;
  t.penalty_scale = penalty_scale;
  adam_bias(step, lr, beta1, beta2, &t.step_size, &t.bias2_sqrt);
  return c;
}

ap_adam_hyper make_hyper(double beta1, double beta2, double eps, double rho, int surrogate, double alpha) {
  ap_adam_hyper h{};
  h.rho = rho;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.eps = eps;
  h.alpha = alpha;
  h.surrogate = surrogate;
  return h;
}

void aux_adam_step_cuda(const at::Tensor& aux, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                        const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& weight,
                        c10::SymInt step, double lr, double beta1, double beta2, double eps, double penalty_scale,
                        double rho, c10::string_view surrogate, double alpha) {
  const int sur = surrogate_code(surrogate);
  check_alpha(alpha);
  check_device(aux, "aux", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(aux.device());
  CudaAdamSet s = prepare(aux, exp_avg, exp_avg_sq, grad, weight, step.guard_int(__FILE__, __LINE__), lr, beta1, beta2,
                          eps, penalty_scale, "");
  const ap_adam_hyper h = make_hyper(beta1, beta2, eps, rho, sur, alpha);
  check_launch(ap_cuda_adam(&s.t, &h, current_stream(aux)), "aux_adam_step_");
  finish(s.set);
}

void aux_adam_step_multi_cuda(at::TensorList aux, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                              const c10::List<std::optional<at::Tensor>>& grads,
                              const c10::List<std::optional<at::Tensor>>& weights, c10::SymIntArrayRef steps,
                              at::ArrayRef<double> penalty_scales, double lr, double beta1, double beta2, double eps,
                              double rho, c10::string_view surrogate, double alpha) {
  const size_t n = check_multi_lengths(aux.size(), exp_avg.size(), exp_avg_sq.size(), grads.size(), weights.size(),
                                       steps.size(), penalty_scales.size());
  if (n == 0) return;
  const int sur = surrogate_code(surrogate);
  check_alpha(alpha);
  check_device(aux[0], "aux[0]", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(aux[0].device());
  std::vector<CudaAdamSet> sets;
  sets.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string suffix = "[" + std::to_string(i) + "]";
    check_same_device(aux[i], ("aux" + suffix).c_str(), aux[0], "aux[0]");
    sets.push_back(prepare(aux[i], exp_avg[i], exp_avg_sq[i], grads.get(i), weights.get(i),
                           steps[i].guard_int(__FILE__, __LINE__), lr, beta1, beta2, eps, penalty_scales[i], suffix));
  }
  const ap_adam_hyper h = make_hyper(beta1, beta2, eps, rho, sur, alpha);
  // one multi-tensor launch per compute precision (float64 tensors compute in double, as the reference)
  for (int f64 = 0; f64 < 2; ++f64) {
    std::vector<ap_adam_tensor> group;
    for (const auto& s : sets)
      if (s.t.compute_f64 == f64 && s.t.numel > 0) group.push_back(s.t);
    if (!group.empty())
      check_launch(ap_cuda_adam_multi(group.data(), static_cast<int>(group.size()), &h, current_stream(aux[0])),
                   "aux_adam_step_multi_");
  }
  for (auto& s : sets) finish(s.set);
}

}  // namespace
}  // namespace autoprune

TORCH_LIBRARY_IMPL(autoprune_cpp, CUDA, m) {
  m.impl("apply_mask", &autoprune::apply_mask_cuda);
  m.impl("nm_scores", &autoprune::nm_scores_cuda);
  m.impl("mask_backward", &autoprune::mask_backward_cuda);
  m.impl("aux_adam_step_", &autoprune::aux_adam_step_cuda);
  m.impl("aux_adam_step_multi_", &autoprune::aux_adam_step_multi_cuda);
}
