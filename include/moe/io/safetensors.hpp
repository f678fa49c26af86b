#pragma once
// Safetensors files: reading (SafeTensors, memory-mapped or from bytes) and writing
// (SafeTensorsWriter). The format: an 8-byte little-endian header length N, N bytes of a JSON
// object {"<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
// "__metadata__": {"<key>": "<value>"}}, then the data buffer; offsets count from the start of
// that buffer, tensors are little-endian and row-major, and they cover the buffer exactly.
//
// A file is validated in full when it is opened or parsed, so that every later read stays inside
// it; reading converts to the caller's type (float <- F16/BF16/F32/F64, integers range-checked).
// Every error is a moe::Error whose message starts with the file's path (or the origin given to
// parse) and names the tensor and what was expected. Nothing else escapes parse, open or read.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <ranges>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "moe/error.hpp"
#include "moe/io/atomic_file.hpp"
#include "moe/io/dtype.hpp"

namespace moe::io {

static_assert(std::endian::native == std::endian::little,
              "moe/io/safetensors.hpp reads and writes the file's little-endian data as it is in memory");

namespace detail {

// A header longer than this is refused before it is parsed (the reference implementation's limit).
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

// The number of elements of `shape`, or nullopt when a dimension is negative or the product of
// the non-zero dimensions does not fit in int64. (A zero dimension does not excuse the others:
// code that multiplies a few of the dimensions must not overflow either.)
[[nodiscard]] inline std::optional<std::int64_t> checked_numel(std::span<const std::int64_t> shape) {
  std::int64_t product = 1;
  bool empty = false;
  for (const std::int64_t d : shape) {
    if (d < 0) return std::nullopt;
    if (d == 0) {
      empty = true;
    } else if (__builtin_mul_overflow(product, d, &product)) {
      return std::nullopt;
    }
  }
  return empty ? 0 : product;
}

[[nodiscard]] inline std::string shape_string(std::span<const std::int64_t> shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Whether `s` is well-formed UTF-8 (no overlong forms, no surrogates, nothing past U+10FFFF):
// what a JSON header must hold.
[[nodiscard]] inline bool valid_utf8(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::size_t len;
    std::uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1Fu;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0Fu;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07u;
    } else {
      return false;
    }
    if (s.size() - i < len) return false;
    for (std::size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3Fu);
    }
    static constexpr std::uint32_t min_cp[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

// `j` as JSON text for a message, cut short: a header's value can be megabytes long.
[[nodiscard]] inline std::string short_dump(const nlohmann::json& j) {
  std::string text = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (text.size() > 80) text = text.substr(0, 80) + "...";
  return text;
}

// The name of a C++ element type in messages: "float", "double", "int64", "uint8", ...
template <class T>
[[nodiscard]] std::string type_name() {
  if constexpr (std::is_same_v<T, float>) {
    return "float";
  } else if constexpr (std::is_same_v<T, double>) {
    return "double";
  } else {
    return (std::is_signed_v<T> ? "int" : "uint") + std::to_string(8 * sizeof(T));
  }
}

// The element types reads and writes convert to and from.
template <class T>
concept Element = std::same_as<T, float> || std::same_as<T, double> ||
    (std::integral<T> && !std::same_as<T, bool> && sizeof(T) <= 8);

// A little-endian S at `p`, which need not be aligned for S.
template <class S>
[[nodiscard]] S load(const std::byte* p) {
  S v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// A read-only private memory mapping of a whole file, unmapped when destroyed.
class MappedFile {
 public:
  MappedFile() = default;
  MappedFile(const void* data, std::size_t size) : data_(data), size_(size) {}
  MappedFile(MappedFile&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  MappedFile& operator=(MappedFile&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() { reset(); }

  [[nodiscard]] explicit operator bool() const { return data_ != nullptr; }
  [[nodiscard]] std::span<const std::byte> bytes() const { return {static_cast<const std::byte*>(data_), size_}; }

 private:
  void reset() {
    if (data_ != nullptr) ::munmap(const_cast<void*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }
  const void* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace detail

// One tensor of a file, as its header describes it.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  // byte offsets in the data buffer

  // The product of the shape (1 for shape []). Throws moe::Error for a negative dimension or a
  // product past int64 (never for a TensorInfo of a parsed file: those are validated).
  [[nodiscard]] std::int64_t numel() const {
    const auto n = detail::checked_numel(shape);
    if (!n) {
      moe::detail::fail("moe::io::TensorInfo: tensor '", name, "' has shape ", detail::shape_string(shape),
                        ", expected non-negative dimensions whose product fits in int64");
    }
    return *n;
  }
};

// Checks a read makes.
struct Expect {
  std::optional<std::vector<std::int64_t>> shape = std::nullopt;  // when set: the tensor's shape must equal it
  bool finite = false;  // when true: NaN or Inf is an error naming the tensor and the first bad flat index
};

using Metadata = std::map<std::string, std::string>;

// A parsed and validated safetensors file, read-only. Movable, not copyable.
class SafeTensors {
 public:
  SafeTensors(SafeTensors&&) noexcept = default;
  SafeTensors& operator=(SafeTensors&&) noexcept = default;
  SafeTensors(const SafeTensors&) = delete;
  SafeTensors& operator=(const SafeTensors&) = delete;
  ~SafeTensors() = default;

  // Maps the file at `path` (PROT_READ, MAP_PRIVATE) and validates it. The file must not be
  // truncated while this object lives (a read past the new end would be a SIGBUS); files replaced
  // with write_file_atomically never are, since the rename leaves the old file's inode alone.
  static SafeTensors open(const std::filesystem::path& path) {
    SafeTensors st;
    st.origin_ = path.string();
    const std::string& o = st.origin_;
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      moe::detail::fail(o, ": cannot open: ", detail::errno_text(err));
    }
    struct ::stat s {};
    const int stat_result = ::fstat(fd, &s);
    const int stat_err = errno;
    if (stat_result != 0) {
      ::close(fd);
      moe::detail::fail(o, ": cannot stat: ", detail::errno_text(stat_err));
    }
    if (!S_ISREG(s.st_mode)) {
      ::close(fd);
      moe::detail::fail(o, ": not a regular file, expected a safetensors file");
    }
    if (s.st_size == 0) {
      ::close(fd);
      moe::detail::fail(o,
                        ": empty file, expected a safetensors file (an 8-byte header length, a JSON header, the data)");
    }
    const auto size = static_cast<std::size_t>(s.st_size);
    void* data = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int map_err = errno;
    ::close(fd);  // the mapping keeps the file
    if (data == MAP_FAILED) moe::detail::fail(o, ": cannot map ", size, " bytes: ", detail::errno_text(map_err));
    st.mapped_ = detail::MappedFile(data, size);
    st.load();
    return st;
  }

  // Validates a file held in `bytes`, which it keeps; `origin` starts every error message.
  static SafeTensors parse(std::vector<std::byte> bytes, std::string origin = "<memory>") {
    SafeTensors st;
    st.origin_ = std::move(origin);
    st.owned_ = std::move(bytes);
    st.load();
    return st;
  }

  // The path or origin, the prefix of every error message.
  [[nodiscard]] const std::string& origin() const { return origin_; }
  [[nodiscard]] const Metadata& metadata() const { return metadata_; }
  // In data order (by begin).
  [[nodiscard]] const std::vector<TensorInfo>& tensors() const { return tensors_; }
  [[nodiscard]] bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }

  [[nodiscard]] const TensorInfo& info(std::string_view name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) {
      // List a few names, in name order, to show what the file has (and, often, the typo).
      std::string names;
      std::size_t listed = 0;
      for (const auto& entry : index_) {
        if (listed == 10) {
          names += ", ...";
          break;
        }
        names += (listed++ ? ", " : ": ") + entry.first;
      }
      moe::detail::fail(origin_, ": no tensor '", name, "' (the file has ", tensors_.size(),
                        tensors_.size() == 1 ? " tensor" : " tensors", names, ")");
    }
    return tensors_[it->second];
  }

  // The tensor's bytes in the file, as stored (little-endian, row-major, possibly unaligned).
  [[nodiscard]] std::span<const std::byte> raw(std::string_view name) const {
    const TensorInfo& t = info(name);
    return file().subspan(data_start_ + t.begin, t.end - t.begin);
  }

  // Converts tensor `name` into `out`. Floating T (float, double) takes F16, BF16, F32 and F64 (an
  // F64 value past float's range is an error when T is float); integral T takes every integer
  // dtype and BOOL (0 or 1), range-checked. out.size() must equal the tensor's numel.
  template <class T>
  requires detail::Element<T>
  void read(std::string_view name, std::span<T> out, const Expect& expect = {}) const {
    const TensorInfo& t = info(name);
    const std::string where = moe::detail::concat(origin_, ": tensor '", t.name, "'");
    if (expect.shape && *expect.shape != t.shape) {
      moe::detail::fail(where, " has shape ", detail::shape_string(t.shape), ", expected ",
                        detail::shape_string(*expect.shape));
    }
    const auto n = static_cast<std::size_t>(t.numel());
    moe::detail::require(out.size() == n, where, " has ", n, " elements (shape ", detail::shape_string(t.shape),
                         "), but the output has room for ", out.size());
    const std::byte* src = file().data() + data_start_ + t.begin;
    if constexpr (std::is_floating_point_v<T>) {
      moe::detail::require(is_floating(t.dtype), where, " has dtype ", dtype_name(t.dtype),
                           ", expected a floating dtype (F16, BF16, F32 or F64) to read it as ",
                           detail::type_name<T>());
      switch (t.dtype) {
        case Dtype::F16:
          for (std::size_t i = 0; i < n; ++i) out[i] = half_to_float(detail::load<std::uint16_t>(src + 2 * i));
          break;
        case Dtype::BF16:
          for (std::size_t i = 0; i < n; ++i) out[i] = bf16_to_float(detail::load<std::uint16_t>(src + 2 * i));
          break;
        case Dtype::F32:
          for (std::size_t i = 0; i < n; ++i) out[i] = detail::load<float>(src + 4 * i);
          break;
        default:  // F64
          for (std::size_t i = 0; i < n; ++i) {
            const auto v = detail::load<double>(src + 8 * i);
            // Converting a finite double past float's range is undefined behaviour, not infinity.
            if (std::is_same_v<T, float> && std::isfinite(v) && std::abs(v) > std::numeric_limits<float>::max()) {
              moe::detail::fail(where, ": element ", i, " is ", v, ", which does not fit in float");
            }
            out[i] = static_cast<T>(v);
          }
          break;
      }
      if (expect.finite) {
        for (std::size_t i = 0; i < n; ++i) {
          if (!std::isfinite(out[i])) {
            moe::detail::fail(where, ": element ", i, " is ", out[i], ", expected finite values");
          }
        }
      }
    } else {
      moe::detail::require(!is_floating(t.dtype), where, " has dtype ", dtype_name(t.dtype),
                           ", expected an integer dtype or BOOL to read it as ", detail::type_name<T>());
      switch (t.dtype) {
        case Dtype::BOOL:
          read_integers<std::uint8_t>(where, src, out, true);
          break;
        case Dtype::U8:
          read_integers<std::uint8_t>(where, src, out);
          break;
        case Dtype::I8:
          read_integers<std::int8_t>(where, src, out);
          break;
        case Dtype::U16:
          read_integers<std::uint16_t>(where, src, out);
          break;
        case Dtype::I16:
          read_integers<std::int16_t>(where, src, out);
          break;
        case Dtype::U32:
          read_integers<std::uint32_t>(where, src, out);
          break;
        case Dtype::I32:
          read_integers<std::int32_t>(where, src, out);
          break;
        case Dtype::U64:
          read_integers<std::uint64_t>(where, src, out);
          break;
        default:
          read_integers<std::int64_t>(where, src, out);
          break;  // I64
      }
    }
  }

  template <class T>
  requires detail::Element<T>
  [[nodiscard]] std::vector<T> read(std::string_view name, const Expect& expect = {}) const {
    // The size comes from a validated header: numel * dtype size bytes are in the file.
    std::vector<T> out(static_cast<std::size_t>(info(name).numel()));
    read(name, std::span<T>(out), expect);
    return out;
  }

 private:
  SafeTensors() = default;

  [[nodiscard]] std::span<const std::byte> file() const {
    return mapped_ ? mapped_.bytes() : std::span<const std::byte>(owned_);
  }

  template <class S, class T>
  static void read_integers(const std::string& where, const std::byte* src, std::span<T> out, bool is_bool = false) {
    for (std::size_t i = 0; i < out.size(); ++i) {
      const S v = detail::load<S>(src + sizeof(S) * i);
      if (is_bool && v > 1) moe::detail::fail(where, ": element ", i, " of a BOOL tensor is ", +v, ", expected 0 or 1");
      // (Streamed as a 64-bit integer: a uint8_t would print as a character.)
      if (!std::in_range<T>(v)) {
        moe::detail::fail(where, ": element ", i, " is ",
                          static_cast<std::conditional_t<std::is_signed_v<S>, std::int64_t, std::uint64_t>>(v),
                          ", which does not fit in ", detail::type_name<T>());
      }
      out[i] = static_cast<T>(v);
    }
  }

  // Validates the whole file and fills the tensors, the index and the metadata.
  void load() {
    const auto f = file();
    const std::string& o = origin_;
    moe::detail::require(f.size() >= 8, o, ": the file is ", f.size(),
                         " bytes, shorter than the 8-byte header length that starts a safetensors file");
    const auto header_size = detail::load<std::uint64_t>(f.data());
    moe::detail::require(header_size != 0, o, ": the header length is 0, expected a JSON object");
    moe::detail::require(header_size <= detail::max_header_bytes, o, ": the header length is ", header_size,
                         ", over the limit of ", detail::max_header_bytes, " bytes");
    moe::detail::require(header_size <= f.size() - 8, o, ": the header length is ", header_size,
                         ", past the end of the file (", f.size() - 8, " bytes follow the length)");
    const std::string_view header(reinterpret_cast<const char*>(f.data() + 8), static_cast<std::size_t>(header_size));
    // nlohmann's parser takes a NUL byte for the end of its input and would ignore what follows.
    if (const auto nul = header.find('\0'); nul != std::string_view::npos) {
      moe::detail::fail(o, ": the header has a NUL byte at byte ", 8 + nul, " of the file, expected UTF-8 JSON");
    }
    data_start_ = 8 + header_size;
    const std::uint64_t data_size = f.size() - data_start_;

    std::vector<TensorInfo> tensors;
    try {
      const nlohmann::json j = parse_header(header);
      if (!j.is_object()) moe::detail::fail(o, ": the header is a JSON ", j.type_name(), ", expected an object");
      for (auto it = j.begin(); it != j.end(); ++it) {
        if (it.key() == "__metadata__") {
          load_metadata(it.value());
        } else {
          tensors.push_back(load_entry(it.key(), it.value(), data_size));
        }
      }
    } catch (const nlohmann::json::exception& e) {
      // What the checks above should have prevented; still a bad file, not a crash.
      moe::detail::fail(o, ": invalid header: ", e.what());
    }

    // The tensors must tile the data buffer: sorted by offsets, each starts where the previous
    // one ended, and the last ends at the end of the buffer. (Ties, zero-size tensors at one
    // offset, go by name so that the order does not depend on the header's.)
    std::sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
    });
    std::uint64_t covered = 0;
    const TensorInfo* last = nullptr;  // the tensor that ends at `covered`
    for (const TensorInfo& t : tensors) {
      if (t.begin < covered) {
        moe::detail::fail(o, ": tensor '", t.name, "' (data_offsets [", t.begin, ", ", t.end, "]) overlaps tensor '",
                          last->name, "' ([", last->begin, ", ", last->end, "]), expected disjoint tensors");
      }
      if (t.begin > covered) {
        moe::detail::fail(o, ": bytes [", covered, ", ", t.begin, ") of the data buffer, before tensor '", t.name,
                          "', belong to no tensor, expected the tensors to cover the data buffer exactly");
      }
      if (t.end > covered || last == nullptr) last = &t;
      covered = t.end;
    }
    if (covered != data_size) {
      moe::detail::fail(o, ": the last ", data_size - covered, " bytes of the data buffer (from offset ", covered,
                        " of ", data_size,
                        ") belong to no tensor, expected the tensors to cover the data buffer exactly");
    }
    tensors_ = std::move(tensors);
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  }

  // The header as JSON; a key twice in one object is an error (nlohmann would keep one of them).
  // A header is an object of objects of arrays: deeper nesting is refused as it is met, so that a
  // large header cannot make the parser hold millions of open containers.
  [[nodiscard]] nlohmann::json parse_header(std::string_view header) const {
    const std::string& o = origin_;
    std::vector<std::set<std::string>> keys;  // the keys seen so far in each open object
    std::optional<std::string> entry;         // the top-level key being parsed
    const auto where = [&] {
      if (!entry) return std::string("the header");
      return *entry == "__metadata__" ? *entry : "tensor '" + *entry + "'";
    };
    const auto check = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
      using Event = nlohmann::json::parse_event_t;
      if ((event == Event::object_start || event == Event::array_start) && depth > 2) {
        moe::detail::fail(o, ": ", where(), ": JSON nested ", depth + 1,
                          " deep, expected at most 3 (an object of objects of arrays)");
      }
      if (event == Event::object_start) {
        keys.emplace_back();
      } else if (event == Event::object_end) {
        if (!keys.empty()) keys.pop_back();
      } else if (event == Event::key && !keys.empty() && parsed.is_string()) {
        const auto& key = parsed.get_ref<const std::string&>();
        if (!keys.back().insert(key).second) {
          if (depth == 1) {
            moe::detail::fail(o, ": the header has the key '", key, "' twice, expected unique tensor names");
          }
          moe::detail::fail(o, ": ", where(), ": the key '", key, "' appears twice in one object");
        }
        if (depth == 1) entry = key;
      }
      return true;
    };
    try {
      return nlohmann::json::parse(header.begin(), header.end(), check, /*allow_exceptions=*/true,
                                   /*ignore_comments=*/false);
    } catch (const nlohmann::json::exception& e) {
      moe::detail::fail(o, ": the header is not valid UTF-8 JSON: ", e.what());
    }
  }

