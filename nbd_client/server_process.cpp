// Socket-activated server subprocess. Runs on the main thread before and after
// the event loop; the child only execs, so nothing after fork() allocates.
#include "nbd_client/server_process.hpp"

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <string>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

namespace nbd_client {

namespace {

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("was killed by signal ") + strsignal(WTERMSIG(status));
  return "stopped";
}

}  // namespace

ServerProcess::~ServerProcess() { stop(); }

std::error_code ServerProcess::start(const std::vector<std::string>& argv, bool pass_stderr,
                                     std::string& socket_path, std::string& error_message) {
  if (argv.empty()) {
    error_message = "the server command between [ and ] is empty";
    return std::make_error_code(std::errc::invalid_argument);
  }
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/nbdbridge-XXXXXX";
  if (!mkdtemp(pattern.data())) {
    int err = errno;
    error_message = "cannot create a socket directory: " + std::string(std::strerror(err));
    return {err, std::generic_category()};
  }
  directory_ = pattern;
  socket_path_ = directory_ + "/sock";

  int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, socket_path_.c_str(), sizeof(address.sun_path) - 1);
  if (listener < 0 || bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      listen(listener, 16) != 0) {
    int err = errno;
    if (listener >= 0) ::close(listener);
    error_message = "cannot create the server's socket: " + std::string(std::strerror(err));
    return {err, std::generic_category()};
  }

  // Build everything the child needs before fork().
  std::vector<char*> child_argv;
  for (const auto& word : argv) child_argv.push_back(const_cast<char*>(word.c_str()));
  child_argv.push_back(nullptr);
  // The environment minus any inherited LISTEN_* plus ours; the child fills in
  // LISTEN_PID (its own pid) in a buffer reserved here.
  char listen_pid_variable[48] = "LISTEN_PID=";
  std::vector<char*> child_environment;
  for (char** entry = environ; *entry; ++entry)
    if (std::strncmp(*entry, "LISTEN_", 7) != 0) child_environment.push_back(*entry);
  child_environment.push_back(listen_pid_variable);
  child_environment.push_back(const_cast<char*>("LISTEN_FDS=1"));
  child_environment.push_back(nullptr);

  // A pipe with CLOEXEC tells the parent whether exec succeeded.
  int exec_status[2];
  if (pipe2(exec_status, O_CLOEXEC) != 0) {
    int err = errno;
    ::close(listener);
    error_message = "pipe: " + std::string(std::strerror(err));
    return {err, std::generic_category()};
  }

  if (!pass_stderr) captured_stderr_ = memfd_create("nbdbridge-server-stderr", MFD_CLOEXEC);

  const pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    int err = errno;
    ::close(listener);
    ::close(exec_status[0]);
    ::close(exec_status[1]);
    error_message = "fork: " + std::string(std::strerror(err));
    return {err, std::generic_category()};
  }
  if (pid == 0) {
    // Child: only async-signal-safe calls from here on.
    ::close(exec_status[0]);
    if (captured_stderr_ >= 0) dup2(captured_stderr_, STDERR_FILENO);
    if (listener != 3) {
      dup2(listener, 3);
    } else {
      int flags = fcntl(3, F_GETFD);
      fcntl(3, F_SETFD, flags & ~FD_CLOEXEC);
    }
    char pid_text[32];
    int length = 0;
    for (pid_t value = getpid(); value > 0; value /= 10) pid_text[length++] = char('0' + value % 10);
    for (int i = 0; i < length; ++i) listen_pid_variable[11 + i] = pid_text[length - 1 - i];
    listen_pid_variable[11 + length] = '\0';
    // The bridge ignores SIGPIPE; a server must get the default.
    signal(SIGPIPE, SIG_DFL);
    // Out of the terminal's process group and session: Ctrl-C (or a hangup) is for
    // the bridge, which lets the requests in flight finish before it stops the
    // server itself. A server that got the SIGINT too would drop them.
    setsid();
    // The server goes with the bridge, however it ends (kill -9, or --list's alarm): it
    // would otherwise serve a socket nobody knows of. The forking thread is the main
    // one, which lasts as long as the process. A parent gone before this: do not start.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(127);
    execvpe(child_argv[0], child_argv.data(), child_environment.data());
    int err = errno;
    ssize_t ignored = write(exec_status[1], &err, sizeof err);
    (void)ignored;
    _exit(127);
  }
  ::close(listener);
  ::close(exec_status[1]);
  pid_ = pid;
  int exec_error = 0;
  ssize_t got;
  do {
    got = read(exec_status[0], &exec_error, sizeof exec_error);
  } while (got < 0 && errno == EINTR);
  ::close(exec_status[0]);
  if (got == sizeof exec_error) {
    error_message = "cannot run server command '" + argv[0] + "': " + std::strerror(exec_error);
    stop();
    return {exec_error, std::generic_category()};
  }
  socket_path = socket_path_;
  return {};
}

bool ServerProcess::exited(std::string& how, std::chrono::milliseconds grace) {
  if (pid_ <= 0) return false;
  int status = 0;
  const auto give_up_at = std::chrono::steady_clock::now() + grace;
  while (waitpid(pid_, &status, WNOHANG) != pid_) {
    if (std::chrono::steady_clock::now() >= give_up_at) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  pid_ = -1;
  how = describe_status(status);
  std::string said = last_words();
  if (!said.empty()) how += ": " + said;
  return true;
}

std::string ServerProcess::last_words() {
  if (captured_stderr_ < 0) return {};
  std::string text;
  char chunk[4096];
  lseek(captured_stderr_, 0, SEEK_SET);
  for (ssize_t got; (got = read(captured_stderr_, chunk, sizeof chunk)) > 0 && text.size() < 65536;)
    text.append(chunk, std::size_t(got));
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.pop_back();
  // The first line is usually the reason; later ones are hints like "see --help".
  auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

void ServerProcess::stop() {
  if (pid_ > 0) {
    kill(pid_, SIGTERM);
    using clock = std::chrono::steady_clock;
    auto deadline = clock::now() + std::chrono::seconds(5);
    int status = 0;
    // Poll the child with a deadline; waitpid has no timeout of its own.
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (clock::now() >= deadline) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    pid_ = -1;
  }
  if (captured_stderr_ >= 0) {
    ::close(captured_stderr_);
    captured_stderr_ = -1;
  }
  if (!socket_path_.empty()) {
    unlink(socket_path_.c_str());
    socket_path_.clear();
  }
  if (!directory_.empty()) {
    rmdir(directory_.c_str());
    directory_.clear();
  }
}

}  // namespace nbd_client
