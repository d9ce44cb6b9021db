// The latency histogram's accuracy and the statistics' counters and JSON rendering.
#include "bridge/latency_histogram.hpp"
#include "bridge/statistics.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

using bridge::LatencyHistogram;
using bridge::Operation;
using bridge::Statistics;

namespace {

// The nearest-rank percentile of the exact samples, which the histogram approximates.
std::uint64_t exact_percentile(std::vector<std::uint64_t> samples, double p) {
  std::sort(samples.begin(), samples.end());
  auto parts_per_million = std::uint64_t(std::llround(p * 10000.0));
  auto rank = (parts_per_million * samples.size() + 999999) / 1000000;
  rank = std::clamp<std::uint64_t>(rank, 1, samples.size());
  return samples[rank - 1];
}

double relative_error(std::uint64_t measured, std::uint64_t exact) {
  return std::abs(double(measured) - double(exact)) / double(exact);
}

// Just enough of a JSON parser to tell well-formed from not: values, nesting, strings, numbers.
struct JsonChecker {
  std::string_view text;
  std::size_t at = 0;

  void skip_space() {
    while (at < text.size() && (text[at] == ' ' || text[at] == '\n' || text[at] == '\t' || text[at] == '\r')) ++at;
  }
  bool literal(std::string_view word) {
    if (text.substr(at, word.size()) != word) return false;
    at += word.size();
    return true;
  }
  bool string() {
    if (at >= text.size() || text[at] != '"') return false;
    for (++at; at < text.size(); ++at) {
      if (text[at] == '\\') {
        ++at;
      } else if (text[at] == '"') {
        ++at;
        return true;
      } else if (static_cast<unsigned char>(text[at]) < 0x20) {
        return false;
      }
    }
    return false;
  }
  bool number() {
    std::size_t start = at;
    if (at < text.size() && text[at] == '-') ++at;
    std::size_t digits = at;
    while (at < text.size() && std::isdigit(static_cast<unsigned char>(text[at]))) ++at;
    if (at == digits) return false;
    if (text[digits] == '0' && at - digits > 1) return false;  // no leading zeros in JSON
    if (at < text.size() && text[at] == '.') {
      std::size_t fraction = ++at;
      while (at < text.size() && std::isdigit(static_cast<unsigned char>(text[at]))) ++at;
      if (at == fraction) return false;
    }
    return at > start;
  }
  bool value() {
    skip_space();
    if (at >= text.size()) return false;
    char first = text[at];
    if (first == '{') {
      ++at;
      skip_space();
      if (literal("}")) return true;
      for (;;) {
        skip_space();
        if (!string()) return false;
        skip_space();
        if (!literal(":") || !value()) return false;
        skip_space();
        if (literal("}")) return true;
        if (!literal(",")) return false;
      }
    }
    if (first == '[') {
      ++at;
      skip_space();
      if (literal("]")) return true;
      for (;;) {
        if (!value()) return false;
        skip_space();
        if (literal("]")) return true;
        if (!literal(",")) return false;
      }
    }
    if (first == '"') return string();
    if (literal("true") || literal("false") || literal("null")) return true;
    return number();
  }
  bool document() {
    if (!value()) return false;
    skip_space();
    return at == text.size();
  }
};

bool valid_json(std::string_view text) { return JsonChecker{text}.document(); }

// The number that follows the first occurrence of key at or after from.
double number_after(const std::string& json, std::string_view key, std::size_t from = 0) {
  auto at = json.find(key, from);
  REQUIRE(at != std::string::npos);
  return std::stod(json.substr(at + key.size()));
}

}  // namespace

TEST_CASE("an empty histogram answers zero") {
  LatencyHistogram histogram;
  CHECK(histogram.count() == 0);
  CHECK(histogram.max() == 0);
  CHECK(histogram.min() == 0);
  CHECK(histogram.mean() == 0.0);
  CHECK(histogram.percentile(50) == 0);
  CHECK(histogram.percentile(100) == 0);
}

TEST_CASE("bucket bounds tile the range without gaps and each value falls inside its bucket") {
  for (std::size_t index = 0; index + 1 < LatencyHistogram::bucket_count; ++index)
    REQUIRE(LatencyHistogram::bucket_upper(index) == LatencyHistogram::bucket_lower(index + 1));
  for (std::uint64_t value : {0ull, 7ull, 8ull, 999ull, 1000ull, 2047ull, 2048ull, 123456789ull, 1'800'000'000'000ull}) {
    auto index = LatencyHistogram::bucket_index(value);
    CHECK(LatencyHistogram::bucket_lower(index) <= value);
    CHECK(value < LatencyHistogram::bucket_upper(index));
  }
  // From 1 µs up, no bucket is wider than 1% of the values it holds.
  for (std::size_t index = LatencyHistogram::bucket_index(1000); index < LatencyHistogram::bucket_count; ++index) {
    double width = double(LatencyHistogram::bucket_upper(index) - LatencyHistogram::bucket_lower(index));
    REQUIRE(width / double(std::max<std::uint64_t>(LatencyHistogram::bucket_lower(index), 1000)) < 0.01);
  }
}

