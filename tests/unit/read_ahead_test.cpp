// The read-ahead bookkeeping: when a file counts as read sequentially, which windows are
// fetched, and when a window may answer a READ (fresh, and no write of this mount since).
#include "bridge/read_ahead.hpp"

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <vector>

using namespace std::chrono_literals;

namespace {

struct Buffer {
  std::vector<std::byte> bytes;
  std::byte* data() { return bytes.data(); }
  const std::byte* data() const { return bytes.data(); }
};
using ReadAhead = bridge::ReadAhead<Buffer>;
using Clock = ReadAhead::Clock;
constexpr std::size_t KiB = 1024;
constexpr std::size_t MiB = 1024 * KiB;

// A buffer whose every byte says which window it is from.
Buffer filled(std::size_t length, std::uint8_t value) { return Buffer{std::vector<std::byte>(length, std::byte{value})}; }

struct Reader {
  ReadAhead& read_ahead;
  std::uint64_t handle;
  std::uint64_t position = 0;
  std::vector<ReadAhead::Fetch> fetches{};
  // Reads `length` at the position; whether a window answered it.
  bool read(std::size_t length, Clock::time_point now) {
    const bool answered = read_ahead.find(handle, position, length, now) != nullptr;
    if (auto fetch = read_ahead.observe(handle, position, length, now, [] { return true; })) fetches.push_back(*fetch);
    position += length;
    return answered;
  }
};

}  // namespace

TEST_CASE("read-ahead starts after a few sequential reads, one window at the reader's position") {
  ReadAhead read_ahead;
  read_ahead.set_export(64 * MiB, 1);
  Reader reader{read_ahead, 1};
  const auto now = Clock::now();
  CHECK_FALSE(reader.read(4 * KiB, now));
  CHECK_FALSE(reader.read(4 * KiB, now));
  CHECK(reader.fetches.empty());  // `file` and `blkid` read this much and stop
  CHECK_FALSE(reader.read(4 * KiB, now));
  REQUIRE(reader.fetches.size() == 1);
  CHECK(reader.fetches[0].offset == 12 * KiB);
  CHECK(reader.fetches[0].length == 1 * MiB);
  // While it is fetched nothing answers, and it is not asked for again.
  CHECK_FALSE(reader.read(4 * KiB, now));
  CHECK(reader.fetches.size() == 1);
  read_ahead.fetched(reader.fetches[0], filled(1 * MiB, 7), true, now);
  const std::byte* data = read_ahead.find(1, 20 * KiB, 4 * KiB, now);
  REQUIRE(data != nullptr);
  CHECK(*data == std::byte{7});
  // Not across the window's end, nor for another file.
  CHECK(read_ahead.find(1, 12 * KiB + 1 * MiB - 2 * KiB, 4 * KiB, now) == nullptr);
  CHECK(read_ahead.find(2, 20 * KiB, 4 * KiB, now) == nullptr);
}

TEST_CASE("read-ahead fetches the next window half-way through the current one") {
  ReadAhead read_ahead;
  read_ahead.set_export(64 * MiB, 1);
  Reader reader{read_ahead, 1, /*position=*/0};
  const auto now = Clock::now();
  for (int read = 0; read < 3; ++read) reader.read(64 * KiB, now);
  REQUIRE(reader.fetches.size() == 1);
  const auto first = reader.fetches[0];
  CHECK(first.offset == 192 * KiB);
  read_ahead.fetched(first, filled(first.length, 1), true, now);
  // Up to half-way, answered from the first window, nothing more fetched.
  while (reader.position + 64 * KiB < first.offset + first.length / 2) CHECK(reader.read(64 * KiB, now));
  CHECK(reader.fetches.size() == 1);
  CHECK(reader.read(64 * KiB, now));
  REQUIRE(reader.fetches.size() == 2);
  CHECK(reader.fetches[1].offset == first.offset + first.length);
  read_ahead.fetched(reader.fetches[1], filled(reader.fetches[1].length, 2), true, now);
  // The reader goes on from one window into the next without a READ to the server.
  while (reader.position < reader.fetches[1].offset + 64 * KiB) CHECK(reader.read(64 * KiB, now));
  CHECK(*read_ahead.find(1, reader.fetches[1].offset, 4 * KiB, now) == std::byte{2});
}

