// Parsing of the fault-injection options and the draws of delays and errors. Parsing runs once
// at start-up; draws run on the loop thread, per request, without allocating.
#include "bridge/fault_injection.hpp"

#include "bridge/errno_map.hpp"

#include <array>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <numbers>

namespace bridge {

namespace {

struct ErrnoName {
  std::string_view name;
  int number;
};

// The errors a disk can plausibly return, and the ones the connection code produces.
constexpr std::array<ErrnoName, 23> errno_names = {{
    {"EIO", EIO},           {"ENOSPC", ENOSPC},       {"EPERM", EPERM},         {"EINVAL", EINVAL},
    {"ENOMEM", ENOMEM},     {"EROFS", EROFS},         {"ETIMEDOUT", ETIMEDOUT}, {"EACCES", EACCES},
    {"EAGAIN", EAGAIN},     {"EBUSY", EBUSY},         {"EDQUOT", EDQUOT},       {"EFBIG", EFBIG},
    {"EOVERFLOW", EOVERFLOW}, {"ENOTSUP", ENOTSUP},   {"ENXIO", ENXIO},         {"ENODEV", ENODEV},
    {"ESHUTDOWN", ESHUTDOWN}, {"ENOTCONN", ENOTCONN}, {"ECONNRESET", ECONNRESET}, {"EPIPE", EPIPE},
    {"EINTR", EINTR},       {"EFAULT", EFAULT},
    {"EOPNOTSUPP", EOPNOTSUPP},  // ENOTSUP's value on Linux; after it, so the number is named ENOTSUP
}};

constexpr std::array<std::pair<std::string_view, DelayDistribution>, 4> distribution_names = {{
    {"uniform", DelayDistribution::uniform},
    {"normal", DelayDistribution::normal},
    {"exponential", DelayDistribution::exponential},
    {"constant", DelayDistribution::constant},
}};

constexpr double longest_duration_nanoseconds = 1e18;  // ~31 years: beyond it, int64 ns overflows soon

bool equal_ignoring_case(std::string_view left, std::string_view right) {
  if (left.size() != right.size()) return false;
  for (std::size_t index = 0; index < left.size(); ++index) {
    auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? char(c - 'A' + 'a') : c; };
    if (lower(left[index]) != lower(right[index])) return false;
  }
  return true;
}

// A plain non-negative decimal; from_chars alone would also take "-1", "inf" and "nan".
bool parse_number(std::string_view text, double& value, std::string_view& rest) {
  if (text.empty() || !((text[0] >= '0' && text[0] <= '9') || text[0] == '.')) return false;
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc() || !std::isfinite(value)) return false;
  rest = text.substr(std::size_t(end - text.data()));
  return true;
}

// "EPERM, EIO, ..." in errno_names' order: the errors to_application_errno() keeps.
std::string passed_through_names() {
  std::string names;
  for (auto& known : errno_names)
    if (to_application_errno(known.number) == known.number)
      names += (names.empty() ? "" : ", ") + std::string(known.name);
  return names;
}

std::optional<DelayDistribution> distribution_from_name(std::string_view name) {
  for (auto& [known, distribution] : distribution_names)
    if (equal_ignoring_case(name, known)) return distribution;
  return std::nullopt;
}

std::string_view distribution_name(DelayDistribution distribution) {
  for (auto& [known, value] : distribution_names)
    if (value == distribution) return known;
  return "unknown";
}

std::string format_duration(std::chrono::nanoseconds duration) {
  char text[48];
  auto nanoseconds = double(duration.count());
  if (duration.count() != 0 && duration.count() < 1000)
    std::snprintf(text, sizeof text, "%.0fns", nanoseconds);
  else if (duration.count() < 1'000'000)
    std::snprintf(text, sizeof text, "%gus", nanoseconds / 1e3);
  else if (duration.count() < 1'000'000'000)
    std::snprintf(text, sizeof text, "%gms", nanoseconds / 1e6);
  else
    std::snprintf(text, sizeof text, "%gs", nanoseconds / 1e9);
  return text;
}

// Seeds for the two generators: splitmix64 spreads nearby user seeds (0, 1, 2...) far apart.
std::uint64_t mix_seed(std::uint64_t value) {
  value += 0x9e3779b97f4a7c15ull;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ull;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebull;
  return value ^ (value >> 31);
}

// mt19937_64's output is fixed by the standard; taking its top 53 bits gives every double in
// [0, 1) on the 2^-53 grid with equal weight.
double next_unit(std::mt19937_64& generator) { return double(generator() >> 11) * 0x1.0p-53; }

std::chrono::nanoseconds round_to_nanoseconds(double value) {
  if (!(value > 0)) return std::chrono::nanoseconds(0);
  if (value > longest_duration_nanoseconds) value = longest_duration_nanoseconds;
  return std::chrono::nanoseconds(std::int64_t(value + 0.5));
}

}  // namespace

