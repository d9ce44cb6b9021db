// Which errno the application sees.
#include "bridge/errno_map.hpp"

#include <doctest/doctest.h>

using bridge::to_application_errno;

TEST_CASE("server errors pass through, connection errors become EIO") {
  CHECK(to_application_errno(0) == 0);
  CHECK(to_application_errno(EIO) == EIO);
  CHECK(to_application_errno(ENOSPC) == ENOSPC);
  CHECK(to_application_errno(EPERM) == EPERM);
  CHECK(to_application_errno(EINVAL) == EINVAL);
  CHECK(to_application_errno(EOVERFLOW) == EOVERFLOW);
  CHECK(to_application_errno(ENOTSUP) == ENOTSUP);
  CHECK(to_application_errno(ENOTCONN) == EIO);
  CHECK(to_application_errno(ESHUTDOWN) == EIO);
  CHECK(to_application_errno(ECONNRESET) == EIO);
  CHECK(to_application_errno(EPIPE) == EIO);
  CHECK(to_application_errno(std::error_code()) == 0);
  CHECK(to_application_errno(std::error_code(ENOSPC, std::generic_category())) == ENOSPC);
}