TEST_CASE("read-ahead: a write of this mount over a window, or age, makes it unusable there") {
  ReadAhead read_ahead;
  read_ahead.set_export(64 * MiB, 1);
  Reader reader{read_ahead, 1};
  const auto now = Clock::now();
  for (int read = 0; read < 3; ++read) reader.read(4 * KiB, now);
  REQUIRE(reader.fetches.size() == 1);
  read_ahead.fetched(reader.fetches[0], filled(1 * MiB, 1), true, now);
  CHECK(read_ahead.find(1, 12 * KiB, 4 * KiB, now) != nullptr);
  CHECK(read_ahead.find(1, 12 * KiB, 4 * KiB, now + read_ahead.limits().freshness + 1ms) == nullptr);
  read_ahead.written(4 * MiB, 4 * KiB);  // elsewhere: the window stays
  CHECK(read_ahead.find(1, 12 * KiB, 4 * KiB, now) != nullptr);

  SUBCASE("a write inside keeps what lies before it") {
    read_ahead.written(512 * KiB + 100, 1);
    CHECK(read_ahead.find(1, 12 * KiB, 4 * KiB, now) != nullptr);
    CHECK(read_ahead.find(1, 508 * KiB, 4 * KiB, now) != nullptr);
    CHECK(read_ahead.find(1, 512 * KiB, 4 * KiB, now) == nullptr);
    CHECK(read_ahead.find(1, 600 * KiB, 4 * KiB, now) == nullptr);
    // The next window starts where the kept part ends.
    while (reader.position < 256 * KiB + 12 * KiB) reader.read(4 * KiB, now);
    REQUIRE(reader.fetches.size() == 2);
    CHECK(reader.fetches[1].offset == 512 * KiB + 100);
  }
  SUBCASE("a write over its start (the reader writing back what it read) keeps what follows") {
    read_ahead.written(12 * KiB, 4 * KiB);
    CHECK(read_ahead.find(1, 12 * KiB, 4 * KiB, now) == nullptr);
    CHECK(read_ahead.find(1, 16 * KiB, 4 * KiB, now) != nullptr);
  }
  SUBCASE("a window written whole is lost, and not fetched again until passed") {
    read_ahead.written(0, 2 * MiB);
    CHECK(read_ahead.find(1, 512 * KiB, 4 * KiB, now) == nullptr);
    while (reader.position + 4 * KiB < 12 * KiB + 1 * MiB) reader.read(4 * KiB, now);
    CHECK(reader.fetches.size() == 1);
    reader.read(4 * KiB, now);
    REQUIRE(reader.fetches.size() == 2);
    CHECK(reader.fetches[1].offset == 12 * KiB + 1 * MiB);
    SUBCASE("...or the reader starts elsewhere") {
      reader.position = 0;
      for (int read = 0; read < 3; ++read) reader.read(4 * KiB, now);
      CHECK(reader.fetches.size() == 3);
    }
  }
  SUBCASE("a write that ends while a window is fetched ends it there too") {
    while (reader.position < 512 * KiB + 12 * KiB) reader.read(4 * KiB, now);
    REQUIRE(reader.fetches.size() == 2);
    read_ahead.written(reader.fetches[1].offset, 2 * MiB);  // (its start was before the fetch)
    read_ahead.fetched(reader.fetches[1], filled(1 * MiB, 3), true, now);
    CHECK(read_ahead.find(1, reader.fetches[1].offset + 4 * KiB, 4 * KiB, now) == nullptr);
  }
}

