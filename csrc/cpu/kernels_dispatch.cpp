// Run-time choice of the CPU kernel table: the best instruction set compiled in and supported by
// the running CPU, or the one named by AUTOPRUNE_CPU_ISA / set_isa(). No torch headers.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace autoprune {
namespace cpu {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// supported tables, worst first
struct Supported {
  const KernelTable* tables[3];
  const char* names[3];
  int count = 0;
  Supported() {
    add(table_default());
    if (cpu_has_avx2()) add(table_avx2());
    if (cpu_has_avx512()) add(table_avx512());
  }
  void add(const KernelTable* t) {
    if (t == nullptr) return;
    tables[count] = t;
    names[count] = t->isa;
    ++count;
  }
  const KernelTable* find(const char* name) const {
    if (name == nullptr || name[0] == '\0' || std::strcmp(name, "auto") == 0) return tables[count - 1];
    for (int i = 0; i < count; ++i)
      if (std::strcmp(names[i], name) == 0) return tables[i];
    return nullptr;
  }
};

const Supported& supported() {
  static const Supported s;
  return s;
}

std::atomic<const KernelTable*> g_table{nullptr};

}  // namespace

const KernelTable& kernel_table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = supported().find(std::getenv("AUTOPRUNE_CPU_ISA"));
    if (t == nullptr) t = supported().find("auto");  // unknown / unsupported name: best available
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

const char* const* supported_isas(int* count) {
  *count = supported().count;
  return supported().names;
}

bool set_isa(const char* name) {
  const KernelTable* t = supported().find(name);
  if (t == nullptr) return false;
  g_table.store(t, std::memory_order_release);
  return true;
}

}  // namespace cpu
}  // namespace autoprune
