// The libFuzzer target of moe::io::SafeTensors (scripts/fuzz; replay.cpp runs it without libFuzzer).
// Any input must either parse or fail with a moe::Error whose message starts with the origin;
// anything else (another exception, a crash, a sanitizer report) is a finding. A file that parses
// is read in full, and one whose tensors all read (finite floats, integers that fit int64) must
// come back the same, byte for byte, when written again with SafeTensorsWriter.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

#include "moe/io/safetensors.hpp"

namespace {

constexpr std::string_view origin = "fuzz-input";

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "safetensors_fuzz: %s\n", what);
  std::abort();
}

// Writes everything that was read with SafeTensorsWriter; the result must be the same file.
void check_round_trip(const moe::io::SafeTensors& st, const std::vector<std::vector<double>>& floats,
                      const std::vector<std::vector<std::int64_t>>& ints) {
  moe::io::SafeTensorsWriter writer;
  for (const auto& [key, value] : st.metadata()) writer.set_metadata(key, value);
  for (std::size_t i = 0; i < st.tensors().size(); ++i) {
    const auto& t = st.tensors()[i];
    if (moe::io::is_floating(t.dtype)) {
      writer.add<double>(t.name, t.shape, floats[i], t.dtype);
    } else {
      writer.add<std::int64_t>(t.name, t.shape, ints[i], t.dtype);
    }
  }
  const auto again = moe::io::SafeTensors::parse(writer.bytes(), std::string(origin));
  if (again.metadata() != st.metadata()) finding("the metadata changed on a round trip");
  if (again.tensors().size() != st.tensors().size()) finding("the tensors changed on a round trip");
  for (std::size_t i = 0; i < st.tensors().size(); ++i) {
    const auto& a = st.tensors()[i];
    const auto& b = again.tensors()[i];
    if (a.name != b.name || a.dtype != b.dtype || a.shape != b.shape || a.begin != b.begin || a.end != b.end) {
      finding("a tensor's header changed on a round trip");
    }
    const auto ra = st.raw(a.name), rb = again.raw(b.name);
    if (ra.size() != rb.size() || (!ra.empty() && std::memcmp(ra.data(), rb.data(), ra.size()) != 0)) {
      finding("a tensor's data changed on a round trip");
    }
  }
}

void run(const std::uint8_t* data, std::size_t size) {
  std::vector<std::byte> bytes(size);
  if (size != 0) std::memcpy(bytes.data(), data, size);
  const auto st = moe::io::SafeTensors::parse(std::move(bytes), std::string(origin));
  std::vector<std::vector<double>> floats(st.tensors().size());
  std::vector<std::vector<std::int64_t>> ints(st.tensors().size());
  bool all_read = true;
  for (std::size_t i = 0; i < st.tensors().size(); ++i) {
    const auto& t = st.tensors()[i];
    if (!st.contains(t.name) || &st.info(t.name) != &t) finding("a listed tensor is not found by name");
    if (st.raw(t.name).size() != t.end - t.begin) finding("raw() has the wrong size");
    try {
      if (moe::io::is_floating(t.dtype)) {
        floats[i] = st.read<double>(t.name, moe::io::Expect{.shape = t.shape, .finite = true});
      } else {
        ints[i] = st.read<std::int64_t>(t.name, moe::io::Expect{.shape = t.shape});
      }
    } catch (const moe::Error& e) {
      if (!std::string_view(e.what()).starts_with(origin)) finding("a read's error does not start with the origin");
      all_read = false;
    }
    // Also as float and int32: the narrowing paths (range checks, F64 past float's range).
    try {
      if (moe::io::is_floating(t.dtype)) {
        (void)st.read<float>(t.name);
      } else {
        (void)st.read<std::int32_t>(t.name);
      }
    } catch (const moe::Error& e) {
      if (!std::string_view(e.what()).starts_with(origin)) finding("a read's error does not start with the origin");
    }
  }
  // The writer rejects empty names, which the format allows.
  for (const auto& t : st.tensors()) all_read = all_read && !t.name.empty();
  if (all_read) check_round_trip(st, floats, ints);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    run(data, size);
  } catch (const moe::Error& e) {
    if (!std::string_view(e.what()).starts_with(origin)) {
      std::fprintf(stderr, "%s\n", e.what());
      finding("an error does not start with the origin");
    }
  }
  return 0;
}
