// masked_linear_autograd / apply_mask_autograd: the masked linear layer's and the masked weight's
// forward and backward as one C++ autograd node each.
//
// The eager fast path of autoprune_ext/ops.py takes them for plain CPU tensors when the `cpp` backend
// runs the ops. They compute exactly what the Python autograd.Functions (_MaskedLinearFn,
// _ApplyMaskFn) compute, with the same kernels (masked_linear_checked / masked_linear and
// masked_linear_backward; apply_mask_checked / apply_mask and mask_backward), without a Python frame
// in forward or backward: a small layer's step loses most of its fixed cost. The Python layer checks
// every argument before calling them; the one check here is of what only backward sees (grad_out's
// dtype, as the Python path checks it).
//
// Under create_graph the first-order gradients come out attached to a node that raises when
// differentiated again, as the Python path's registered backward op does (the mask ops have no
// second derivative): never a silently partial higher-order gradient.
//
// AuxAdam.fused_step arms aux tensors (fused_aux_arm: the Adam moments and the step's scalars, keyed
// by the aux's data pointer). The masked linear node's backward then takes an armed aux's Adam step
// in its coarse-gradient pass (masked_linear_backward_adam_) instead of returning dM: no dM buffer,
// no second pass over aux. fused_aux_take tells the optimiser what happened.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "ops_common.h"

namespace autoprune {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor call_masked_linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& aux,
                              const std::optional<at::Tensor>& bias, bool check_finite) {
  // the forward does not depend on the surrogate, rule or alpha (only the backward does)
  if (check_finite) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("autoprune_cpp::masked_linear_checked", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&)>();
    return op.call(input, weight, aux, bias);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("autoprune_cpp::masked_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, c10::string_view, c10::string_view,
                                         double)>();
  return op.call(input, weight, aux, bias, "softplus", "sign", 0.1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_masked_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& aux,
    const std::string& surrogate, const std::string& rule, double alpha, bool need_x, bool need_w, bool need_m,
    bool need_b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("autoprune_cpp::masked_linear_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           c10::string_view, c10::string_view, double, bool, bool, bool, bool)>();
  return op.call(grad_out, input, weight, aux, surrogate, rule, alpha, need_x, need_w, need_m, need_b);
}

std::tuple<at::Tensor, at::Tensor> call_mask_backward(const at::Tensor& grad, const at::Tensor& weight,
                                                      const at::Tensor& aux, const std::string& surrogate,
                                                      const std::string& rule, double alpha, bool need_w, bool need_m) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("autoprune_cpp::mask_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, c10::string_view,
                                                                 c10::string_view, double, bool, bool)>();
  return op.call(grad, weight, aux, surrogate, rule, alpha, need_w, need_m);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> call_masked_linear_backward_adam(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& aux,
    const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const std::string& rule, bool need_x, bool need_w,
    bool need_b, int64_t step, double lr, double beta1, double beta2, double eps, double penalty_scale, double rho,
    at::IntArrayRef sr_keys) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("autoprune_cpp::masked_linear_backward_adam_", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, c10::string_view, bool, bool, bool, int64_t, double,
                           double, double, double, double, double, at::IntArrayRef)>();
  return op.call(grad_out, input, weight, aux, exp_avg, exp_avg_sq, rule, need_x, need_w, need_b, step, lr, beta1,
                 beta2, eps, penalty_scale, rho, sr_keys);
}

at::Tensor call_apply_mask(const at::Tensor& weight, const at::Tensor& aux, bool check_finite) {
  if (check_finite) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("autoprune_cpp::apply_mask_checked", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    return op.call(weight, aux);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("autoprune_cpp::apply_mask", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, c10::string_view,
                                         double)>();
  return op.call(weight, aux, "softplus", "sign", 0.1);  // T does not depend on the options
}

void save_options(AutogradContext* ctx, c10::string_view surrogate, c10::string_view rule, double alpha) {
  ctx->saved_data["surrogate"] = std::string(surrogate);
  ctx->saved_data["rule"] = std::string(rule);
  ctx->saved_data["alpha"] = alpha;
}

// torch's Python name of a float dtype, as the Python checks print it
std::string py_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return std::string("torch.") + c10::toString(t.scalar_type());
  }
}

