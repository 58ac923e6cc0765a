// CPU kernels compiled for AVX2 + FMA (x86-64 with GCC or Clang); chosen at run time if supported.
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(AUTOPRUNE_NO_ISA_DISPATCH)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define AP_ISA_NS isa_avx2
#define AP_ISA_NAME "avx2"
#define AP_HAS_FMA 1  // the target above has FMA (target pragmas do not define __FMA__)
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace autoprune {
namespace cpu {
const KernelTable* table_avx2() { return &isa_avx2::kTable; }
}  // namespace cpu
}  // namespace autoprune

#else
namespace autoprune {
namespace cpu {
const KernelTable* table_avx2() { return nullptr; }
}  // namespace cpu
}  // namespace autoprune
#endif
