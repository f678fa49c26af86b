// The CPU backend's grouped GEMMs on every path they take (thin groups streamed through
// stream_gemm / stream_gemm_bt, taller groups in Eigen tiles, the weight gradient's tiles)
// against a plain triple loop in long double, and their bits against the thread count and
// against the company a row keeps in its group.

#include "support.hpp"

#include <cmath>
#include <vector>

using namespace moe;
using moe::test::Matrix;
using moe::test::random_matrix;
namespace cpu = moe::backend::cpu;

namespace {

// Group sizes that cross every boundary: empty, one row, the stream path's limit and one past
// it, an odd count, and one past the Eigen tile height (two tiles).
std::vector<Index> group_rows() {
  return {0, 1, 3, cpu::kStreamRows, cpu::kStreamRows + 1, 7, cpu::kGroupRowTile + 3, 2};
}

std::vector<Index> offsets_of(const std::vector<Index>& rows) {
  std::vector<Index> off{0};
  for (const Index r : rows) off.push_back(off.back() + r);
  return off;
}

// c_g = a_g op(w_g) in long double.
template <class S>
Matrix<S> reference(const std::vector<Index>& off, Op tw, const Matrix<S>& a, const Matrix<S>& w, Index n) {
  const auto groups = Index(off.size()) - 1;
  const Index wr = w.rows() / groups, k = a.cols();
  Matrix<S> c(a.rows(), n);
  for (Index g = 0; g < groups; ++g)
    for (Index r = off[g]; r < off[g + 1]; ++r)
      for (Index j = 0; j < n; ++j) {
        long double acc = 0;
        for (Index p = 0; p < k; ++p)
          acc += static_cast<long double>(a(r, p)) *
                 static_cast<long double>(tw == Op::none ? w(g * wr + p, j) : w(g * wr + j, p));
        c(r, j) = static_cast<S>(acc);
      }
  return c;
}

template <class S>
double max_rel_diff(const Matrix<S>& x, const Matrix<S>& y, double scale) {
  double worst = 0;
  for (Index r = 0; r < x.rows(); ++r)
    for (Index c = 0; c < x.cols(); ++c)
      worst = std::max(worst, std::abs(double(x(r, c)) - double(y(r, c))) / scale);
  return worst;
}

template <class S>
bool same_bits(const Matrix<S>& x, const Matrix<S>& y) {
  return x.rows() == y.rows() && x.cols() == y.cols() &&
         std::memcmp(x.data(), y.data(), sizeof(S) * std::size_t(x.rows() * x.cols())) == 0;
}

template <class S>
void check_grouped_gemm(Op tw, Index k, Index n) {
  const std::vector<Index> rows = group_rows();
  const std::vector<Index> off = offsets_of(rows);
  const auto groups = Index(rows.size());
  const Matrix<S> a = random_matrix<S>(off.back(), k, 3);
  const Matrix<S> w = tw == Op::none ? random_matrix<S>(groups * k, n, 4) : random_matrix<S>(groups * n, k, 4);
  const Matrix<S> expect = reference(off, tw, a, w, n);
  Matrix<S> one(a.rows(), n), three(a.rows(), n);
  cpu::grouped_gemm<S>(1, off.data(), groups, tw, a.view(), w.view(), one.view());
  cpu::grouped_gemm<S>(3, off.data(), groups, tw, a.view(), w.view(), three.view());
  // Sums of k products of values in (-1, 1]: rounding grows at most like k eps.
  const double eps = std::is_same_v<S, float> ? 1.2e-7 : 2.3e-16;
  CHECK(max_rel_diff(one, expect, 1.0) <= 4 * double(k) * eps);
  CHECK(same_bits(one, three));

  // A thin group's rows have the same bits alone as in company: each element is its own chain.
  const Index g = 2;  // 3 rows
  REQUIRE(rows[std::size_t(g)] <= cpu::kStreamRows);
  for (Index r = off[std::size_t(g)]; r < off[std::size_t(g) + 1]; ++r) {
    const Index one_row[] = {0, 1};
    const Index wr = w.rows() / groups;
    const ConstMatrixView<S> wg{w.data() + g * wr * w.cols(), wr, w.cols(), w.cols()};
    Matrix<S> alone(1, n);
    cpu::grouped_gemm<S>(2, one_row, 1, tw, a.view().block_rows(r, 1), wg, alone.view());
    for (Index j = 0; j < n; ++j) CHECK(alone(0, j) == one(r, j));
  }
}

template <class S>
void check_wgrad(Index k, Index n, S beta) {
  const std::vector<Index> rows = group_rows();
  const std::vector<Index> off = offsets_of(rows);
  const auto groups = Index(rows.size());
  const Matrix<S> a = random_matrix<S>(off.back(), k, 5), b = random_matrix<S>(off.back(), n, 6);
  const Matrix<S> start = random_matrix<S>(groups * k, n, 7);
  Matrix<S> one = start, three = start, expect(groups * k, n);
  for (Index g = 0; g < groups; ++g)
    for (Index p = 0; p < k; ++p)
      for (Index j = 0; j < n; ++j) {
        long double acc = static_cast<long double>(beta) * static_cast<long double>(start(g * k + p, j));
        for (Index r = off[std::size_t(g)]; r < off[std::size_t(g) + 1]; ++r)
          acc += static_cast<long double>(a(r, p)) * static_cast<long double>(b(r, j));
        expect(g * k + p, j) = static_cast<S>(acc);
      }
  cpu::grouped_gemm_wgrad<S>(1, off.data(), groups, a.view(), b.view(), beta, one.view());
  cpu::grouped_gemm_wgrad<S>(3, off.data(), groups, a.view(), b.view(), beta, three.view());
  const double eps = std::is_same_v<S, float> ? 1.2e-7 : 2.3e-16;
  CHECK(max_rel_diff(one, expect, 1.0) <= 4 * double(off.back() + 1) * eps);
  CHECK(same_bits(one, three));
}

}  // namespace

TEST_CASE_TEMPLATE("grouped_gemm: thin groups streamed, tall ones tiled, against long double", S, float, double) {
  // k and n leave remainders after every vector width and depth step; n spans two stream blocks.
  for (const Op tw : {Op::none, Op::transpose}) {
    CAPTURE(tw == Op::none);
    check_grouped_gemm<S>(tw, 37, 21);
    check_grouped_gemm<S>(tw, 8, cpu::kStreamCols + 19);
  }
}

TEST_CASE_TEMPLATE("grouped_gemm_wgrad: tiles of the weight, against long double, for beta 0, 1 and 0.5", S, float,
                   double) {
  for (const S beta : {S(0), S(1), S(0.5)}) {
    CAPTURE(beta);
    check_wgrad<S>(19, 23, beta);
    check_wgrad<S>(cpu::kWgradTileRows + 5, cpu::kWgradTileCols + 3, beta);
  }
}