// first-order gradients computed under create_graph, returned as fresh tensors that depend on every
// tensor the layer's backward read (`inputs`), with a backward that refuses
struct NoSecondDerivative : public torch::autograd::Function<NoSecondDerivative> {
  static variable_list forward(AutogradContext*, at::TensorList grads, at::TensorList /*inputs*/) {
    variable_list out;
    for (const at::Tensor& g : grads) out.push_back(g.clone());  // not views of this node's inputs
    return out;
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "autoprune_ext: the coarse gradient of the mask ops has no derivative (a higher-order "
                "gradient through them is not defined)");
  }
};

// The gradients of one backward into their input slots of `out` (slot, gradient; unneeded slots
// stay undefined). Under create_graph they pass through NoSecondDerivative first, depending on
// `read`: every tensor the backward read.
variable_list place_grads(variable_list out, const std::vector<std::pair<size_t, at::Tensor>>& needed,
                          at::TensorList read) {
  variable_list grads;
  for (const auto& [slot, g] : needed) grads.push_back(g);
  if (at::GradMode::is_enabled()) grads = NoSecondDerivative::apply(at::TensorList(grads), read);
  for (size_t k = 0; k < needed.size(); ++k) out[needed[k].first] = grads[k];
  return out;
}

// ------------------------------------------------------------------------------------------------
// armed aux tensors (AuxAdam.fused_step)
// ------------------------------------------------------------------------------------------------
// aux's gradient accumulator (std::shared_ptr<Node> before torch 2.12, c10::intrusive_ptr<Node> after)
using NodeRef = decltype(torch::autograd::impl::grad_accumulator(std::declval<const torch::autograd::Variable&>()));

struct ArmedAux {
  at::Tensor aux;  // a detached alias: the memory armed, even if the parameter's .data is replaced later
  at::Tensor exp_avg, exp_avg_sq;
  NodeRef accumulator;  // the armed parameter's: another leaf over the same memory is not it
  int64_t step;
  double lr, beta1, beta2, eps, penalty_scale, rho;
  std::vector<int64_t> sr_keys;  // memory="bf16_sr": the step's three noise keys; empty: "standard"
  std::thread::id thread;  // the arming thread: a backward on another thread does not take the step
  bool busy = false;       // a backward is taking the step now
  bool stepped = false;    // a backward took the step
  int64_t nonfinite = 0;
};

std::mutex& armed_mutex() {
  static std::mutex mu;
  return mu;
}

std::unordered_map<const void*, ArmedAux>& armed_table() {
  static auto* table = new std::unordered_map<const void*, ArmedAux>();  // never destroyed: no exit-order issue
  return *table;
}

// the same memory seen through any alias (the optimiser arms p.detach(); the node sees the parameter)
bool same_tensor(const at::Tensor& a, const at::Tensor& b) {
  return a.is_alias_of(b) && a.const_data_ptr() == b.const_data_ptr() && a.sizes() == b.sizes() &&
         a.strides() == b.strides() && a.scalar_type() == b.scalar_type();
}