TEST_CASE("out-of-range values land in the first and last buckets and keep exact extremes") {
  LatencyHistogram histogram;
  histogram.record(0);
  histogram.record(3);
  histogram.record(UINT64_MAX / 4);
  CHECK(histogram.bucket(0) == 2);
  CHECK(histogram.bucket(LatencyHistogram::bucket_count - 1) == 1);
  CHECK(histogram.min() == 0);
  CHECK(histogram.max() == UINT64_MAX / 4);
  CHECK(histogram.percentile(100) == UINT64_MAX / 4);
}

TEST_CASE("percentiles stay within 1% across 1 µs .. 60 s") {
  // Log-uniform covers every decade equally, so each scale of bucket gets tested.
  std::mt19937_64 generator(42);
  std::vector<std::uint64_t> samples;
  LatencyHistogram histogram;
  for (int sample = 0; sample < 200000; ++sample) {
    double exponent = 3.0 + 7.778 * double(generator() >> 11) * 0x1.0p-53;  // 10^3 .. 6·10^10 ns
    auto value = std::uint64_t(std::pow(10.0, exponent));
    samples.push_back(value);
    histogram.record(value);
  }
  for (double p : {0.1, 1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0, 99.9, 99.99}) {
    INFO("p = " << p);
    CHECK(relative_error(histogram.percentile(p), exact_percentile(samples, p)) < 0.01);
  }
  CHECK(histogram.max() == *std::max_element(samples.begin(), samples.end()));
  CHECK(histogram.min() == *std::min_element(samples.begin(), samples.end()));
  CHECK(histogram.count() == samples.size());
}

TEST_CASE("p99.9 of 1000 samples is the 999th, not the largest") {
  LatencyHistogram histogram;
  for (int i = 0; i < 999; ++i) histogram.record(100);
  histogram.record(100000);
  CHECK(histogram.percentile(99.9) == 100);
  CHECK(histogram.percentile(99.95) == 100000);
  CHECK(histogram.percentile(100) == 100000);
}

TEST_CASE("a uniform set of values gives the expected percentiles and mean") {
  LatencyHistogram histogram;
  std::vector<std::uint64_t> samples;
  for (std::uint64_t microseconds = 1; microseconds <= 10000; ++microseconds) {
    samples.push_back(microseconds * 1000);
    histogram.record(microseconds * 1000);
  }
  for (double p : {1.0, 50.0, 90.0, 99.0, 99.9}) {
    INFO("p = " << p);
    CHECK(relative_error(histogram.percentile(p), exact_percentile(samples, p)) < 0.01);
  }
  CHECK(histogram.mean() == doctest::Approx(5000.5 * 1000));
  CHECK(histogram.max() == 10'000'000);
  CHECK(histogram.percentile(0) == 1000);
}

TEST_CASE("single values far apart are each reported within 1%") {
  for (std::uint64_t value : {1000ull, 1500ull, 77'777ull, 5'000'000ull, 60'000'000'000ull, 1'700'000'000'000ull}) {
    LatencyHistogram histogram;
    histogram.record(value);
    histogram.record(value);
    INFO("value = " << value);
    CHECK(histogram.percentile(50) == value);  // clamped to the exact extremes
    if (value * 3 >= LatencyHistogram::saturation_nanoseconds) continue;  // beyond ~36 min: last bucket
    LatencyHistogram spread;
    spread.record(value);
    spread.record(value * 2);
    spread.record(value * 3);
    CHECK(relative_error(spread.percentile(50), value * 2) < 0.01);
  }
}

TEST_CASE("merge adds counts and keeps extremes; reset empties") {
  LatencyHistogram first, second;
  for (std::uint64_t value = 1000; value < 2000; ++value) first.record(value);
  for (std::uint64_t value = 5000; value < 6000; ++value) second.record(value);
  first.merge(second);
  CHECK(first.count() == 2000);
  CHECK(first.min() == 1000);
  CHECK(first.max() == 5999);
  CHECK(first.mean() == doctest::Approx(3499.5));
  first.reset();
  CHECK(first.count() == 0);
  CHECK(first.max() == 0);
  CHECK(first.percentile(50) == 0);
}

