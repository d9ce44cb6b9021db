// Which errno an application sees for an NBD command's result. The one place
// where internal std::error_codes become the positive errno given to FUSE.
#pragma once

#include <cerrno>
#include <system_error>

namespace bridge {

// Errors the NBD protocol carries from the server pass through unchanged; the
// rest describe our connection (lost, shut down, never made), which to the
// application is an I/O error on its disk.
constexpr int to_application_errno(int error) {
  switch (error) {
    case 0: return 0;
    case EPERM:
    case EIO:
    case ENOMEM:
    case EINVAL:
    case ENOSPC:
    case EOVERFLOW:
    case ENOTSUP:
    case EROFS:
    case EACCES:
    case EFBIG:
      return error;
    default:
      return EIO;
  }
}

inline int to_application_errno(std::error_code error) { return error ? to_application_errno(error.value()) : 0; }

}  // namespace bridge
