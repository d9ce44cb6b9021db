// C-to-C++ trampolines for the ops table. Nothing here holds state.
#include "fuse_front/operations.hpp"

#include <cerrno>

namespace fuse_front {

namespace {

Handlers& handlers_of(fuse_req_t request) { return *static_cast<Handlers*>(fuse_req_userdata(request)); }

}  // namespace

fuse_lowlevel_ops operations_table() {
  fuse_lowlevel_ops table{};
  table.init = [](void* user_data, fuse_conn_info* connection) {
    static_cast<Handlers*>(user_data)->init(connection);
  };
  table.lookup = [](fuse_req_t request, fuse_ino_t parent, const char* name) {
    handlers_of(request).lookup(request, parent, name);
  };
  table.getattr = [](fuse_req_t request, fuse_ino_t inode, fuse_file_info*) {
    handlers_of(request).getattr(request, inode);
  };
  table.setattr = [](fuse_req_t request, fuse_ino_t inode, struct stat* attributes, int to_set,
                     fuse_file_info* file) { handlers_of(request).setattr(request, inode, *attributes, to_set, file); };
  table.open = [](fuse_req_t request, fuse_ino_t inode, fuse_file_info* file) {
    handlers_of(request).open(request, inode, file);
  };
  table.read = [](fuse_req_t request, fuse_ino_t, size_t size, off_t offset, fuse_file_info* file) {
    handlers_of(request).read(request, size, offset, file);
  };
  table.write = [](fuse_req_t request, fuse_ino_t, const char* data, size_t size, off_t offset,
                   fuse_file_info* file) { handlers_of(request).write(request, data, size, offset, file); };
  table.flush = [](fuse_req_t request, fuse_ino_t, fuse_file_info* file) { handlers_of(request).flush(request, file); };
  table.fsync = [](fuse_req_t request, fuse_ino_t, int data_only, fuse_file_info* file) {
    handlers_of(request).fsync(request, data_only != 0, file);
  };
  table.release = [](fuse_req_t request, fuse_ino_t inode, fuse_file_info* file) {
    handlers_of(request).release(request, inode, file);
  };
  table.opendir = [](fuse_req_t request, fuse_ino_t inode, fuse_file_info* file) {
    handlers_of(request).opendir(request, inode, file);
  };
  table.readdir = [](fuse_req_t request, fuse_ino_t inode, size_t size, off_t offset, fuse_file_info*) {
    handlers_of(request).readdir(request, inode, size, offset);
  };
  table.releasedir = [](fuse_req_t request, fuse_ino_t, fuse_file_info*) { fuse_reply_err(request, 0); };
  table.statfs = [](fuse_req_t request, fuse_ino_t) { handlers_of(request).statfs(request); };
  table.fallocate = [](fuse_req_t request, fuse_ino_t, int mode, off_t offset, off_t length, fuse_file_info*) {
    handlers_of(request).fallocate(request, mode, offset, length);
  };
  table.lseek = [](fuse_req_t request, fuse_ino_t, off_t offset, int whence, fuse_file_info* file) {
    handlers_of(request).lseek(request, offset, whence, file);
  };
  // The directory holds the export alone: creating, removing or renaming entries is
  // refused as not permitted (without these, libfuse's ENOSYS reached the application
  // as "Function not implemented").
  table.mknod = [](fuse_req_t request, fuse_ino_t, const char*, mode_t, dev_t) { fuse_reply_err(request, EPERM); };
  table.mkdir = [](fuse_req_t request, fuse_ino_t, const char*, mode_t) { fuse_reply_err(request, EPERM); };
  table.create = [](fuse_req_t request, fuse_ino_t, const char*, mode_t, fuse_file_info*) {
    fuse_reply_err(request, EPERM);
  };
  table.unlink = [](fuse_req_t request, fuse_ino_t, const char*) { fuse_reply_err(request, EPERM); };
  table.rmdir = [](fuse_req_t request, fuse_ino_t, const char*) { fuse_reply_err(request, EPERM); };
  table.symlink = [](fuse_req_t request, const char*, fuse_ino_t, const char*) { fuse_reply_err(request, EPERM); };
  table.link = [](fuse_req_t request, fuse_ino_t, fuse_ino_t, const char*) { fuse_reply_err(request, EPERM); };
  table.rename = [](fuse_req_t request, fuse_ino_t, const char*, fuse_ino_t, const char*, unsigned int) {
    fuse_reply_err(request, EPERM);
  };
  return table;
}

}  // namespace fuse_front