  void load_metadata(const nlohmann::json& m) {
    const std::string& o = origin_;
    if (!m.is_object()) {
      moe::detail::fail(o, ": __metadata__ is a JSON ", m.type_name(), ", expected an object of strings");
    }
    for (auto it = m.begin(); it != m.end(); ++it) {
      if (!it.value().is_string()) {
        moe::detail::fail(o, ": __metadata__ '", it.key(), "' is a JSON ", it.value().type_name(),
                          ", expected a string");
      }
      metadata_.emplace(it.key(), it.value().get_ref<const std::string&>());
    }
  }

  [[nodiscard]] TensorInfo load_entry(const std::string& name, const nlohmann::json& e, std::uint64_t data_size) const {
    const std::string where = moe::detail::concat(origin_, ": tensor '", name, "'");
    if (!e.is_object()) {
      moe::detail::fail(where, " is a JSON ", e.type_name(), ", expected an object with dtype, shape and data_offsets");
    }
    for (auto it = e.begin(); it != e.end(); ++it) {
      if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets") {
        moe::detail::fail(where, " has the key '", it.key(), "', expected only dtype, shape and data_offsets");
      }
    }
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!e.contains(key)) moe::detail::fail(where, " has no '", key, "', expected dtype, shape and data_offsets");
    }
    TensorInfo t;
    t.name = name;

    const auto& dtype = e["dtype"];
    if (!dtype.is_string()) moe::detail::fail(where, ": dtype is a JSON ", dtype.type_name(), ", expected a string");
    const auto parsed = parse_dtype(dtype.get_ref<const std::string&>());
    if (!parsed) {
      std::string known;
      for (const Dtype d : detail::all_dtypes) known += (known.empty() ? "" : ", ") + std::string(dtype_name(d));
      moe::detail::fail(where, ": unknown dtype '", dtype.get_ref<const std::string&>(), "', expected one of ", known);
    }
    t.dtype = *parsed;

    const auto& shape = e["shape"];
    if (!shape.is_array()) {
      moe::detail::fail(where, ": shape is a JSON ", shape.type_name(), ", expected an array of integers");
    }
    for (std::size_t i = 0; i < shape.size(); ++i) {
      const auto& d = shape[i];
      if (d.is_number_integer() && !d.is_number_unsigned()) {
        moe::detail::fail(where, ": shape[", i, "] is ", d.get<std::int64_t>(), ", expected a non-negative integer");
      }
      if (!d.is_number_unsigned()) {
        moe::detail::fail(where, ": shape[", i, "] is ", detail::short_dump(d), ", expected a non-negative integer");
      }
      const auto v = d.get<std::uint64_t>();
      if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        moe::detail::fail(where, ": shape[", i, "] is ", v, ", expected at most 2^63 - 1");
      }
      t.shape.push_back(static_cast<std::int64_t>(v));
    }
    const auto numel = detail::checked_numel(t.shape);
    if (!numel) {
      moe::detail::fail(where, ": shape ", detail::shape_string(t.shape), " has more than 2^63 - 1 elements");
    }
    const std::uint64_t elem = dtype_size(t.dtype);
    const auto count = static_cast<std::uint64_t>(*numel);
    if (count > std::numeric_limits<std::uint64_t>::max() / elem) {
      moe::detail::fail(where, ": shape ", detail::shape_string(t.shape), " of ", dtype_name(t.dtype),
                        " has more than 2^64 - 1 bytes");
    }
    const std::uint64_t bytes = count * elem;

    const auto& offsets = e["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      moe::detail::fail(where, ": data_offsets is ", detail::short_dump(offsets),
                        ", expected [begin, end], two non-negative integers");
    }
    t.begin = offsets[0].get<std::uint64_t>();
    t.end = offsets[1].get<std::uint64_t>();
    if (t.begin > t.end) moe::detail::fail(where, ": data_offsets [", t.begin, ", ", t.end, "] end before they begin");
    if (t.end > data_size) {
      moe::detail::fail(where, ": data_offsets [", t.begin, ", ", t.end, "] go past the end of the data buffer (",
                        data_size, " bytes)");
    }
    if (t.end - t.begin != bytes) {
      moe::detail::fail(where, ": shape ", detail::shape_string(t.shape), " of ", dtype_name(t.dtype), " is ", bytes,
                        " bytes, but data_offsets [", t.begin, ", ", t.end, "] hold ", t.end - t.begin);
    }
    return t;
  }

  std::string origin_;
  std::vector<std::byte> owned_;  // the file, when parsed from bytes
  detail::MappedFile mapped_;     // the file, when opened
  std::uint64_t data_start_ = 0;  // 8 + the header length
  Metadata metadata_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t, std::less<>> index_;  // name -> position in tensors_
};

