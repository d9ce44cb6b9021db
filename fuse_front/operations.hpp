// The one FUSE low-level ops table, forwarding each C callback to a Handlers
// object (the bridge). Handlers run on the loop thread inside Session::receive();
// only fuse_req_t may outlive a call, so handlers copy what they keep.
#pragma once

#include "fuse_front/session.hpp"

#include <sys/stat.h>

namespace fuse_front {

class Handlers {
 public:
  virtual ~Handlers() = default;
  virtual void init(fuse_conn_info* connection) = 0;
  virtual void lookup(fuse_req_t request, fuse_ino_t parent, const char* name) = 0;
  virtual void getattr(fuse_req_t request, fuse_ino_t inode) = 0;
  // file: the open file of an ftruncate/futimens, else null.
  virtual void setattr(fuse_req_t request, fuse_ino_t inode, const struct stat& attributes, int to_set,
                       const fuse_file_info* file) = 0;
  virtual void open(fuse_req_t request, fuse_ino_t inode, fuse_file_info* file) = 0;
  virtual void read(fuse_req_t request, std::size_t size, off_t offset, const fuse_file_info* file) = 0;
  virtual void write(fuse_req_t request, const char* data, std::size_t size, off_t offset,
                     const fuse_file_info* file) = 0;
  virtual void flush(fuse_req_t request, const fuse_file_info* file) = 0;
  virtual void fsync(fuse_req_t request, bool data_only, const fuse_file_info* file) = 0;
  virtual void opendir(fuse_req_t request, fuse_ino_t inode, fuse_file_info* file) = 0;
  virtual void readdir(fuse_req_t request, fuse_ino_t inode, std::size_t size, off_t offset) = 0;
  virtual void statfs(fuse_req_t request) = 0;
  virtual void fallocate(fuse_req_t request, int mode, off_t offset, off_t length) = 0;
  virtual void lseek(fuse_req_t request, off_t offset, int whence, const fuse_file_info* file) = 0;
  virtual void release(fuse_req_t request, fuse_ino_t inode, const fuse_file_info* file) = 0;
};

// user_data for fuse_session_new must be the Handlers*.
fuse_lowlevel_ops operations_table();

}  // namespace fuse_front