TEST_CASE("read-ahead: a server too slow for the freshness is not sent a fetch per READ") {
  ReadAhead read_ahead;
  read_ahead.set_export(64 * MiB, 1);
  Reader reader{read_ahead, 1};
  auto now = Clock::now();
  for (int read = 0; read < 3; ++read) reader.read(4 * KiB, now);
  REQUIRE(reader.fetches.size() == 1);
  // The fetch takes 150 ms; meanwhile the reader's own READs go on (each answered in 150 ms).
  for (int read = 0; read < 10; ++read) {
    now += 15ms;
    reader.read(4 * KiB, now);
  }
  CHECK(reader.fetches.size() == 1);
  read_ahead.fetched(reader.fetches[0], filled(1 * MiB, 1), true, now);
  CHECK(read_ahead.find(1, reader.position, 4 * KiB, now) == nullptr);  // stale on arrival
  for (int read = 0; read < 10; ++read) reader.read(4 * KiB, now);
  CHECK(reader.fetches.size() == 1);  // not again for this reader
}

TEST_CASE("read-ahead: a late or failed fetch answers nothing") {
  ReadAhead read_ahead;
  read_ahead.set_export(64 * MiB, 1);
  Reader reader{read_ahead, 1};
  const auto now = Clock::now();
  for (int read = 0; read < 3; ++read) reader.read(4 * KiB, now);
  REQUIRE(reader.fetches.size() == 1);
  SUBCASE("failed") {
    read_ahead.fetched(reader.fetches[0], filled(1 * MiB, 1), false, now);
    CHECK(read_ahead.find(1, 12 * KiB, 4 * KiB, now) == nullptr);
    // Not fetched again (a bad block would fail every one): the reads go to the
    // server until the reader has passed it.
    while (reader.position + 4 * KiB < 12 * KiB + 1 * MiB) reader.read(4 * KiB, now);
    CHECK(reader.fetches.size() == 1);
    reader.read(4 * KiB, now);
    CHECK(reader.fetches.size() == 2);
  }
  SUBCASE("the file was closed meanwhile") {
    read_ahead.forget(1);
    read_ahead.fetched(reader.fetches[0], filled(1 * MiB, 1), true, now);
    CHECK(read_ahead.find(1, 12 * KiB, 4 * KiB, now) == nullptr);
  }
  SUBCASE("cleared (idle, or stopping)") {
    read_ahead.clear();
    read_ahead.fetched(reader.fetches[0], filled(1 * MiB, 1), true, now);
    CHECK(read_ahead.find(1, 12 * KiB, 4 * KiB, now) == nullptr);
  }
}

TEST_CASE("read-ahead: a jump, large reads and the export's end") {
  ReadAhead read_ahead;
  read_ahead.set_export(2 * MiB, 1);
  const auto now = Clock::now();
  SUBCASE("a jump starts the count again") {
    Reader reader{read_ahead, 1};
    reader.read(4 * KiB, now);
    reader.read(4 * KiB, now);
    reader.position += 4 * KiB;
    reader.read(4 * KiB, now);
    reader.read(4 * KiB, now);
    CHECK(reader.fetches.empty());
  }
  SUBCASE("large reads are not read ahead") {
    CHECK(read_ahead.wants(128 * KiB));
    CHECK_FALSE(read_ahead.wants(128 * KiB + 1));
  }
  SUBCASE("a window stops at the end, and none starts there") {
    Reader reader{read_ahead, 1, 2 * MiB - 512 * KiB};
    for (int read = 0; read < 3; ++read) reader.read(4 * KiB, now);
    REQUIRE(reader.fetches.size() == 1);
    CHECK(reader.fetches[0].offset + reader.fetches[0].length == 2 * MiB);
    read_ahead.fetched(reader.fetches[0], filled(reader.fetches[0].length, 1), true, now);
    while (reader.position < 2 * MiB) reader.read(4 * KiB, now);
    CHECK(reader.fetches.size() == 1);
  }
  SUBCASE("a fifth file is not read ahead while four others are read, but takes an idle one's place") {
    for (std::uint64_t handle = 1; handle <= ReadAhead::stream_count + 1; ++handle) {
      Reader reader{read_ahead, handle};
      for (int read = 0; read < 3; ++read) reader.read(4 * KiB, now + std::chrono::milliseconds(handle));
      REQUIRE(reader.fetches.size() == (handle <= ReadAhead::stream_count ? 1 : 0));
      if (!reader.fetches.empty())
        read_ahead.fetched(reader.fetches[0], filled(reader.fetches[0].length, std::uint8_t(handle)), true, now);
    }
    CHECK(read_ahead.find(1, 12 * KiB, 4 * KiB, now + 10ms) != nullptr);
    const auto later = now + read_ahead.limits().freshness + 10ms;
    Reader fifth{read_ahead, ReadAhead::stream_count + 1};
    for (int read = 0; read < 3; ++read) fifth.read(4 * KiB, later);
    CHECK(fifth.fetches.size() == 1);
  }
}

