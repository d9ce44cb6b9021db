// Where the export appears: the three MOUNTPOINT forms, and the checks that
// refuse a mountpoint before anything is started. Pure parts are separate from
// the parts that look at the filesystem, so the unit tests can reach them.
#pragma once

#include <string>
#include <string_view>
#include <system_error>

namespace bridge {

struct MountPlan {
  std::string mount_path;  // what the kernel mounts on
  std::string file_name;   // the export's name inside it; empty in file mode
  std::string export_path() const { return file_name.empty() ? mount_path : mount_path + "/" + file_name; }
};

// What stat() said about a path, reduced to what the decision needs.
enum class PathKind { directory, regular_file, other, missing, disconnected, inaccessible };

// Decides the plan from the path and what it and its parent are. Returns an
// empty error and fills `plan`, or a one-line reason.
std::string plan_mount(std::string_view path, PathKind path_kind, PathKind parent_kind, MountPlan& plan);

PathKind classify_path(const std::string& path);

// Splits "a/b/c" into parent "a/b" and name "c" ("c" alone has parent ".").
void split_parent(std::string_view path, std::string& parent, std::string& name);

// True if mountinfo (the text of /proc/self/mountinfo) lists a FUSE mount whose
// mount point is `absolute_path`. Handles the octal escapes mountinfo uses.
bool has_fuse_mount(std::string_view mountinfo, std::string_view absolute_path);

// --force: lazily unmounts a stale FUSE mount (ENOTCONN) at path or at its
// parent (the DIR/NAME form). Returns "" when there was nothing to clear or it
// was cleared, else a one-line reason.
std::string clear_stale_mount(const std::string& path);

// The whole check, on the real filesystem: a plan or a one-line reason.
std::string resolve_mountpoint(const std::string& path, MountPlan& plan);

}  // namespace bridge