// Builds a safetensors file: metadata and tensors in memory, then bytes() or write(path).
class SafeTensorsWriter {
 public:
  // Sets (or replaces) a metadata entry. Key and value must be valid UTF-8.
  void set_metadata(std::string key, std::string value) {
    moe::detail::require(detail::valid_utf8(key) && detail::valid_utf8(value), "moe::io::SafeTensorsWriter: metadata '",
                         key, "': key and value must be valid UTF-8");
    metadata_[std::move(key)] = std::move(value);
  }

  // Adds a tensor; tensors are written in the order added. values.size() must equal the product
  // of shape. Floating T can be stored as F16, BF16, F32 or F64 (rounded to nearest even; a
  // finite value that would become infinite is an error; double goes through float for F16 and
  // BF16), integral T as any integer dtype or BOOL (range-checked).
  template <class T>
  requires detail::Element<T>
  void add(std::string name, std::vector<std::int64_t> shape, std::span<const T> values, Dtype dtype = dtype_of<T>) {
    const std::string where = "moe::io::SafeTensorsWriter: tensor '" + name + "'";
    moe::detail::require(!name.empty(),
                         "moe::io::SafeTensorsWriter: a tensor name is empty, expected a non-empty name");
    moe::detail::require(name != "__metadata__", where, ": the name is reserved for the metadata");
    moe::detail::require(detail::valid_utf8(name), where, ": the name is not valid UTF-8");
    moe::detail::require(!names_.contains(name), where, " was already added, expected unique names");
    const auto numel = detail::checked_numel(shape);
    moe::detail::require(numel.has_value(), where, ": shape ", detail::shape_string(shape),
                         ", expected non-negative dimensions whose product fits in int64");
    moe::detail::require(values.size() == static_cast<std::size_t>(*numel), where, ": shape ",
                         detail::shape_string(shape), " has ", *numel, " elements, but ", values.size(),
                         " values were given");

    std::vector<std::byte> data(values.size() * dtype_size(dtype));
    std::byte* dst = data.data();
    if constexpr (std::is_floating_point_v<T>) {
      moe::detail::require(is_floating(dtype), where, ": cannot store ", detail::type_name<T>(), " values as ",
                           dtype_name(dtype), ", expected F16, BF16, F32 or F64");
      for (std::size_t i = 0; i < values.size(); ++i) {
        const T v = values[i];
        if (dtype == Dtype::F64) {
          store(dst + 8 * i, static_cast<double>(v));
          continue;
        }
        // Converting a finite double past float's range is undefined behaviour: catch it first.
        if (std::isfinite(v) && std::abs(static_cast<double>(v)) > std::numeric_limits<float>::max()) {
          overflow(where, i, v, dtype);
        }
        const auto f = static_cast<float>(v);
        if (dtype == Dtype::F32) {
          store(dst + 4 * i, f);
          continue;
        }
        const std::uint16_t h = dtype == Dtype::F16 ? float_to_half(f) : float_to_bf16(f);
        const float back = dtype == Dtype::F16 ? half_to_float(h) : bf16_to_float(h);
        if (std::isfinite(v) && !std::isfinite(back)) overflow(where, i, v, dtype);
        store(dst + 2 * i, h);
      }
    } else {
      moe::detail::require(!is_floating(dtype), where, ": cannot store ", detail::type_name<T>(), " values as ",
                           dtype_name(dtype), ", expected an integer dtype or BOOL");
      switch (dtype) {
        case Dtype::BOOL:
          store_integers<std::uint8_t>(where, dtype, values, dst, true);
          break;
        case Dtype::U8:
          store_integers<std::uint8_t>(where, dtype, values, dst);
          break;
        case Dtype::I8:
          store_integers<std::int8_t>(where, dtype, values, dst);
          break;
        case Dtype::U16:
          store_integers<std::uint16_t>(where, dtype, values, dst);
          break;
        case Dtype::I16:
          store_integers<std::int16_t>(where, dtype, values, dst);
          break;
        case Dtype::U32:
          store_integers<std::uint32_t>(where, dtype, values, dst);
          break;
        case Dtype::I32:
          store_integers<std::int32_t>(where, dtype, values, dst);
          break;
        case Dtype::U64:
          store_integers<std::uint64_t>(where, dtype, values, dst);
          break;
        default:
          store_integers<std::int64_t>(where, dtype, values, dst);
          break;  // I64
      }
    }
    names_.insert(name);
    tensors_.push_back({std::move(name), dtype, std::move(shape), std::move(data)});
  }

