// Host-only test of csrc/common/bspline.h (built by CMakeLists.txt, run by ctest):
// partition of unity, the closed forms of the uniform basis (SpliNet paper, eqs. 9-10, on
// uniform knots) and the knot-interval rule.
#include <cmath>
#include <cstdio>

#include "common/bspline.h"

static int failures = 0;
#define EXPECT_NEAR(a, b, tol)                                                           \
  do {                                                                                 \
    if (std::fabs((a) - (b)) > (tol)) {                                                \
      std::printf("%s:%d: %s = %.17g, expected %.17g\n", __FILE__, __LINE__, #a, (double)(a), (double)(b)); \
      ++failures;                                                                      \
    }                                                                                  \
  } while (0)

int main() {
  for (double u = 0.0; u <= 1.0; u += 0.125) {
    double w[4];
    splinet::bspline_weights<double>(u, 3, w);
    const double v = 1.0 - u;
    EXPECT_NEAR(w[0], v * v * v / 6, 1e-15);
    EXPECT_NEAR(w[1], (3 * u * u * u - 6 * u * u + 4) / 6, 1e-15);
    EXPECT_NEAR(w[2], (-3 * u * u * u + 3 * u * u + 3 * u + 1) / 6, 1e-15);
    EXPECT_NEAR(w[3], u * u * u / 6, 1e-15);
    splinet::bspline_weights<double>(u, 2, w);
    EXPECT_NEAR(w[1], (-2 * u * u + 2 * u + 1) / 2, 1e-15);
    for (int d = 0; d <= 7; ++d) {
      double wd[8], sum = 0;
      splinet::bspline_weights<double>(u, d, wd);
      for (int r = 0; r <= d; ++r) sum += wd[r];
      EXPECT_NEAR(sum, 1.0, 1e-14);
    }
  }
  double u;
  EXPECT_NEAR((double)splinet::knot_interval(4.0, 4, &u), 3.0, 0);  // t = 1: last interval
  EXPECT_NEAR(u, 1.0, 0);
  EXPECT_NEAR((double)splinet::knot_interval(splinet::grid_position(3, 0.0, 7, 7), 7, &u), 3.0, 0);
  EXPECT_NEAR(u, 0.0, 0);  // Remark 1: L = N puts step i on knot i exactly
  std::printf(failures ? "FAILED\n" : "ok\n");
  return failures ? 1 : 0;
}
