// moe/io: the safetensors reader and writer (round trips, the bytes of the format, every
// validation error), the 16-bit float conversions, and atomic file writes.

#include "moe/io/safetensors.hpp"

#include <doctest/doctest.h>
#include <stdlib.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "moe/io/atomic_file.hpp"
#include "moe/io/dtype.hpp"
#include "moe/precision.hpp"

namespace {

namespace fs = std::filesystem;
using moe::io::Dtype;
using moe::io::Expect;
using moe::io::SafeTensors;
using moe::io::SafeTensorsWriter;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

float from_bits(std::uint32_t b) { return std::bit_cast<float>(b); }

// A file: the 8-byte little-endian length of `header` (or `length` when given), the header, `data`.
std::vector<std::byte> file_bytes(std::string_view header, const std::vector<std::uint8_t>& data = {},
                                  std::optional<std::uint64_t> length = std::nullopt) {
  const std::uint64_t n = length.value_or(header.size());
  std::vector<std::byte> out(8 + header.size() + data.size());
  for (int i = 0; i < 8; ++i) out[i] = static_cast<std::byte>((n >> (8 * i)) & 0xFF);
  std::memcpy(out.data() + 8, header.data(), header.size());
  if (!data.empty()) std::memcpy(out.data() + 8 + header.size(), data.data(), data.size());
  return out;
}

// The message of the moe::Error that f throws; a marker when it throws nothing or something else.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const moe::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<not a moe::Error: ") + e.what() + ">";
  }
  return "<no exception>";
}

constexpr const char* origin = "bad.safetensors";

// The error of parsing a file with `header` and `data_size` zero bytes of data.
std::string parse_error(std::string_view header, std::size_t data_size = 0) {
  return error_of([&] { (void)SafeTensors::parse(file_bytes(header, std::vector<std::uint8_t>(data_size)), origin); });
}

// Checks that `message` starts with the origin and contains every part.
void check_message(const std::string& message, std::initializer_list<std::string_view> parts,
                   std::string_view prefix = origin) {
  INFO("message: ", message);
  CHECK(message.starts_with(std::string(prefix) + ": "));
  for (const std::string_view part : parts) {
    INFO("expected part: ", part);
    CHECK(message.find(part) != std::string::npos);
  }
}

// A header entry "name": {...}.
std::string entry(std::string_view name, std::string_view dtype, std::string_view shape, std::uint64_t begin,
                  std::uint64_t end) {
  return "\"" + std::string(name) + "\":{\"dtype\":\"" + std::string(dtype) + "\",\"shape\":" + std::string(shape) +
         ",\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(end) + "]}";
}

// A fresh directory, removed with its contents at the end of the scope.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "moe-io-test.XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path_ = tmpl;
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  [[nodiscard]] const fs::path& path() const { return path_; }
  [[nodiscard]] std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path_)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

 private:
  fs::path path_;
};

std::vector<std::byte> read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> chars((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(chars.size());
  if (!chars.empty()) std::memcpy(out.data(), chars.data(), chars.size());
  return out;
}

}  // namespace

TEST_CASE("dtype names, sizes and dtype_of") {
  const std::vector<std::pair<Dtype, std::size_t>> all = {
      {Dtype::BOOL, 1}, {Dtype::U8, 1},  {Dtype::I8, 1},  {Dtype::I16, 2}, {Dtype::U16, 2},
      {Dtype::I32, 4},  {Dtype::U32, 4}, {Dtype::I64, 8}, {Dtype::U64, 8}, {Dtype::F16, 2},
      {Dtype::BF16, 2}, {Dtype::F32, 4}, {Dtype::F64, 8}};
  for (const auto& row : all) {
    const Dtype d = row.first;
    const std::size_t size = row.second;
    CAPTURE(moe::io::dtype_name(d));
    CHECK(moe::io::parse_dtype(moe::io::dtype_name(d)) == d);
    CHECK(moe::io::dtype_size(d) == size);
  }
  CHECK(moe::io::dtype_name(Dtype::BF16) == "BF16");
  CHECK(moe::io::dtype_name(Dtype::BOOL) == "BOOL");
  CHECK_FALSE(moe::io::parse_dtype("F8_E4M3").has_value());
  CHECK_FALSE(moe::io::parse_dtype("f32").has_value());
  CHECK_FALSE(moe::io::parse_dtype("").has_value());
  CHECK(moe::io::is_floating(Dtype::F16));
  CHECK(moe::io::is_floating(Dtype::BF16));
  CHECK(moe::io::is_floating(Dtype::F64));
  CHECK_FALSE(moe::io::is_floating(Dtype::I64));
  CHECK_FALSE(moe::io::is_floating(Dtype::BOOL));
  static_assert(moe::io::dtype_of<float> == Dtype::F32);
  static_assert(moe::io::dtype_of<double> == Dtype::F64);
  static_assert(moe::io::dtype_of<std::int64_t> == Dtype::I64);
  static_assert(moe::io::dtype_of<std::int32_t> == Dtype::I32);
  static_assert(moe::io::dtype_of<std::uint8_t> == Dtype::U8);
}

