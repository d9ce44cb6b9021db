// Test helper, preloaded into nbdbridge (LD_PRELOAD): a name resolver that is slow to
// answer. While the file SLOW_RESOLVER_FLAG names exists, getaddrinfo() first sleeps
// SLOW_RESOLVER_SECONDS (default 3), between lines "slow <name>" and "done <name>"
// appended to SLOW_RESOLVER_LOG.
#include <dlfcn.h>
#include <fcntl.h>
#include <netdb.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
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
    sleep(seconds ? unsigned(std::atoi(seconds)) : 3u);
    note("done", node);
  }
  return next(node, service, hints, result);
}
