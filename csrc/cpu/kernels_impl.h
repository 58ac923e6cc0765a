// Bodies of the CPU kernels, compiled once per instruction set.
//
// Included by kernels_isa_*.cpp with AP_ISA_NS naming a namespace of its own and, for the
// AVX2 / AVX-512 copies, under a `#pragma GCC target`. It includes no header and calls no inline
// function from the standard library: a std:: template instantiated here would be a weak symbol
// shared with the other copies, and the linker could hand AVX-512 code to a CPU without it.
// Everything below is plain loops over small cache-resident blocks that GCC / Clang vectorise at
// -O3: block-wise dtype conversion, then float arithmetic (or double, for float64 inputs), with the
// transcendental functions written as branch-free polynomials so that they vectorise too.
//
// Formulas and rounding order follow autoprune_ext/reference.py (see the comments per kernel).

#ifndef AP_ISA_NS
#error "define AP_ISA_NS before including kernels_impl.h"
#endif

namespace autoprune {
namespace cpu {
namespace AP_ISA_NS {

#define AP_INLINE static inline __attribute__((always_inline))

// ------------------------------------------------------------------------------------------------
// scalar helpers
// ------------------------------------------------------------------------------------------------
AP_INLINE uint32_t f2u(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
}
AP_INLINE float u2f(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
AP_INLINE int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// bfloat16 <-> float32, as c10::BFloat16 (round to nearest even, NaN -> 0x7FC0)
AP_INLINE float bf16_to_f32(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }
AP_INLINE uint16_t f32_to_bf16(float f) {
  const uint32_t u = f2u(f);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : r);
}

// float16 <-> float32, branch-free, bit-identical to c10::detail::fp16_ieee_{to,from}_fp32_value
AP_INLINE float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = sign | (two_w < (1u << 27) ? f2u(denormalized) : f2u(normalized));
  return u2f(bits);
}
AP_INLINE uint16_t f32_to_f16(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f2u(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = u2f((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f2u(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// exp(x) for x <= 0 (NaN propagates): Cephes expf polynomial with Cody-Waite reduction; the scale
// 2^n is applied in two halves so that results in the denormal range round correctly.
AP_INLINE float exp_nonpos(float x) {
  x = x < -104.0f ? -104.0f : x;
  const float t = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: round to an integer
  const float n = t - 12582912.0f;
  const int32_t ni = static_cast<int32_t>(f2u(t) - 0x4B400000u);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const int32_t n1 = ni >> 1;
  const int32_t n2 = ni - n1;
  const float s1 = u2f(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = u2f(static_cast<uint32_t>(n2 + 127) << 23);
  return (y * s1) * s2;
}

// log1p(y) for y in [0, 1] (NaN propagates), as 2 atanh(s) with s = y / (2 + y) <= 1/3:
// t = 2s = 2y / (2 + y) needs no range reduction and keeps full relative precision for tiny and
// denormal y; the series t (1 + z/3 + z^2/5 + ... + z^6/13), z = s^2 <= 1/9, truncates below 1e-8
// relative. Measured over [2^-149, 1]: at most 3 * 2^-24 relative error, one division, no branch.
AP_INLINE float log1p_unit(float y) {
  const float t = (y + y) / (2.0f + y);
  const float h = 0.5f * t;
  const float z = h * h;
  float p = 1.0f / 13.0f;
  p = p * z + 1.0f / 11.0f;
  p = p * z + 1.0f / 9.0f;
  p = p * z + 1.0f / 7.0f;
  p = p * z + 1.0f / 5.0f;
  p = p * z + 1.0f / 3.0f;
  return t + t * (z * p);
}

// F.softplus (beta 1, threshold 20): x above 20, else log1p(exp(x)) = max(x, 0) + log1p(exp(-|x|))
AP_INLINE float softplus_f(float x) {
  const float l = log1p_unit(exp_nonpos(-__builtin_fabsf(x)));
  const float r = (x > 0.0f ? x : 0.0f) + l;
  return x > 20.0f ? x : r;
}
AP_INLINE float sigmoid_f(float x) {
  const float e = exp_nonpos(-__builtin_fabsf(x));
  return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}
AP_INLINE double softplus_d(double x) { return x > 20.0 ? x : __builtin_log1p(__builtin_exp(x)); }
AP_INLINE double sigmoid_d(double x) { return 1.0 / (1.0 + __builtin_exp(-x)); }

// square root in the compute precision (a float must not go through the double __builtin_sqrt: the
// update would then be computed in double, with double's range -- no float overflow to inf)
AP_INLINE float sqrt_ct(float x) { return __builtin_sqrtf(x); }
AP_INLINE double sqrt_ct(double x) { return __builtin_sqrt(x); }

AP_INLINE float finite_max(float) { return __FLT_MAX__; }
AP_INLINE double finite_max(double) { return __DBL_MAX__; }

AP_INLINE float softplus_ct(float x) { return softplus_f(x); }
AP_INLINE double softplus_ct(double x) { return softplus_d(x); }
AP_INLINE float sigmoid_ct(float x) { return sigmoid_f(x); }
AP_INLINE double sigmoid_ct(double x) { return sigmoid_d(x); }

// reference.surrogate: alpha in the compute precision (double for float64 inputs)
template <typename CT>
AP_INLINE CT alpha_ct(double alpha) {
  return static_cast<CT>(alpha);
}

template <typename CT>
AP_INLINE CT surrogate_one(CT m, int kind, CT alpha) {
  switch (kind) {
    case AP_SOFTPLUS: return softplus_ct(m);
    case AP_SIGMOID: return sigmoid_ct(m);
    case AP_IDENTITY: return CT(1);
    case AP_LEAKY_RELU: return m > CT(0) ? CT(1) : alpha;
    case AP_LEAKY_RELU_REVERSED: return m > CT(0) ? alpha : CT(1);
    default: return m > CT(0) ? CT(1) : CT(0);
  }
}

// ------------------------------------------------------------------------------------------------
// block conversion
// ------------------------------------------------------------------------------------------------
template <typename CT>
__attribute__((noinline)) static void cvt_in(const void* src, int dt, int64_t off, int64_t n, CT* dst) {
  switch (dt) {
    case AP_F32: {
      const float* s = static_cast<const float*>(src) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<CT>(s[i]);
      break;
    }
    case AP_F64: {
      const double* s = static_cast<const double*>(src) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<CT>(s[i]);
      break;
    }
    case AP_BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<CT>(bf16_to_f32(s[i]));
      break;
    }
    default: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<CT>(f16_to_f32(s[i]));
      break;
    }
  }
}

template <typename CT>
__attribute__((noinline)) static void cvt_out(const CT* src, void* dst, int dt, int64_t off, int64_t n) {
  switch (dt) {
    case AP_F32: {
      float* d = static_cast<float*>(dst) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(src[i]);
      break;
    }
    case AP_F64: {
      double* d = static_cast<double*>(dst) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<double>(src[i]);
      break;
    }
    case AP_BF16: {  // from double: through float, as c10::BFloat16(double)
      uint16_t* d = static_cast<uint16_t*>(dst) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(static_cast<float>(src[i]));
      break;
    }
    default: {
      uint16_t* d = static_cast<uint16_t*>(dst) + off;
      for (int64_t i = 0; i < n; ++i) d[i] = f32_to_f16(static_cast<float>(src[i]));
      break;
    }
  }
}

template <typename CT>
AP_INLINE bool is_native(int dt) {
  return sizeof(CT) == 4 ? dt == AP_F32 : dt == AP_F64;
}

// elements [off, off + n) of src as CT: a pointer into src when its dtype is CT, else converted into buf
template <typename CT>
AP_INLINE const CT* load_block(const void* src, int dt, int64_t off, int64_t n, CT* buf) {
  if (is_native<CT>(dt)) return static_cast<const CT*>(src) + off;
  cvt_in<CT>(src, dt, off, n, buf);
  return buf;
}
// where to compute elements [off, off + n) of dst: dst itself when its dtype is CT, else buf
template <typename CT>
AP_INLINE CT* out_block(void* dst, int dt, int64_t off, CT* buf) {
  return is_native<CT>(dt) ? static_cast<CT*>(dst) + off : buf;
}
template <typename CT>
AP_INLINE void flush_block(const CT* buf, void* dst, int dt, int64_t off, int64_t n) {
  if (!is_native<CT>(dt)) cvt_out<CT>(buf, dst, dt, off, n);
}
// buf (n elements) into dst at off, converting unless dst has dtype CT
template <typename CT>
AP_INLINE void store_block(const CT* buf, void* dst, int dt, int64_t off, int64_t n) {
  if (is_native<CT>(dt))
    __builtin_memcpy(static_cast<CT*>(dst) + off, buf, static_cast<size_t>(n) * sizeof(CT));
  else
    cvt_out<CT>(buf, dst, dt, off, n);
}
template <typename CT>
AP_INLINE CT load_one(const void* src, int dt, int64_t i) {
  switch (dt) {
    case AP_F32: return static_cast<CT>(static_cast<const float*>(src)[i]);
    case AP_F64: return static_cast<CT>(static_cast<const double*>(src)[i]);
    case AP_BF16: return static_cast<CT>(bf16_to_f32(static_cast<const uint16_t*>(src)[i]));
    default: return static_cast<CT>(f16_to_f32(static_cast<const uint16_t*>(src)[i]));
  }
}
template <typename CT>
AP_INLINE void store_one(CT v, void* dst, int dt, int64_t i) {
  cvt_out<CT>(&v, dst, dt, i, 1);
}

// ------------------------------------------------------------------------------------------------
// surrogates over a block
// ------------------------------------------------------------------------------------------------
template <typename CT>
__attribute__((noinline)) static void surrogate_block(const CT* m, CT* s, int64_t n, int kind, CT alpha) {
  switch (kind) {
    case AP_SOFTPLUS:
      for (int64_t i = 0; i < n; ++i) s[i] = softplus_ct(m[i]);
      break;
    case AP_SIGMOID:
      for (int64_t i = 0; i < n; ++i) s[i] = sigmoid_ct(m[i]);
      break;
    case AP_IDENTITY:
      for (int64_t i = 0; i < n; ++i) s[i] = CT(1);
      break;
    case AP_LEAKY_RELU:
      for (int64_t i = 0; i < n; ++i) s[i] = m[i] > CT(0) ? CT(1) : alpha;
      break;
    case AP_LEAKY_RELU_REVERSED:
      for (int64_t i = 0; i < n; ++i) s[i] = m[i] > CT(0) ? alpha : CT(1);
      break;
    default:
      for (int64_t i = 0; i < n; ++i) s[i] = m[i] > CT(0) ? CT(1) : CT(0);
      break;
  }
}

// softplus(x) and softplus(-x), sharing log1p(exp(-|x|))
AP_INLINE void softplus_pair(float x, float* sp, float* sn) {
  const float l = log1p_unit(exp_nonpos(-__builtin_fabsf(x)));
  const float p = (x > 0.0f ? x : 0.0f) + l;
  const float q = (x < 0.0f ? -x : 0.0f) + l;
  *sp = x > 20.0f ? x : p;
  *sn = -x > 20.0f ? -x : q;
}

// s(m) and s(-m) together (the penalty gradient needs both; softplus / sigmoid share one exp)
__attribute__((noinline)) static void surrogate_pair_block(const float* m, float* sp, float* sn, int64_t n, int kind,
                                                           float alpha) {
  switch (kind) {
    case AP_SOFTPLUS:
      for (int64_t i = 0; i < n; ++i) softplus_pair(m[i], sp + i, sn + i);
      break;
    case AP_SIGMOID:
      for (int64_t i = 0; i < n; ++i) {
        const float x = m[i];
        const float e = exp_nonpos(-__builtin_fabsf(x));
        const float den = 1.0f + e;
        sp[i] = (x >= 0.0f ? 1.0f : e) / den;
        sn[i] = (-x >= 0.0f ? 1.0f : e) / den;
      }
      break;
    case AP_IDENTITY:
      for (int64_t i = 0; i < n; ++i) sp[i] = sn[i] = 1.0f;
      break;
    case AP_LEAKY_RELU:
      for (int64_t i = 0; i < n; ++i) {
        sp[i] = m[i] > 0.0f ? 1.0f : alpha;
        sn[i] = -m[i] > 0.0f ? 1.0f : alpha;
      }
      break;
    case AP_LEAKY_RELU_REVERSED:
      for (int64_t i = 0; i < n; ++i) {
        sp[i] = m[i] > 0.0f ? alpha : 1.0f;
        sn[i] = -m[i] > 0.0f ? alpha : 1.0f;
      }
      break;
    default:
      for (int64_t i = 0; i < n; ++i) {
        sp[i] = m[i] > 0.0f ? 1.0f : 0.0f;
        sn[i] = -m[i] > 0.0f ? 1.0f : 0.0f;
      }
      break;
  }
}
__attribute__((noinline)) static void surrogate_pair_block(const double* m, double* sp, double* sn, int64_t n, int kind,
                                                           double alpha) {
  for (int64_t i = 0; i < n; ++i) {
    sp[i] = surrogate_one<double>(m[i], kind, alpha);
    sn[i] = surrogate_one<double>(-m[i], kind, alpha);
  }
}

// ------------------------------------------------------------------------------------------------
// apply_mask: T = where(M >= 0, W, 0), copied bit for bit in W's dtype
// ------------------------------------------------------------------------------------------------
template <typename U, typename CM, bool kCheck>
static void apply_mask_weight_impl(const ApplyMaskArgs& a, int64_t begin, int64_t end) {
  CM buf[kBlock];
  const U* w = static_cast<const U*>(a.weight);
  U* out = static_cast<U*>(a.out);
  const CM big = finite_max(CM(0));
  int bad = 0;
  for (int64_t off = begin; off < end; off += kBlock) {
    const int64_t n = imin(kBlock, end - off);
    const CM* m = load_block<CM>(a.aux, a.aux_dt, off, n, buf);
    const U* wp = w + off;
    U* op = out + off;
    for (int64_t i = 0; i < n; ++i) {
      const U v = wp[i];  // loaded unconditionally: a blend, not a masked (fault-suppressing) load
      op[i] = m[i] >= CM(0) ? v : U(0);
    }
    if (kCheck) {
      int block_bad = 0;  // NaN fails the compare too
      for (int64_t i = 0; i < n; ++i) block_bad |= !((m[i] < CM(0) ? -m[i] : m[i]) <= big);
      bad |= block_bad;
    }
  }
  if (kCheck && bad) __atomic_store_n(a.nonfinite, 1, __ATOMIC_RELAXED);
}

template <typename U, typename CM>
static void apply_mask_weight(const ApplyMaskArgs& a, int64_t begin, int64_t end) {
  if (a.nonfinite)
    apply_mask_weight_impl<U, CM, true>(a, begin, end);
  else
    apply_mask_weight_impl<U, CM, false>(a, begin, end);
}

AP_INLINE bool keep_one(const void* aux, int dt, int64_t i) {
  return dt == AP_F64 ? static_cast<const double*>(aux)[i] >= 0.0 : load_one<float>(aux, dt, i) >= 0.0f;
}

static void apply_mask_unit(const ApplyMaskArgs& a, int64_t begin, int64_t end) {
  const int64_t es = a.weight_dt == AP_F64 ? 8 : (a.weight_dt == AP_F32 ? 4 : 2);
  const char* w = static_cast<const char*>(a.weight);
  char* out = static_cast<char*>(a.out);
  for (int64_t i = begin; i < end;) {
    const int64_t r = i / a.row_len;
    const int64_t stop = imin(end, (r + 1) * a.row_len);
    if (keep_one(a.aux, a.aux_dt, r))
      __builtin_memcpy(out + i * es, w + i * es, static_cast<size_t>((stop - i) * es));
    else
      __builtin_memset(out + i * es, 0, static_cast<size_t>((stop - i) * es));
    i = stop;
  }
}

static void apply_mask(const ApplyMaskArgs& a, int64_t begin, int64_t end) {
  if (a.row_len > 0) return apply_mask_unit(a, begin, end);
  const bool m64 = a.aux_dt == AP_F64;  // compare M in its own precision (bf16/fp16 -> float is exact)
  switch (a.weight_dt) {
    case AP_F64:
      return m64 ? apply_mask_weight<uint64_t, double>(a, begin, end) : apply_mask_weight<uint64_t, float>(a, begin, end);
    case AP_F32:
      return m64 ? apply_mask_weight<uint32_t, double>(a, begin, end) : apply_mask_weight<uint32_t, float>(a, begin, end);
    default:
      return m64 ? apply_mask_weight<uint16_t, double>(a, begin, end) : apply_mask_weight<uint16_t, float>(a, begin, end);
  }
}

// ------------------------------------------------------------------------------------------------
// mask_backward, weight granularity
//   dW = (g * h(M)).to(W.dtype)               (a product, as the reference: -0 and NaN propagate)
//   dM = ((g * c(W)) * s(M)).to(M.dtype)      c = sign (torch.sign: 0 for 0 and NaN) or identity
// ------------------------------------------------------------------------------------------------
// T[off, off + n) = where(m >= 0, W, 0), W's bits copied as apply_mask does
template <typename U, typename CT>
AP_INLINE void mask_copy_block(const void* weight, void* out, const CT* m, int64_t off, int64_t n) {
  const U* w = static_cast<const U*>(weight) + off;
  U* o = static_cast<U*>(out) + off;
  for (int64_t i = 0; i < n; ++i) {
    const U v = w[i];
    o[i] = m[i] >= CT(0) ? v : U(0);
  }
}

// dM first, then T, then dW: dW may overwrite grad, which dM reads
template <typename CT>
static void backward_weight_impl(const BackwardArgs& a, int64_t begin, int64_t end) {
  CT gbuf[kBlock], mbuf[kBlock], wbuf[kBlock], sbuf[kBlock], obuf[kBlock];
  const CT alpha = alpha_ct<CT>(a.alpha);
  for (int64_t off = begin; off < end; off += kBlock) {
    const int64_t n = imin(kBlock, end - off);
    const CT* g = load_block<CT>(a.grad, a.grad_dt, off, n, gbuf);
    const CT* m = load_block<CT>(a.aux, a.aux_dt, off, n, mbuf);
    if (a.dM) {
      const CT* w = load_block<CT>(a.weight, a.weight_dt, off, n, wbuf);
      surrogate_block<CT>(m, sbuf, n, a.surrogate, alpha);
      CT* dm = out_block<CT>(a.dM, a.aux_dt, off, obuf);
      if (a.rule == AP_RULE_SIGN) {
        for (int64_t i = 0; i < n; ++i) {
          const CT c = (w[i] > CT(0) ? CT(1) : CT(0)) - (w[i] < CT(0) ? CT(1) : CT(0));
          dm[i] = (g[i] * c) * sbuf[i];
        }
      } else {
        for (int64_t i = 0; i < n; ++i) dm[i] = (g[i] * w[i]) * sbuf[i];
      }
      flush_block<CT>(dm, a.dM, a.aux_dt, off, n);
    }
    if (a.T) {
      if (a.weight_dt == AP_F64)
        mask_copy_block<uint64_t, CT>(a.weight, a.T, m, off, n);
      else if (a.weight_dt == AP_F32)
        mask_copy_block<uint32_t, CT>(a.weight, a.T, m, off, n);
      else
        mask_copy_block<uint16_t, CT>(a.weight, a.T, m, off, n);
    }
    if (a.dW) {
      CT* dw = out_block<CT>(a.dW, a.weight_dt, off, obuf);
      for (int64_t i = 0; i < n; ++i) dw[i] = g[i] * (m[i] >= CT(0) ? CT(1) : CT(0));
      flush_block<CT>(dw, a.dW, a.weight_dt, off, n);
    }
  }
}

// The common cases -- grad and weight of one dtype (U: the bits of float32 or bfloat16), float32 aux;
// softplus when dM is wanted -- as one loop with the formulas above, bit for bit: no stack buffers.
// kDW / kDM / kT: which of dW, dM, T the call writes (the trainer's weight steps want dW and T, its
// mask steps dM and T). kInPlace: dW is written over grad (each index is read before it is written).
AP_INLINE float bits_to_f32(uint32_t u) { return u2f(u); }
AP_INLINE float bits_to_f32(uint16_t h) { return bf16_to_f32(h); }
AP_INLINE void f32_to_bits(float f, uint32_t* out) { *out = f2u(f); }
AP_INLINE void f32_to_bits(float f, uint16_t* out) { *out = f32_to_bf16(f); }

template <typename U, bool kSign, bool kT, bool kDW, bool kDM, bool kInPlace>
__attribute__((noinline)) static void backward_weight_fast(const BackwardArgs& a, int64_t begin, int64_t end) {
  U* g = static_cast<U*>(const_cast<void*>(a.grad));  // written only when kInPlace (then a.dW == a.grad)
  U* dw = static_cast<U*>(a.dW);
  const U* w = static_cast<const U*>(a.weight);
  const float* m = static_cast<const float*>(a.aux);
  float* dm = static_cast<float*>(a.dM);
  U* t = static_cast<U*>(a.T);
  for (int64_t i = begin; i < end; ++i) {
    const float gi = bits_to_f32(g[i]);
    const float x = m[i];
    if (kDM) {
      const float wi = bits_to_f32(w[i]);
      const float c = kSign ? (wi > 0.0f ? 1.0f : 0.0f) - (wi < 0.0f ? 1.0f : 0.0f) : wi;
      dm[i] = (gi * c) * softplus_f(x);
    }
    if (kT) t[i] = x >= 0.0f ? w[i] : U(0);
    if (kDW) f32_to_bits(gi * (x >= 0.0f ? 1.0f : 0.0f), kInPlace ? g + i : dw + i);
  }
}

template <typename U, bool kSign, bool kDW, bool kDM>
static void backward_weight_fast_for(const BackwardArgs& a, int64_t begin, int64_t end) {
  const bool in_place = kDW && a.dW == a.grad;
  if (a.T)
    return in_place ? backward_weight_fast<U, kSign, true, kDW, kDM, true>(a, begin, end)
                    : backward_weight_fast<U, kSign, true, kDW, kDM, false>(a, begin, end);
  return in_place ? backward_weight_fast<U, kSign, false, kDW, kDM, true>(a, begin, end)
                  : backward_weight_fast<U, kSign, false, kDW, kDM, false>(a, begin, end);
}

template <typename U>
static void backward_weight_fast_dispatch(const BackwardArgs& a, int64_t begin, int64_t end) {
  const bool sign = a.rule == AP_RULE_SIGN;
  if (!a.dM) return backward_weight_fast_for<U, true, true, false>(a, begin, end);  // the rule is unused
  if (!a.dW)
    return sign ? backward_weight_fast_for<U, true, false, true>(a, begin, end)
                : backward_weight_fast_for<U, false, false, true>(a, begin, end);
  return sign ? backward_weight_fast_for<U, true, true, true>(a, begin, end)
              : backward_weight_fast_for<U, false, true, true>(a, begin, end);
}

static void backward_weight(const BackwardArgs& a, int64_t begin, int64_t end) {
  if (a.f64) return backward_weight_impl<double>(a, begin, end);
  // without dM the surrogate is unused; T (when written) needs W's bits, dM needs W
  const bool common = (a.dM || a.dW) && (!a.dM || a.surrogate == AP_SOFTPLUS) && a.aux_dt == AP_F32 &&
                      a.grad_dt == a.weight_dt && (a.weight_dt == AP_F32 || a.weight_dt == AP_BF16) &&
                      (a.weight || (!a.dM && !a.T));
  if (!common) return backward_weight_impl<float>(a, begin, end);
  if (a.weight_dt == AP_F32) return backward_weight_fast_dispatch<uint32_t>(a, begin, end);
  return backward_weight_fast_dispatch<uint16_t>(a, begin, end);
}

// ------------------------------------------------------------------------------------------------
// mask_backward, unit granularity: task t covers columns [c * kUnitColumns, ...) of row r, writes
// dW there and the partial sum of g * c(W) (accumulated in double, 16 lanes) into partial[t];
// backward_unit_finish then sums each row's partials in order and multiplies by s(M[r]).
// ------------------------------------------------------------------------------------------------
constexpr int kLanes = 16;

template <typename CT>
static void backward_unit_impl(const BackwardArgs& a, int64_t begin, int64_t end) {
  CT gbuf[kBlock], wbuf[kBlock], obuf[kBlock];
  const int64_t K = a.row_len;
  for (int64_t t = begin; t < end; ++t) {
    const int64_t r = t / a.tasks_per_row;
    const int64_t c = t - r * a.tasks_per_row;
    const int64_t lo = r * K + c * kUnitColumns;
    const int64_t hi = r * K + imin(K, (c + 1) * kUnitColumns);
    const CT h = load_one<CT>(a.aux, a.aux_dt, r) >= CT(0) ? CT(1) : CT(0);
    double lanes[kLanes];
    for (int j = 0; j < kLanes; ++j) lanes[j] = 0.0;
    for (int64_t off = lo; off < hi; off += kBlock) {
      const int64_t n = imin(kBlock, hi - off);
      const CT* g = load_block<CT>(a.grad, a.grad_dt, off, n, gbuf);
      if (a.dW) {
        CT* dw = out_block<CT>(a.dW, a.weight_dt, off, obuf);
        for (int64_t i = 0; i < n; ++i) dw[i] = g[i] * h;
        flush_block<CT>(dw, a.dW, a.weight_dt, off, n);
      }
      if (a.dM) {
        const CT* w = load_block<CT>(a.weight, a.weight_dt, off, n, wbuf);
        CT* prod = obuf;
        if (a.rule == AP_RULE_SIGN) {
          for (int64_t i = 0; i < n; ++i)
            prod[i] = g[i] * ((w[i] > CT(0) ? CT(1) : CT(0)) - (w[i] < CT(0) ? CT(1) : CT(0)));
        } else {
          for (int64_t i = 0; i < n; ++i) prod[i] = g[i] * w[i];
        }
        int64_t i = 0;
        for (; i + kLanes <= n; i += kLanes)
          for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<double>(prod[i + j]);
        for (int j = 0; i < n; ++i, ++j) lanes[j] += static_cast<double>(prod[i]);
      }
    }
    if (a.dM) {
      double s = 0.0;
      for (int j = 0; j < kLanes; ++j) s += lanes[j];
      a.partial[t] = s;
    }
  }
}

static void backward_unit(const BackwardArgs& a, int64_t begin, int64_t end) {
  if (a.f64)
    backward_unit_impl<double>(a, begin, end);
  else
    backward_unit_impl<float>(a, begin, end);
}

template <typename CT>
static void backward_unit_finish_impl(const BackwardArgs& a, int64_t begin, int64_t end) {
  const CT alpha = alpha_ct<CT>(a.alpha);
  for (int64_t r = begin; r < end; ++r) {
    double s = 0.0;
    for (int64_t c = 0; c < a.tasks_per_row; ++c) s += a.partial[r * a.tasks_per_row + c];
    const CT m = load_one<CT>(a.aux, a.aux_dt, r);
    store_one<CT>(static_cast<CT>(s) * surrogate_one<CT>(m, a.surrogate, alpha), a.dM, a.aux_dt, r);
  }
}

static void backward_unit_finish(const BackwardArgs& a, int64_t begin, int64_t end) {
  if (a.f64)
    backward_unit_finish_impl<double>(a, begin, end);
  else
    backward_unit_finish_impl<float>(a, begin, end);
}

// ------------------------------------------------------------------------------------------------
// aux_adam_step_ (reference.aux_adam_step_ / penalty_grad), one pass, in place:
//   p  = scale * (s(m) - rho * s(-m));  with weight: p = |w| < 1e-15 ? 0 : p / max(|w|, 1e-15)
//        (max as torch.clamp_min: a NaN |w| gives a NaN p)
//   g  = p + grad
//   m1 = exp_avg * beta1 + (1 - beta1) * g;   m2 = exp_avg_sq * beta2 + (1 - beta2) * g * g
//   m  = m - (lr / bias1) * m1 / (sqrt(m2) / sqrt(bias2) + eps)
// ------------------------------------------------------------------------------------------------
// memory="bf16_sr": optim.stochastic_round_bf16 with the keyed noise of optim._sr_noise. Adding 16
// random low bits to the float32 pattern and truncating rounds |v| up with probability (low bits) /
// 2^16, for either sign, so the rounding is exact on average; NaN and inf convert as usual.
AP_INLINE uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

// kClamp0: clamp_min(0) after the rounding (exp_avg_sq): a negative non-NaN value becomes +0. All
// selects, no branch: the loop vectorises.
template <bool kClamp0>
AP_INLINE void store_block_sr(const float* buf, void* dst, int64_t off, int64_t n, uint32_t key) {
  uint16_t* out = static_cast<uint16_t*>(dst) + off;
  const uint32_t k0 = static_cast<uint32_t>(off);  // the flat index mod 2^32, in 32-bit lanes
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = f2u(buf[i]);
    const uint32_t noise = lowbias32((k0 + static_cast<uint32_t>(i)) ^ key) >> 16;
    const bool finite = (bits & 0x7f800000u) != 0x7f800000u;
    // inf: its own bits; NaN: the quiet NaN f32_to_bf16 gives (integer selects, as the rest)
    const uint32_t special = (bits & 0x7fffffffu) > 0x7f800000u ? 0x7FC0u : bits >> 16;
    const uint32_t r = finite ? (bits + noise) >> 16 : special;
    const bool negative = (r & 0x8000u) != 0 && (r & 0x7fffu) <= 0x7f80u;
    out[i] = static_cast<uint16_t>(kClamp0 && negative ? 0u : r);
  }
}

// the step's scalars in the compute precision
template <typename CT>
struct AdamScalars {
  CT scale, rho, beta1, beta2, omb1, omb2, step_size, bias2_sqrt, eps;
  explicit AdamScalars(const AdamArgs& a)
      : scale(static_cast<CT>(a.penalty_scale)), rho(static_cast<CT>(a.rho)), beta1(static_cast<CT>(a.beta1)),
        beta2(static_cast<CT>(a.beta2)), omb1(static_cast<CT>(1.0 - a.beta1)), omb2(static_cast<CT>(1.0 - a.beta2)),
        step_size(static_cast<CT>(a.step_size)), bias2_sqrt(static_cast<CT>(a.bias2_sqrt)), eps(static_cast<CT>(a.eps)) {}
};

// a * b + c, written out: one rounding where the instruction set has FMA, else two. The Adam formulas
// use it wherever a product meets a sum, so every kernel that inlines them rounds alike whatever
// the compiler would contract on its own (the fused backward + step must equal the two kernels bit
// for bit, and the loop around decides which products GCC's -ffp-contract=fast fuses).
#if defined(AP_HAS_FMA) || defined(__FP_FAST_FMAF)  // __FP_FAST_FMAF: the compiler's own target has FMA
AP_INLINE float fma_ct(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
AP_INLINE double fma_ct(double a, double b, double c) { return __builtin_fma(a, b, c); }
#else
AP_INLINE float fma_ct(float a, float b, float c) { return a * b + c; }  // no FMA: nothing contracts
AP_INLINE double fma_ct(double a, double b, double c) { return a * b + c; }
#endif

// the penalty gradient scale * (s(m) - rho * s(-m)), and that plus the task gradient
template <typename CT>
AP_INLINE CT penalty_of(const AdamScalars<CT>& c, CT sp, CT sn) {
  return c.scale * fma_ct(-c.rho, sn, sp);
}
template <typename CT>
AP_INLINE CT penalty_plus(const AdamScalars<CT>& c, CT sp, CT sn, CT grad) {
  return fma_ct(c.scale, fma_ct(-c.rho, sn, sp), grad);
}

// one entry's moments and update from its total gradient g
template <typename CT>
AP_INLINE void adam_one(const AdamScalars<CT>& c, CT m, CT e1, CT e2, CT g, CT* m_out, CT* e1_out, CT* e2_out) {
  const CT m1 = fma_ct(c.omb1, g, e1 * c.beta1);
  const CT m2 = fma_ct(c.omb2 * g, g, e2 * c.beta2);
  *e1_out = m1;
  *e2_out = m2;
  *m_out = m - c.step_size * m1 / (sqrt_ct(m2) / c.bias2_sqrt + c.eps);
}

template <typename CT>
static void adam_impl(const AdamArgs& a, int64_t begin, int64_t end) {
  CT abuf[kBlock], e1buf[kBlock], e2buf[kBlock], gbuf[kBlock], wbuf[kBlock], sp[kBlock], sn[kBlock];
  CT o1buf[kBlock], o2buf[kBlock], oabuf[kBlock];
  const CT alpha = alpha_ct<CT>(a.alpha);
  const AdamScalars<CT> c(a);
  const CT tiny = static_cast<CT>(AP_INV_ABS_EPS);
  for (int64_t off = begin; off < end; off += kBlock) {
    const int64_t n = imin(kBlock, end - off);
    const CT* m = load_block<CT>(a.aux, a.aux_dt, off, n, abuf);
    const CT* e1 = load_block<CT>(a.exp_avg, a.exp_avg_dt, off, n, e1buf);
    const CT* e2 = load_block<CT>(a.exp_avg_sq, a.exp_avg_sq_dt, off, n, e2buf);
    surrogate_pair_block(m, sp, sn, n, a.surrogate, alpha);
    CT* g = sp;  // the gradient overwrites s(m)
    for (int64_t i = 0; i < n; ++i) g[i] = penalty_of(c, sp[i], sn[i]);
    if (a.weight) {
      const CT* w = load_block<CT>(a.weight, a.weight_dt, off, n, wbuf);
      for (int64_t i = 0; i < n; ++i) {
        const CT aw = w[i] < CT(0) ? -w[i] : w[i];
        // g / max(|w|, tiny) where |w| >= tiny is g / |w|; a NaN |w| gives NaN (as torch.clamp_min)
        g[i] = aw < tiny ? CT(0) : g[i] / aw;
      }
    }
    if (a.grad) {
      const CT* gr = load_block<CT>(a.grad, a.grad_dt, off, n, gbuf);
      for (int64_t i = 0; i < n; ++i) g[i] = g[i] + gr[i];
    }
    // results go to stack buffers first (the outputs alias the inputs: in place), then out
    for (int64_t i = 0; i < n; ++i) adam_one<CT>(c, m[i], e1[i], e2[i], g[i], oabuf + i, o1buf + i, o2buf + i);
    if constexpr (sizeof(CT) == sizeof(float)) {
      if (a.sr) {  // the op checked: bfloat16 aux and moments
        store_block_sr<false>(o1buf, a.exp_avg, off, n, a.sr_keys[0]);
        store_block_sr<true>(o2buf, a.exp_avg_sq, off, n, a.sr_keys[1]);
        store_block_sr<false>(oabuf, a.aux, off, n, a.sr_keys[2]);
        continue;
      }
    }
    store_block<CT>(o1buf, a.exp_avg, a.exp_avg_dt, off, n);
    store_block<CT>(o2buf, a.exp_avg_sq, a.exp_avg_sq_dt, off, n);
    store_block<CT>(oabuf, a.aux, a.aux_dt, off, n);
  }
}

// The common case -- float32 aux, moments and grad (or none), softplus, no inv_abs_weight -- as one
// loop with the same formulas: no stack buffers, no copies out, about 30% faster than the blocks above
// (which convert every dtype). In place element by element: each index is read before it is written.
template <bool kGrad>
__attribute__((noinline)) static void adam_f32_softplus(const AdamArgs& a, int64_t begin, int64_t end) {
  float* m = static_cast<float*>(a.aux);
  float* e1 = static_cast<float*>(a.exp_avg);
  float* e2 = static_cast<float*>(a.exp_avg_sq);
  const float* gr = static_cast<const float*>(a.grad);
  const AdamScalars<float> c(a);
  for (int64_t i = begin; i < end; ++i) {
    float sp, sn;
    softplus_pair(m[i], &sp, &sn);
    const float g = kGrad ? penalty_plus(c, sp, sn, gr[i]) : penalty_of(c, sp, sn);
    adam_one<float>(c, m[i], e1[i], e2[i], g, m + i, e1 + i, e2 + i);
  }
}

static void adam(const AdamArgs& a, int64_t begin, int64_t end) {
  if (a.f64)
    adam_impl<double>(a, begin, end);
  else if (a.sr)
    adam_impl<float>(a, begin, end);
  else if (a.surrogate == AP_SOFTPLUS && !a.weight && a.aux_dt == AP_F32 && a.exp_avg_dt == AP_F32 &&
           a.exp_avg_sq_dt == AP_F32 && (!a.grad || a.grad_dt == AP_F32)) {
    if (a.grad)
      adam_f32_softplus<true>(a, begin, end);
    else
      adam_f32_softplus<false>(a, begin, end);
  } else {
    adam_impl<float>(a, begin, end);
  }
}

AP_INLINE float stored_to_f32(float v) { return v; }
AP_INLINE float stored_to_f32(uint16_t v) { return bf16_to_f32(v); }

// The first loop of the fused kernels over the block [off, off + n): T and dW from the aux before its
// step (A: the aux's storage, float32 or bfloat16 bits; dW may overwrite grad), and grad as float32
// into gbuf for the second loop. Distinct buffers: the op checked that aux, the moments and W share
// no memory; grad, dW and T are its own fresh tensors; dW is not touched when kInPlace.
template <typename U, typename A, bool kT, bool kDW, bool kInPlace>
AP_INLINE void fused_mask_block(const BackwardArgs& a, const A* __restrict__ m, int64_t off, int64_t n,
                                float* __restrict__ gbuf) {
  U* __restrict__ g = static_cast<U*>(const_cast<void*>(a.grad)) + off;  // written only when kInPlace
  U* __restrict__ dw = kDW && !kInPlace ? static_cast<U*>(a.dW) + off : nullptr;
  const U* __restrict__ w = static_cast<const U*>(a.weight) + off;
  U* __restrict__ t = kT ? static_cast<U*>(a.T) + off : nullptr;
  m += off;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = bits_to_f32(g[i]);
    const float x = stored_to_f32(m[i]);
    gbuf[i] = gi;
    if (kT) t[i] = x >= 0.0f ? w[i] : U(0);
    if (kDW) f32_to_bits(gi * (x >= 0.0f ? 1.0f : 0.0f), kInPlace ? g + i : dw + i);
  }
}

// backward_weight_fast with the Adam step of aux fused in (AuxAdam.fused_step): the dM of an entry
// goes straight into adam_f32_softplus's formulas, bit for bit the two-kernel result, and aux and the
// moments are written in place of dM. One softplus serves dM and the penalty gradient. Per block of
// kBlock entries, two loops: T and dW (which may overwrite grad), then dM and the step (which
// overwrites aux) from a float copy of grad -- one loop over all seven streams does not vectorise.
template <typename U, bool kSign, bool kT, bool kDW, bool kInPlace>
__attribute__((noinline)) static void backward_weight_adam_fast(const BackwardArgs& a, const AdamArgs& o,
                                                                int64_t begin, int64_t end, int64_t* nonfinite) {
  const U* __restrict__ w = static_cast<const U*>(a.weight);
  float* __restrict__ m = static_cast<float*>(o.aux);
  float* __restrict__ e1 = static_cast<float*>(o.exp_avg);
  float* __restrict__ e2 = static_cast<float*>(o.exp_avg_sq);
  const AdamScalars<float> c(o);
  float gbuf[kBlock];
  uint32_t bad = 0;  // 32-bit, as the float lanes: an int64 count keeps the loop from vectorising
  for (int64_t off = begin; off < end; off += kBlock) {
    const int64_t n = imin(kBlock, end - off);
    const U* __restrict__ wb = w + off;
    float* __restrict__ mb = m + off;
    fused_mask_block<U, float, kT, kDW, kInPlace>(a, m, off, n, gbuf);
    for (int64_t i = 0; i < n; ++i) {
      const float gi = gbuf[i];
      const float wi = bits_to_f32(wb[i]);
      const float x = mb[i];
      const float cw = kSign ? (wi > 0.0f ? 1.0f : 0.0f) - (wi < 0.0f ? 1.0f : 0.0f) : wi;
      float sp, sn;
      softplus_pair(x, &sp, &sn);
      const float d = (gi * cw) * sp;  // dM, as backward_weight_fast writes it
      const float v1 = e1[off + i], v2 = e2[off + i];
      float nm, n1, n2;
      adam_one<float>(c, x, v1, v2, penalty_plus(c, sp, sn, d), &nm, &n1, &n2);
      const bool ok = (d < 0.0f ? -d : d) <= __FLT_MAX__;  // false for NaN and inf
      mb[i] = ok ? nm : x;  // selects, stored unconditionally: masked stores do not vectorise here
      e1[off + i] = ok ? n1 : v1;
      e2[off + i] = ok ? n2 : v2;
      bad += ok ? 0u : 1u;
    }
  }
  if (bad) __atomic_fetch_add(nonfinite, static_cast<int64_t>(bad), __ATOMIC_RELAXED);
}

// The same with memory="bf16_sr" (bfloat16 aux and moments): dM rounded to bfloat16 as the backward
// stores it, then the block Adam step's formulas (penalty, then + dM: two roundings, as adam_impl)
// and stochastic stores (store_block_sr), bit for bit the two-kernel result.
template <typename U, bool kSign, bool kT, bool kDW, bool kInPlace>
__attribute__((noinline)) static void backward_weight_adam_sr(const BackwardArgs& a, const AdamArgs& o,
                                                              int64_t begin, int64_t end, int64_t* nonfinite) {
  const U* __restrict__ w = static_cast<const U*>(a.weight);
  uint16_t* __restrict__ m = static_cast<uint16_t*>(o.aux);
  uint16_t* __restrict__ e1 = static_cast<uint16_t*>(o.exp_avg);
  uint16_t* __restrict__ e2 = static_cast<uint16_t*>(o.exp_avg_sq);
  const AdamScalars<float> c(o);
  float gbuf[kBlock], nm[kBlock], n1[kBlock], n2[kBlock];
  uint32_t bad = 0;
  for (int64_t off = begin; off < end; off += kBlock) {
    const int64_t n = imin(kBlock, end - off);
    fused_mask_block<U, uint16_t, kT, kDW, kInPlace>(a, m, off, n, gbuf);
    // dM (into gbuf) and the penalty gradient (into nm), then their sum in a loop of its own, as
    // adam_impl adds them: one loop would let the compiler fuse the penalty's product into the sum
    for (int64_t i = 0; i < n; ++i) {
      const float wi = bits_to_f32(w[off + i]);
      const float x = bf16_to_f32(m[off + i]);
      const float cw = kSign ? (wi > 0.0f ? 1.0f : 0.0f) - (wi < 0.0f ? 1.0f : 0.0f) : wi;
      float sp, sn;
      softplus_pair(x, &sp, &sn);
      gbuf[i] = bf16_to_f32(f32_to_bf16((gbuf[i] * cw) * sp));  // dM as the backward stores it
      nm[i] = penalty_of(c, sp, sn);
    }
    uint32_t block_bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float d = gbuf[i];
      const float gt = nm[i] + d;
      adam_one<float>(c, bf16_to_f32(m[off + i]), bf16_to_f32(e1[off + i]), bf16_to_f32(e2[off + i]), gt, nm + i,
                      n1 + i, n2 + i);
      const bool ok = (d < 0.0f ? -d : d) <= __FLT_MAX__;  // false for NaN and inf
      gbuf[i] = ok ? 1.0f : 0.0f;                          // reused: which entries are stepped
      block_bad += ok ? 0u : 1u;
    }
    if (block_bad) {  // the entries with a NaN/inf dM keep their old values: write those back
      for (int64_t i = 0; i < n; ++i)
        if (gbuf[i] == 0.0f) {
          nm[i] = bf16_to_f32(m[off + i]);
          n1[i] = bf16_to_f32(e1[off + i]);
          n2[i] = bf16_to_f32(e2[off + i]);
        }
    }
    // an unchanged entry goes through the stochastic store as an exact bfloat16 value: unchanged bits
    store_block_sr<false>(n1, e1, off, n, o.sr_keys[0]);
    store_block_sr<true>(n2, e2, off, n, o.sr_keys[1]);
    store_block_sr<false>(nm, m, off, n, o.sr_keys[2]);
    bad += block_bad;
  }
  if (bad) __atomic_fetch_add(nonfinite, static_cast<int64_t>(bad), __ATOMIC_RELAXED);
}

template <typename U, bool kSign>
static void backward_weight_adam_for(const BackwardArgs& a, const AdamArgs& o, int64_t begin, int64_t end,
                                     int64_t* nonfinite) {
  const bool dW = a.dW != nullptr, in_place = dW && a.dW == a.grad;
#define AP_ADAM_KERNEL(T_, DW_, IP_)                                                                  \
  (o.sr ? backward_weight_adam_sr<U, kSign, T_, DW_, IP_>(a, o, begin, end, nonfinite)              \
        : backward_weight_adam_fast<U, kSign, T_, DW_, IP_>(a, o, begin, end, nonfinite))
  if (a.T) {
    if (!dW) return AP_ADAM_KERNEL(true, false, false);
    return in_place ? AP_ADAM_KERNEL(true, true, true) : AP_ADAM_KERNEL(true, true, false);
  }
  if (!dW) return AP_ADAM_KERNEL(false, false, false);
  return in_place ? AP_ADAM_KERNEL(false, true, true) : AP_ADAM_KERNEL(false, true, false);
#undef AP_ADAM_KERNEL
}

// the op layer checked: float32 or bfloat16 grad and weight of one dtype, float32 aux and moments
// (bfloat16 ones with o.sr)
static void backward_weight_adam(const BackwardArgs& a, const AdamArgs& o, int64_t begin, int64_t end,
                                 int64_t* nonfinite) {
  const bool sign = a.rule == AP_RULE_SIGN;
  if (a.weight_dt == AP_F32)
    return sign ? backward_weight_adam_for<uint32_t, true>(a, o, begin, end, nonfinite)
                : backward_weight_adam_for<uint32_t, false>(a, o, begin, end, nonfinite);
  return sign ? backward_weight_adam_for<uint16_t, true>(a, o, begin, end, nonfinite)
              : backward_weight_adam_for<uint16_t, false>(a, o, begin, end, nonfinite);
}

static void surrogate_f32(const float* m, float* out, int64_t n, int kind, double alpha) {
  for (int64_t off = 0; off < n; off += kBlock)
    surrogate_block<float>(m + off, out + off, imin(kBlock, n - off), kind, alpha_ct<float>(alpha));
}

static const KernelTable kTable = {
    AP_ISA_NAME, &apply_mask, &backward_weight, &backward_unit, &backward_unit_finish, &adam, &backward_weight_adam,
    &surrogate_f32,
};

#undef AP_INLINE

}  // namespace AP_ISA_NS
}  // namespace cpu
}  // namespace autoprune
