// Reads and writes against the export's end, and splitting at the server maximum.
#include "bridge/buffer_pool.hpp"
#include "bridge/geometry.hpp"
#include "nbd_client/request_split.hpp"

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

using bridge::clamp_read;
using bridge::plan_write;

TEST_CASE("reads are short at EOF and empty past it") {
  CHECK(clamp_read(1000, 0, 100) == 100);
  CHECK(clamp_read(1000, 900, 100) == 100);
  CHECK(clamp_read(1000, 950, 100) == 50);
  CHECK(clamp_read(1000, 999, 4096) == 1);
  CHECK(clamp_read(1000, 1000, 10) == 0);
  CHECK(clamp_read(1000, 5000, 10) == 0);
  CHECK(clamp_read(0, 0, 10) == 0);
}

TEST_CASE("writes never grow the export") {
  CHECK(plan_write(1000, 0, 100).length == 100);
  CHECK(plan_write(1000, 0, 100).error == 0);
  auto crossing = plan_write(1000, 990, 100);
  CHECK(crossing.length == 10);
  CHECK(crossing.error == 0);
  CHECK(plan_write(1000, 1000, 1).error == ENOSPC);
  CHECK(plan_write(1000, 4096, 512).error == ENOSPC);
  CHECK(plan_write(1000, 1000, 0).error == 0);
}

TEST_CASE("the file ends at the export's last whole minimum block") {
  CHECK(bridge::reachable_size(10000, 4096) == 8192);
  CHECK(bridge::reachable_size(8192, 4096) == 8192);
  CHECK(bridge::reachable_size(10000, 1) == 10000);
  CHECK(bridge::reachable_size(10000, 0) == 10000);  // no minimum advertised
  CHECK(bridge::reachable_size(4095, 4096) == 0);
}

TEST_CASE("requests split into chunks no larger than the limit, covering every byte once") {
  auto chunks_of = [](std::size_t length, std::size_t limit) {
    std::vector<std::pair<std::size_t, std::size_t>> chunks;
    nbd_client::for_each_chunk(length, limit, [&](std::size_t done, std::size_t chunk) {
      chunks.emplace_back(done, chunk);
      return true;
    });
    return chunks;
  };
  CHECK(chunks_of(4096, 65536) == std::vector<std::pair<std::size_t, std::size_t>>{{0, 4096}});
  CHECK(chunks_of(1 << 20, 256 << 10).size() == 4);
  auto uneven = chunks_of(1000, 300);
  REQUIRE(uneven.size() == 4);
  CHECK(uneven[3] == std::pair<std::size_t, std::size_t>{900, 100});
  CHECK(chunks_of(0, 512).empty());
  std::size_t visited = 0;
  bool completed = nbd_client::for_each_chunk(1000, 100, [&](std::size_t, std::size_t) { return ++visited < 3; });
  CHECK_FALSE(completed);
  CHECK(visited == 3);
}

TEST_CASE("buffer pool reuses buffers of a size class") {
  bridge::BufferPool pool;
  std::byte* first;
  {
    auto lease = pool.acquire(3000);
    CHECK(lease.capacity() == 4096);
    first = lease.data();
  }
  auto again = pool.acquire(4096);
  CHECK(again.data() == first);
  auto bigger = pool.acquire(4097);
  CHECK(bigger.capacity() == 8192);
  CHECK(bridge::BufferPool::class_of(1 << 20) == 8);
}

TEST_CASE("buffer pool carves large buffers from huge-page-sized chunks") {
  bridge::BufferPool pool;
  auto first = pool.acquire(1 << 20);
  auto second = pool.acquire(1 << 20);
  // Two 1 MiB buffers share one 2 MiB chunk, aligned so THP can back it whole.
  CHECK(reinterpret_cast<std::uintptr_t>(first.data()) % bridge::BufferPool::huge_page == 0);
  CHECK(second.data() == first.data() + (1 << 20));
  auto third = pool.acquire(1 << 20);
  CHECK(reinterpret_cast<std::uintptr_t>(third.data()) % bridge::BufferPool::huge_page == 0);
  std::byte* second_data = second.data();
  second.reset();
  CHECK(pool.acquire(1 << 20).data() == second_data);  // kept, not freed
  auto larger = pool.acquire(3 << 20);  // 4 MiB class: a chunk of its own
  CHECK(larger.capacity() == (4u << 20));
  CHECK(reinterpret_cast<std::uintptr_t>(larger.data()) % bridge::BufferPool::huge_page == 0);
  std::memset(larger.data(), 1, larger.capacity());
}

TEST_CASE("buffer pool gives every free buffer's memory back when idle, and stays usable") {
  bridge::BufferPool pool;
  std::vector<bridge::BufferPool::Lease> leases;
  for (std::size_t i = 0; i < 8; ++i) {
    leases.push_back(pool.acquire(1 << 20));
    std::memset(leases.back().data(), 5, 1 << 20);
    leases.push_back(pool.acquire(4096));
  }
  leases.clear();
  CHECK(pool.resident_free_bytes() == 8u << 20);
  pool.release_idle();
  CHECK(pool.resident_free_bytes() == 0);
  auto reused = pool.acquire(1 << 20);
  CHECK(reused.data()[0] == std::byte{0});  // a released one, zero-filled by the kernel
  std::memset(reused.data(), 9, 1 << 20);
  auto small = pool.acquire(4096);
  std::memset(small.data(), 9, 4096);
}

TEST_CASE("buffer pool keeps the memory of a bounded number of free large buffers") {
  bridge::BufferPool pool;
  constexpr std::size_t count = 40;
  std::vector<bridge::BufferPool::Lease> leases;
  for (std::size_t i = 0; i < count; ++i) {
    leases.push_back(pool.acquire(1 << 20));
    std::memset(leases.back().data(), int(i), 1 << 20);
  }
  std::byte* last = leases.back().data();
  leases.clear();  // returns them in order: the first 16 MiB stay resident
  CHECK(pool.resident_free_bytes() == bridge::BufferPool::kept_resident_bytes);
  auto again = pool.acquire(1 << 20);
  CHECK(again.data() != last);  // a resident one comes first, not a released one
  // A released buffer is still usable memory (zero-filled by the kernel).
  std::vector<bridge::BufferPool::Lease> all;
  for (std::size_t i = 0; i < count; ++i) all.push_back(pool.acquire(1 << 20));
  bool found_last = false;
  for (auto& lease : all) {
    if (lease.data() != last) continue;
    found_last = true;
    CHECK(lease.data()[0] == std::byte{0});
    std::memset(lease.data(), 7, 1 << 20);
  }
  CHECK(found_last);
}
