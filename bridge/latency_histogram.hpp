// A fixed-size latency histogram with bounded relative error (under 0.4% from 1 µs to ~36 min).
// Plain value type, no locks, no heap: owned and used by one thread (the loop); record() is O(1)
// and allocation-free so it can sit on the per-request path. Copy it to hand a snapshot elsewhere.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace bridge {

// Layout, in units of 8 ns (finer than anything a FUSE or NBD round trip can resolve):
//  - units [0, 256) — everything below 2048 ns — get one bucket each (8 ns wide), so values below
//    1 µs share a linear first region instead of needing buckets of their own;
//  - above that, each power of two [2^m, 2^(m+1)) is split into 128 equal buckets, so a bucket is
//    never wider than 1/128 of its lower bound and its midpoint is within 1/256 of any member.
// The exponent comes from std::bit_width: no floating point on the recording path.
class LatencyHistogram {
 public:
  static constexpr unsigned unit_shift = 3;  // 8 ns
  static constexpr unsigned sub_bucket_bits = 7;
  static constexpr std::uint64_t sub_bucket_count = std::uint64_t(1) << sub_bucket_bits;  // 128
  static constexpr std::uint64_t linear_units = 2 * sub_bucket_count;                    // 256
  static constexpr unsigned highest_magnitude = 37;  // units 2^37..2^38: up to ~36.6 minutes
  static constexpr std::size_t bucket_count =
      linear_units + (highest_magnitude - (sub_bucket_bits + 1) + 1) * sub_bucket_count;  // 4096
  // The first value that lands in the last bucket no matter how large it is.
  static constexpr std::uint64_t saturation_nanoseconds = (std::uint64_t(1) << (highest_magnitude + 1)) << unit_shift;

  static constexpr std::size_t bucket_index(std::uint64_t nanoseconds) {
    std::uint64_t units = nanoseconds >> unit_shift;
    if (units < linear_units) return std::size_t(units);
    unsigned magnitude = unsigned(std::bit_width(units)) - 1;
    if (magnitude > highest_magnitude) return bucket_count - 1;
    std::uint64_t sub_bucket = (units >> (magnitude - sub_bucket_bits)) - sub_bucket_count;
    return std::size_t(linear_units + (magnitude - (sub_bucket_bits + 1)) * sub_bucket_count + sub_bucket);
  }

  // [lower, upper) of a bucket in nanoseconds; the last bucket also holds everything above.
  static constexpr std::uint64_t bucket_lower(std::size_t index) {
    if (index < linear_units) return std::uint64_t(index) << unit_shift;
    std::uint64_t above_linear = index - linear_units;
    unsigned magnitude = unsigned(above_linear / sub_bucket_count) + sub_bucket_bits + 1;
    std::uint64_t sub_bucket = above_linear % sub_bucket_count;
    return ((sub_bucket_count + sub_bucket) << (magnitude - sub_bucket_bits)) << unit_shift;
  }
  static constexpr std::uint64_t bucket_upper(std::size_t index) {
    return index + 1 < bucket_count ? bucket_lower(index + 1) : saturation_nanoseconds;
  }

  void record(std::uint64_t nanoseconds) {
    ++buckets_[bucket_index(nanoseconds)];
    ++count_;
    sum_ += nanoseconds;
    minimum_ = std::min(minimum_, nanoseconds);
    maximum_ = std::max(maximum_, nanoseconds);
  }

  std::uint64_t count() const { return count_; }
  std::uint64_t bucket(std::size_t index) const { return buckets_[index]; }
  // Exact, not bucketed; 0 when empty.
  std::uint64_t max() const { return maximum_; }
  std::uint64_t min() const { return count_ ? minimum_ : 0; }
  double mean() const { return count_ ? double(sum_) / double(count_) : 0.0; }

  // The value at or below which p percent of the samples lie (nearest rank), as the midpoint of
  // its bucket — clamped to the exact min and max, so percentile(0) and percentile(100) are exact.
  std::uint64_t percentile(double p) const {
    if (count_ == 0) return 0;
    if (!(p > 0)) return minimum_;  // also catches NaN
    if (p >= 100) return maximum_;
    // The rank in integers: 99.9 / 100.0 * 1000 is 999.0000000000001 in floating point,
    // whose ceiling took the maximum for p99.9 of 1000 samples.
    const auto parts_per_million = static_cast<unsigned __int128>(p * 10000.0 + 0.5);
    auto rank = std::uint64_t((parts_per_million * count_ + 999999) / 1000000);
    rank = std::clamp<std::uint64_t>(rank, 1, count_);
    std::uint64_t seen = 0;
    for (std::size_t index = 0; index < bucket_count; ++index) {
      seen += buckets_[index];
      if (seen >= rank) {
        std::uint64_t lower = bucket_lower(index);
        std::uint64_t middle = lower + (bucket_upper(index) - lower) / 2;
        return std::clamp(middle, minimum_, maximum_);
      }
    }
    return maximum_;
  }

  void reset() { *this = LatencyHistogram(); }

  void merge(const LatencyHistogram& other) {
    for (std::size_t index = 0; index < bucket_count; ++index) buckets_[index] += other.buckets_[index];
    count_ += other.count_;
    sum_ += other.sum_;
    minimum_ = std::min(minimum_, other.minimum_);
    maximum_ = std::max(maximum_, other.maximum_);
  }

 private:
  std::array<std::uint64_t, bucket_count> buckets_{};
  std::uint64_t count_ = 0;
  std::uint64_t sum_ = 0;  // 2^64 ns is ~584 years of summed latency
  std::uint64_t minimum_ = std::numeric_limits<std::uint64_t>::max();
  std::uint64_t maximum_ = 0;
};

static_assert(LatencyHistogram::bucket_count == 4096);
static_assert(LatencyHistogram::bucket_index(LatencyHistogram::saturation_nanoseconds - 1) ==
              LatencyHistogram::bucket_count - 1);
static_assert(LatencyHistogram::bucket_lower(LatencyHistogram::bucket_index(1'000'000)) <= 1'000'000);
static_assert(LatencyHistogram::bucket_upper(LatencyHistogram::bucket_index(1'000'000)) > 1'000'000);

}  // namespace bridge
