#pragma once
// write_file_atomically: replaces a file so that readers, and the disk after a crash, see either
// the old contents or the new ones, never a torn mix. The bytes go to a temporary file in the
// same directory (rename is atomic only within one file system), which is flushed to disk and
// then renamed over the target; the directory is flushed last so that the rename itself lasts.
// POSIX only.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <filesystem>
#include <span>
#include <string>
#include <system_error>
#include <utility>

#include "moe/error.hpp"

namespace moe::io {

namespace detail {

// strerror's text, without strerror's shared buffer (not thread-safe).
inline std::string errno_text(int err) { return std::generic_category().message(err); }

// The temporary file while it exists: closed and removed unless committed, so that no failure
// (or exception) leaves it behind.
class TempFile {
 public:
  TempFile(std::filesystem::path path, int fd) : path_(std::move(path)), fd_(fd) {}
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(path_.c_str());
  }
  [[nodiscard]] int fd() const { return fd_; }
  [[nodiscard]] const std::filesystem::path& path() const { return path_; }
  // Closes the descriptor, returning close's errno (0 on success): close can report a failed
  // write-back (e.g. on NFS).
  int close() {
    const int result = ::close(fd_);
    fd_ = -1;
    return result == 0 ? 0 : errno;
  }
  void commit() { committed_ = true; }

 private:
  std::filesystem::path path_;
  int fd_;
  bool committed_ = false;
};

}  // namespace detail

// Writes `bytes` to `path` atomically (see the top of this file). A new file gets the usual
// permissions (0666 less the umask). Throws moe::Error naming the path and the system's reason on
// any failure, having removed the temporary file.
inline void write_file_atomically(const std::filesystem::path& path, std::span<const std::byte> bytes) {
  namespace fs = std::filesystem;
  const std::string where = "moe::io::write_file_atomically: " + path.string();
  if (!path.has_filename()) moe::detail::fail(where, ": expected the path of a file, not of a directory");
  const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");

  // A name no other writer uses: the process id, a per-process counter and the clock. O_EXCL
  // makes a clash an EEXIST, not a shared file, and the loop then tries the next name.
  static std::atomic<unsigned> counter{0};
  int fd = -1;
  fs::path tmp_path;
  for (int attempt = 0;; ++attempt) {
    const auto ticks = std::chrono::steady_clock::now().time_since_epoch().count();
    tmp_path = dir / ("." + path.filename().string() + ".tmp." + std::to_string(::getpid()) + "." +
                      std::to_string(counter.fetch_add(1)) + "." + std::to_string(ticks % 1000000));
    fd = ::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0) break;
    const int err = errno;
    if (err != EEXIST || attempt >= 100) {
      moe::detail::fail(where, ": cannot create a temporary file in ", dir.string(), ": ", detail::errno_text(err));
    }
  }
  detail::TempFile tmp(tmp_path, fd);

  const std::byte* p = bytes.data();
  std::size_t left = bytes.size();
  while (left > 0) {
    // At most 1 GiB a call: Linux writes at most about 2 GiB in one.
    const ::ssize_t n = ::write(tmp.fd(), p, std::min<std::size_t>(left, std::size_t{1} << 30));
    if (n < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      moe::detail::fail(where, ": cannot write ", tmp.path().string(), ": ", detail::errno_text(err));
    }
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  if (::fsync(tmp.fd()) != 0) {
    const int err = errno;
    moe::detail::fail(where, ": cannot flush ", tmp.path().string(), " to disk: ", detail::errno_text(err));
  }
  if (const int err = tmp.close(); err != 0) {
    moe::detail::fail(where, ": cannot close ", tmp.path().string(), ": ", detail::errno_text(err));
  }
  if (std::rename(tmp.path().c_str(), path.c_str()) != 0) {
    const int err = errno;
    moe::detail::fail(where, ": cannot rename ", tmp.path().string(), " over it: ", detail::errno_text(err));
  }
  tmp.commit();

  // Flush the directory entry. A file system that cannot sync directories says EINVAL (or
  // ENOTSUP); the file itself is in place by now, so only a real I/O error is a failure.
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd < 0) {
    const int err = errno;
    moe::detail::fail(where, ": written, but cannot open its directory ", dir.string(),
                      " to flush it: ", detail::errno_text(err));
  }
  const int sync_result = ::fsync(dir_fd);
  const int sync_err = errno;
  ::close(dir_fd);
  if (sync_result != 0 && sync_err != EINVAL && sync_err != ENOTSUP) {
    moe::detail::fail(where, ": written, but cannot flush its directory ", dir.string(), ": ",
                      detail::errno_text(sync_err));
  }
}

}  // namespace moe::io
