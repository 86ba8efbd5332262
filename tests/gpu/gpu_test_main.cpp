// int4train GPU tests: the runner. Runs every registered case (or those whose name contains the
// first argument), prints one line per case and "N passed, M failed", and exits non-zero on any
// failure; 77 (CTest's skip code) when no CUDA device is visible. --quick skips the large cases;
// --list prints the selected cases' names and their count without running them (no device needed;
// exit 1 if two cases share a name).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <set>
#include <string>

#include "gpu_test_util.h"
#include "int4train/common.h"

namespace gputest {
namespace {
int g_case_failures = 0;
std::string g_first_failure;
}  // namespace

std::vector<Case>& registry() {
  static std::vector<Case> r;
  return r;
}

void fail(const char* file, int line, const std::string& what) {
  if (g_case_failures < 5) {
    std::fprintf(stderr, "    %s:%d: %s\n", file, line, what.c_str());
  }
  ++g_case_failures;
}

int add_case(const std::string& name, bool big, std::function<void()> fn) {
  registry().push_back(Case{name, std::move(fn), big});
  return static_cast<int>(registry().size());
}

}  // namespace gputest

int main(int argc, char** argv) {
  std::string filter;
  bool quick = false, list = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--list") == 0) {
      list = true;
    } else {
      filter = argv[i];
    }
  }
  if (list) {  // the cases' names (those the filter and --quick select), no device needed
    std::set<std::string> names;
    for (const auto& c : gputest::registry()) {
      if (!names.insert(c.name).second) {
        std::printf("duplicate case name: %s\n", c.name.c_str());
        return 1;
      }
    }
    int n = 0;
    for (const auto& c : gputest::registry()) {
      if ((!filter.empty() && c.name.find(filter) == std::string::npos) || (quick && c.big)) {
        continue;
      }
      std::printf("%s\n", c.name.c_str());
      ++n;
    }
    std::printf("%d cases\n", n);
    return 0;
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: GPU tests skipped\n");
    return 77;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device: %s (sm_%d%d, %d SMs)\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount);
  int passed = 0, failed = 0, skipped = 0;
  for (const auto& c : gputest::registry()) {
    if (!filter.empty() && c.name.find(filter) == std::string::npos) continue;
    if (quick && c.big) {
      ++skipped;
      continue;
    }
    gputest::g_case_failures = 0;
    try {
      c.fn();
      const cudaError_t err = cudaDeviceSynchronize();
      if (err != cudaSuccess) {
        gputest::fail(__FILE__, __LINE__,
                      std::string("CUDA error after the case: ") + cudaGetErrorString(err));
      }
    } catch (const std::exception& e) {
      gputest::fail(__FILE__, __LINE__, std::string("exception: ") + e.what());
    }
    if (gputest::g_case_failures == 0) {
      ++passed;
      std::printf("[  OK  ] %s\n", c.name.c_str());
    } else {
      ++failed;
      std::printf("[ FAIL ] %s (%d failed checks)\n", c.name.c_str(), gputest::g_case_failures);
    }
    std::fflush(stdout);
  }
  std::printf("%d passed, %d failed", passed, failed);
  if (skipped) std::printf(", %d skipped (--quick)", skipped);
  std::printf("\n");
  return failed == 0 ? 0 : 1;
}
