#pragma once
// The Backend concept: HOW the layer's math runs on a device. A backend knows nothing of MoE;
// it offers memory, GEMM (plain and grouped), parallel per-item maps, routing primitives
// (histogram, scan, stable sort, gather) and ordered reductions. The layer, gates and experts
// are written once against this set.

#include <concepts>
#include <cstring>
#include <type_traits>
#include <vector>

#include "moe/error.hpp"
#include "moe/op.hpp"
#include "moe/precision.hpp"
#include "moe/view.hpp"

namespace moe {

namespace detail {
// A functor the concept check passes to for_each.
struct NoopItem {
  MOE_HD void operator()(Index) const {}
};
}  // namespace detail

// The segment owning row r of rows split by offsets [segments + 1] (segment s owns rows
// [offsets[s], offsets[s + 1])), by binary search; an empty segment owns no row.
MOE_HD inline Index segment_of_row(const Index* offsets, Index segments, Index r) {
  Index lo = 0, hi = segments;
  while (hi - lo > 1) {
    const Index mid = (lo + hi) / 2;
    if (offsets[mid] <= r)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

namespace detail {
// One B::for_each item per element of a grid with `cols` columns (a class, not a lambda, so
// that CUDA accepts the caller's lambda inside it).
template <class F>
struct ElementItem {
  F f;
  Index cols;
  MOE_HD void operator()(Index i) const { f(i / cols, i % cols); }
};
}  // namespace detail

// f(r, c) for every element of a rows x cols grid; items must write disjoint memory. A backend
// may offer B::for_each_element with this meaning (the CPU backend does: a loop over each row's
// columns, with no division per element and room to vectorize); otherwise one B::for_each item
// per element, consecutive items on consecutive columns.
template <class B, class F>
void for_each_element(typename B::Context& ctx, Index rows, Index cols, F f) {
  if constexpr (requires { B::for_each_element(ctx, rows, cols, f); })
    B::for_each_element(ctx, rows, cols, f);
  else
    B::for_each(ctx, rows * cols, detail::ElementItem<F>{f, cols});
}

// A backend B provides:
//   B::Scalar                 storage and compute type of activations and parameters
//   B::Buffer<T>              an owning row-major matrix in the backend's memory
//   B::Context                per-call state (threads, stream, handles), default-constructible
//   gemm, grouped_gemm, grouped_gemm_wgrad (both with a Precision; on float, also on BFloat16
//   operands with Precision::bf16), for_each, gather_rows, sum_rows,
//   histogram, exclusive_scan, stable_sort_by_key, fill, copy, synchronize
// clang-format off
template <class B>
concept Backend =
    requires { typename B::Scalar; typename B::Context; typename B::template Buffer<typename B::Scalar>; } &&
    std::default_initializable<typename B::Context> &&
    requires(typename B::Context& ctx, typename B::template Buffer<typename B::Scalar>& buf,
             typename B::template Buffer<Index>& ibuf, ConstMatrixView<typename B::Scalar> a,
             MatrixView<typename B::Scalar> c, typename B::Scalar s, const Index* ip, Index* op, Index n) {
      buf.resize(n, n);
      buf.resize(n, n, s);
      ibuf.resize(n, n);
      { buf.view() } -> std::convertible_to<MatrixView<typename B::Scalar>>;
      { buf.data() } -> std::convertible_to<typename B::Scalar*>;
      { ibuf.view() } -> std::convertible_to<MatrixView<Index>>;
      { ibuf.data() } -> std::convertible_to<Index*>;
      { buf.rows() } -> std::convertible_to<Index>;
      { buf.cols() } -> std::convertible_to<Index>;
      B::gemm(ctx, Op::none, Op::none, s, a, a, s, c);
      B::grouped_gemm(ctx, ip, n, Op::none, a, a, c, Precision::fp32);
      B::grouped_gemm_wgrad(ctx, ip, n, a, a, s, c, Precision::fp32);
      B::for_each(ctx, n, detail::NoopItem{});
      B::gather_rows(ctx, a, ip, c);
      B::sum_rows(ctx, a, c.data);
      B::histogram(ctx, ip, n, n, op);
      B::exclusive_scan(ctx, ip, n, op);
      B::stable_sort_by_key(ctx, ip, n, n, op);
      B::fill(ctx, c, s);
      B::copy(ctx, a, c);
      B::synchronize(ctx);
    };
// clang-format on

// A backend's page-locked staging pool for reads to the host (B::Staging), or void.
template <class B>
struct StagingOf {
  using type = void;
};
template <class B>
  requires requires { typename B::Staging; }
struct StagingOf<B> {
  using type = typename B::Staging;
};

// Reads of backend memory into host vectors, for the few small reads the layer makes on the host
// (routed row counts, balance statistics, loss sums, error checks), queued and completed by one
// synchronization:
//   HostReads<B> reads(ctx);
//   reads.add(importance, st.importance);  // resizes the vector, queues the copy
//   reads.add(load, st.load);
//   reads.wait();                          // one B::synchronize; the vectors hold the values
// A backend whose copies into pageable memory would each wait on their own (CUDA) names a
// page-locked staging pool, B::Staging: the copies go there, asynchronously, and wait() copies
// them out. add() sizes the vector at once; a backend without staging copies the values then, one
// with staging only at wait(). So read the vectors after wait(), and keep each view valid and
// each vector unresized until then.
template <Backend B>
class HostReads {
  using Staging = typename StagingOf<B>::type;
  static constexpr bool kStaged = !std::is_void_v<Staging>;

 public:
  explicit HostReads(typename B::Context& ctx) : ctx_(ctx) {
    if constexpr (kStaged) mark_ = Staging::of_this_thread().mark();
  }
  HostReads(const HostReads&) = delete;
  HostReads& operator=(const HostReads&) = delete;
  ~HostReads() {
    if constexpr (kStaged) Staging::of_this_thread().release(mark_);
  }

  template <class T>
  void add(ConstMatrixView<T> v, std::vector<T>& out) {
    out.resize(static_cast<std::size_t>(v.rows * v.cols));
    if (out.empty()) return;
    queued_ = true;
    if constexpr (kStaged) {
      const std::size_t bytes = out.size() * sizeof(T);
      T* stage = reinterpret_cast<T*>(Staging::of_this_thread().take(bytes));
      B::copy(ctx_, v, MatrixView<T>{stage, v.rows, v.cols});
      pending_.push_back({stage, out.data(), bytes});
    } else {
      B::copy(ctx_, v, MatrixView<T>{out.data(), v.rows, v.cols});
    }
  }

  // One synchronization when anything was queued; then every vector holds its values.
  void wait() {
    if (!queued_) return;
    B::synchronize(ctx_);
    for (const Pending& p : pending_) std::memcpy(p.to, p.from, p.bytes);
    pending_.clear();
    queued_ = false;
  }

 private:
  struct Pending {
    const void* from;
    void* to;
    std::size_t bytes;
  };
  struct NoStaging {
    struct Mark {};
  };
  using Pool = std::conditional_t<kStaged, Staging, NoStaging>;
  typename B::Context& ctx_;
  typename Pool::Mark mark_{};
  std::vector<Pending> pending_;
  bool queued_ = false;
};

// One read of backend memory to the host: a HostReads of one vector.
template <Backend B, class T>
std::vector<T> to_host(typename B::Context& ctx, ConstMatrixView<T> v) {
  std::vector<T> out;
  HostReads<B> reads(ctx);
  reads.add(v, out);
  reads.wait();
  return out;
}

// dst (resized to [values x 1]) = the host values.
template <Backend B, class T>
void from_host(typename B::Context& ctx, const std::vector<T>& values, typename B::template Buffer<T>& dst) {
  const auto count = static_cast<Index>(values.size());
  dst.resize(count, 1);
  if (count > 0) B::copy(ctx, ConstMatrixView<T>{values.data(), count, 1}, dst.view());
}

// Is v a finite number (not NaN, not +-Inf)? Written without library calls, so it is the same
// test on the host and on a device: v - v is 0 for a finite v and NaN otherwise.
template <class S>
MOE_HD inline bool is_finite(S v) {
  const S z = v - v;
  return z == z;
}

namespace detail {
// Throws moe::Error unless the backend can read the memory at p with its kernels, naming `what`.
// A backend whose kernels run on the host reads any host memory and checks nothing; a device
// backend offers B::require_readable(p, what) (the CUDA backend refuses pageable host memory,
// which a kernel would fault on, reported later at an unrelated call).
template <Backend B>
void require_readable(const void* p, const char* what) {
  if constexpr (requires { B::require_readable(p, what); }) B::require_readable(p, what);
}

// Throws moe::Error naming the first non-finite element of m (backend memory), if any. The scan
// runs on the backend, one flag per row in `scratch`; only the flags come to the host.
template <Backend B, class S>
void require_finite(typename B::Context& ctx, ConstMatrixView<S> m, const char* what,
                    typename B::template Buffer<Index>& scratch) {
  if (m.rows == 0 || m.cols == 0) return;
  scratch.resize(m.rows, 1);
  Index* bad = scratch.data();
  const Index cols = m.cols;
  B::for_each(ctx, m.rows, [=] MOE_HD(Index r) {
    Index first = -1;
    for (Index c = cols - 1; c >= 0; --c)
      if (!is_finite(m(r, c))) first = c;
    bad[r] = first;
  });
  const std::vector<Index> flags = to_host<B>(ctx, ConstMatrixView<Index>(scratch.view()));
  for (Index r = 0; r < m.rows; ++r) {
    const Index c = flags[static_cast<std::size_t>(r)];
    if (c < 0) continue;
    const S v = to_host<B>(ctx, ConstMatrixView<S>{m.row(r) + c, 1, 1})[0];
    fail(what, " has the non-finite value ", v, " at (", r, ", ", c,
         "), expected finite values (Config::check_finite = false skips this check)");
  }
}
}  // namespace detail

// Rows per chunk of segment_sums' first pass.
inline constexpr Index kSumChunk = 256;

// out[s * cols + c] = the sum over the rows r of segment s of value(r, c), for s < segments and
// c < cols, where segment s owns rows [offsets[s], offsets[s + 1]) (offsets in backend memory;
// null: one segment of max_rows rows). max_rows bounds every segment's rows (a host value).
// Deterministic and parallel, with no atomics: a segment of at most kSumChunk rows is summed in
// row order by one item per (segment, column); longer ones in two passes, chunks of kSumChunk rows
// in row order, then the chunk sums in chunk order, so a long segment is not one thread's walk.
// The order depends only on max_rows and the offsets, so every backend gets the same bits.
// value is a MOE_HD functor; partial is the second pass's scratch.
template <Backend B, class F>
void segment_sums(typename B::Context& ctx, const Index* offsets, Index segments, Index max_rows, Index cols, F value,
                  typename B::Scalar* out, typename B::template Buffer<typename B::Scalar>& partial) {
  using S = typename B::Scalar;
  if (segments <= 0 || cols <= 0) return;
  const Index chunks = max_rows > kSumChunk ? (max_rows + kSumChunk - 1) / kSumChunk : 1;
  const Index chunk = kSumChunk, all = max_rows;
  if (chunks == 1) {
    B::for_each(ctx, segments * cols, [=] MOE_HD(Index i) {
      const Index s = i / cols, c = i % cols;
      const Index lo = offsets != nullptr ? offsets[s] : 0, hi = offsets != nullptr ? offsets[s + 1] : all;
      S acc = S(0);
      for (Index r = lo; r < hi; ++r) acc += value(r, c);
      out[i] = acc;
    });
    return;
  }
  partial.resize(segments * chunks, cols);
  S* part = partial.data();
  B::for_each(ctx, segments * chunks * cols, [=] MOE_HD(Index i) {
    const Index c = i % cols, s = i / cols / chunks, j = i / cols % chunks;
    const Index begin = offsets != nullptr ? offsets[s] : 0, end = offsets != nullptr ? offsets[s + 1] : all;
    const Index lo = begin + j * chunk, hi = end < lo + chunk ? end : lo + chunk;
    S acc = S(0);
    for (Index r = lo; r < hi; ++r) acc += value(r, c);
    part[i] = acc;
  });
  B::for_each(ctx, segments * cols, [=] MOE_HD(Index i) {
    const Index s = i / cols, c = i % cols;
    S acc = S(0);
    for (Index j = 0; j < chunks; ++j) acc += part[(s * chunks + j) * cols + c];
    out[i] = acc;
  });
}

// A backend context for the given thread count, for backends whose context has one (0: all).
template <Backend B>
typename B::Context make_context(int threads) {
  typename B::Context ctx{};
  if constexpr (requires { ctx.threads; }) ctx.threads = threads;
  return ctx;
}

}  // namespace moe
