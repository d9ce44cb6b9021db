// The three mountpoint forms and the refusals.
#include "bridge/mountpoint.hpp"

#include <doctest/doctest.h>

using bridge::MountPlan;
using bridge::PathKind;

TEST_CASE("directory, DIRECTORY/NAME and regular file") {
  MountPlan plan;
  CHECK(bridge::plan_mount("/mnt", PathKind::directory, PathKind::missing, plan).empty());
  CHECK(plan.mount_path == "/mnt");
  CHECK(plan.export_path() == "/mnt/nbd");

  CHECK(bridge::plan_mount("/mnt/disk.img", PathKind::missing, PathKind::directory, plan).empty());
  CHECK(plan.mount_path == "/mnt");
  CHECK(plan.file_name == "disk.img");

  CHECK(bridge::plan_mount("/srv/image.raw", PathKind::regular_file, PathKind::missing, plan).empty());
  CHECK(plan.file_name.empty());
  CHECK(plan.export_path() == "/srv/image.raw");

  CHECK(bridge::plan_mount("disk", PathKind::missing, PathKind::directory, plan).empty());
  CHECK(plan.mount_path == ".");
}

TEST_CASE("refusals") {
  MountPlan plan;
  CHECK(bridge::plan_mount("/no/such/dir/x", PathKind::missing, PathKind::missing, plan).find("does not exist") !=
        std::string::npos);
  CHECK(bridge::plan_mount("/dev/null", PathKind::other, PathKind::missing, plan).find("neither") !=
        std::string::npos);
  CHECK(bridge::plan_mount("/mnt", PathKind::disconnected, PathKind::missing, plan).find("fusermount3 -u /mnt") !=
        std::string::npos);
  // DIRECTORY/NAME inside a dead mount: the stale mount to clear is DIRECTORY.
  std::string inside = bridge::plan_mount("/mnt/disk.img", PathKind::disconnected, PathKind::disconnected, plan);
  CHECK(inside.find("fusermount3 -u /mnt ") != std::string::npos);
  CHECK(inside.find("disk.img") == std::string::npos);
  CHECK(bridge::plan_mount("/mnt/disk.img", PathKind::disconnected, PathKind::directory, plan)
            .find("fusermount3 -u /mnt/disk.img") != std::string::npos);
  // The statistics file beside the export has that name: the export would be hidden.
  CHECK(bridge::plan_mount("/mnt/.stats", PathKind::missing, PathKind::directory, plan).find(".stats is the name") !=
        std::string::npos);
}

TEST_CASE("split_parent") {
  std::string parent, name;
  bridge::split_parent("/a/b/c", parent, name);
  CHECK(parent == "/a/b");
  CHECK(name == "c");
  bridge::split_parent("/c", parent, name);
  CHECK(parent == "/");
  bridge::split_parent("c/", parent, name);
  CHECK(parent == ".");
  CHECK(name == "c");
}

TEST_CASE("FUSE mounts are found in mountinfo, with escapes") {
  const char* mountinfo =
      "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
      "97 29 0:50 / /tmp/my\\040mnt rw,nosuid,nodev shared:1 - fuse.nbdbridge nbdbridge rw,user_id=0\n"
      "98 29 0:51 / /srv/other rw - ext4 /dev/sda1 rw\n";
  CHECK(bridge::has_fuse_mount(mountinfo, "/tmp/my mnt"));
  CHECK_FALSE(bridge::has_fuse_mount(mountinfo, "/srv/other"));
  CHECK_FALSE(bridge::has_fuse_mount(mountinfo, "/tmp"));
}