TEST_CASE("float_to_half and half_to_float: IEEE binary16, ties to even") {
  using moe::io::float_to_half;
  using moe::io::half_to_float;
  CHECK(float_to_half(1.0f) == 0x3C00);
  CHECK(float_to_half(-2.5f) == 0xC100);
  CHECK(float_to_half(65504.0f) == 0x7BFF);  // the largest half
  CHECK(float_to_half(0.1f) == 0x2E66);
  CHECK(half_to_float(0x3C00) == 1.0f);
  CHECK(half_to_float(0xC100) == -2.5f);
  CHECK(half_to_float(0x7BFF) == 65504.0f);
  // 65520 is halfway between 65504 (odd mantissa) and 65536 (past the largest): ties to even, infinite.
  CHECK(float_to_half(65519.996f) == 0x7BFF);
  CHECK(float_to_half(65520.0f) == 0x7C00);
  CHECK(float_to_half(1e6f) == 0x7C00);
  CHECK(float_to_half(-1e6f) == 0xFC00);
  CHECK(float_to_half(std::numeric_limits<float>::max()) == 0x7C00);
  // Ties in the normal range: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 -> 1 (even);
  // 1 + 3 * 2^-11 is halfway between 1 + 2^-10 and 1 + 2^-9 -> 1 + 2^-9 (even).
  CHECK(float_to_half(1.0f + 0x1p-11f) == 0x3C00);
  CHECK(float_to_half(1.0f + 3 * 0x1p-11f) == 0x3C02);
  CHECK(float_to_half(std::nextafter(1.0f + 0x1p-11f, 2.0f)) == 0x3C01);
  // Rounding up carries into the exponent: the largest value below 2 rounds to 2.
  CHECK(float_to_half(std::nextafter(2.0f, 0.0f)) == 0x4000);
  // Subnormals: 2^-24 is the smallest, 1023 * 2^-24 the largest, 2^-14 the smallest normal.
  CHECK(float_to_half(0x1p-24f) == 0x0001);
  CHECK(float_to_half(1023 * 0x1p-24f) == 0x03FF);
  CHECK(float_to_half(0x1p-14f) == 0x0400);
  CHECK(half_to_float(0x0001) == 0x1p-24f);
  CHECK(half_to_float(0x03FF) == 1023 * 0x1p-24f);
  CHECK(half_to_float(0x8001) == -0x1p-24f);
  CHECK(half_to_float(0x0400) == 0x1p-14f);
  // 2^-25 ties between 0 and 2^-24: to the even 0; just above rounds up; 3 * 2^-25 ties to 2 * 2^-24.
  CHECK(float_to_half(0x1p-25f) == 0x0000);
  CHECK(float_to_half(std::nextafter(0x1p-25f, 1.0f)) == 0x0001);
  CHECK(float_to_half(3 * 0x1p-25f) == 0x0002);
  CHECK(float_to_half(0x1p-30f) == 0x0000);
  CHECK(float_to_half(-0x1p-30f) == 0x8000);
  // The largest subnormal plus half a step rounds to the smallest normal.
  CHECK(float_to_half(1023.5f * 0x1p-24f) == 0x0400);
  // Zeros, infinities, NaN.
  CHECK(float_to_half(0.0f) == 0x0000);
  CHECK(float_to_half(-0.0f) == 0x8000);
  CHECK(std::signbit(half_to_float(0x8000)));
  CHECK(float_to_half(kInf) == 0x7C00);
  CHECK(float_to_half(-kInf) == 0xFC00);
  CHECK(half_to_float(0x7C00) == kInf);
  CHECK(half_to_float(0xFC00) == -kInf);
  const auto is_half_nan = [](std::uint16_t h) { return (h & 0x7C00) == 0x7C00 && (h & 0x03FF) != 0; };
  CHECK(is_half_nan(float_to_half(kNaN)));
  CHECK(is_half_nan(float_to_half(from_bits(0x7F800001u))));  // a payload only in the dropped bits
  CHECK(is_half_nan(float_to_half(-kNaN)));
  CHECK(std::isnan(half_to_float(0x7E00)));
  CHECK(std::isnan(half_to_float(0x7C01)));

  // Every half survives half -> float -> half, and half_to_float is the value of the bits.
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    const float f = half_to_float(bits);
    if (is_half_nan(bits)) {
      CHECK(std::isnan(f));
      CHECK(is_half_nan(float_to_half(f)));
      continue;
    }
    const int exp = (h >> 10) & 0x1F;
    const int mant = h & 0x3FF;
    const double magnitude = exp == 0x1F ? std::numeric_limits<double>::infinity()
                             : exp == 0  ? std::ldexp(mant, -24)
                                         : std::ldexp(1024 + mant, exp - 25);
    const double expected = (h & 0x8000) ? -magnitude : magnitude;
    if (static_cast<double>(f) != expected || float_to_half(f) != bits) {
      FAIL_CHECK("half 0x", std::hex, h, ": ", f, " != ", expected);
    }
  }

#if defined(__FLT16_MAX__)
  // The compiler's own conversion (correctly rounded) on a sweep of floats, every exponent.
  std::uint64_t mismatches = 0;
  for (std::uint64_t b = 0; b <= 0xFFFFFFFFu; b += 4093) {
    const float f = from_bits(static_cast<std::uint32_t>(b));
    if (std::isnan(f)) continue;
    const auto expected = std::bit_cast<std::uint16_t>(static_cast<_Float16>(f));
    if (float_to_half(f) != expected) ++mismatches;
  }
  CHECK(mismatches == 0);
#endif
}