  // The same, for any contiguous range of values (a std::vector, std::array, std::span<T>).
  template <std::ranges::contiguous_range R>
  requires detail::Element<std::remove_cv_t<std::ranges::range_value_t<R>>>
  void add(std::string name, std::vector<std::int64_t> shape, const R& values,
           Dtype dtype = dtype_of<std::remove_cv_t<std::ranges::range_value_t<R>>>) {
    using T = std::remove_cv_t<std::ranges::range_value_t<R>>;
    add<T>(std::move(name), std::move(shape), std::span<const T>(std::ranges::data(values), std::ranges::size(values)),
           dtype);
  }

  // The serialized file: the header lists the metadata first, then the tensors in the order
  // added, each with dtype, shape and data_offsets; it is padded with spaces to a multiple of 8
  // bytes so that the data buffer starts 8-byte aligned.
  [[nodiscard]] std::vector<std::byte> bytes() const {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) {
      auto& m = header["__metadata__"] = nlohmann::ordered_json::object();
      for (const auto& [key, value] : metadata_) m[key] = value;
    }
    std::uint64_t offset = 0;
    for (const Entry& t : tensors_) {
      nlohmann::ordered_json e = nlohmann::ordered_json::object();
      e["dtype"] = std::string(dtype_name(t.dtype));
      e["shape"] = t.shape;
      e["data_offsets"] = nlohmann::ordered_json::array({offset, offset + t.data.size()});
      header[t.name] = std::move(e);
      offset += t.data.size();
    }
    std::string text;
    try {
      text = header.dump();
    } catch (const nlohmann::json::exception& e) {  // names and metadata were checked to be UTF-8
      moe::detail::fail("moe::io::SafeTensorsWriter: cannot serialize the header: ", e.what());
    }
    text.append((8 - text.size() % 8) % 8, ' ');