TEST_CASE("statistics count operations, bytes, errors and in-flight peaks") {
  Statistics statistics(2);
  for (int request = 0; request < 3; ++request) statistics.request_started(Operation::read);
  statistics.request_started(Operation::write);
  CHECK(statistics.in_flight() == 4);
  CHECK(statistics.operation(Operation::read).in_flight == 3);

  statistics.request_finished(Operation::read, 4096, false, 100'000);
  statistics.request_finished(Operation::read, 4096, false, 200'000);
  statistics.request_finished(Operation::read, 0, true, 300'000);
  statistics.request_finished(Operation::write, 65536, false, 1'000'000);
  statistics.command_finished(Operation::read, 0, 80'000, false);
  statistics.command_finished(Operation::read, 1, 90'000, true);
  statistics.command_finished(Operation::write, 7, 900'000, false);  // outside the table: latency only

  const auto& read = statistics.operation(Operation::read);
  CHECK(read.count == 3);
  CHECK(read.bytes == 8192);
  CHECK(read.errors == 1);
  CHECK(read.in_flight == 0);
  CHECK(read.in_flight_peak == 3);
  CHECK(read.fuse_latency.count() == 3);
  CHECK(read.nbd_latency.count() == 2);
  CHECK(statistics.operation(Operation::write).nbd_latency.count() == 1);
  CHECK(statistics.in_flight() == 0);
  CHECK(statistics.in_flight_peak() == 4);
  CHECK(statistics.connections()[0].commands == 1);
  CHECK(statistics.connections()[1].commands == 1);
  CHECK(statistics.connections()[1].errors == 1);

  statistics.connection_lost(1);
  statistics.connection_restored(1, 2'000'000'000);
  statistics.injected_delay(5'000'000);
  statistics.injected_delay(3'000'000);
  statistics.injected_error();
  CHECK(statistics.disconnects() == 1);
  CHECK(statistics.reconnects() == 1);
  CHECK(statistics.connections()[1].outage_nanoseconds == 2'000'000'000);
  CHECK(statistics.injected_delays() == 2);
  CHECK(statistics.injected_delay_nanoseconds() == 8'000'000);
  CHECK(statistics.injected_errors() == 1);
  statistics.spliced_read(true);
  statistics.spliced_read(true);
  statistics.spliced_read(false);
  CHECK(statistics.spliced_reads() == 2);
  CHECK(statistics.splice_fallbacks() == 1);
  CHECK(statistics.to_json().find("\"spliced_reads\":{\"piped\":2,\"fallbacks\":1}") != std::string::npos);
  statistics.spliced_write(false);
  statistics.spliced_write(true);
  CHECK(statistics.spliced_writes() == 2);
  CHECK(statistics.retired_write_buffers() == 1);
  CHECK(statistics.to_json().find("\"spliced_writes\":{\"by_reference\":2,\"retired\":1}") != std::string::npos);

  // A stray finish must not wrap the gauges around.
  statistics.request_finished(Operation::flush, 0, false, 1000);
  CHECK(statistics.in_flight() == 0);
  CHECK(statistics.operation(Operation::flush).in_flight == 0);

  statistics.set_connections(4);
  CHECK(statistics.connections().size() == 4);
  CHECK(statistics.connections()[1].commands == 1);

  // The pool's block-status connection is the last; its role survives a reset.
  statistics.set_connections(3);
  statistics.set_connection_role(2, "block_status");
  statistics.reset();
  CHECK(std::string(statistics.connections()[0].role) == "data");
  CHECK(std::string(statistics.connections()[2].role) == "block_status");
  std::string json = statistics.to_json();
  CHECK(json.find("{\"index\":0,\"role\":\"data\"") != std::string::npos);
  CHECK(json.find("{\"index\":2,\"role\":\"block_status\"") != std::string::npos);
}

TEST_CASE("reset zeroes everything but what is in flight now") {
  Statistics statistics;
  for (int request = 0; request < 5; ++request) statistics.request_started(Operation::write);
  for (int request = 0; request < 3; ++request) statistics.request_finished(Operation::write, 512, false, 10'000);
  statistics.connection_lost(0);
  statistics.injected_error();
  statistics.spliced_read(false);
  statistics.spliced_write(true);
  statistics.answered_early(false);
  statistics.answered_early(false);
  statistics.answered_early(true);
  statistics.reset();

  CHECK(statistics.answered_running() == 1);  // a gauge, like in_flight
  const auto& write = statistics.operation(Operation::write);
  CHECK(write.count == 0);
  CHECK(write.bytes == 0);
  CHECK(write.fuse_latency.count() == 0);
  CHECK(write.in_flight == 2);
  CHECK(write.in_flight_peak == 2);
  CHECK(statistics.in_flight() == 2);
  CHECK(statistics.in_flight_peak() == 2);
  CHECK(statistics.disconnects() == 0);
  CHECK(statistics.connections()[0].disconnects == 0);
  CHECK(statistics.injected_errors() == 0);
  CHECK(statistics.splice_fallbacks() == 0);
  CHECK(statistics.spliced_writes() == 0);
  CHECK(statistics.retired_write_buffers() == 0);

  statistics.request_finished(Operation::write, 512, false, 10'000);
  statistics.request_finished(Operation::write, 512, false, 10'000);
  CHECK(statistics.in_flight() == 0);
}

TEST_CASE("the JSON is well formed and carries counts, percentiles and histograms") {
  CHECK(valid_json("{\"a\":[1,2.5,{\"b\":\"c\"}],\"d\":-0.1}"));
  CHECK_FALSE(valid_json("{\"a\":1,}"));
  CHECK_FALSE(valid_json("{\"a\":nan}"));

  Statistics empty;
  std::string empty_json = empty.to_json();
  CHECK(valid_json(empty_json));
  CHECK(empty_json.find("\"fuse\":[]") != std::string::npos);

  Statistics statistics(2);
  for (std::uint64_t microseconds = 1; microseconds <= 1000; ++microseconds) {
    statistics.request_started(Operation::read);
    statistics.request_finished(Operation::read, 4096, false, microseconds * 1000);
    statistics.command_finished(Operation::read, microseconds % 2, microseconds * 900, false);
  }
  statistics.request_started(Operation::write);
  statistics.injected_delay(1'500'000);
  std::string json = statistics.to_json();
  INFO(json.substr(0, 1500));
  CHECK(valid_json(json));
  for (std::string_view key : {"\"version\":1", "\"uptime_seconds\":", "\"operations\":{\"read\":{\"count\":1000,",
                               "\"bytes\":4096000", "\"max\":1000.0,\"mean\":500.5,\"count\":1000}",
                               "\"trim_zero\":{\"count\":0",
                               "\"block_status\":", "\"in_flight\":{\"now\":1,\"peak\":1,\"answered_running\":0}",
                               "\"connections\":[{\"index\":0,\"role\":\"data\",\"commands\":500,",
                               "{\"index\":1,\"role\":\"data\",\"commands\":500,",
                               "\"disconnects\":0,\"reconnects\":0",
                               "\"injected\":{\"delays\":1,\"delay_total_us\":1500.0,\"errors\":0}",
                               "\"histograms\":{\"read\":{\"fuse\":[[", "\"write\":{\"fuse\":[],\"nbd\":[]}"}) {
    INFO(key);
    CHECK(json.find(key) != std::string::npos);
  }
  auto fuse = json.find("\"fuse_latency_us\":");
  CHECK(number_after(json, "\"p50\":", fuse) == doctest::Approx(500).epsilon(0.01));
  CHECK(number_after(json, "\"p90\":", fuse) == doctest::Approx(900).epsilon(0.01));
  CHECK(number_after(json, "\"p99\":", fuse) == doctest::Approx(990).epsilon(0.01));
  CHECK(number_after(json, "\"p99.9\":", fuse) == doctest::Approx(999).epsilon(0.01));
  auto nbd = json.find("\"nbd_latency_us\":");
  CHECK(number_after(json, "\"p50\":", nbd) == doctest::Approx(450).epsilon(0.01));
  CHECK(number_after(json, "\"max\":", nbd) == doctest::Approx(900));

  // The histogram's counts add up to the operation's count.
  auto start = json.find("\"histograms\":{\"read\":{\"fuse\":[");
  auto end = json.find("]]", start);
  std::uint64_t total = 0;
  for (auto at = json.find('[', start + 30); at < end; at = json.find('[', at + 1)) {
    auto comma = json.find(',', at);
    total += std::stoull(json.substr(comma + 1));
  }
  CHECK(total == 1000);
}

TEST_CASE("the summary line names the busy operations and the gauges") {
  Statistics statistics;
  for (int request = 0; request < 100; ++request) {
    statistics.request_started(Operation::read);
    statistics.request_finished(Operation::read, 1 << 20, false, 85'000);
  }
  statistics.request_started(Operation::flush);
  statistics.request_finished(Operation::flush, 0, true, 2'500'000);
  std::string line = statistics.summary_line();
  INFO(line);
  CHECK(line.find("read 100 ops 100.0 MiB p50 85us p99 85us") == 0);
  CHECK(line.find("| write 0 ops 0.0 MiB") != std::string::npos);
  CHECK(line.find("| flush 1 ops 1 errors p50 2.5ms") != std::string::npos);
  CHECK(line.find("trim_zero") == std::string::npos);
  CHECK(line.find("| in-flight 0 (peak 1) | reconnects 0") != std::string::npos);
  CHECK(line.find('\n') == std::string::npos);
}
