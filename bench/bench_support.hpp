#pragma once
// What the benchmarks share: round-robin timing with medians and page faults, the other
// processes' CPU use during a run, a small JSON writer and an atomic file write.

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace bench {

using Clock = std::chrono::steady_clock;

inline int threads_from(const std::string& text) {
  int threads = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), threads);
  if (error != std::errc{} || end != text.data() + text.size() || threads < 0)
    throw std::invalid_argument("--threads " + text + ": expected an integer >= 0 (0: all available)");
  return threads;
}

inline long minor_faults() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

struct Measured {
  double seconds = 0;  // median
  double faults = 0;   // minor page faults per call: memory touched for the first time
};

// Runs the tasks round-robin, `warmup` untimed rounds then `reps` timed ones, so that a
// drift of the machine (a neighbour, the clock) shifts every task alike and the ratios stay fair.
inline std::vector<Measured> measure(int warmup, int reps, const std::vector<std::function<void()>>& tasks) {
  std::vector<std::vector<double>> times(tasks.size());
  std::vector<long> faults(tasks.size(), 0);
  for (int round = 0; round < warmup + reps; ++round)
    for (std::size_t i = 0; i < tasks.size(); ++i) {
      const long faults_before = minor_faults();
      const auto start = Clock::now();
      tasks[i]();
      const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
      if (round < warmup) continue;
      times[i].push_back(seconds);
      faults[i] += minor_faults() - faults_before;
    }
  std::vector<Measured> out;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    std::vector<double>& t = times[i];
    std::sort(t.begin(), t.end());
    const std::size_t mid = t.size() / 2;
    out.push_back({t.size() % 2 == 1 ? t[mid] : 0.5 * (t[mid - 1] + t[mid]), double(faults[i]) / reps});
  }
  return out;
}

// CPU seconds that every other process on the machine has used since boot, or -1 if unknown:
// other work during the run distorts every number here, so the run reports how much there was.
inline double others_cpu_seconds() {
  std::FILE* machine = std::fopen("/proc/stat", "r");
  std::FILE* self = std::fopen("/proc/self/stat", "r");
  unsigned long long user = 0, nice = 0, sys = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
  unsigned long long self_user = 0, self_sys = 0;
  char line[1024] = {};
  const bool ok = machine != nullptr && self != nullptr &&
                  std::fscanf(machine, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &user, &nice, &sys, &idle,
                              &iowait, &irq, &softirq, &steal) == 8 &&
                  std::fgets(line, sizeof line, self) != nullptr && std::strrchr(line, ')') != nullptr &&
                  // fields 14 and 15 (utime, stime), counted after the parenthesized command name
                  std::sscanf(std::strrchr(line, ')') + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
                              &self_user, &self_sys) == 2;
  if (machine != nullptr) std::fclose(machine);
  if (self != nullptr) std::fclose(self);
  const double busy = double(user + nice + sys + irq + softirq + steal) - double(self_user + self_sys);
  return ok ? busy / double(::sysconf(_SC_CLK_TCK)) : -1;
}

// A small JSON writer: objects, arrays, numbers (non-finite ones become null) and plain strings.
class Json {
 public:
  Json& open(const std::string& key, char bracket) {
    item(key);
    out_ += bracket;
    first_.push_back(true);
    return *this;
  }
  Json& close(char bracket) {
    first_.pop_back();
    out_ += '\n' + std::string(2 * first_.size(), ' ') + bracket;
    return *this;
  }
  Json& num(const std::string& key, double v) {
    item(key);
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.6g", v);
    out_ += std::isfinite(v) ? buf : "null";
    return *this;
  }
  Json& str(const std::string& key, const std::string& v) {
    item(key);
    out_ += '"' + v + '"';
    return *this;
  }
  [[nodiscard]] std::string text() const { return out_ + '\n'; }

 private:
  void item(const std::string& key) {
    if (!first_.empty()) {
      if (!first_.back()) out_ += ',';
      first_.back() = false;
      out_ += '\n' + std::string(2 * first_.size(), ' ');
    }
    if (!key.empty()) out_ += '"' + key + "\": ";
  }
  std::string out_;
  std::vector<bool> first_;
};

// Writes text to path atomically: a temporary file beside it, fsync, then rename over path.
inline void write_atomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";  // .gitignore has *.json.tmp
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + tmp + ": " + std::strerror(errno));
  const auto fail = [&](const char* what) {
    const std::string message = std::string(what) + " " + tmp + ": " + std::strerror(errno);
    ::close(fd);
    ::unlink(tmp.c_str());
    throw std::runtime_error(message);
  };
  for (std::size_t done = 0; done < text.size();) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno != EINTR) fail("cannot write");
    if (n > 0) done += std::size_t(n);
  }
  if (::fsync(fd) != 0) fail("cannot fsync");
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot close " + tmp + ": " + std::strerror(errno));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string message = "cannot rename " + tmp + " to " + path + ": " + std::strerror(errno);
    ::unlink(tmp.c_str());
    throw std::runtime_error(message);
  }
}

}  // namespace bench
