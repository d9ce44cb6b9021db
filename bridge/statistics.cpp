// Recording and rendering of the bridge's statistics. Loop thread only; the recording half
// never allocates, the rendering half (to_json, summary_line) builds fresh strings each call.
#include "bridge/statistics.hpp"

#include <algorithm>
#include <charconv>
#include <cstdio>

namespace bridge {

namespace {

constexpr std::array<std::string_view, operation_kinds> operation_names = {
    "read", "write", "flush", "trim_zero", "block_status"};

void append_unsigned(std::string& out, std::uint64_t value) {
  char digits[24];
  auto end = std::to_chars(digits, digits + sizeof digits, value).ptr;
  out.append(digits, end);
}

// Fixed-point, never exponent notation, never NaN or infinity: JSON has no spelling for those.
void append_fixed(std::string& out, double value, int decimals) {
  if (!(value == value) || value > 1e18 || value < -1e18) value = 0;
  char text[48];
  int length = std::snprintf(text, sizeof text, "%.*f", decimals, value);
  if (length > 0) out.append(text, std::size_t(length));
}

void append_microseconds(std::string& out, double nanoseconds) { append_fixed(out, nanoseconds / 1000.0, 1); }

// One JSON object or array being written into a string: it writes the separators and keys,
// and closes itself when it goes out of scope (a temporary, at the end of its statement).
// A nested value is written through member() or element(), which return the string.
class JsonScope {
 public:
  JsonScope(std::string& out, char open) : out_(out), close_(open == '{' ? '}' : ']') { out_ += open; }
  ~JsonScope() { out_ += close_; }
  JsonScope(const JsonScope&) = delete;
  JsonScope& operator=(const JsonScope&) = delete;

  std::string& member(std::string_view key) {
    element();
    out_ += '"';
    out_ += key;
    out_ += "\":";
    return out_;
  }
  std::string& element() {
    if (!first_) out_ += ',';
    first_ = false;
    return out_;
  }
  JsonScope& number(std::string_view key, std::uint64_t value) {
    append_unsigned(member(key), value);
    return *this;
  }
  JsonScope& fixed(std::string_view key, double value, int decimals) {
    append_fixed(member(key), value, decimals);
    return *this;
  }
  JsonScope& microseconds(std::string_view key, double nanoseconds) {
    append_microseconds(member(key), nanoseconds);
    return *this;
  }
  JsonScope& text(std::string_view key, std::string_view value) {  // value: no quotes or escapes in it
    auto& out = member(key);
    out += '"';
    out += value;
    out += '"';
    return *this;
  }

