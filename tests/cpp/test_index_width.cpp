// Host-only test that the index helpers of csrc/common/bspline.h keep step and knot indices
// in 64 bits: a step index past 2^31 and 2^32 (built by CMakeLists.txt, run by ctest and by
// tests/test_index_width.py). Nothing is allocated: the helpers are plain arithmetic.
#include <cstdint>
#include <initializer_list>
#include <cstdio>

#include "common/bspline.h"

static int failures = 0;
#define EXPECT_EQ(a, b)                                                                              \
  do {                                                                                             \
    if (!((a) == (b))) {                                                                           \
      std::printf("%s:%d: %s = %lld, expected %lld\n", __FILE__, __LINE__, #a, (long long)(a), (long long)(b)); \
      ++failures;                                                                                  \
    }                                                                                              \
  } while (0)

int main() {
  // L = N puts step i on knot i exactly (SpliNet paper, Remark 1), whatever the width of i:
  // past 2^31 a 32-bit index would wrap negative (clamped to knot 0), past 2^32 to a small one.
  const int64_t N = (int64_t(1) << 33) + 7;
  for (const int64_t i : {int64_t(1) << 31, (int64_t(1) << 31) + 3, (int64_t(1) << 32) + 5, N - 1}) {
    double u = -1, w[4];
    EXPECT_EQ(splinet::knot_interval(splinet::grid_position(i, 0.0, N, N), N, &u), i);
    EXPECT_EQ(u, 0.0);
    EXPECT_EQ(splinet::grid_basis<double>(i, 0.0, N, N, 3, w), i);
    EXPECT_EQ(w[0], 1.0 / 6);  // u = 0: the uniform cubic's weights 1/6, 2/3, 1/6, 0
  }
  // The last step's last stage (c = 1) belongs to the last interval.
  double u;
  EXPECT_EQ(splinet::knot_interval(splinet::grid_position(N - 1, 1.0, N, N), N, &u), N - 1);
  std::printf(failures ? "FAILED\n" : "ok\n");
  return failures ? 1 : 0;
}