TEST_CASE("read-ahead: how soon a quick sequential reader comes back") {
  ReadAhead read_ahead;
  read_ahead.set_export(64 * MiB, 1);
  Reader reader{read_ahead, 1};
  auto now = Clock::now();
  const auto gap = 80us;  // md5sum's 32 KiB take ~60 us here
  for (int read = 0; read < 8; ++read, now += gap) reader.read(32 * KiB, now);
  CHECK(read_ahead.next_read_within(1) == 2 * gap);
  CHECK(read_ahead.next_read_within(2) == 0us);  // not a reader seen
  SUBCASE("a slow reader (gzip) is not polled for") {
    for (int read = 0; read < 16; ++read, now += 1ms) reader.read(32 * KiB, now);
    CHECK(read_ahead.next_read_within(1) == 0us);
  }
  SUBCASE("nor one that jumped") {
    reader.position += 1 * MiB;
    reader.read(32 * KiB, now);
    CHECK(read_ahead.next_read_within(1) == 0us);
  }
}

TEST_CASE("read-ahead: a slower reader gets a smaller window, a slow one none") {
  ReadAhead read_ahead;
  read_ahead.set_export(64 * MiB, 1);
  auto now = Clock::now();
  SUBCASE("a 4 KiB read every 2 ms: 25 in half the freshness (the next window goes half-way)") {
    Reader reader{read_ahead, 1};
    for (int read = 0; read < 3; ++read, now += 2ms) reader.read(4 * KiB, now);
    REQUIRE(reader.fetches.size() == 1);
    CHECK(reader.fetches[0].length == 100 * KiB);
  }
  SUBCASE("one every 50 ms: a window would be stale after two") {
    Reader reader{read_ahead, 1};
    for (int read = 0; read < 10; ++read, now += 50ms) reader.read(4 * KiB, now);
    CHECK(reader.fetches.empty());
  }
  SUBCASE("none while the caller may not fetch") {
    for (std::uint64_t position = 0; position < 64 * KiB; position += 4 * KiB)
      CHECK_FALSE(read_ahead.observe(1, position, 4 * KiB, now, [] { return false; }));
    CHECK(read_ahead.observe(1, 64 * KiB, 4 * KiB, now, [] { return true; }));
  }
}

TEST_CASE("read-ahead windows start on the server's minimum block") {
  ReadAhead read_ahead;
  read_ahead.set_export(64 * MiB, 64 * KiB);
  Reader reader{read_ahead, 1, /*position=*/100 * KiB};
  const auto now = Clock::now();
  for (int read = 0; read < 3; ++read) reader.read(4 * KiB, now);
  REQUIRE(reader.fetches.size() == 1);
  CHECK(reader.fetches[0].offset == 64 * KiB);
  read_ahead.fetched(reader.fetches[0], filled(reader.fetches[0].length, 5), true, now);
  CHECK(*read_ahead.find(1, reader.position, 4 * KiB, now) == std::byte{5});
}

TEST_CASE("read-ahead: a distant server's round trips are not the reader's pace") {
  ReadAhead read_ahead;
  read_ahead.set_export(64 * MiB, 1);
  auto now = Clock::now();
  // Each READ takes 50 ms to answer; the reader asks for the next 20 us after each answer.
  std::vector<ReadAhead::Fetch> fetches;
  for (std::uint64_t position = 0; position < 12 * KiB; position += 4 * KiB) {
    if (auto fetch = read_ahead.observe(1, position, 4 * KiB, now, [] { return true; })) fetches.push_back(*fetch);
    now += 50ms;
    read_ahead.answered(1, now);
    now += 20us;
  }
  REQUIRE(fetches.size() == 1);
  CHECK(fetches[0].length == 1 * MiB);
}