TEST_CASE("float_to_bf16 and bf16_to_float: ties to even, as moe::round_to_bf16") {
  using moe::io::bf16_to_float;
  using moe::io::float_to_bf16;
  CHECK(float_to_bf16(1.0f) == 0x3F80);
  CHECK(float_to_bf16(-2.5f) == 0xC020);
  CHECK(bf16_to_float(0x3F80) == 1.0f);
  CHECK(bf16_to_float(0xC020) == -2.5f);
  CHECK(float_to_bf16(0.1f) == 0x3DCD);  // 0x3DCCCCCD rounds up
  // 1 + 2^-8 ties between 1 and 1 + 2^-7: to 1 (even); 1 + 3 * 2^-8 to 1 + 2^-6 (even).
  CHECK(float_to_bf16(1.0f + 0x1p-8f) == 0x3F80);
  CHECK(float_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3F82);
  CHECK(float_to_bf16(from_bits(0x3F808001u)) == 0x3F81);
  // Subnormals keep their exact value when their low 16 bits are 0, and round otherwise.
  CHECK(float_to_bf16(0x1p-130f) == 0x0008);
  CHECK(bf16_to_float(0x0008) == 0x1p-130f);
  CHECK(bf16_to_float(0x0001) == 0x1p-133f);
  CHECK(float_to_bf16(from_bits(0x00018000u)) == 0x0002);  // tie: 1.5 units -> 2
  CHECK(float_to_bf16(from_bits(0x00008000u)) == 0x0000);  // tie: 0.5 units -> 0
  // Zeros, infinities, overflow, NaN.
  CHECK(float_to_bf16(-0.0f) == 0x8000);
  CHECK(float_to_bf16(kInf) == 0x7F80);
  CHECK(float_to_bf16(-kInf) == 0xFF80);
  CHECK(float_to_bf16(std::numeric_limits<float>::max()) == 0x7F80);
  CHECK(float_to_bf16(-std::numeric_limits<float>::max()) == 0xFF80);
  CHECK(std::isnan(bf16_to_float(float_to_bf16(kNaN))));
  CHECK(std::isnan(bf16_to_float(float_to_bf16(from_bits(0x7F800001u)))));
  CHECK(std::isnan(bf16_to_float(float_to_bf16(from_bits(0xFF800001u)))));

  // The same rounding as the bf16 GEMMs' operands, bit for bit, over a sweep of floats.
  std::uint64_t mismatches = 0;
  for (std::uint64_t b = 0; b <= 0xFFFFFFFFu; b += 3089) {
    const float f = from_bits(static_cast<std::uint32_t>(b));
    const float a = bf16_to_float(float_to_bf16(f));
    const float r = moe::round_to_bf16(f);
    if (std::bit_cast<std::uint32_t>(a) != std::bit_cast<std::uint32_t>(r)) ++mismatches;
  }
  CHECK(mismatches == 0);
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    const float f = bf16_to_float(bits);
    if (!std::isnan(f) && float_to_bf16(f) != bits) FAIL_CHECK("bf16 0x", std::hex, h, " does not round trip");
  }
}

TEST_CASE("the writer's bytes are the format, byte for byte") {
  SafeTensorsWriter w;
  w.set_metadata("format", "pt1");
  const std::vector<float> x = {1.0f, -2.0f};
  w.add<float>("x", {2}, x);
  const std::vector<std::uint8_t> y = {7};
  w.add<std::uint8_t>("y", {}, y);

  // By hand: the header, padded with spaces to a multiple of 8, its length in 8 little-endian
  // bytes before it, then x's two floats (little-endian IEEE) and y's byte.
  std::string header = R"({"__metadata__":{"format":"pt1"},)"
                       R"("x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                       R"("y":{"dtype":"U8","shape":[],"data_offsets":[8,9]}})";
  REQUIRE(header.size() == 137);
  header += "       ";  // 137 -> 144
  std::vector<std::uint8_t> expected = {144, 0, 0, 0, 0, 0, 0, 0};
  expected.insert(expected.end(), header.begin(), header.end());
  for (const std::uint8_t b : {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0, 0x07}) expected.push_back(b);

  const std::vector<std::byte> bytes = w.bytes();
  REQUIRE(bytes.size() == expected.size());
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    if (std::to_integer<std::uint8_t>(bytes[i]) != expected[i]) FAIL_CHECK("byte ", i, " differs");
  }

  // An empty file is "{}" padded to 8 bytes.
  const auto empty = SafeTensorsWriter{}.bytes();
  CHECK(empty == file_bytes("{}      "));
  CHECK(SafeTensors::parse(empty).tensors().empty());
}

TEST_CASE("a file written by hand, as other writers write it, reads back") {
  // Keys in another order, whitespace, unaligned offsets (a 3-byte tensor before a float), a
  // tensor order in the header that is not the data order.
  const std::string header = R"( { "b" : { "shape" : [ 2 ], "data_offsets" : [ 3, 11 ], "dtype" : "F32" },
    "a": {"data_offsets": [0, 3], "dtype": "I8", "shape": [3]},
    "__metadata__": {"note": "caf\u00e9 \u2603"},
    "e": {"dtype": "F64", "shape": [0, 2], "data_offsets": [11, 11]},
    "h": {"dtype": "F16", "shape": [1, 1], "data_offsets": [11, 13]} }  )";
  std::vector<std::uint8_t> data = {0xFF, 0x02, 0x80};                                              // a: -1, 2, -128
  for (const std::uint8_t b : {0x00, 0x00, 0x40, 0x40, 0x00, 0x00, 0x80, 0xBF}) data.push_back(b);  // b: 3, -1
  data.push_back(0x00);                                                                             // h: 2.0 = 0x4000
  data.push_back(0x40);
  const auto st = SafeTensors::parse(file_bytes(header, data), "hand.safetensors");
  CHECK(st.origin() == "hand.safetensors");
  CHECK(st.metadata().at("note") == "caf\xC3\xA9 \xE2\x98\x83");
  REQUIRE(st.tensors().size() == 4);
  CHECK(st.tensors()[0].name == "a");
  CHECK(st.tensors()[1].name == "b");
  CHECK(st.tensors()[2].name == "e");  // zero-size, at 11, before h ([11, 13])
  CHECK(st.tensors()[3].name == "h");
  CHECK(st.info("b").begin == 3);
  CHECK(st.info("b").end == 11);
  CHECK(st.info("e").numel() == 0);
  CHECK(st.read<std::int64_t>("a") == std::vector<std::int64_t>{-1, 2, -128});
  CHECK(st.read<float>("b") == std::vector<float>{3.0f, -1.0f});
  CHECK(st.read<double>("e").empty());
  CHECK(st.read<float>("h") == std::vector<float>{2.0f});
  CHECK(st.raw("b").size() == 8);
  CHECK(std::to_integer<int>(st.raw("a")[0]) == 0xFF);
}

