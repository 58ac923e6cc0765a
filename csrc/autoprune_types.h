/* Shared constants of the autoprune_ext kernels: dtype, surrogate and rule codes.
 *
 * Plain C (usable from C++, CUDA and the bindings); includes nothing. The codes are part of the
 * launcher API in cuda/autoprune_kernels.h and of the CPU kernel table in cpu/kernels.h.
 */
#ifndef AUTOPRUNE_TYPES_H_
#define AUTOPRUNE_TYPES_H_

/* element types a tensor argument may have */
enum ap_dtype {
  AP_F32 = 0,
  AP_BF16 = 1,
  AP_F16 = 2,
  AP_F64 = 3
};

/* surrogate s(m) replacing dh/dm (same order as autoprune_ext.reference.SURROGATES) */
enum ap_surrogate {
  AP_SOFTPLUS = 0,
  AP_SIGMOID = 1,
  AP_IDENTITY = 2,
  AP_LEAKY_RELU = 3,
  AP_LEAKY_RELU_REVERSED = 4,
  AP_RELU = 5
};

/* coarse-gradient rule c(W): sign(W) (AutoPrune) or W (plain chain rule) */
enum ap_rule {
  AP_RULE_SIGN = 0,
  AP_RULE_CHAIN = 1
};

/* inv_abs_weight: weights with |w| below this get no penalty push (reference.INV_ABS_EPS) */
#define AP_INV_ABS_EPS 1e-15
/* F.softplus(x) returns x itself above this threshold (beta = 1) */
#define AP_SOFTPLUS_THRESHOLD 20.0

#endif /* AUTOPRUNE_TYPES_H_ */