std::string parse_duration(std::string_view text, std::chrono::nanoseconds& duration) {
  double value = 0;
  std::string_view unit;
  if (!parse_number(text, value, unit))
    return "invalid duration '" + std::string(text) + "' (expected e.g. 2ms, 500us, 1.5ms, 0.002s)";
  double nanoseconds_per_unit;
  if (unit.empty() || unit == "ms")
    nanoseconds_per_unit = 1e6;  // milliseconds are what delays are usually thought of in
  else if (unit == "us" || unit == "\u00b5s")
    nanoseconds_per_unit = 1e3;
  else if (unit == "ns")
    nanoseconds_per_unit = 1;
  else if (unit == "s")
    nanoseconds_per_unit = 1e9;
  else
    return "invalid duration '" + std::string(text) + "': unit must be ns, us, ms or s";
  double nanoseconds = value * nanoseconds_per_unit;
  if (nanoseconds > longest_duration_nanoseconds) return "duration '" + std::string(text) + "' is too long";
  duration = round_to_nanoseconds(nanoseconds);
  return {};
}

std::string parse_delay_spec(std::string_view text, DelaySpec& spec) {
  std::array<std::string_view, 3> fields;
  std::size_t field_count = 0;
  for (std::string_view rest = text;;) {
    if (field_count == fields.size())
      return "--inject-delay: invalid delay '" + std::string(text) + "' (expected MEAN[:JITTER][:DISTRIBUTION])";
    auto colon = rest.find(':');
    fields[field_count++] = rest.substr(0, colon);
    if (colon == std::string_view::npos) break;
    rest = rest.substr(colon + 1);
  }

  for (std::size_t index = 0; index < field_count; ++index)
    if (fields[index].empty())
      return "--inject-delay: invalid delay '" + std::string(text) + "' (expected MEAN[:JITTER][:DISTRIBUTION])";

  DelaySpec parsed;
  if (auto error = parse_duration(fields[0], parsed.mean); !error.empty()) return "--inject-delay: " + error;
  std::string_view jitter_text, distribution_text;
  if (field_count == 2) {
    // MEAN:DIST reads more naturally than MEAN::DIST, so a lone second field may be either.
    if (distribution_from_name(fields[1]))
      distribution_text = fields[1];
    else
      jitter_text = fields[1];
  } else if (field_count == 3) {
    jitter_text = fields[1];
    distribution_text = fields[2];
  }
  if (!jitter_text.empty()) {
    if (auto error = parse_duration(jitter_text, parsed.jitter); !error.empty()) return "--inject-delay: " + error;
  }
  if (!distribution_text.empty()) {
    auto distribution = distribution_from_name(distribution_text);
    if (!distribution)
      return "--inject-delay: unknown distribution '" + std::string(distribution_text) +
             "' (expected uniform, normal, exponential or constant)";
    parsed.distribution = *distribution;
  }
  if ((parsed.distribution == DelayDistribution::exponential || parsed.distribution == DelayDistribution::constant) &&
      parsed.jitter.count() > 0)
    return "--inject-delay: " + std::string(distribution_name(parsed.distribution)) +
           " delays take no jitter (MEAN:" + std::string(distribution_name(parsed.distribution)) + ")";
  if (parsed.distribution == DelayDistribution::uniform && parsed.jitter > parsed.mean)
    return "--inject-delay: uniform jitter " + format_duration(parsed.jitter) + " exceeds the mean " +
           format_duration(parsed.mean) + " (use normal to allow clipping at zero)";
  spec = parsed;
  return {};
}

