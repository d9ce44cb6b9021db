// Test helper, preloaded into nbdbridge (LD_PRELOAD): a name resolver that is slow to
// answer. While the file SLOW_RESOLVER_FLAG names exists, getaddrinfo() first sleeps
// SLOW_RESOLVER_SECONDS (default 3), after appending "slow <name>" to SLOW_RESOLVER_LOG.
#include <dlfcn.h>
#include <fcntl.h>
#include <netdb.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

extern "C" int getaddrinfo(const char* node, const char* service, const addrinfo* hints, addrinfo** result) {
  using Resolve = int (*)(const char*, const char*, const addrinfo*, addrinfo**);
  static const auto next = reinterpret_cast<Resolve>(dlsym(RTLD_NEXT, "getaddrinfo"));
  const char* flag = std::getenv("SLOW_RESOLVER_FLAG");
  struct stat status;
  if (flag && stat(flag, &status) == 0) {
    if (const char* log = std::getenv("SLOW_RESOLVER_LOG")) {
      int fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
      if (fd >= 0) {
        const char* name = node ? node : "";
        ssize_t ignored = write(fd, "slow ", 5);
        ignored = write(fd, name, std::strlen(name));
        ignored = write(fd, "\n", 1);
        (void)ignored;
        close(fd);
      }
    }
    const char* seconds = std::getenv("SLOW_RESOLVER_SECONDS");
    sleep(seconds ? unsigned(std::atoi(seconds)) : 3u);
  }
  return next(node, service, hints, result);
}
