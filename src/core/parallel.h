// int4train core (internal): a fixed pool of worker threads for the fast CPU paths. Work is split
// into contiguous chunks, so results never depend on scheduling when each chunk writes its own output.
#pragma once

#include <cstdint>
#include <functional>

namespace int4train {
namespace detail {

// Number of threads the pool uses: INT4TRAIN_NUM_THREADS if set (>= 1), else the hardware's.
int num_threads();

// Calls fn(begin, end) on disjoint chunks covering [0, n) with at least `grain` items per chunk (the
// caller's thread takes part). Runs inline when n <= grain or one thread is configured. Exceptions
// thrown by fn are rethrown in the caller (the first one).
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace detail
}  // namespace int4train
