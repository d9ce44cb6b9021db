// The awaitable wrapper completes exactly once whatever order libnbd calls back
// in: success, error, submission failure, and freed without a callback.
#include "nbd_client/connection_pool.hpp"

#include <asio/experimental/as_tuple.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>
#include <doctest/doctest.h>

#include <vector>

namespace {

struct CountingCommand final : nbd_client::PendingCommand {
  std::vector<int>* results;
  bool* destroyed;
  CountingCommand(std::vector<int>* results, bool* destroyed) : results(results), destroyed(destroyed) {}
  void finish(std::error_code result) override { results->push_back(result.value()); }
  void deliver() override {}
  void destroy() override {
    *destroyed = true;
    delete this;
  }
};

// What libnbd does for one chunk that was accepted: the callback, then .free.
void submit_chunks(nbd_client::PendingCommand* command, int chunks) {
  command->submitting = true;
  command->callbacks_outstanding += chunks;
  command->frees_outstanding += chunks;
  command->submitting = false;
}

}  // namespace

TEST_CASE("one chunk: success completes once, then is freed") {
  std::vector<int> results;
  bool destroyed = false;
  auto* command = new CountingCommand(&results, &destroyed);
  submit_chunks(command, 1);
  int ok = 0;
  CHECK(nbd_client::on_chunk_done(command, &ok) == 1);
  CHECK(results == std::vector<int>{0});
  CHECK_FALSE(destroyed);
  nbd_client::on_chunk_freed(command);
  CHECK(destroyed);
  CHECK(results.size() == 1);
}

TEST_CASE("split command: the first error wins, completion after the last chunk") {
  std::vector<int> results;
  bool destroyed = false;
  auto* command = new CountingCommand(&results, &destroyed);
  submit_chunks(command, 3);
  int ok = 0, io_error = EIO, no_space = ENOSPC;
  nbd_client::on_chunk_done(command, &ok);
  nbd_client::on_chunk_done(command, &io_error);
  CHECK(results.empty());
  nbd_client::on_chunk_done(command, &no_space);
  CHECK(results == std::vector<int>{EIO});
  for (int i = 0; i < 3; ++i) nbd_client::on_chunk_freed(command);
  CHECK(destroyed);
}

TEST_CASE("freed without its callback (handle closed): completes once with ESHUTDOWN") {
  std::vector<int> results;
  bool destroyed = false;
  auto* command = new CountingCommand(&results, &destroyed);
  submit_chunks(command, 2);
  int ok = 0;
  nbd_client::on_chunk_done(command, &ok);
  nbd_client::on_chunk_freed(command);
  nbd_client::on_chunk_freed(command);
  CHECK(results == std::vector<int>{ESHUTDOWN});
  CHECK(destroyed);
}

TEST_CASE("submission failure on an unconnected handle completes once with ENOTCONN") {
  asio::io_context io;
  nbd_client::Connection connection(io.get_executor());
  std::vector<int> results;
  std::byte buffer[512];
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        auto [error] = co_await connection.async_pread(buffer, sizeof buffer, 0, nbd_client::use_result);
        results.push_back(error.value());
      },
      asio::detached);
  io.run();
  CHECK(results == std::vector<int>{ENOTCONN});
}

TEST_CASE("against a real nbdkit: success, server error, and libnbd refusing the command") {
  asio::io_context io;
  nbd_client::ConnectionPool pool(io.get_executor());
  nbd_client::Target target;
  target.kind = nbd_client::Target::Kind::command;
  target.command = {"nbdkit", "memory", "1M"};
  std::vector<int> results;
  std::error_code connect_error;
  asio::co_spawn(
      io,
      [&]() -> asio::awaitable<void> {
        connect_error = co_await pool.async_connect(target, {});
        if (connect_error) co_return;
        nbd_client::Connection& connection = pool.pick();
        static std::byte data[4096];
        for (auto& byte : data) byte = std::byte{0x5a};
        auto [written] = co_await connection.async_pwrite(data, sizeof data, 4096, 0, nbd_client::use_result);
        results.push_back(written.value());
        static std::byte back[4096];
        auto [read] = co_await connection.async_pread(back, sizeof back, 4096, nbd_client::use_result);
        results.push_back(read.value());
        results.push_back(back[100] == std::byte{0x5a} ? 0 : -1);
        // Past the end: libnbd refuses before sending; the callback never runs.
        auto [refused] = co_await connection.async_pread(back, sizeof back, 2u << 20, nbd_client::use_result);
        results.push_back(refused.value());
        auto [flushed] = co_await connection.async_flush(nbd_client::use_result);
        results.push_back(flushed.value());
        pool.close();
      },
      asio::detached);
  io.run_for(std::chrono::seconds(20));
  REQUIRE_MESSAGE(!connect_error, pool.error_message());
  REQUIRE(results.size() == 5);
  CHECK(results[0] == 0);
  CHECK(results[1] == 0);
  CHECK(results[2] == 0);
  CHECK(results[3] == EINVAL);
  CHECK(results[4] == 0);
}

TEST_CASE("the ready list hands commands back in the order their replies came") {
  std::vector<int> results;
  bool destroyed_a = false, destroyed_b = false, destroyed_c = false;
  auto* a = new CountingCommand(&results, &destroyed_a);
  auto* b = new CountingCommand(&results, &destroyed_b);
  auto* c = new CountingCommand(&results, &destroyed_c);
  nbd_client::ReadyList ready;
  CHECK(ready.pop() == nullptr);
  ready.push(b);
  ready.push(a);
  CHECK(ready.pop() == b);
  ready.push(c);
  CHECK(ready.pop() == a);
  CHECK(ready.pop() == c);
  CHECK(ready.pop() == nullptr);
  CHECK(ready.head == nullptr);
  CHECK(ready.tail == nullptr);
  for (auto* command : {a, b, c}) command->destroy();
  CHECK((destroyed_a && destroyed_b && destroyed_c));
}

TEST_CASE("command memory reuses its blocks, so commands in the steady state allocate nothing") {
  nbd_client::CommandMemory memory;
  void* first = memory.take(96);
  void* second = memory.take(nbd_client::CommandMemory::block_size);
  CHECK(first != second);
  memory.give(first, 96);
  memory.give(second, nbd_client::CommandMemory::block_size);
  CHECK(memory.kept() == 2);
  // Last given, first taken: the block most likely still in cache.
  CHECK(memory.take(64) == second);
  CHECK(memory.take(128) == first);
  CHECK(memory.kept() == 0);
  // Larger than a block: its own allocation, never kept.
  void* large = memory.take(nbd_client::CommandMemory::block_size + 1);
  memory.give(large, nbd_client::CommandMemory::block_size + 1);
  CHECK(memory.kept() == 0);
  memory.give(first, 96);
  memory.give(second, 96);
  CHECK(memory.kept() == 2);
}