    std::vector<std::byte> out(8 + text.size() + offset);
    const std::uint64_t n = text.size();
    std::memcpy(out.data(), &n, 8);
    std::memcpy(out.data() + 8, text.data(), text.size());
    std::byte* p = out.data() + 8 + text.size();
    for (const Entry& t : tensors_) {
      if (!t.data.empty()) std::memcpy(p, t.data.data(), t.data.size());
      p += t.data.size();
    }
    return out;
  }

  // write_file_atomically(path, bytes()).
  void write(const std::filesystem::path& path) const { write_file_atomically(path, bytes()); }

 private:
  struct Entry {
    std::string name;
    Dtype dtype;
    std::vector<std::int64_t> shape;
    std::vector<std::byte> data;
  };

  template <class S>
  static void store(std::byte* p, S v) {
    std::memcpy(p, &v, sizeof v);
  }

  template <class T>
  [[noreturn]] static void overflow(const std::string& where, std::size_t i, T v, Dtype dtype) {
    moe::detail::fail(where, ": element ", i, " is ", v, ", past the largest finite ", dtype_name(dtype));
  }

  template <class S, class T>
  static void store_integers(const std::string& where, Dtype dtype, std::span<const T> values, std::byte* dst,
                             bool is_bool = false) {
    for (std::size_t i = 0; i < values.size(); ++i) {
      const T v = values[i];
      if (!std::in_range<S>(v) || (is_bool && v != 0 && v != 1)) {
        moe::detail::fail(where, ": element ", i, " is ",
                          static_cast<std::conditional_t<std::is_signed_v<T>, std::int64_t, std::uint64_t>>(v),
                          ", which does not fit in ", dtype_name(dtype), is_bool ? " (0 or 1)" : "");
      }
      store(dst + sizeof(S) * i, static_cast<S>(v));
    }
  }

  Metadata metadata_;
  std::vector<Entry> tensors_;
  std::set<std::string, std::less<>> names_;
};