void fused_aux_arm(const at::Tensor& aux, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, int64_t step,
                   double lr, double beta1, double beta2, double eps, double penalty_scale, double rho,
                   at::IntArrayRef sr_keys) {
  check_sr_state(aux, exp_avg, exp_avg_sq, sr_keys, false, true);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{aux, "aux"}, {exp_avg, "exp_avg"},
                                {exp_avg_sq, "exp_avg_sq"}}) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected a CPU tensor, got one on ", t.device());
    TORCH_CHECK_VALUE(t.numel() > 0, name, ": expected a non-empty tensor");
    TORCH_CHECK_VALUE(t.sizes() == aux.sizes(), name, ": expected the shape of aux ", aux.sizes(), ", got ",
                      t.sizes());
  }
  check_adam_scalars(step, lr, beta1, beta2, eps);
  check_penalty_scalars(penalty_scale, rho);
  TORCH_CHECK_VALUE(aux.requires_grad() && aux.is_leaf(), "aux: expected the parameter itself (a leaf that "
                    "requires grad), got a tensor that ", aux.requires_grad() ? "is not a leaf" : "requires no grad");
  NodeRef accumulator = torch::autograd::impl::grad_accumulator(aux);
  std::lock_guard<std::mutex> lock(armed_mutex());
  const bool inserted =
      armed_table()
          .try_emplace(aux.const_data_ptr(),
                       ArmedAux{aux.detach(), exp_avg, exp_avg_sq, std::move(accumulator), step, lr, beta1, beta2, eps,
                                penalty_scale, rho, std::vector<int64_t>(sr_keys.begin(), sr_keys.end()),
                                std::this_thread::get_id()})
          .second;
  TORCH_CHECK_VALUE(inserted, "aux: already armed by a fused_step in progress (one optimiser's fused_step per "
                              "aux tensor at a time)");
}

// [armed, stepped, entries left unchanged for a NaN/inf dM]; disarms (`aux`: the tensor given to
// fused_aux_arm, so that a parameter whose .data was replaced since is still found)
std::vector<int64_t> fused_aux_take(const at::Tensor& aux) {
  std::lock_guard<std::mutex> lock(armed_mutex());
  auto it = armed_table().find(aux.numel() > 0 ? aux.const_data_ptr() : nullptr);
  if (it == armed_table().end() || !same_tensor(it->second.aux, aux)) return {0, 0, 0};
  // a backward still stepping it (on another thread) records its step after this: count it as taken
  std::vector<int64_t> out{1, it->second.stepped || it->second.busy ? 1 : 0, it->second.nonfinite};
  armed_table().erase(it);
  return out;
}

int64_t fused_aux_armed() {
  std::lock_guard<std::mutex> lock(armed_mutex());
  return static_cast<int64_t>(armed_table().size());
}

// Whether the running backward accumulates aux's gradient from one node alone and keeps it: the
// engine runs aux's AccumulateGrad (not torch.autograd.grad's capture, not a backward(inputs=...)
// without aux), and no other node of the graph feeds it (a loss that uses weight_aux directly, one
// aux in two layers). Otherwise the step, taken on this node's dM alone, would not be step()'s.
bool sole_kept_gradient(const at::Tensor& aux) {
  const auto acc = torch::autograd::impl::try_get_grad_accumulator(aux);
  if (!acc) return false;
  const auto* exec = torch::autograd::get_current_graph_task_exec_info();
  const auto* nodes = torch::autograd::get_current_graph_task_nodes_in_graph();
  if (exec == nullptr || nodes == nullptr) return false;  // not in an engine's backward
  if (!exec->empty()) {
    const auto it = exec->find(acc.get());
    if (it == exec->end() || !it->second.needed_ || it->second.captures_) return false;
  }
  // edges into aux's accumulator, counted once per backward (graph task) for all armed tensors
  thread_local int counted_task = -1;
  thread_local std::unordered_map<const torch::autograd::Node*, int> feeds;
  const int task = torch::autograd::get_current_graph_task_id();
  if (task != counted_task) {
    feeds.clear();
    for (const torch::autograd::Node* n : *nodes)
      for (const torch::autograd::Edge& e : n->next_edges())
        if (e.function) ++feeds[e.function.get()];
    counted_task = task;
  }
  const auto f = feeds.find(acc.get());
  int total = f == feeds.end() ? 0 : f->second;
  // the backward's root node is not in nodes_in_graph: when it is this node, its edge is not counted
  const auto self = torch::autograd::get_current_node();
  if (!self) return false;
  if (nodes->count(self.get()) == 0)
    for (const torch::autograd::Edge& e : self->next_edges()) total += e.function.get() == acc.get() ? 1 : 0;
  return total == 1;
}

