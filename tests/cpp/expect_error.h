// Shared by the core's C++ tests: the check that a call fails with an int4train::Error naming its
// argument, the library's error contract (common.h).
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "int4train/common.h"

namespace int4train {

// Runs f, which must throw an Error of `kind` whose message starts with `arg` followed by ':'.
template <class F>
void expect_error(F&& f, const std::string& arg, ErrorKind kind = ErrorKind::kValue) {
  try {
    f();
    ADD_FAILURE() << "expected an Error naming " << arg;
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), kind) << e.what();
    EXPECT_EQ(std::string(e.what()).rfind(arg + ":", 0), 0u) << e.what();
  }
}

}  // namespace int4train