namespace detail {

// The JSON file at `path`, parsed; errors name the file.
inline nlohmann::json read_json_file(const std::filesystem::path& path) {
  const std::string origin = path.string();
  std::string text;
  std::FILE* f = std::fopen(path.c_str(), "rb");
  moe::detail::require(f != nullptr, origin, ": cannot open: ", errno_text(errno));
  char buffer[65536];
  std::size_t got = 0;
  while ((got = std::fread(buffer, 1, sizeof buffer, f)) > 0) text.append(buffer, got);
  std::fclose(f);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    moe::detail::fail(origin, ": not valid JSON: ", e.what());
  }
}

}  // namespace detail

// The safetensors files of a checkpoint split over several files: which file holds each tensor
// (the "weight_map" of a model.safetensors.index.json), each file opened and validated on first use.
class ShardedFiles {
 public:
  ShardedFiles() = default;

  // From an index (already parsed) read from `origin`; the files lie in `dir`. Every file name
  // must be a plain name in that directory, so an index cannot point outside its checkpoint.
  static ShardedFiles from_index(const nlohmann::json& index, std::filesystem::path dir, std::string origin) {
    moe::detail::require(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(), origin,
                         ": expected a JSON object with a \"weight_map\" object (a sharded checkpoint's index)");
    ShardedFiles s;
    s.dir_ = std::move(dir);
    s.origin_ = std::move(origin);
    for (const auto& [name, file] : index["weight_map"].items()) {
      moe::detail::require(file.is_string(), s.origin_, ": weight_map[\"", name, "\"] is not a file name");
      const std::string f = file.template get<std::string>();
      moe::detail::require(!f.empty() && f.find('/') == std::string::npos && f.find('\\') == std::string::npos &&
                               f != "." && f != "..",
                           s.origin_, ": weight_map[\"", name, "\"] = \"", f,
                           "\", expected a file name in the index's directory");
      s.file_of_[name] = f;
    }
    return s;
  }