 private:
  std::string& out_;
  char close_;
  bool first_ = true;
};

void append_latency(std::string& out, const LatencyHistogram& histogram) {
  JsonScope(out, '{')
      .microseconds("p50", double(histogram.percentile(50)))
      .microseconds("p90", double(histogram.percentile(90)))
      .microseconds("p99", double(histogram.percentile(99)))
      .microseconds("p99.9", double(histogram.percentile(99.9)))
      .microseconds("max", double(histogram.max()))
      .microseconds("mean", histogram.mean())
      .number("count", histogram.count());
}

// [[upper bound in microseconds, count], ...] for the buckets that hold anything.
void append_buckets(std::string& out, const LatencyHistogram& histogram) {
  JsonScope buckets(out, '[');
  for (std::size_t index = 0; index < LatencyHistogram::bucket_count; ++index) {
    std::uint64_t count = histogram.bucket(index);
    if (count == 0) continue;
    JsonScope bucket(buckets.element(), '[');
    append_fixed(bucket.element(), double(LatencyHistogram::bucket_upper(index)) / 1000.0, 3);
    append_unsigned(bucket.element(), count);
  }
}

double seconds_since(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// "85us", "12.3ms", "1.20s": short enough for a status line, precise enough to compare.
void append_duration(std::string& out, std::uint64_t nanoseconds) {
  if (nanoseconds < 1'000'000) {
    append_unsigned(out, (nanoseconds + 500) / 1000);
    out += "us";
  } else if (nanoseconds < 1'000'000'000) {
    append_fixed(out, double(nanoseconds) / 1e6, 1);
    out += "ms";
  } else {
    append_fixed(out, double(nanoseconds) / 1e9, 2);
    out += 's';
  }
}

void append_bytes(std::string& out, std::uint64_t bytes) {
  constexpr double mebibyte = 1024.0 * 1024.0;
  if (bytes >= std::uint64_t(10) * 1024 * 1024 * 1024) {
    append_fixed(out, double(bytes) / (mebibyte * 1024.0), 1);
    out += " GiB";
  } else {
    append_fixed(out, double(bytes) / mebibyte, 1);
    out += " MiB";
  }
}

}  // namespace

std::string_view operation_name(Operation operation) {
  auto index = std::size_t(operation);
  return index < operation_kinds ? operation_names[index] : std::string_view("unknown");
}

Statistics::Statistics(std::size_t connections) : connections_(connections) {}

void Statistics::set_connections(std::size_t connections) { connections_.resize(connections); }

void Statistics::set_connection_role(std::size_t index, const char* role) {
  if (index < connections_.size()) connections_[index].role = role;
}

void Statistics::request_started(Operation operation) {
  auto& kind = counters(operation);
  ++kind.in_flight;
  kind.in_flight_peak = std::max(kind.in_flight_peak, kind.in_flight);
  ++in_flight_;
  in_flight_peak_ = std::max(in_flight_peak_, in_flight_);
}

void Statistics::request_finished(Operation operation, std::uint64_t bytes, bool failed,
                                  std::uint64_t fuse_nanoseconds) {
  auto& kind = counters(operation);
  // A finish without a start (e.g. a caller that only reports) must not wrap the gauges.
  if (kind.in_flight > 0) --kind.in_flight;
  if (in_flight_ > 0) --in_flight_;
  ++kind.count;
  kind.bytes += bytes;
  if (failed) ++kind.errors;
  kind.fuse_latency.record(fuse_nanoseconds);
}

void Statistics::command_finished(Operation operation, std::size_t connection, std::uint64_t nbd_nanoseconds,
                                  bool failed) {
  counters(operation).nbd_latency.record(nbd_nanoseconds);
  if (connection >= connections_.size()) return;
  auto& link = connections_[connection];
  ++link.commands;
  if (failed) ++link.errors;
}

void Statistics::connection_lost(std::size_t connection) {
  ++disconnects_;
  if (connection < connections_.size()) ++connections_[connection].disconnects;
}

void Statistics::connection_restored(std::size_t connection, std::uint64_t outage_nanoseconds) {
  ++reconnects_;
  if (connection >= connections_.size()) return;
  ++connections_[connection].reconnects;
  connections_[connection].outage_nanoseconds += outage_nanoseconds;
}

void Statistics::injected_delay(std::uint64_t nanoseconds) {
  ++injected_delays_;
  injected_delay_nanoseconds_ += nanoseconds;
}

void Statistics::injected_error() { ++injected_errors_; }

void Statistics::read_ahead_fetched(std::uint64_t bytes, bool failed) {
  ++read_ahead_windows_;
  if (failed) ++read_ahead_failed_windows_;
  else read_ahead_fetched_bytes_ += bytes;
}

void Statistics::spliced_read(bool whole) { ++(whole ? spliced_reads_ : splice_fallbacks_); }

void Statistics::spliced_write(bool retired) {
  ++spliced_writes_;
  if (retired) ++retired_write_buffers_;
}

void Statistics::reset() {
  for (auto& kind : operations_) {
    std::uint64_t still_in_flight = kind.in_flight;
    kind = OperationCounters{};
    kind.in_flight = still_in_flight;
    kind.in_flight_peak = still_in_flight;
  }
  for (auto& link : connections_) link = ConnectionCounters{.role = link.role};
  in_flight_peak_ = in_flight_;
  disconnects_ = reconnects_ = 0;
  injected_delays_ = injected_delay_nanoseconds_ = injected_errors_ = 0;
  spliced_reads_ = splice_fallbacks_ = 0;
  spliced_writes_ = retired_write_buffers_ = 0;
  read_ahead_windows_ = read_ahead_failed_windows_ = read_ahead_fetched_bytes_ = 0;
  read_ahead_reads_ = read_ahead_served_bytes_ = 0;
  last_reset_ = Clock::now();
}

std::string Statistics::to_json() const {
  std::string out;
  out.reserve(4096);
  {
    JsonScope top(out, '{');
    top.number("version", 1)
        .fixed("uptime_seconds", seconds_since(started_), 3)
        .fixed("interval_seconds", seconds_since(last_reset_), 3);
    {
      JsonScope operations(top.member("operations"), '{');
      for (std::size_t index = 0; index < operation_kinds; ++index) {
        const auto& kind = operations_[index];
        JsonScope counters(operations.member(operation_names[index]), '{');
        counters.number("count", kind.count)
            .number("bytes", kind.bytes)
            .number("errors", kind.errors)
            .number("in_flight", kind.in_flight)
            .number("in_flight_peak", kind.in_flight_peak);
        append_latency(counters.member("fuse_latency_us"), kind.fuse_latency);
        append_latency(counters.member("nbd_latency_us"), kind.nbd_latency);
      }
    }
    JsonScope(top.member("in_flight"), '{')
        .number("now", in_flight_)
        .number("peak", in_flight_peak_)
        .number("answered_running", answered_running_);
    {
      JsonScope connections(top.member("connections"), '[');
      for (std::size_t index = 0; index < connections_.size(); ++index) {
        const auto& link = connections_[index];
        JsonScope(connections.element(), '{')
            .number("index", index)
            .text("role", link.role)
            .number("commands", link.commands)
            .number("errors", link.errors)
            .number("disconnects", link.disconnects)
            .number("reconnects", link.reconnects)
            .microseconds("outage_us", double(link.outage_nanoseconds));
      }
    }
    top.number("disconnects", disconnects_).number("reconnects", reconnects_);
    JsonScope(top.member("injected"), '{')
        .number("delays", injected_delays_)
        .microseconds("delay_total_us", double(injected_delay_nanoseconds_))
        .number("errors", injected_errors_);
    JsonScope(top.member("spliced_reads"), '{').number("piped", spliced_reads_).number("fallbacks", splice_fallbacks_);
    JsonScope(top.member("spliced_writes"), '{')
        .number("by_reference", spliced_writes_)
        .number("retired", retired_write_buffers_);
    JsonScope(top.member("read_ahead"), '{')
        .number("windows", read_ahead_windows_)
        .number("failed_windows", read_ahead_failed_windows_)
        .number("bytes_fetched", read_ahead_fetched_bytes_)
        .number("reads_answered", read_ahead_reads_)
        .number("bytes_answered", read_ahead_served_bytes_);
    JsonScope histograms(top.member("histograms"), '{');
    for (std::size_t index = 0; index < operation_kinds; ++index) {
      const auto& kind = operations_[index];
      JsonScope of_kind(histograms.member(operation_names[index]), '{');
      append_buckets(of_kind.member("fuse"), kind.fuse_latency);
      append_buckets(of_kind.member("nbd"), kind.nbd_latency);
    }
  }
  return out;
}

std::string Statistics::summary_line() const {
  std::string out;
  for (std::size_t index = 0; index < operation_kinds; ++index) {
    const auto& kind = operations_[index];
    // Reads and writes always show, so consecutive lines line up; the rest only once they occur.
    bool always_shown = index == std::size_t(Operation::read) || index == std::size_t(Operation::write);
    if (!always_shown && kind.count == 0 && kind.in_flight == 0) continue;
    if (!out.empty()) out += " | ";
    out += operation_names[index];
    out += ' ';
    append_unsigned(out, kind.count);
    out += " ops ";
    if (index == std::size_t(Operation::read) || index == std::size_t(Operation::write)) {
      append_bytes(out, kind.bytes);
      out += ' ';
    }
    if (kind.errors) {
      append_unsigned(out, kind.errors);
      out += " errors ";
    }
    out += "p50 ";
    append_duration(out, kind.fuse_latency.percentile(50));
    out += " p99 ";
    append_duration(out, kind.fuse_latency.percentile(99));
  }
  out += " | in-flight ";
  append_unsigned(out, in_flight_);
  out += " (peak ";
  append_unsigned(out, in_flight_peak_);
  out += ") | reconnects ";
  append_unsigned(out, reconnects_);
  if (injected_delays_ || injected_errors_) {
    out += " | injected ";
    append_unsigned(out, injected_delays_);
    out += " delays ";
    append_unsigned(out, injected_errors_);
    out += " errors";
  }
  return out;
}

}  // namespace bridge