TEST_CASE("round trip of every dtype, shape [], zero-size tensors and metadata") {
  const std::vector<float> f32 = {1.5f, -2.25f, 0.0f, -0.0f, 3e38f, 1e-40f};
  const std::vector<double> f64 = {3.141592653589793};
  const std::vector<float> bf16 = {1.0f, -2.5f, 0.0078125f, 256.0f, moe::io::bf16_to_float(0x4049)};
  const std::vector<float> f16 = {1.0f, -2.5f, 65504.0f, 0x1p-24f, 0.099975586f};
  const std::vector<std::int64_t> i64 = {std::numeric_limits<std::int64_t>::min(), -1, 0,
                                         std::numeric_limits<std::int64_t>::max()};
  const std::vector<std::int32_t> i32 = {-7, 123456789};
  const std::vector<std::uint8_t> u8 = {0, 1, 200, 255};
  const std::vector<float> none;

  SafeTensorsWriter w;
  w.set_metadata("format", "pt");
  w.set_metadata("config", R"({"k": 2, "name": "caf\u00e9"})");
  w.set_metadata("format", "moe");  // replaces
  w.add<float>("f32", {2, 3}, f32);
  w.add<double>("scalar", {}, f64);
  w.add<float>("bf16", {5}, bf16, Dtype::BF16);
  w.add<float>("f16", {5, 1}, f16, Dtype::F16);
  w.add<std::int64_t>("i64", {4}, i64);
  w.add<std::int32_t>("i32", {1, 2}, i32);
  w.add<std::uint8_t>("u8", {2, 2}, u8);
  w.add<float>("empty", {0, 4}, none);
  w.add<float>("empty2", {3, 0}, none, Dtype::BF16);
  w.add("from_vector", {2}, std::vector<double>{1.0, 2.0}, Dtype::F32);  // the range overload
  w.add("bools", {3}, std::vector<std::int32_t>{1, 0, 1}, Dtype::BOOL);

  const auto check = [&](const SafeTensors& st) {
    CHECK(st.metadata().size() == 2);
    CHECK(st.metadata().at("format") == "moe");
    CHECK(st.metadata().at("config") == R"({"k": 2, "name": "caf\u00e9"})");
    // In the order added, which is the data order.
    const std::vector<std::string> names = {"f32", "scalar", "bf16",   "f16",         "i64",  "i32",
                                            "u8",  "empty",  "empty2", "from_vector", "bools"};
    REQUIRE(st.tensors().size() == names.size());
    for (std::size_t i = 0; i < names.size(); ++i) CHECK(st.tensors()[i].name == names[i]);
    CHECK(st.info("f32").dtype == Dtype::F32);
    CHECK(st.info("f32").shape == std::vector<std::int64_t>{2, 3});
    CHECK(st.info("scalar").shape.empty());
    CHECK(st.info("scalar").numel() == 1);
    CHECK(st.info("bf16").dtype == Dtype::BF16);
    CHECK(st.info("f16").dtype == Dtype::F16);
    CHECK(st.info("empty").numel() == 0);
    CHECK(st.info("empty").begin == st.info("empty").end);
    CHECK(st.info("bools").dtype == Dtype::BOOL);

    const auto r32 = st.read<float>("f32");
    REQUIRE(r32.size() == f32.size());
    for (std::size_t i = 0; i < f32.size(); ++i) {
      CHECK(std::bit_cast<std::uint32_t>(r32[i]) == std::bit_cast<std::uint32_t>(f32[i]));
    }
    CHECK(st.read<double>("f32")[4] == static_cast<double>(3e38f));
    CHECK(st.read<double>("scalar") == f64);
    CHECK(st.read<float>("bf16") == bf16);
    CHECK(st.read<double>("bf16")[1] == -2.5);
    CHECK(st.read<float>("f16") == f16);
    CHECK(st.read<std::int64_t>("i64") == i64);
    CHECK(st.read<std::int32_t>("i32") == i32);
    CHECK(st.read<std::int64_t>("i32") == std::vector<std::int64_t>{-7, 123456789});
    CHECK(st.read<std::uint8_t>("u8") == u8);
    CHECK(st.read<std::int32_t>("u8") == std::vector<std::int32_t>{0, 1, 200, 255});
    CHECK(st.read<float>("empty").empty());
    CHECK(st.read<double>("empty2").empty());
    CHECK(st.read<float>("from_vector") == std::vector<float>{1.0f, 2.0f});
    CHECK(st.read<std::uint8_t>("bools") == std::vector<std::uint8_t>{1, 0, 1});
    // Into a caller's buffer.
    std::vector<double> out(6);
    st.read<double>("f32", std::span<double>(out), Expect{.shape = std::vector<std::int64_t>{2, 3}, .finite = true});
    CHECK(out[0] == 1.5);
    CHECK(st.contains("u8"));
    CHECK_FALSE(st.contains("u9"));
    CHECK_FALSE(st.contains("__metadata__"));
  };
  const auto bytes = w.bytes();
  std::uint64_t header_size;
  std::memcpy(&header_size, bytes.data(), 8);
  CHECK(header_size % 8 == 0);
  check(SafeTensors::parse(bytes));

  TempDir dir;
  const auto path = dir.path() / "all.safetensors";
  w.write(path);
  CHECK(read_file(path) == bytes);
  const auto opened = SafeTensors::open(path);
  CHECK(opened.origin() == path.string());
  check(opened);

  // Moving keeps the data, mapped or owned.
  SafeTensors moved = SafeTensors::open(path);
  SafeTensors target = std::move(moved);
  check(target);
  target = SafeTensors::parse(bytes);
  check(target);
  static_assert(!std::is_copy_constructible_v<SafeTensors>);
  static_assert(!std::is_copy_assignable_v<SafeTensors>);
  static_assert(std::is_nothrow_move_constructible_v<SafeTensors>);
}