  // One file holding every tensor (opened now).
  static ShardedFiles from_file(const std::filesystem::path& path) {
    ShardedFiles s;
    s.dir_ = path.parent_path();
    s.origin_ = path.string();
    const std::string name = path.filename().string();
    auto& file = s.files_.emplace(name, SafeTensors::open(path)).first->second;
    for (const auto& t : file.tensors()) s.file_of_[t.name] = name;
    return s;
  }

  [[nodiscard]] bool contains(const std::string& name) const { return file_of_.count(name) != 0; }

  // The file holding tensor `name`; an Error naming the tensor when none does.
  [[nodiscard]] const SafeTensors& file_of(const std::string& name) const {
    const auto it = file_of_.find(name);
    moe::detail::require(it != file_of_.end(), origin_, ": no tensor '", name, "' in the weight map");
    auto found = files_.find(it->second);
    if (found == files_.end()) found = files_.emplace(it->second, SafeTensors::open(dir_ / it->second)).first;
    moe::detail::require(found->second.contains(name), found->second.origin(), ": no tensor '", name,
                         "', which the index ", origin_, " places there");
    return found->second;
  }

 private:
  std::filesystem::path dir_;
  std::string origin_;
  std::map<std::string, std::string> file_of_;
  mutable std::map<std::string, SafeTensors> files_;
};

}  // namespace moe::io
