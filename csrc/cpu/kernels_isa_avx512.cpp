// CPU kernels compiled for AVX-512 (F, BW, VL, DQ) (x86-64 with GCC or Clang); chosen at run time if supported.
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(AUTOPRUNE_NO_ISA_DISPATCH)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
#endif
#define AP_ISA_NS isa_avx512
#define AP_ISA_NAME "avx512"
#define AP_HAS_FMA 1  // the target above has FMA (target pragmas do not define __FMA__)
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace autoprune {
namespace cpu {
const KernelTable* table_avx512() { return &isa_avx512::kTable; }
}  // namespace cpu
}  // namespace autoprune

#else
namespace autoprune {
namespace cpu {
const KernelTable* table_avx512() { return nullptr; }
}  // namespace cpu
}  // namespace autoprune
#endif
