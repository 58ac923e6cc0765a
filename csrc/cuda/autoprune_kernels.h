/* Launcher API of the autoprune_ext CUDA kernels (autoprune_kernels.cu).
 *
 * Plain C: raw device pointers, element counts and the codes of ../autoprune_types.h. No torch and no
 * CUDA header is needed to include it, so the kernels compile with nvcc alone and the torch binding
 * (binding.cpp) with the host compiler alone.
 *
 * Conventions of every launcher:
 *  - pointers are device pointers to contiguous data of the given dtype (ap_dtype); an optional input
 *    is NULL when absent; outputs may not alias inputs except where a launcher updates in place;
 *  - arithmetic is float32, or float64 when compute_f64 != 0 (autoprune_ext.reference's rule: float64
 *    when any input is float64); loads convert from each tensor's dtype, stores round to nearest even;
 *  - work is enqueued on `stream` (a cudaStream_t; NULL = the legacy default stream) of the current
 *    device; the return value is the cudaError_t of the launch (0 = success), see ap_cuda_error_string.
 */
#ifndef AUTOPRUNE_KERNELS_H_
#define AUTOPRUNE_KERNELS_H_

#include <stddef.h>
#include <stdint.h>

#include "../autoprune_types.h"

#ifdef __cplusplus
extern "C" {
#endif

/* T = where(M >= 0, W, 0) in W's dtype (bit copy). row_len == 0: M has W's shape (weight
 * granularity); else M has numel / row_len entries, one per row of row_len elements (unit). */
int ap_cuda_apply_mask(const void* weight, int weight_dt, const void* aux, int aux_dt, void* out, int64_t numel,
                       int64_t row_len, void* stream);

/* Bytes of device workspace ap_cuda_mask_backward needs (unit granularity with dM; else 0). */
size_t ap_cuda_mask_backward_workspace(int64_t rows, int64_t row_len, int need_aux_grad);

/* dW = g * h(M) (W's dtype) and dM = g * c(W) * s(M) (M's dtype; unit granularity: the sum over each row
 * of g * c(W), times s(M[row])). dW / dM NULL: not requested. grad has W's shape, its own dtype.
 * rows = number of entries of M for unit granularity (row_len > 0). workspace: at least
 * ap_cuda_mask_backward_workspace(...) bytes, 8-byte aligned. */
int ap_cuda_mask_backward(const void* grad, int grad_dt, const void* weight, int weight_dt, const void* aux, int aux_dt,
                          void* dW, void* dM, int64_t numel, int64_t rows, int64_t row_len, int surrogate, int rule,
                          double alpha, int compute_f64, void* workspace, void* stream);

/* One auxiliary tensor of an Adam step: updated in place (aux, exp_avg, exp_avg_sq). */
typedef struct ap_adam_tensor {
  void* aux;
  void* exp_avg;
  void* exp_avg_sq;
  const void* grad;   /* NULL: penalty only */
  const void* weight; /* NULL: no inv_abs_weight */
  int64_t numel;
  int aux_dt;
  int exp_avg_dt;
  int exp_avg_sq_dt;
  int grad_dt;
  int weight_dt;
  int compute_f64;
  double penalty_scale; /* lambda / N of the tensor's group */
  double step_size;     /* lr / (1 - beta1^step) */
  double bias2_sqrt;    /* sqrt(1 - beta2^step) */
} ap_adam_tensor;

/* Hyper-parameters shared by all tensors of a step. */
typedef struct ap_adam_hyper {
  double rho;
  double beta1;
  double beta2;
  double eps;
  double alpha;
  int surrogate;
} ap_adam_hyper;

/* p = scale * (s(m) - rho * s(-m)) [/ |w|, 0 where |w| < 1e-15]; g = p + grad;
 * m1 = beta1 m1 + (1 - beta1) g; m2 = beta2 m2 + (1 - beta2) g^2; m -= step_size m1 / (sqrt(m2) / bias2_sqrt + eps) */
int ap_cuda_adam(const ap_adam_tensor* t, const ap_adam_hyper* h, void* stream);

/* The same over `count` tensors in as few launches as possible (up to 20 tensors / 160 blocks each);
 * every tensor's compute_f64 must be equal (the binding groups them). */
int ap_cuda_adam_multi(const ap_adam_tensor* ts, int count, const ap_adam_hyper* h, void* stream);

/* N:M scores (autoprune_ext.reference.nm_scores): one thread per group of m (1 <= n <= m <= 32)
 * consecutive entries of aux (dtype aux_dt); out has aux's dtype and size groups * m; computed in
 * float32, float64 for AP_F64. */
int ap_cuda_nm_scores(const void* aux, int aux_dt, void* out, int64_t groups, int n, int m, void* stream);

/* cudaGetErrorString of a launcher's return value. */
const char* ap_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* AUTOPRUNE_KERNELS_H_ */