TEST_CASE("parse rejects a malformed file, naming the origin, the tensor and the reason") {
  const std::string w = entry("w", "F32", "[2]", 0, 8);
  SUBCASE("the valid file the cases below break") { CHECK(parse_error("{" + w + "}", 8) == "<no exception>"); }

  SUBCASE("the header length") {
    check_message(error_of([] { (void)SafeTensors::parse(std::vector<std::byte>(5), origin); }),
                  {"5 bytes", "shorter than the 8-byte header length"});
    check_message(error_of([] { (void)SafeTensors::parse({}, origin); }), {"0 bytes"});
    check_message(error_of([] { (void)SafeTensors::parse(file_bytes("", {}, 0), origin); }), {"header length is 0"});
    check_message(error_of([] { (void)SafeTensors::parse(file_bytes("{}", {}, 1ull << 40), origin); }),
                  {"header length is 1099511627776", "over the limit of 100000000"});
    check_message(error_of([] { (void)SafeTensors::parse(file_bytes("{}", {}, 3), origin); }),
                  {"header length is 3", "past the end of the file (2 bytes"});
    check_message(error_of([] { (void)SafeTensors::parse(file_bytes("{}", {}, ~0ull), origin); }), {"over the limit"});
  }

  SUBCASE("not JSON, not UTF-8, not an object") {
    check_message(parse_error("{nope"), {"not valid UTF-8 JSON"});
    check_message(parse_error("{\"w\":"), {"not valid UTF-8 JSON"});
    check_message(parse_error("{}}"), {"not valid UTF-8 JSON"});
    check_message(parse_error("{\"\xFF\":{}}"), {"not valid UTF-8 JSON"});
    check_message(parse_error("{\"\xC0\x80\":{}}"), {"not valid UTF-8 JSON"});  // an overlong NUL
    check_message(parse_error(std::string("{}\0xx", 5)), {"NUL byte at byte 10"});
    check_message(parse_error("[1, 2]"), {"the header is a JSON array, expected an object"});
    check_message(parse_error("\"w\""), {"the header is a JSON string, expected an object"});
    // Nesting deeper than a header's (an object of objects of arrays) stops the parse.
    check_message(parse_error(R"({"w":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}})", 8),
                  {"tensor 'w': JSON nested 4 deep, expected at most 3"});
    check_message(parse_error(R"({"__metadata__":{"k":{"x":{}}}})"), {"__metadata__: JSON nested 4 deep"});
    check_message(parse_error(std::string(100000, '[') + std::string(100000, ']')), {"the header: JSON nested 4 deep"});
  }

  SUBCASE("duplicate keys") {
    check_message(parse_error("{" + w + "," + entry("w", "F32", "[2]", 8, 16) + "}", 16),
                  {"the key 'w' twice", "unique tensor names"});
    check_message(parse_error(R"({"w":{"dtype":"F32","dtype":"F64","shape":[2],"data_offsets":[0,8]}})", 8),
                  {"tensor 'w': the key 'dtype' appears twice in one object"});
    check_message(parse_error(R"({"__metadata__":{"a":"1","a":"2"}})"), {"__metadata__: the key 'a' appears twice"});
    check_message(parse_error(R"({"__metadata__":{},"__metadata__":{}})"), {"the key '__metadata__' twice"});
    // The same key in different objects is fine.
    CHECK(parse_error("{" + w + "," + entry("v", "F32", "[2]", 8, 16) + "}", 16) == "<no exception>");
  }

  SUBCASE("entries") {
    check_message(parse_error(R"({"w": 3})"), {"tensor 'w' is a JSON number", "expected an object with dtype"});
    check_message(parse_error(R"({"w": [0, 8]})"), {"tensor 'w' is a JSON array"});
    check_message(parse_error(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", 8), {"tensor 'w' has no 'dtype'"});
    check_message(parse_error(R"({"w":{"dtype":"F32","data_offsets":[0,8]}})", 8), {"tensor 'w' has no 'shape'"});
    check_message(parse_error(R"({"w":{"dtype":"F32","shape":[2]}})", 8), {"tensor 'w' has no 'data_offsets'"});
    check_message(parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8),
                  {"tensor 'w' has the key 'x'", "expected only dtype, shape and data_offsets"});
  }

  SUBCASE("dtype") {
    check_message(parse_error("{" + entry("w", "F8_E4M3", "[8]", 0, 8) + "}", 8),
                  {"tensor 'w'", "unknown dtype 'F8_E4M3'", "expected one of BOOL, U8,", "F64"});
    check_message(parse_error(R"({"w":{"dtype":4,"shape":[2],"data_offsets":[0,8]}})", 8),
                  {"tensor 'w'", "dtype is a JSON number, expected a string"});
  }

  SUBCASE("shape") {
    check_message(parse_error("{" + entry("w", "F32", "2", 0, 8) + "}", 8),
                  {"tensor 'w'", "shape is a JSON number, expected an array of integers"});
    check_message(parse_error("{" + entry("w", "F32", "[-2]", 0, 8) + "}", 8),
                  {"tensor 'w'", "shape[0] is -2, expected a non-negative integer"});
    check_message(parse_error("{" + entry("w", "F32", "[1,2.0]", 0, 8) + "}", 8),
                  {"tensor 'w'", "shape[1] is 2.0, expected a non-negative integer"});
    check_message(parse_error("{" + entry("w", "F32", "[\"2\"]", 0, 8) + "}", 8), {"tensor 'w'", "shape[0] is \"2\""});
    check_message(parse_error("{" + entry("w", "F32", "[9223372036854775808]", 0, 8) + "}", 8),
                  {"tensor 'w'", "shape[0] is 9223372036854775808, expected at most 2^63 - 1"});
    check_message(parse_error("{" + entry("w", "F32", "[99999999999999999999]", 0, 8) + "}", 8),
                  {"tensor 'w'", "shape[0] is 1e+20"});
    check_message(parse_error("{" + entry("w", "U8", "[4294967296,4294967296]", 0, 8) + "}", 8),
                  {"tensor 'w'", "shape [4294967296, 4294967296] has more than 2^63 - 1 elements"});
    // A zero dimension does not excuse the others' overflow.
    check_message(parse_error("{" + entry("w", "U8", "[0,4294967296,4294967296]", 0, 0) + "}"),
                  {"tensor 'w'", "more than 2^63 - 1 elements"});
    check_message(parse_error("{" + entry("w", "F64", "[4611686018427387904]", 0, 8) + "}", 8),
                  {"tensor 'w'", "of F64 has more than 2^64 - 1 bytes"});
    check_message(parse_error("{" + entry("w", "F32", "[3]", 0, 8) + "}", 8),
                  {"tensor 'w'", "shape [3] of F32 is 12 bytes, but data_offsets [0, 8] hold 8"});
    check_message(parse_error("{" + entry("w", "F32", "[]", 0, 8) + "}", 8), {"shape [] of F32 is 4 bytes"});
  }

  SUBCASE("data_offsets") {
    check_message(parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":8}})", 8),
                  {"tensor 'w'", "data_offsets is 8, expected [begin, end], two non-negative integers"});
    check_message(parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}})", 8),
                  {"tensor 'w'", "data_offsets is [0,8,8]"});
    check_message(parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[-1,7]}})", 8),
                  {"tensor 'w'", "data_offsets is [-1,7]"});
    check_message(parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0.0,8]}})", 8),
                  {"tensor 'w'", "data_offsets is [0.0,8]"});
    check_message(parse_error("{" + entry("w", "F32", "[0]", 8, 0) + "}", 8),
                  {"tensor 'w'", "data_offsets [8, 0] end before they begin"});
    check_message(parse_error("{" + entry("w", "F32", "[2]", 0, 8) + "}", 7),
                  {"tensor 'w'", "data_offsets [0, 8] go past the end of the data buffer (7 bytes)"});
    check_message(parse_error("{" + entry("w", "F32", "[2]", 18446744073709551608ull, 0) + "}", 8),
                  {"tensor 'w'", "end before they begin"});
  }

  SUBCASE("the tensors tile the data buffer") {
    check_message(parse_error("{" + w + "," + entry("v", "F32", "[2]", 4, 12) + "}", 12),
                  {"tensor 'v' (data_offsets [4, 12]) overlaps tensor 'w' ([0, 8])"});
    // By a single byte: the last byte of one tensor is the first of the next.
    check_message(parse_error("{" + w + "," + entry("v", "I8", "[5]", 7, 12) + "}", 12),
                  {"tensor 'v' (data_offsets [7, 12]) overlaps tensor 'w' ([0, 8])"});
    check_message(parse_error("{" + w + "," + entry("v", "F32", "[2]", 0, 8) + "}", 8),
                  {"overlaps tensor", "'v'", "'w'"});
    check_message(parse_error("{" + w + "," + entry("z", "F32", "[0]", 4, 4) + "}", 8),
                  {"tensor 'z' (data_offsets [4, 4]) overlaps tensor 'w'"});
    check_message(parse_error("{" + w + "," + entry("v", "F32", "[2]", 12, 20) + "}", 20),
                  {"bytes [8, 12) of the data buffer, before tensor 'v', belong to no tensor"});
    check_message(parse_error("{" + entry("v", "F32", "[2]", 4, 12) + "}", 12),
                  {"bytes [0, 4) of the data buffer, before tensor 'v'"});
    check_message(parse_error("{" + w + "}", 11),
                  {"the last 3 bytes of the data buffer (from offset 8 of 11) belong to no tensor"});
    check_message(parse_error("{}", 1), {"the last 1 bytes of the data buffer"});
    // Zero-size tensors anywhere on the boundaries are fine, also several at one offset.
    CHECK(parse_error("{" + entry("a", "F32", "[0]", 0, 0) + "," + w + "," + entry("b", "I8", "[0,3]", 8, 8) + "," +
                          entry("c", "BOOL", "[0]", 8, 8) + "}",
                      8) == "<no exception>");
  }

  SUBCASE("__metadata__") {
    check_message(parse_error(R"({"__metadata__": [1]})"),
                  {"__metadata__ is a JSON array, expected an object of strings"});
    check_message(parse_error(R"({"__metadata__": null})"), {"__metadata__ is a JSON null"});
    check_message(parse_error(R"({"__metadata__": {"a": "1", "k": 2}})"),
                  {"__metadata__ 'k' is a JSON number, expected a string"});
    check_message(parse_error(R"({"__metadata__": {"k": {"x": "y"}}})"), {"__metadata__ 'k' is a JSON object"});
  }
}