std::string parse_error_spec(std::string_view text, ErrorSpec& spec) {
  auto colon = text.find(':');
  std::string_view rate_text = text.substr(0, colon);
  ErrorSpec parsed;
  parsed.error_number = EIO;

  double rate = 0;
  std::string_view rest;
  if (!parse_number(rate_text, rate, rest) || !(rest.empty() || rest == "%"))
    return "--inject-error: invalid rate '" + std::string(rate_text) + "' (expected e.g. 0.01 or 1%)";
  if (rest == "%") {
    if (rate > 100) return "--inject-error: rate " + std::string(rate_text) + " is above 100%";
    rate /= 100;
  } else if (rate > 1) {
    return "--inject-error: rate " + std::string(rate_text) + " is above 1 (write a percentage as " +
           std::string(rate_text) + "%)";
  }
  parsed.rate = rate;

  if (colon != std::string_view::npos) {
    std::string_view errno_text = text.substr(colon + 1);
    int number = 0;
    auto [end, error] = std::from_chars(errno_text.data(), errno_text.data() + errno_text.size(), number);
    if (!errno_text.empty() && error == std::errc() && end == errno_text.data() + errno_text.size()) {
      if (number <= 0 || number >= 4096) return "--inject-error: errno " + std::string(errno_text) + " is out of range";
      parsed.error_number = number;
    } else if (auto known = errno_from_name(errno_text)) {
      parsed.error_number = *known;
    } else {
      return "--inject-error: unknown errno '" + std::string(errno_text) + "' (expected a name such as EIO or a number)";
    }
    // The injected error stands for the server's or the connection's, so the
    // application would see it as it sees theirs: one that would arrive as EIO is
    // refused rather than quietly turned into EIO.
    if (to_application_errno(parsed.error_number) != parsed.error_number)
      return "--inject-error: " + errno_name(parsed.error_number) +
             " would reach the application as EIO; only " + passed_through_names() + " pass through";
  }
  spec = parsed;
  return {};
}

std::optional<int> errno_from_name(std::string_view name) {
  for (auto& known : errno_names)
    if (equal_ignoring_case(name, known.name)) return known.number;
  return std::nullopt;
}

std::string errno_name(int error_number) {
  for (auto& known : errno_names)
    if (known.number == error_number) return std::string(known.name);
  return std::to_string(error_number);
}

std::string describe(const DelaySpec& spec) {
  std::string text = "delay " + format_duration(spec.mean);
  switch (spec.distribution) {
    case DelayDistribution::constant:
    case DelayDistribution::exponential:
      break;
    case DelayDistribution::uniform:
    case DelayDistribution::normal:
      if (spec.jitter.count()) text += " \u00b1 " + format_duration(spec.jitter);
      break;
  }
  return text + " (" + std::string(distribution_name(spec.distribution)) + ")";
}

std::string describe(const ErrorSpec& spec) {
  char rate[32];
  std::snprintf(rate, sizeof rate, "%g%%", spec.rate * 100);
  return "error " + errno_name(spec.error_number) + " at " + rate;
}

FaultInjector::FaultInjector(std::optional<DelaySpec> delay, std::optional<ErrorSpec> error, std::uint64_t seed)
    : delay_(delay), error_(error), delay_generator_(mix_seed(seed)), error_generator_(mix_seed(~seed)) {}

std::chrono::nanoseconds FaultInjector::next_delay() {
  if (!delay_) return std::chrono::nanoseconds(0);
  auto mean = double(delay_->mean.count());
  auto jitter = double(delay_->jitter.count());
  switch (delay_->distribution) {
    case DelayDistribution::constant:
      return delay_->mean;
    case DelayDistribution::uniform:
      return round_to_nanoseconds(mean + jitter * (2 * next_unit(delay_generator_) - 1));
    case DelayDistribution::normal: {
      // Box–Muller; one of the pair is dropped so that each delay costs the same two draws.
      double nonzero = 1 - next_unit(delay_generator_);  // (0, 1]: log stays finite
      double angle = 2 * std::numbers::pi * next_unit(delay_generator_);
      double standard = std::sqrt(-2 * std::log(nonzero)) * std::cos(angle);
      return round_to_nanoseconds(mean + jitter * standard);
    }
    case DelayDistribution::exponential:
      return round_to_nanoseconds(-mean * std::log(1 - next_unit(delay_generator_)));  // inverse CDF
  }
  return delay_->mean;
}

int FaultInjector::next_error() {
  if (!error_) return 0;
  // Always draw, even at rate 0 or 1, so the sequence depends only on the number of requests.
  double draw = next_unit(error_generator_);
  return draw < error_->rate ? error_->error_number : 0;
}

}  // namespace bridge
