// CPU kernels for the baseline instruction set of the build (SSE2 on x86-64, NEON on arm64).
#include <cstdint>

#include "kernels.h"

#define AP_ISA_NS isa_default
#define AP_ISA_NAME "default"
#include "kernels_impl.h"

namespace autoprune {
namespace cpu {
const KernelTable* table_default() { return &isa_default::kTable; }
}  // namespace cpu
}  // namespace autoprune
