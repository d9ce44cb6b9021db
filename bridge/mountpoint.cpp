// Mountpoint forms and refusal checks. Runs once at start-up, before the loop.
#include "bridge/mountpoint.hpp"

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <cstring>
#include <dirent.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>
#include <vector>

namespace bridge {

void split_parent(std::string_view path, std::string& parent, std::string& name) {
  while (path.size() > 1 && path.back() == '/') path.remove_suffix(1);
  auto slash = path.rfind('/');
  if (slash == std::string_view::npos) {
    parent = ".";
    name = std::string(path);
  } else {
    parent = slash == 0 ? "/" : std::string(path.substr(0, slash));
    name = std::string(path.substr(slash + 1));
  }
}

namespace {

// The dead mount to clear for path, or empty: DIRECTORY/NAME is mounted on DIRECTORY, so
// inside a dead mount the parent is dead too.
std::string stale_mount_of(const std::string& path, const std::string& parent, PathKind kind, PathKind parent_kind) {
  if (parent_kind == PathKind::disconnected && (kind == PathKind::disconnected || kind == PathKind::missing))
    return parent;
  return kind == PathKind::disconnected ? path : std::string();
}

}  // namespace

std::string plan_mount(std::string_view path, PathKind path_kind, PathKind parent_kind, MountPlan& plan) {
  std::string text(path);
  std::string parent, name;
  split_parent(path, parent, name);
  if (std::string stale = stale_mount_of(text, parent, path_kind, parent_kind); !stale.empty())
    return "mountpoint " + stale +
           " is a stale FUSE mount (Transport endpoint is not connected); clear it with: fusermount3 -u " + stale +
           " (or run again with --force)";
  switch (path_kind) {
    case PathKind::directory:
      plan = {text, "nbd"};
      return {};
    case PathKind::regular_file:
      plan = {text, ""};
      return {};
    case PathKind::other:
      return "mountpoint " + text + " is neither a directory nor a regular file";
    case PathKind::inaccessible:
      return "cannot access mountpoint " + text;
    case PathKind::disconnected:  // answered above
    case PathKind::missing:
      break;
  }
  if (parent_kind != PathKind::directory || name.empty() || name == "." || name == "..")
    return "mountpoint " + text + " does not exist (give an existing directory, DIRECTORY/NAME, or a regular file)";
  if (name == ".stats")  // the statistics file of a directory mount has that name
    return "mountpoint " + text + ": .stats is the name of the statistics file beside the export; choose another NAME";
  plan = {parent, name};
  return {};
}

PathKind classify_path(const std::string& path) {
  struct stat status {};
  if (stat(path.c_str(), &status) != 0) {
    if (errno == ENOTCONN) return PathKind::disconnected;
    if (errno == ENOENT) return PathKind::missing;
    return PathKind::inaccessible;
  }
  // The kernel may answer stat() of a dead FUSE mount's root from attributes it
  // cached; statfs() always asks the (absent) server and says ENOTCONN.
  struct statfs filesystem {};
  if (statfs(path.c_str(), &filesystem) != 0 && errno == ENOTCONN) return PathKind::disconnected;
  if (S_ISDIR(status.st_mode)) return PathKind::directory;
  if (S_ISREG(status.st_mode)) return PathKind::regular_file;
  return PathKind::other;
}

namespace {

std::string unescape_mountinfo(std::string_view field) {
  std::string out;
  auto octal = [](char c) { return c >= '0' && c <= '7'; };
  for (std::size_t i = 0; i < field.size(); ++i) {
    if (field[i] == '\\' && i + 3 < field.size() && octal(field[i + 1]) && octal(field[i + 2]) &&
        octal(field[i + 3])) {
      out += char((field[i + 1] - '0') * 64 + (field[i + 2] - '0') * 8 + (field[i + 3] - '0'));
      i += 3;
      continue;
    }
    out += field[i];
  }
  return out;
}

// The DIRECTORY/NAME form mounts on DIRECTORY: whatever else it holds disappears
// while the bridge runs, and a shell whose working directory it is keeps seeing
// the old directory (so NAME would seem missing there). Both are surprises the
// user did not ask for; an existing file NAME (file mode) covers only itself.
std::string check_directory_may_be_covered(const std::string& directory) {
  struct stat directory_status {}, working_status {};
  if (stat(directory.c_str(), &directory_status) == 0 && stat(".", &working_status) == 0 &&
      directory_status.st_dev == working_status.st_dev && directory_status.st_ino == working_status.st_ino)
    return "the working directory (a shell there would not see the export)";
  DIR* listing = opendir(directory.c_str());
  if (!listing) return {};  // mount() gives the real reason
  std::size_t entries = 0;
  while (dirent* entry = readdir(listing))
    if (std::strcmp(entry->d_name, ".") != 0 && std::strcmp(entry->d_name, "..") != 0) ++entries;
  closedir(listing);
  if (entries == 0) return {};
  return "hiding the " + std::to_string(entries) + (entries == 1 ? " entry" : " entries") + " in it";
}

}  // namespace

bool has_fuse_mount(std::string_view mountinfo, std::string_view absolute_path) {
  std::istringstream lines{std::string(mountinfo)};
  for (std::string line; std::getline(lines, line);) {
    // id parent major:minor root mount-point options [optional...] - fstype source super-options
    std::istringstream words(line);
    std::vector<std::string> fields;
    for (std::string word; words >> word;) fields.push_back(word);
    if (fields.size() < 7) continue;
    std::size_t separator = 6;
    while (separator < fields.size() && fields[separator] != "-") ++separator;
    if (separator + 1 >= fields.size()) continue;
    const std::string& type = fields[separator + 1];
    if (type.rfind("fuse", 0) != 0) continue;
    if (unescape_mountinfo(fields[4]) == absolute_path) return true;
  }
  return false;
}

std::string clear_stale_mount(const std::string& path) {
  std::string parent, name;
  split_parent(path, parent, name);
  std::string target = stale_mount_of(path, parent, classify_path(path), classify_path(parent));
  if (target.empty()) return {};
  // Lazy, so a process still holding the dead mount open cannot block us.
  if (geteuid() == 0) {
    if (umount2(target.c_str(), MNT_DETACH) == 0) return {};
  } else {
    // No shell: the path goes to fusermount3 as one argument.
    const char* argv[] = {"fusermount3", "-u", "-z", "--", target.c_str(), nullptr};
    pid_t child = -1;
    int status = 0;
    if (posix_spawnp(&child, "fusermount3", nullptr, nullptr, const_cast<char* const*>(argv), environ) == 0 &&
        waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0)
      return {};
    errno = EPERM;
  }
  return "cannot clear the stale mount at " + target + ": " + std::strerror(errno);
}

std::string resolve_mountpoint(const std::string& path, MountPlan& plan) {
  PathKind kind = classify_path(path);
  PathKind parent_kind = PathKind::missing;
  if (kind == PathKind::missing || kind == PathKind::disconnected) {
    std::string parent, name;
    split_parent(path, parent, name);
    parent_kind = classify_path(parent);
  }
  std::string problem = plan_mount(path, kind, parent_kind, plan);
  if (!problem.empty()) return problem;
  char resolved[PATH_MAX];
  if (!realpath(plan.mount_path.c_str(), resolved)) return "cannot resolve mountpoint " + plan.mount_path;
  plan.mount_path = resolved;
  std::ifstream mountinfo_file("/proc/self/mountinfo");
  std::stringstream mountinfo;
  mountinfo << mountinfo_file.rdbuf();
  if (has_fuse_mount(mountinfo.str(), plan.mount_path))
    return "mountpoint " + plan.mount_path + " is already a FUSE mount; unmount it first (fusermount3 -u " +
           plan.mount_path + ")";
  if (!plan.file_name.empty() && kind == PathKind::missing) {
    problem = check_directory_may_be_covered(plan.mount_path);
    if (!problem.empty())
      return "mountpoint " + path + " does not exist, and as DIRECTORY/NAME the mount would cover " +
             plan.mount_path + ", " + problem + "; create " + path +
             " first to mount over that file alone, or name an empty directory";
  }
  return {};
}

}  // namespace bridge