TEST_CASE("open: a missing, empty or unreadable file is an error naming the path") {
  TempDir dir;
  const auto missing = dir.path() / "missing.safetensors";
  check_message(error_of([&] { (void)SafeTensors::open(missing); }), {"cannot open", "No such file"}, missing.string());
  const auto empty = dir.path() / "empty.safetensors";
  std::ofstream(empty).close();
  check_message(error_of([&] { (void)SafeTensors::open(empty); }), {"empty file"}, empty.string());
  check_message(error_of([&] { (void)SafeTensors::open(dir.path()); }), {"not a regular file"}, dir.path().string());
  const auto bad = dir.path() / "bad.safetensors";
  moe::io::write_file_atomically(bad,
                                 file_bytes("{" + entry("w", "F32", "[3]", 0, 8) + "}", std::vector<std::uint8_t>(8)));
  check_message(error_of([&] { (void)SafeTensors::open(bad); }), {"tensor 'w'", "12 bytes"}, bad.string());
}

TEST_CASE("info and read: missing tensors, dtypes, sizes, ranges") {
  SafeTensorsWriter w;
  w.add("floats", {2, 2}, std::vector<float>{1, 2, 3, 4});
  w.add("big", {3}, std::vector<std::int64_t>{1, 300, -5});
  w.add("huge", {1}, std::vector<std::uint64_t>{std::numeric_limits<std::uint64_t>::max()});
  w.add("wide", {2}, std::vector<double>{1.0, 1e300});
  const auto st = SafeTensors::parse(w.bytes(), origin);

  check_message(error_of([&] { (void)st.info("flaots"); }),
                {"no tensor 'flaots' (the file has 4 tensors: big, floats, huge, wide)"});
  check_message(error_of([&] { (void)st.raw("nope"); }), {"no tensor 'nope'"});
  check_message(error_of([&] { (void)st.read<float>("nope"); }), {"no tensor 'nope'"});
  {
    SafeTensorsWriter many;
    for (int i = 0; i < 15; ++i) many.add("t" + std::to_string(10 + i), {1}, std::vector<float>{0});
    const auto m = SafeTensors::parse(many.bytes(), origin);
    const auto e = error_of([&] { (void)m.info("x"); });
    check_message(e, {"(the file has 15 tensors: t10, t11,", "t19, ...)"});
    CHECK(e.find("t20") == std::string::npos);
    check_message(error_of([] { (void)SafeTensors::parse(SafeTensorsWriter{}.bytes(), origin).info("x"); }),
                  {"no tensor 'x' (the file has 0 tensors)"});
  }

  // Floating and integral do not mix.
  check_message(error_of([&] { (void)st.read<std::int64_t>("floats"); }),
                {"tensor 'floats' has dtype F32", "expected an integer dtype or BOOL to read it as int64"});
  check_message(
      error_of([&] { (void)st.read<float>("big"); }),
      {"tensor 'big' has dtype I64", "expected a floating dtype (F16, BF16, F32 or F64) to read it as float"});
  // The output's size.
  std::vector<float> three(3);
  check_message(error_of([&] { st.read<float>("floats", std::span<float>(three)); }),
                {"tensor 'floats' has 4 elements (shape [2, 2]), but the output has room for 3"});
  // Integer ranges.
  check_message(error_of([&] { (void)st.read<std::uint8_t>("big"); }),
                {"tensor 'big': element 1 is 300, which does not fit in uint8"});
  CHECK(st.read<std::int16_t>("big") == std::vector<std::int16_t>{1, 300, -5});
  check_message(error_of([&] { (void)st.read<std::uint16_t>("big"); }),
                {"tensor 'big': element 2 is -5, which does not fit in uint16"});
  check_message(error_of([&] { (void)st.read<std::int64_t>("huge"); }),
                {"tensor 'huge': element 0 is 18446744073709551615, which does not fit in int64"});
  CHECK(st.read<std::uint64_t>("huge")[0] == std::numeric_limits<std::uint64_t>::max());
  // F64 past float's range.
  check_message(error_of([&] { (void)st.read<float>("wide"); }),
                {"tensor 'wide': element 1 is 1e+300, which does not fit in float"});
  CHECK(st.read<double>("wide")[1] == 1e300);

  // A BOOL byte other than 0 or 1.
  const auto bools = SafeTensors::parse(file_bytes("{" + entry("b", "BOOL", "[3]", 0, 3) + "}", {1, 0, 2}), origin);
  check_message(error_of([&] { (void)bools.read<std::int32_t>("b"); }),
                {"tensor 'b': element 2 of a BOOL tensor is 2, expected 0 or 1"});
  check_message(error_of([&] { (void)bools.read<float>("b"); }), {"tensor 'b' has dtype BOOL"});
}

