// int4train core: runtime CPU feature detection for the SIMD fast paths.
#include "cpu_features.h"

#include <cstdlib>
#include <cstring>

namespace int4train {
namespace detail {

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    CpuFeatures r;
    const char* env = std::getenv("INT4TRAIN_SIMD");
    if (env != nullptr && std::strcmp(env, "0") == 0) return r;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    r.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    r.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl");
    r.avx512_vnni = r.avx512 && __builtin_cpu_supports("avx512vnni");
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
    r.avx_vnni = r.avx2 && __builtin_cpu_supports("avxvnni");
#endif
#endif
    return r;
  }();
  return f;
}

}  // namespace detail
}  // namespace int4train
