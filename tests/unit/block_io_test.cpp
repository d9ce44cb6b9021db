// Pure parts of the block layer: alignment, hole rules, extent search, and the
// range lock that serialises read-modify-write.
#include "bridge/block_io.hpp"
#include "bridge/range_lock.hpp"

#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/redirect_error.hpp>
#include <asio/steady_timer.hpp>
#include <asio/use_awaitable.hpp>
#include <doctest/doctest.h>

#include <string>

using bridge::align_down;
using bridge::align_up;
using nbd_client::Extent;

TEST_CASE("alignment to the server's minimum block") {
  CHECK(align_down(4097, 4096) == 4096);
  CHECK(align_up(4097, 4096) == 8192);
  CHECK(align_up(4096, 4096) == 4096);
  CHECK(align_down(511, 512) == 0);
  CHECK(align_up(1, 512) == 512);
  CHECK(align_up(0, 512) == 0);
}

TEST_CASE("a hole must be both unallocated and zero") {
  CHECK(bridge::is_hole(3));
  CHECK_FALSE(bridge::is_hole(1));  // unallocated but may read non-zero (backing file)
  CHECK_FALSE(bridge::is_hole(2));  // allocated zeros are data
  CHECK_FALSE(bridge::is_hole(0));
}

TEST_CASE("finding data and holes in extents") {
  std::vector<Extent> extents{{0, 4096, 3}, {4096, 8192, 0}, {12288, 4096, 3}, {16384, 4096, 2}};
  std::uint64_t found = 0;
  REQUIRE(bridge::find_in_extents(extents, 0, true, found));
  CHECK(found == 4096);
  REQUIRE(bridge::find_in_extents(extents, 5000, true, found));
  CHECK(found == 5000);  // already inside data
  REQUIRE(bridge::find_in_extents(extents, 5000, false, found));
  CHECK(found == 12288);
  REQUIRE(bridge::find_in_extents(extents, 13000, true, found));
  CHECK(found == 16384);  // allocated zeros count as data
  CHECK_FALSE(bridge::find_in_extents(extents, 16384, false, found));  // no hole before the extents end
  CHECK_FALSE(bridge::find_in_extents({}, 0, true, found));
}

TEST_CASE("the range lock serialises overlapping holders only") {
  asio::io_context io;
  bridge::RangeLock lock(io.get_executor());
  std::string order;
  auto holder = [&](char name, std::uint64_t begin, std::uint64_t end, int yields) -> asio::awaitable<void> {
    auto guard = co_await lock.acquire(begin, end);
    order += name;
    for (int i = 0; i < yields; ++i) co_await asio::post(io, asio::use_awaitable);
    order += char(name - 'A' + 'a');  // lower case: released
  };
  asio::co_spawn(io, holder('A', 0, 4096, 3), asio::detached);
  asio::co_spawn(io, holder('B', 2048, 8192, 0), asio::detached);  // overlaps A: waits
  asio::co_spawn(io, holder('C', 8192, 12288, 0), asio::detached);  // disjoint: runs at once
  io.run();
  CHECK(order.find('B') > order.find('a'));
  CHECK(order.find('C') < order.find('a'));
  CHECK(order.size() == 6);
  CHECK_FALSE(lock.overlaps(0, 1 << 20));
}

TEST_CASE("a range lock waiter whose request was answered leaves at wake_all(), holding nothing") {
  asio::io_context io;
  bridge::RangeLock lock(io.get_executor());
  bool answered = false;
  std::string order;
  asio::steady_timer hold(io, std::chrono::hours(1));  // the first holder: a write the server holds
  asio::co_spawn(io, [&]() -> asio::awaitable<void> {
    auto guard = co_await lock.acquire(0, 4096);
    std::error_code ignored;
    co_await hold.async_wait(asio::redirect_error(asio::use_awaitable, ignored));
    order += 'a';
  }, asio::detached);
  asio::co_spawn(io, [&]() -> asio::awaitable<void> {
    auto guard = co_await lock.acquire(0, 4096, &answered);
    order += 'b';  // before 'a': it left while the first holder still had the block
  }, asio::detached);
  asio::co_spawn(io, [&]() -> asio::awaitable<void> {
    co_await asio::post(io, asio::use_awaitable);
    lock.wake_all();  // not answered yet: it waits on
    co_await asio::post(io, asio::use_awaitable);
    co_await asio::post(io, asio::use_awaitable);
    CHECK(order.empty());
    answered = true;  // as Tracked::answer_early() does, then BlockIo::release_answered()
    lock.wake_all();
  }, asio::detached);
  io.run_for(std::chrono::milliseconds(200));
  CHECK(order == "b");
  CHECK(lock.overlaps(0, 4096));  // the first holder still has it
  hold.cancel();
  io.run_for(std::chrono::milliseconds(200));
  CHECK(order == "ba");
  CHECK_FALSE(lock.overlaps(0, 1 << 20));
}

TEST_CASE("the range lock serves overlapping waiters in arrival order") {
  // A writer that takes the same block again as soon as it lets go must not keep a
  // waiter out (a read-modify-write starved behind aligned writes).
  asio::io_context io;
  bridge::RangeLock lock(io.get_executor());
  std::string order;
  auto repeated_writer = [&]() -> asio::awaitable<void> {
    for (int round = 0; round < 3; ++round) {
      auto guard = co_await lock.acquire(0, 4096);
      order += 'A';
      co_await asio::post(io, asio::use_awaitable);
    }
  };
  auto waiter = [&](char name, std::uint64_t begin, std::uint64_t end) -> asio::awaitable<void> {
    auto guard = co_await lock.acquire(begin, end);
    order += name;
    co_await asio::post(io, asio::use_awaitable);
  };
  asio::co_spawn(io, repeated_writer(), asio::detached);
  asio::co_spawn(io, waiter('B', 1024, 2048), asio::detached);   // inside A's block: queues
  asio::co_spawn(io, waiter('C', 1536, 8192), asio::detached);   // overlaps A and B: after B
  asio::co_spawn(io, waiter('D', 8192, 12288), asio::detached);  // disjoint from all: at once
  io.run();
  CHECK(order == "ADBCAA");
  CHECK_FALSE(lock.overlaps(0, 1 << 20));
}