TEST_CASE("Expect: the shape and finite values") {
  SafeTensorsWriter w;
  w.add("w", {2, 3}, std::vector<float>{0, 1, 2, kNaN, 4, kInf});
  w.add("h", {2}, std::vector<float>{1, -kInf}, Dtype::F16);
  w.add("b", {2}, std::vector<float>{kNaN, 1}, Dtype::BF16);
  w.add("d", {1}, std::vector<double>{-std::numeric_limits<double>::infinity()});
  w.add("ok", {3}, std::vector<float>{1, 2, 3}, Dtype::BF16);
  w.add("i", {2}, std::vector<std::int32_t>{1, 2});
  const auto st = SafeTensors::parse(w.bytes(), origin);

  check_message(error_of([&] {
                  (void)st.read<float>("w", Expect{.shape = std::vector<std::int64_t>{3, 2}});
                }),
                {"tensor 'w' has shape [2, 3], expected [3, 2]"});
  check_message(error_of([&] { (void)st.read<float>("w", Expect{.shape = std::vector<std::int64_t>{6}}); }),
                {"tensor 'w' has shape [2, 3], expected [6]"});
  CHECK(st.read<float>("w", Expect{.shape = std::vector<std::int64_t>{2, 3}}).size() == 6);
  // Not finite: the first bad flat index.
  check_message(error_of([&] { (void)st.read<float>("w", Expect{.finite = true}); }),
                {"tensor 'w': element 3 is nan, expected finite values"});
  check_message(error_of([&] { (void)st.read<double>("h", Expect{.finite = true}); }),
                {"tensor 'h': element 1 is -inf"});
  check_message(error_of([&] { (void)st.read<float>("b", Expect{.finite = true}); }), {"tensor 'b': element 0 is"});
  check_message(error_of([&] { (void)st.read<float>("d", Expect{.finite = true}); }),
                {"tensor 'd': element 0 is -inf"});
  // Without the check, NaN and Inf read as they are.
  const auto r = st.read<float>("w");
  CHECK(std::isnan(r[3]));
  CHECK(r[5] == kInf);
  CHECK(std::isnan(st.read<double>("b")[0]));
  CHECK(st.read<float>("ok", Expect{.shape = std::vector<std::int64_t>{3}, .finite = true}) ==
        std::vector<float>{1, 2, 3});
  // `finite` means nothing for integers.
  CHECK(st.read<std::int64_t>("i", Expect{.finite = true}).size() == 2);
  check_message(error_of([&] { (void)st.read<std::int64_t>("i", Expect{.shape = std::vector<std::int64_t>{}}); }),
                {"tensor 'i' has shape [2], expected []"});
}

