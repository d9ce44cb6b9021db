// The reply pipes' own rules, on real pipes: a reply starts with its FUSE header,
// a pipe given back holding bytes is emptied before its next reply, replies a
// pipe cannot hold are refused, and frequent fallbacks pause piping for a while.
#include "fuse_front/reply_pipe.hpp"

#include <doctest/doctest.h>

#include <linux/fuse.h>

#include <cstring>
#include <unistd.h>
#include <vector>

using fuse_front::ReplyPipe;
using fuse_front::ReplyPipes;

namespace {

fuse_out_header read_header(const ReplyPipe& pipe) {
  fuse_out_header header{};
  REQUIRE(::read(pipe.read_end(), &header, sizeof header) == ssize_t(sizeof header));
  return header;
}

std::size_t bytes_waiting(const ReplyPipe& pipe) {
  std::vector<char> scrap(1 << 20);
  ssize_t got = ::read(pipe.read_end(), scrap.data(), scrap.size());
  return got > 0 ? std::size_t(got) : 0;  // non-blocking: -1 (EAGAIN) when empty
}

}  // namespace

TEST_CASE("a reply starts with its header, and what was piped comes back on take_back") {
  ReplyPipes pipes;
  ReplyPipe* pipe = pipes.start_reply(41, 4096);
  REQUIRE(pipe != nullptr);
  std::vector<std::byte> payload(4096, std::byte{0x5a});
  REQUIRE(::write(pipe->write_end(), payload.data(), payload.size()) == 4096);
  std::vector<std::byte> buffer(4096);
  CHECK(pipe->take_back(buffer.data(), buffer.size()));
  CHECK(buffer == payload);
  CHECK(bytes_waiting(*pipe) == 0);
  pipes.give_back(pipe, false);

  pipe = pipes.start_reply(42, 128 * 1024);
  REQUIRE(pipe != nullptr);
  fuse_out_header header = read_header(*pipe);
  CHECK(header.unique == 42);
  CHECK(header.len == sizeof(fuse_out_header) + 128 * 1024);
  CHECK(header.error == 0);
  pipes.give_back(pipe);
}

TEST_CASE("a pipe given back with a reply still in it is emptied before it is reused") {
  ReplyPipes pipes;
  ReplyPipe* first = pipes.start_reply(1, 8192);
  REQUIRE(first != nullptr);
  std::vector<std::byte> payload(8192, std::byte{1});
  REQUIRE(::write(first->write_end(), payload.data(), payload.size()) == 8192);
  pipes.give_back(first);  // as for a request answered by its timeout
  CHECK(pipes.in_use() == 0);
  ReplyPipe* second = pipes.start_reply(2, 8192);
  REQUIRE(second == first);  // the pool's last pipe is reused first
  CHECK(read_header(*second).unique == 2);
  CHECK(bytes_waiting(*second) == 0);
  pipes.give_back(second);
}

TEST_CASE("a reply longer than a pipe holds is refused") {
  ReplyPipes pipes;
  CHECK(pipes.start_reply(3, std::size_t(64) << 20) == nullptr);
  CHECK(pipes.in_use() == 0);
  ReplyPipe* pipe = pipes.start_reply(4, 1 << 20);
  CHECK(pipe != nullptr);  // 1 MiB fits the unprivileged limit
  if (pipe) pipes.give_back(pipe);
}

TEST_CASE("frequent fallbacks pause piping, which then resumes") {
  ReplyPipes pipes;
  for (unsigned i = 0; i < ReplyPipes::fallbacks_to_pause - 1; ++i) {
    ReplyPipe* pipe = pipes.start_reply(i, 4096);
    REQUIRE(pipe != nullptr);
    pipes.give_back(pipe, false);
  }
  CHECK_FALSE(pipes.paused());
  // A window of successes starts the count again.
  for (unsigned i = 0; i < ReplyPipes::outcome_window; ++i) pipes.give_back(pipes.start_reply(i, 4096), true);
  for (unsigned i = 0; i < ReplyPipes::fallbacks_to_pause - 1; ++i)
    pipes.give_back(pipes.start_reply(i, 4096), false);
  CHECK_FALSE(pipes.paused());
  pipes.give_back(pipes.start_reply(99, 4096), false);
  CHECK(pipes.paused());
  for (unsigned i = 0; i < ReplyPipes::paused_replies; ++i) REQUIRE(pipes.start_reply(i, 4096) == nullptr);
  ReplyPipe* pipe = pipes.start_reply(100, 4096);
  CHECK(pipe != nullptr);
  if (pipe) pipes.give_back(pipe);
}