// The armed step of `aux` (a copy of its entry, marked busy), or nullopt when aux is not armed (or
// armed by another thread, or its gradient also comes from elsewhere: then it gets dM as usual).
std::optional<ArmedAux> claim_armed(const at::Tensor& aux) {
  {
    std::lock_guard<std::mutex> lock(armed_mutex());
    if (armed_table().empty()) return std::nullopt;  // the usual case: no fused_step running
  }
  if (aux.numel() == 0 || aux.grad().defined() || !sole_kept_gradient(aux)) return std::nullopt;
  // the armed parameter itself, not another leaf over its memory (functional_call with a detached
  // copy, a state dict loaded with assign=True into a shadow model)
  const auto acc = torch::autograd::impl::try_get_grad_accumulator(aux);
  std::lock_guard<std::mutex> lock(armed_mutex());
  auto it = armed_table().find(aux.const_data_ptr());
  if (it == armed_table().end() || !same_tensor(it->second.aux, aux) ||
      it->second.thread != std::this_thread::get_id() || !acc || acc.get() != it->second.accumulator.get())
    return std::nullopt;
  TORCH_CHECK_VALUE(!it->second.stepped && !it->second.busy,
                    "aux: its Adam step was already taken in this fused_step; fused_step allows one backward "
                    "through each masked layer (no layer used twice in one forward, no second backward, no "
                    "gradient accumulation)");
  it->second.busy = true;
  return it->second;
}

void release_armed(const at::Tensor& aux, bool stepped, int64_t nonfinite) {
  std::lock_guard<std::mutex> lock(armed_mutex());
  auto it = armed_table().find(aux.const_data_ptr());
  if (it == armed_table().end()) return;
  it->second.busy = false;
  it->second.stepped = it->second.stepped || stepped;
  it->second.nonfinite += nonfinite;
}

struct MaskedLinearFunction : public torch::autograd::Function<MaskedLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& aux, const std::optional<at::Tensor>& bias, c10::string_view surrogate,
                            c10::string_view rule, double alpha, bool check_finite) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = call_masked_linear(input, weight, aux, bias, check_finite);
    ctx->save_for_backward({input, weight, aux});
    save_options(ctx, surrogate, rule, alpha);
    ctx->saved_data["bias_dtype"] = bias.has_value() ? c10::IValue(bias->scalar_type()) : c10::IValue();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &aux = saved[2];
    const c10::IValue bias_dtype = ctx->saved_data["bias_dtype"];
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_m = ctx->needs_input_grad(2), need_b = !bias_dtype.isNone() && ctx->needs_input_grad(3);
    variable_list out(8);
    if (!(need_x || need_w || need_m || need_b)) return out;
    // the Python path's check of grad_out (ops._check_linear_backward_args): under autocast the
    // output, hence grad_out, is of a lower dtype than input; the kernels must not mix them silently
    TORCH_CHECK_TYPE(grad_outputs[0].scalar_type() == input.scalar_type(), "grad_out: expected dtype ",
                     py_dtype(input), " (that of input), got ", py_dtype(grad_outputs[0]));
    at::Tensor dX, dW, dM, db;
    const std::string& surrogate = ctx->saved_data["surrogate"].toStringRef();
    const std::string& rule = ctx->saved_data["rule"].toStringRef();
    // an aux armed by AuxAdam.fused_step takes its step here instead of getting dM (not under
    // create_graph, and only where the fused kernel applies; elsewhere it gets dM as usual)
    const at::ScalarType wt = weight.scalar_type();
    std::optional<ArmedAux> armed;
    if (need_m && !at::GradMode::is_enabled() && surrogate == "softplus" && weight.dim() == 2 &&
        aux.sizes() == weight.sizes() && (wt == at::kFloat || wt == at::kBFloat16) && input.scalar_type() == wt)
      armed = claim_armed(aux);
    if (armed) {
      int64_t nonfinite = 0;
      try {
        at::AutoDispatchBelowADInplaceOrView below;
        std::tie(dX, dW, db, nonfinite) = call_masked_linear_backward_adam(
            grad_outputs[0], input, weight, aux, armed->exp_avg, armed->exp_avg_sq, rule, need_x, need_w, need_b,
            armed->step, armed->lr, armed->beta1, armed->beta2, armed->eps, armed->penalty_scale, armed->rho,
            armed->sr_keys);
      } catch (...) {
        release_armed(aux, false, 0);  // its checks (or allocations) failed before it wrote anything
        throw;
      }
      for (const at::Tensor& t : {aux, armed->exp_avg, armed->exp_avg_sq}) t.unsafeGetTensorImpl()->bump_version();
      release_armed(aux, true, nonfinite);
    } else {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dX, dW, dM, db) = call_masked_linear_backward(grad_outputs[0], input, weight, aux, surrogate, rule,
                                                             ctx->saved_data["alpha"].toDouble(), need_x, need_w,
                                                             need_m, need_b);
    }
    std::vector<std::pair<size_t, at::Tensor>> needed;
    if (need_x) needed.emplace_back(0, dX);
    if (need_w) needed.emplace_back(1, dW);
    if (need_m && !armed) needed.emplace_back(2, dM);
    if (need_b) needed.emplace_back(3, db.to(bias_dtype.toScalarType()));
    return place_grads(std::move(out), needed, {grad_outputs[0], input, weight, aux});
  }
};