TEST_CASE("the writer rejects bad names, shapes, sizes, dtypes and values") {
  const std::string prefix = "moe::io::SafeTensorsWriter";
  const std::vector<float> two = {1, 2};
  SafeTensorsWriter w;
  w.add<float>("w", {2}, two);
  check_message(error_of([&] { w.add<float>("w", {2}, two); }), {"tensor 'w' was already added"}, prefix);
  check_message(error_of([&] { w.add<float>("", {2}, two); }), {"a tensor name is empty"}, prefix);
  check_message(error_of([&] { w.add<float>("__metadata__", {2}, two); }), {"reserved for the metadata"}, prefix);
  check_message(error_of([&] { w.add<float>("bad\xFF", {2}, two); }), {"not valid UTF-8"}, prefix);
  check_message(error_of([&] { w.set_metadata("k", "\xC3"); }), {"metadata 'k'", "valid UTF-8"}, prefix);
  check_message(error_of([&] { w.add<float>("v", {3}, two); }),
                {"tensor 'v': shape [3] has 3 elements, but 2 values were given"}, prefix);
  check_message(error_of([&] {
                  w.add<float>("v", {-1, -2}, two);
                }),
                {"tensor 'v': shape [-1, -2], expected non-negative dimensions"}, prefix);
  check_message(error_of([&] {
                  w.add<float>("v", {1ll << 40, 1ll << 40}, two);
                }),
                {"tensor 'v': shape [1099511627776, 1099511627776]"}, prefix);
  check_message(error_of([&] { w.add<float>("v", {2}, two, Dtype::I32); }),
                {"tensor 'v': cannot store float values as I32, expected F16, BF16, F32 or F64"}, prefix);
  check_message(error_of([&] {
                  w.add("v", {2}, std::vector<std::int64_t>{1, 2}, Dtype::F32);
                }),
                {"tensor 'v': cannot store int64 values as F32, expected an integer dtype or BOOL"}, prefix);
  // Ranges.
  check_message(error_of([&] {
                  w.add("v", {2}, std::vector<std::int32_t>{1, 300}, Dtype::U8);
                }),
                {"tensor 'v': element 1 is 300, which does not fit in U8"}, prefix);
  check_message(error_of([&] { w.add("v", {1}, std::vector<std::int64_t>{-1}, Dtype::U64); }),
                {"element 0 is -1, which does not fit in U64"}, prefix);
  check_message(error_of([&] { w.add("v", {1}, std::vector<std::uint64_t>{1ull << 63}, Dtype::I64); }),
                {"element 0 is 9223372036854775808, which does not fit in I64"}, prefix);
  check_message(error_of([&] {
                  w.add("v", {2}, std::vector<std::int32_t>{0, 2}, Dtype::BOOL);
                }),
                {"element 1 is 2, which does not fit in BOOL (0 or 1)"}, prefix);
  check_message(error_of([&] { w.add("v", {1}, std::vector<float>{1e5f}, Dtype::F16); }),
                {"tensor 'v': element 0 is 100000, past the largest finite F16"}, prefix);
  check_message(error_of([&] { w.add("v", {1}, std::vector<double>{1e39}, Dtype::BF16); }),
                {"element 0 is 1e+39, past the largest finite BF16"}, prefix);
  check_message(error_of([&] { w.add("v", {1}, std::vector<double>{-1e300}, Dtype::F32); }),
                {"element 0 is -1e+300, past the largest finite F32"}, prefix);
  check_message(error_of([&] { w.add("v", {1}, std::vector<float>{std::numeric_limits<float>::max()}, Dtype::BF16); }),
                {"past the largest finite BF16"}, prefix);
  // Values that round to the largest finite value, and non-finite values, are stored.
  w.add("h", {4}, std::vector<float>{65519.0f, kInf, kNaN, -1e-9f}, Dtype::F16);
  w.add("d", {2}, std::vector<double>{1e300, -std::numeric_limits<double>::infinity()}, Dtype::F64);
  // The failed adds added nothing.
  const auto st = SafeTensors::parse(w.bytes());
  REQUIRE(st.tensors().size() == 3);
  const auto h = st.read<float>("h");
  CHECK(h[0] == 65504.0f);
  CHECK(h[1] == kInf);
  CHECK(std::isnan(h[2]));
  CHECK(std::signbit(h[3]));
  CHECK(h[3] == 0.0f);
}

TEST_CASE("write_file_atomically: writes, replaces, leaves no temporary file, names the path on failure") {
  TempDir dir;
  const auto path = dir.path() / "out.bin";
  const auto bytes_of = [](std::string_view s) {
    std::vector<std::byte> b(s.size());
    std::memcpy(b.data(), s.data(), s.size());
    return b;
  };
  moe::io::write_file_atomically(path, bytes_of("first contents, long"));
  CHECK(read_file(path) == bytes_of("first contents, long"));
  CHECK(dir.entries() == std::vector<std::string>{"out.bin"});
  // Overwriting, with something shorter: no trace of the old contents.
  moe::io::write_file_atomically(path, bytes_of("second"));
  CHECK(read_file(path) == bytes_of("second"));
  moe::io::write_file_atomically(path, {});
  CHECK(fs::file_size(path) == 0);
  CHECK(dir.entries() == std::vector<std::string>{"out.bin"});
  // Through the writer; then the file reads back.
  SafeTensorsWriter w;
  w.add("x", {1}, std::vector<float>{5});
  w.write(path);
  CHECK(SafeTensors::open(path).read<float>("x") == std::vector<float>{5});
  CHECK(dir.entries() == std::vector<std::string>{"out.bin"});
  // A relative path (the temporary file goes to the current directory).
  {
    const auto cwd = fs::current_path();
    fs::current_path(dir.path());
    const auto e = error_of([&] { moe::io::write_file_atomically("relative.bin", bytes_of("r")); });
    fs::current_path(cwd);
    CHECK(e == "<no exception>");
    CHECK(read_file(dir.path() / "relative.bin") == bytes_of("r"));
    fs::remove(dir.path() / "relative.bin");
  }

  // Failures name the path and the reason, and leave nothing behind.
  const auto missing = dir.path() / "no" / "such" / "dir" / "out.bin";
  const std::string prefix = "moe::io::write_file_atomically";
  check_message(error_of([&] { moe::io::write_file_atomically(missing, bytes_of("x")); }),
                {missing.string(), "cannot create a temporary file", "No such file or directory"}, prefix);
  check_message(error_of([&] { w.write(missing); }), {missing.string()}, prefix);
  fs::create_directory(dir.path() / "sub");
  check_message(error_of([&] { moe::io::write_file_atomically(dir.path() / "sub", bytes_of("x")); }),
                {(dir.path() / "sub").string(), "cannot rename"}, prefix);
  check_message(error_of([&] { moe::io::write_file_atomically(dir.path() / "sub/", bytes_of("x")); }),
                {"expected the path of a file"}, prefix);
  CHECK(dir.entries() == std::vector<std::string>{"out.bin", "sub"});
  CHECK(fs::is_empty(dir.path() / "sub"));
}
