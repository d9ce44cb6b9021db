// Test helper, preloaded into nbdbridge (LD_PRELOAD): a name resolver that is slow to
// answer. While the file SLOW_RESOLVER_FLAG names exists, getaddrinfo() first sleeps
// SLOW_RESOLVER_SECONDS (default 3, fractions allowed), between lines "slow <name>" and
// "done <name>" appended to SLOW_RESOLVER_LOG. The sleep is cut short (within 50 ms) when
// the flag file is removed, so a test that is done with the slow resolver need not wait.
#include <dlfcn.h>
#include <fcntl.h>
#include <netdb.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

void note(const char* what, const char* name) {
  const char* log = std::getenv("SLOW_RESOLVER_LOG");
  if (!log) return;
  int fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return;
  char line[512];
  int length = std::snprintf(line, sizeof line, "%s %s\n", what, name ? name : "");
  ssize_t ignored = write(fd, line, std::size_t(std::min(length, int(sizeof line) - 1)));  // one write: one line
  (void)ignored;
  close(fd);
}

}  // namespace

extern "C" int getaddrinfo(const char* node, const char* service, const addrinfo* hints, addrinfo** result) {
  using Resolve = int (*)(const char*, const char*, const addrinfo*, addrinfo**);
  static const auto next = reinterpret_cast<Resolve>(dlsym(RTLD_NEXT, "getaddrinfo"));
  const char* flag = std::getenv("SLOW_RESOLVER_FLAG");
  struct stat status;
  if (flag && stat(flag, &status) == 0) {
    note("slow", node);
    const char* seconds = std::getenv("SLOW_RESOLVER_SECONDS");
    using clock = std::chrono::steady_clock;
    const auto end = clock::now() + std::chrono::duration_cast<clock::duration>(
                                        std::chrono::duration<double>(seconds ? std::atof(seconds) : 3.0));
    while (clock::now() < end && stat(flag, &status) == 0) {
      const auto left = std::chrono::duration_cast<std::chrono::microseconds>(end - clock::now()).count();
      usleep(useconds_t(std::clamp<long long>(left, 0, 50000)));
    }
    note("done", node);
  }
  return next(node, service, hints, result);
}
