#pragma once
// The operands of the experts' GEMMs kept as BFloat16 for Precision::bf16 (moe/precision.hpp):
// activations narrowed where they are written, and copies of the weights made again only when
// the parameters changed (Parameter::changed, ParameterVersion). A tensor-core GEMM then reads
// half the bytes it reads from fp32 operands, with the same results: rounding a bfloat16 value
// to bfloat16 changes nothing.

#include <cstdint>

#include "moe/backend.hpp"
#include "moe/precision.hpp"
#include "moe/view.hpp"

namespace moe::detail {

// Whether an expert group computing in `precision` over scalar S keeps its operands as BFloat16.
template <class S>
constexpr bool narrow_operands(Precision precision) {
  return std::is_same_v<S, float> && precision == Precision::bf16;
}

// x as an operand stored as T: itself, or rounded to bfloat16.
template <class T, class S>
MOE_HD inline T stored(S x) {
  if constexpr (std::is_same_v<T, BFloat16>)
    return to_bfloat16(static_cast<float>(x));
  else
    return x;
}

// dst = bfloat16(src), elementwise (dst resized to src's shape); returns dst's view.
template <Backend B>
ConstMatrixView<BFloat16> narrow(typename B::Context& ctx, ConstMatrixView<typename B::Scalar> src,
                                 typename B::template Buffer<BFloat16>& dst) {
  dst.resize(src.rows, src.cols);
  BFloat16* out = dst.data();
  const Index cols = src.cols;
  B::for_each(ctx, src.rows * cols,
              [=] MOE_HD(Index i) { out[i] = to_bfloat16(static_cast<float>(src(i / cols, i % cols))); });
  return dst.view();
}

// The dispatch gather of an expert group's input, xs[j] = x[rows[j]]: straight into bfloat16
// (dst) when the group keeps narrow operands, with no fp32 copy; into xs otherwise. Returns
// whether it wrote dst.
template <Backend B>
bool gather_operand_rows(typename B::Context& ctx, bool narrow, ConstMatrixView<typename B::Scalar> x,
                         const Index* rows, MatrixView<typename B::Scalar> xs,
                         typename B::template Buffer<BFloat16>& dst) {
  if (!narrow) {
    B::gather_rows(ctx, x, rows, xs);
    return false;
  }
  dst.resize(xs.rows, x.cols);
  BFloat16* out = dst.data();
  const Index cols = x.cols;
  B::for_each(ctx, xs.rows * cols,
              [=] MOE_HD(Index i) { out[i] = to_bfloat16(static_cast<float>(x(rows[i / cols], i % cols))); });
  return true;
}

// The narrow input rows of a forward call: those gather_operand_rows wrote (consumed: the next
// call narrows its xs again unless gathered anew), or xs narrowed into dst.
template <Backend B>
ConstMatrixView<BFloat16> narrow_input(typename B::Context& ctx, ConstMatrixView<typename B::Scalar> xs,
                                       typename B::template Buffer<BFloat16>& dst, bool& gathered) {
  if (gathered) {
    gathered = false;
    require(dst.rows() == xs.rows && dst.cols() == xs.cols, "expert group: ", dst.rows(), " x ", dst.cols(),
            " rows gathered, but forward got ", xs.rows, " x ", xs.cols);
    return dst.view();
  }
  return narrow<B>(ctx, xs, dst);
}

// A BFloat16 copy of a weight, or of two weights with as many rows side by side ([left | right]:
// row r holds left's row r, then right's; SwiGLU's w1 and w3, multiplied by one GEMM). Made again
// at get() when the owner's version moved since the last copy or the weights are other storage.
template <Backend B>
class NarrowWeights {
  using S = typename B::Scalar;

 public:
  ConstMatrixView<BFloat16> get(typename B::Context& ctx, std::uint64_t version, ConstMatrixView<S> left,
                                ConstMatrixView<S> right = {}) {
    if (made_ && version == version_ && left.data == left_ && right.data == right_) return copy_.view();
    require(right.data == nullptr || right.rows == left.rows, "NarrowWeights: ", left.rows,
                           " rows beside ", right.rows, ", expected as many");
    const Index lc = left.cols, cols = lc + (right.data == nullptr ? 0 : right.cols);
    copy_.resize(left.rows, cols);
    BFloat16* out = copy_.data();
    B::for_each(ctx, left.rows * cols, [=] MOE_HD(Index i) {
      const Index r = i / cols, c = i % cols;
      out[i] = to_bfloat16(static_cast<float>(c < lc ? left(r, c) : right(r, c - lc)));
    });
    made_ = true;
    version_ = version;
    left_ = left.data;
    right_ = right.data;
    return copy_.view();
  }

 private:
  typename B::template Buffer<BFloat16> copy_;
  bool made_ = false;
  std::uint64_t version_ = 0;
  const S* left_ = nullptr;
  const S* right_ = nullptr;
};

}  // namespace moe::detail
