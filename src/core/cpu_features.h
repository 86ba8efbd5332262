// int4train core (internal): which SIMD extensions the running CPU offers, so that the fast paths
// compiled for AVX2 / AVX-512 VNNI are only called where they can run.
#pragma once

namespace int4train {
namespace detail {

struct CpuFeatures {
  bool avx2 = false;         // with FMA
  bool avx512 = false;       // F + BW + VL
  bool avx512_vnni = false;
  bool avx_vnni = false;
};

// Detected once. INT4TRAIN_SIMD=0 in the environment turns every fast SIMD path off (the scalar code
// runs), so tests can compare both on one machine.
const CpuFeatures& cpu_features();

}  // namespace detail
}  // namespace int4train
