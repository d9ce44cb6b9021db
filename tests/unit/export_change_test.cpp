// nbd_client::export_change: what makes a reconnect to a restarted server unsafe.
#include "nbd_client/connection_pool.hpp"

#include <doctest/doctest.h>

using nbd_client::ExportInfo;
using nbd_client::export_change;

namespace {

ExportInfo typical() {
  ExportInfo info;
  info.size = 1 << 30;
  info.can_flush = info.can_fua = info.can_multi_conn = info.can_zero = info.can_trim = true;
  info.can_block_status = true;
  return info;
}

}  // namespace

TEST_CASE("the same export, as another connection sees it") {
  ExportInfo now = typical();
  now.can_block_status = false;  // data connections ask for simple replies: no block status
  now.preferred_block = 65536;   // only a hint
  CHECK(export_change(typical(), now, true).empty());
}

TEST_CASE("each difference the bridge plans by is named") {
  ExportInfo now = typical();
  now.size = 2048;
  CHECK(export_change(typical(), now, false) == "size 1073741824 -> 2048");
  now = typical();
  now.minimum_block = 4096;
  now.can_fua = false;
  CHECK(export_change(typical(), now, false) == "minimum block 1 -> 4096, FUA dropped");
  now = typical();
  now.read_only = true;
  now.can_zero = false;
  now.can_trim = false;
  now.can_flush = false;
  now.maximum_request = 65536;
  CHECK(export_change(typical(), now, false) ==
        "read-only flag changed, maximum request 33554432 -> 65536, flush dropped, write zeroes dropped, trim dropped");
}

TEST_CASE("multi-conn matters only with several connections") {
  ExportInfo now = typical();
  now.can_multi_conn = false;
  CHECK(export_change(typical(), now, false).empty());
  CHECK(export_change(typical(), now, true) == "multi-conn dropped");
  ExportInfo was = typical();
  was.can_fua = false;
  CHECK(export_change(was, typical(), false) == "FUA added");
}