struct ApplyMaskFunction : public torch::autograd::Function<ApplyMaskFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& aux,
                            c10::string_view surrogate, c10::string_view rule, double alpha, bool check_finite) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = call_apply_mask(weight, aux, check_finite);
    ctx->save_for_backward({weight, aux});
    save_options(ctx, surrogate, rule, alpha);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const bool need_w = ctx->needs_input_grad(0), need_m = ctx->needs_input_grad(1);
    variable_list out(6);
    if (!(need_w || need_m)) return out;
    at::Tensor dW, dM;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(dW, dM) = call_mask_backward(grad_outputs[0], saved[0], saved[1],
                                            ctx->saved_data["surrogate"].toStringRef(),
                                            ctx->saved_data["rule"].toStringRef(),
                                            ctx->saved_data["alpha"].toDouble(), need_w, need_m);
    }
    std::vector<std::pair<size_t, at::Tensor>> needed;
    if (need_w) needed.emplace_back(0, dW);
    if (need_m) needed.emplace_back(1, dM);
    return place_grads(std::move(out), needed, {grad_outputs[0], saved[0], saved[1]});
  }
};

at::Tensor apply_mask_autograd(const at::Tensor& weight, const at::Tensor& aux, c10::string_view surrogate,
                               c10::string_view rule, double alpha, bool check_finite) {
  return ApplyMaskFunction::apply(weight, aux, surrogate, rule, alpha, check_finite);
}

at::Tensor masked_linear_autograd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& aux,
                                  const std::optional<at::Tensor>& bias, c10::string_view surrogate,
                                  c10::string_view rule, double alpha, bool check_finite) {
  return MaskedLinearFunction::apply(input, weight, aux, bias, surrogate, rule, alpha, check_finite);
}

}  // namespace
}  // namespace autoprune

TORCH_LIBRARY_FRAGMENT(autoprune_cpp, m) {
  m.def("fused_aux_arm(Tensor aux, Tensor exp_avg, Tensor exp_avg_sq, int step, float lr, float beta1, float beta2, "
        "float eps, float penalty_scale, float rho, int[] sr_keys=[]) -> ()", &autoprune::fused_aux_arm);
  m.def("fused_aux_take(Tensor aux) -> int[]", &autoprune::fused_aux_take);
  m.def("fused_aux_armed() -> int", &autoprune::fused_aux_armed);
  m.def("apply_mask_autograd(Tensor weight, Tensor aux, str surrogate, str rule, float alpha, bool check_finite) -> Tensor");
  m.def(
      "masked_linear_autograd(Tensor input, Tensor weight, Tensor aux, Tensor? bias, str surrogate, str rule, "
      "float alpha, bool check_finite) -> Tensor");
}

TORCH_LIBRARY_IMPL(autoprune_cpp, CompositeImplicitAutograd, m) {
  m.impl("masked_linear_autograd", &autoprune::masked_linear_autograd);
  m.impl("apply_mask_autograd", &autoprune::apply_mask_autograd);
}
