// The reply thread's own rules, with a recording sender in place of /dev/fuse:
// replies go out in order on the worker thread, their callers resume on the loop
// thread, the loop does not run out of work while one waits, jobs are reused, and
// stop() sends what is queued.
#include "fuse_front/reply_worker.hpp"

#include <doctest/doctest.h>

#include <asio/bind_executor.hpp>
#include <asio/co_spawn.hpp>
#include <asio/detached.hpp>
#include <asio/io_context.hpp>
#include <asio/use_awaitable.hpp>

#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

using fuse_front::ReplyWorker;

namespace {

// What the worker sent, in order, and from which thread (one test at a time).
struct SentLog {
  std::mutex mutex;
  std::vector<std::uintptr_t> requests;
  std::vector<std::size_t> lengths;
  std::vector<std::thread::id> threads;
};
SentLog sent;

void record(fuse_req_t request, const std::byte*, std::size_t length, fuse_front::ReplyPipe*, int) {
  std::lock_guard lock(sent.mutex);
  sent.requests.push_back(reinterpret_cast<std::uintptr_t>(request));
  sent.lengths.push_back(length);
  sent.threads.push_back(std::this_thread::get_id());
}

void clear_log() {
  std::lock_guard lock(sent.mutex);
  sent.requests.clear();
  sent.lengths.clear();
  sent.threads.clear();
}

fuse_req_t fake_request(std::uintptr_t number) { return reinterpret_cast<fuse_req_t>(number); }

struct Resumed {
  int count = 0;
  int on_other_threads = 0;
};

asio::awaitable<void> reply_once(ReplyWorker& worker, std::uintptr_t number, Resumed& resumed,
                                 std::thread::id loop_thread) {
  std::byte data[16] = {};
  co_await worker.async_reply_buf(fake_request(number), data, number, asio::use_awaitable);
  ++resumed.count;
  if (std::this_thread::get_id() != loop_thread) ++resumed.on_other_threads;
}

// A loop, a worker that records instead of sending, and what its callers saw.
struct WorkerLoop {
  WorkerLoop() { clear_log(); }
  asio::io_context loop{1};
  ReplyWorker worker{record};
  Resumed resumed;
  const std::thread::id loop_thread = std::this_thread::get_id();

  // Callers first..last, all started before any is resumed; each asks for a reply of its own length.
  void start_callers(int first, int last) {
    for (int number = first; number <= last; ++number)
      asio::co_spawn(loop, reply_once(worker, std::uintptr_t(number), resumed, loop_thread), asio::detached);
  }
};

}  // namespace

TEST_CASE_FIXTURE(WorkerLoop, "replies go out in order on the worker, and their callers resume on the loop") {
  constexpr int replies = 200;
  start_callers(1, replies);
  // run() returns only once every caller has resumed: waiting callers count as work.
  loop.run();
  CHECK(resumed.count == replies);
  CHECK(resumed.on_other_threads == 0);
  std::lock_guard lock(sent.mutex);
  REQUIRE(sent.requests.size() == std::size_t(replies));
  for (int index = 0; index < replies; ++index) {
    CHECK(sent.requests[std::size_t(index)] == std::uintptr_t(index + 1));
    CHECK(sent.lengths[std::size_t(index)] == std::size_t(index + 1));
    CHECK(sent.threads[std::size_t(index)] != loop_thread);
  }
}

TEST_CASE_FIXTURE(WorkerLoop, "jobs are made for the peak in flight and reused after it") {
  start_callers(1, 8);
  loop.run();
  CHECK(resumed.count == 8);
  CHECK(worker.jobs_made() == 8);
  loop.restart();
  // One at a time: each caller is resumed before the next one starts.
  asio::co_spawn(
      loop,
      [&]() -> asio::awaitable<void> {
        for (int number = 9; number <= 40; ++number) co_await reply_once(worker, std::uintptr_t(number), resumed, loop_thread);
      },
      asio::detached);
  loop.run();
  CHECK(resumed.count == 40);
  CHECK(worker.jobs_made() == 8);
}

TEST_CASE_FIXTURE(WorkerLoop, "stop sends every queued reply, and its callers still resume") {
  constexpr int replies = 100;
  start_callers(1, replies);
  // The coroutines run up to their submission, then the worker is stopped at once.
  asio::post(loop, [&] { worker.stop(); });
  loop.run();
  CHECK(resumed.count == replies);
  std::lock_guard lock(sent.mutex);
  CHECK(sent.requests.size() == std::size_t(replies));
}

TEST_CASE_FIXTURE(WorkerLoop, "a caller waiting on the worker keeps the loop's run() from returning") {
  int completed = 0;
  std::byte data[16] = {};
  // Plain callbacks: unlike a co_spawn'd coroutine, nothing else holds the loop's work.
  for (std::uintptr_t number = 1; number <= 50; ++number)
    worker.async_reply_buf(fake_request(number), data, sizeof data, asio::bind_executor(loop, [&] { ++completed; }));
  loop.run();
  CHECK(completed == 50);
}
