// Injected delays and errors for testing: parsing of --inject-delay / --inject-error and a
// seeded, reproducible source of per-request faults. A FaultInjector belongs to one thread (the
// loop); drawing a fault is O(1) and allocation-free. Parsing runs once, at start-up.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <string_view>

namespace bridge {

enum class DelayDistribution {
  uniform,      // mean ± jitter, evenly
  normal,       // mean, standard deviation = jitter, negative draws become 0
  exponential,  // mean only; jitter is ignored
  constant,     // mean exactly
};

struct DelaySpec {
  std::chrono::nanoseconds mean{0};
  std::chrono::nanoseconds jitter{0};
  DelayDistribution distribution = DelayDistribution::uniform;
};

struct ErrorSpec {
  double rate = 0;        // probability per request, in [0, 1]
  int error_number = 0;   // a positive errno; EIO unless given
};

// "MEAN[:JITTER][:DIST]", e.g. "2ms", "1.5ms:500us", "2ms:1ms:normal", "5ms:exponential".
// Durations take ns, us, ms or s; a bare number is milliseconds. Returns "" on success, else a
// one-line message for the command line. Uniform jitter may not exceed the mean (it would have
// to be clipped, which moves the mean).
std::string parse_delay_spec(std::string_view text, DelaySpec& spec);

// "RATE[:ERRNO]", e.g. "0.01", "1%", "0.5%:ENOSPC", "0.1:28". Same return convention.
std::string parse_error_spec(std::string_view text, ErrorSpec& spec);

// A duration in the units above ("1.5ms" and "1500us" are equal), exposed for other options.
std::string parse_duration(std::string_view text, std::chrono::nanoseconds& duration);

// errno names the parser knows, both ways; numbers the table lacks print as themselves.
std::optional<int> errno_from_name(std::string_view name);
std::string errno_name(int error_number);

// For the start-up banner: "delay 2ms ± 1ms (normal)", "error EIO at 1%".
std::string describe(const DelaySpec& spec);
std::string describe(const ErrorSpec& spec);

class FaultInjector {
 public:
  // Delays and errors are drawn from two generators derived from the seed, so how often one
  // is asked never changes the sequence of the other. Same seed, same sequences, on any
  // standard library: the distributions are computed here, not with <random>'s, whose
  // algorithms are left to each implementation.
  FaultInjector(std::optional<DelaySpec> delay, std::optional<ErrorSpec> error, std::uint64_t seed);

  // Zero when no delay is configured.
  std::chrono::nanoseconds next_delay();
  // 0, or the errno to fail this request with.
  int next_error();

  bool enabled() const { return delay_.has_value() || error_.has_value(); }
  bool delays() const { return delay_.has_value(); }
  bool errors() const { return error_.has_value(); }

 private:
  std::optional<DelaySpec> delay_;
  std::optional<ErrorSpec> error_;
  std::mt19937_64 delay_generator_;
  std::mt19937_64 error_generator_;
};

}  // namespace bridge
