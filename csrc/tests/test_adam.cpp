// C++-side check of the soap_kernels ops (built by CMakeLists.txt, run by ctest): each op, reached
// through the dispatcher like any torch op, against the same math written with ATen ops. The full
// test suite is tests/test_native.py; this one proves the library works without Python.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <vector>

namespace {

int failures = 0;

void expect_close(const char* what, const at::Tensor& actual, const at::Tensor& expected, double rtol) {
  const auto diff = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs();
  const double max_abs = diff.numel() ? diff.max().item<double>() : 0.0;
  const bool ok = at::allclose(actual.to(at::kDouble), expected.to(at::kDouble), rtol, 0.0);
  std::printf("%-28s max abs err %.3e  %s\n", what, max_abs, ok ? "ok" : "FAILED");
  failures += ok ? 0 : 1;
}

at::Tensor reference_moments(at::Tensor& m, at::Tensor& v, const at::Tensor& g, double b1, double b2, double eps) {
  m.lerp_(g, 1.0 - b1);
  v.mul_(b2).addcmul_(g, g, 1.0 - b2);
  return m / v.sqrt().add_(eps);
}

void test_moment_update() {
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("soap_kernels::moment_update", "")
                      .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, double, double,
                          double)>();
  std::vector<at::Tensor> m, v, g, d, rm, rv, rd;
  for (const int64_t n : {1, 7, 16385, 100003}) {
    m.push_back(at::randn({n}) * 1e-2);
    v.push_back(at::rand({n}) * 1e-4);
    g.push_back(at::randn({n}) * 1e-2);
    d.push_back(at::empty({n}));
    rm.push_back(m.back().clone());
    rv.push_back(v.back().clone());
    rd.push_back(reference_moments(rm.back(), rv.back(), g.back(), 0.95, 0.95, 1e-8));
  }
  op.call(m, v, g, d, 0.95, 0.95, 1e-8);
  for (size_t i = 0; i < m.size(); ++i) {
    expect_close("moment_update exp_avg", m[i], rm[i], 1e-6);
    expect_close("moment_update exp_avg_sq", v[i], rv[i], 1e-6);
    expect_close("moment_update direction", d[i], rd[i], 1e-6);
  }
}

void test_adam_step() {
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("soap_kernels::adam_step", "")
                      .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                          c10::ArrayRef<double>, double, double, double, double)>();
  const double lr_wd = 1e-4;
  std::vector<at::Tensor> p, g, m, v, rp;
  std::vector<double> step_size;
  for (const int64_t n : {1, 33, 20000}) {
    p.push_back(at::randn({n}));
    g.push_back(at::randn({n}) * 1e-2);
    m.push_back(at::randn({n}) * 1e-2);
    v.push_back(at::rand({n}) * 1e-4);
    step_size.push_back(1e-3 * static_cast<double>(p.size()));
    auto mm = m.back().clone();
    auto vv = v.back().clone();
    auto pp = p.back().clone();
    pp.add_(reference_moments(mm, vv, g.back(), 0.9, 0.95, 1e-8), -step_size.back());
    pp.add_(pp, -lr_wd);
    rp.push_back(pp);
  }
  op.call(p, g, m, v, step_size, 0.9, 0.95, 1e-8, lr_wd);
  for (size_t i = 0; i < p.size(); ++i) {
    expect_close("adam_step param", p[i], rp[i], 1e-6);
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_moment_update();
  test_adam_step();
  std::printf("%s\n", failures == 0 ? "all ok" : "FAILURES");
  return failures == 0 ? 0 : 1;
}
