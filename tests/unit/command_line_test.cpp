// Target and option parsing.
#include "tools/cli_options.hpp"

#include <doctest/doctest.h>

#include <algorithm>

namespace {

// As main() does it.
std::string parse(std::vector<std::string> args, tools::Options& options, nbd_client::Target& target) {
  CLI::App app{"nbdbridge"};
  tools::setup(app, options);
  if (std::string problem = tools::parse_command_line(app, std::move(args), options); !problem.empty())
    return problem;
  return tools::build_target(options, target);
}

}  // namespace

TEST_CASE("a URI target") {
  tools::Options options;
  nbd_client::Target target;
  CHECK(parse({"mnt", "nbd+unix:///?socket=/tmp/s"}, options, target) == "");
  CHECK(target.kind == nbd_client::Target::Kind::uri);
  CHECK(target.uri == "nbd+unix:///?socket=/tmp/s");
  CHECK(options.mountpoint == "mnt");
}

TEST_CASE("a bracketed server command, options on either side") {
  tools::Options options;
  nbd_client::Target target;
  CHECK(parse({"-r", "mnt", "[", "nbdkit", "memory", "1G", "]", "-v"}, options, target) == "");
  CHECK(target.kind == nbd_client::Target::Kind::command);
  CHECK(target.command == std::vector<std::string>{"nbdkit", "memory", "1G"});
  CHECK(options.readonly);
  CHECK(options.verbose);
}

TEST_CASE("--unix, --tcp and --fd") {
  {
    tools::Options options;
    nbd_client::Target target;
    CHECK(parse({"mnt", "--unix", "/run/s"}, options, target) == "");
    CHECK(target.kind == nbd_client::Target::Kind::unix_socket);
    CHECK(target.unix_path == "/run/s");
  }
  {
    tools::Options options;
    nbd_client::Target target;
    CHECK(parse({"mnt", "--tcp", "127.0.0.1", "10809"}, options, target) == "");
    CHECK(target.kind == nbd_client::Target::Kind::tcp);
    CHECK(target.host == "127.0.0.1");
    CHECK(target.port == "10809");
  }
  {
    tools::Options options;
    nbd_client::Target target;
    CHECK(parse({"mnt", "--fd", "5", "-e", "disk"}, options, target) == "");
    CHECK(target.kind == nbd_client::Target::Kind::socket_fd);
    CHECK(target.fd == 5);
    CHECK(target.export_name == "disk");
  }
}

TEST_CASE("bad command lines get one reason") {
  tools::Options options;
  nbd_client::Target target;
  CHECK(parse({"mnt"}, options, target).find("no TARGET") != std::string::npos);
  tools::Options two;
  CHECK(parse({"mnt", "nbd://h/", "--unix", "/s"}, two, target).find("only one") != std::string::npos);
  tools::Options not_uri;
  CHECK(parse({"mnt", "localhost"}, not_uri, target).find("not an NBD URI") != std::string::npos);
  tools::Options unbalanced;
  CHECK(parse({"mnt", "[", "nbdkit", "memory"}, unbalanced, target).find("matching") != std::string::npos);
  tools::Options empty;
  CHECK(parse({"mnt", "[", "]"}, empty, target).find("empty") != std::string::npos);
  tools::Options bad_cache;
  CHECK_FALSE(parse({"mnt", "nbd://h/", "--cache", "weird"}, bad_cache, target).empty());
}

TEST_CASE("-o takes one word, leaving MOUNTPOINT and TARGET positional") {
  tools::Options options;
  nbd_client::Target target;
  CHECK(parse({"-o", "allow_other", "-o", "ro,noatime", "mnt", "nbd://h/"}, options, target) == "");
  CHECK(options.mountpoint == "mnt");
  CHECK(target.uri == "nbd://h/");
  CHECK(tools::split_mount_options(options.mount_options) == std::vector<std::string>{"allow_other", "ro", "noatime"});
}

TEST_CASE("--list takes a TARGET and no MOUNTPOINT") {
  tools::Options options;
  nbd_client::Target target;
  CHECK(parse({"--list", "nbd://h/"}, options, target) == "");
  CHECK(target.uri == "nbd://h/");
  tools::Options both;
  CHECK(parse({"--list", "mnt", "nbd://h/"}, both, target).find("no MOUNTPOINT") != std::string::npos);
}

TEST_CASE("mount options split at commas; allow_other needs fuse.conf for non-root") {
  auto split = tools::split_mount_options({"allow_other,ro", "noatime"});
  CHECK(split == std::vector<std::string>{"allow_other", "ro", "noatime"});
  CHECK(tools::check_allow_other(split, true, "").empty());
  CHECK_FALSE(tools::check_allow_other(split, false, "#user_allow_other\n").empty());
  CHECK(tools::check_allow_other(split, false, "  user_allow_other  \n").empty());
  CHECK(tools::check_allow_other({"ro"}, false, "").empty());
}

TEST_CASE("-C: a number or auto, which follows the CPU count") {
  CHECK(tools::resolve_connections("auto", 2) == 1);
  CHECK(tools::resolve_connections("auto", 8) == 4);
  CHECK(tools::resolve_connections("3", 2) == 3);
  CHECK(tools::resolve_connections("0", 2) == 0);
  CHECK(tools::resolve_connections("65", 2) == 0);
  CHECK(tools::resolve_connections("x", 2) == 0);
}

TEST_CASE("options that contradict each other, and durations out of range") {
  auto problem = [](std::vector<std::string> args) {
    tools::Options options;
    nbd_client::Target target;
    return parse(std::move(args), options, target);
  };
  CHECK(problem({"--list", "--daemon", "nbd://h"}).find("--daemon does not apply to --list") == 0);
  CHECK(problem({"--list", "-o", "allow_other", "nbd://h"}).find("does not apply to --list") != std::string::npos);
  CHECK(problem({"--list", "--connect-timeout", "3", "nbd://h"}) == "");
  // Options --list would ignore are said, not ignored.
  CHECK(problem({"--list", "-v", "nbd://h"}).find("--verbose does not apply to --list") == 0);
  CHECK(problem({"--list", "--tcp-congestion", "cubic", "nbd://h"}).find("does not apply to --list") !=
        std::string::npos);
  CHECK(problem({"--seed", "3", "m", "nbd://h"}) == "--seed applies only with --inject-delay or --inject-error");
  CHECK(problem({"--seed", "3", "--inject-error", "1%", "m", "nbd://h"}) == "");
  CHECK(problem({"--seed", "18446744073709551615", "--inject-error", "1%", "m", "nbd://h"}) == "");
  // CLI11 alone took -1 and anything too large for the largest seed, and 010 for 8.
  for (const char* seed : {"-1", "18446744073709551616", "010", "0x10", "+3", " 3"})
    CHECK(problem({"--seed", seed, "--inject-error", "1%", "m", "nbd://h"}).find("--seed") != std::string::npos);
  CHECK(problem({"--spliced-writes", "on", "--socket-batching", "off", "m", "nbd://h"}) ==
        "--spliced-writes on needs --socket-batching on");
  CHECK(problem({"--socket-batching", "off", "m", "nbd://h"}) == "");  // the defaults give way
  CHECK(problem({"--spliced-reads", "off", "--socket-batching", "off", "m", "nbd://h"}) == "");
  CHECK(problem({"--read-ahead", "off", "m", "nbd://h"}) == "");
  CHECK(problem({"--read-ahead", "on", "--cache=page", "m", "nbd://h"}).find("--cache=none only") !=
        std::string::npos);
  CHECK(problem({"--read-ahead", "sometimes", "m", "nbd://h"}) != "");
  CHECK(problem({"--stats-interval", "0.0005", "m", "nbd://h"}).find("0.001 to 1e9") != std::string::npos);
  CHECK(problem({"--retry-timeout", "2e9", "m", "nbd://h"}).find("0.001 to 1e9") != std::string::npos);
  CHECK(problem({"--retry-timeout", "inf", "m", "nbd://h"}) != "");
  CHECK(problem({"--request-timeout", "5s", "m", "nbd://h"}).find("number of seconds") != std::string::npos);
  CHECK(problem({"--connect-timeout", "0", "m", "nbd://h"}) != "");
  // --wait-for-server: a duration, 0 for off; not where there is no server to wait for.
  CHECK(problem({"--wait-for-server", "0", "m", "nbd://h"}) == "");
  CHECK(problem({"--wait-for-server", "0.5", "m", "--unix", "s"}) == "");
  CHECK(problem({"--wait-for-server", "-1", "m", "nbd://h"}).find("0.001 to 1e9") != std::string::npos);
  CHECK(problem({"--wait-for-server", "1e10", "m", "nbd://h"}).find("0.001 to 1e9") != std::string::npos);
  CHECK(problem({"--wait-for-server", "3s", "m", "nbd://h"}).find("number of seconds") != std::string::npos);
  CHECK(problem({"--wait-for-server", "3", "m", "--fd", "4"}).find("--wait-for-server does not apply to --fd") == 0);
  CHECK(problem({"--wait-for-server", "3", "m", "[", "nbdkit", "memory", "1G", "]"})
            .find("--wait-for-server does not apply to [ CMD ]") == 0);
  CHECK(problem({"--list", "--wait-for-server", "3", "nbd://h"}) == "");
  CHECK(problem({"--retry-timeout", "0", "--shutdown-timeout", "0.25", "m", "nbd://h"}) == "");
  CHECK(problem({"--tcp-keepalive", "1", "m", "nbd://h"}).find("2 to 86400") != std::string::npos);
  CHECK(problem({"--tcp-keepalive", "0", "m", "nbd://h"}) == "");
  CHECK(problem({"--tcp-keepalive", "2", "m", "nbd://h"}) == "");
  // Whole numbers: a fraction is refused, not truncated.
  CHECK(problem({"--tcp-keepalive", "2.9", "m", "nbd://h"}).find("expected a whole number of seconds: 0 or 2 to 86400") != std::string::npos);
  CHECK(problem({"--busy-poll", "0.5", "m", "nbd://h"}).find("expected a whole number of microseconds: 0 to 10000") != std::string::npos);
  CHECK(problem({"--busy-poll", "10001", "m", "nbd://h"}).find("0 to 10000") != std::string::npos);
  CHECK(problem({"--busy-poll", "0", "m", "nbd://h"}) == "");
  // -o ro is --readonly; rw against it is a contradiction.
  CHECK(problem({"-o", "ro,rw", "m", "nbd://h"}) == "-o ro and -o rw contradict each other");
  CHECK(problem({"-r", "-o", "rw", "m", "nbd://h"}) == "-o rw contradicts --readonly");
  CHECK(problem({"-o", "rw", "m", "nbd://h"}) == "");
  {
    tools::Options options;
    nbd_client::Target target;
    CHECK(parse({"-o", "allow_other,ro", "m", "nbd://h"}, options, target) == "");
    CHECK(options.readonly);
  }
  // -o max_read: a plain number, which libfuse and the kernel read alike.
  CHECK(problem({"-o", "ro,max_read=65536", "m", "nbd://h"}) == "");
  CHECK(problem({"-o", "max_read=+4096", "m", "nbd://h"}) ==
        "-o max_read=+4096: expected a whole number of bytes (at most 4294967295)");
  CHECK(problem({"-o", "max_read=0x1000", "m", "nbd://h"}) != "");
  CHECK(problem({"-o", "max_read=010", "m", "nbd://h"}) != "");  // octal to the kernel
  CHECK(problem({"-o", "max_read=0", "m", "nbd://h"}) == "");
  CHECK(problem({"-o", "max_read=", "m", "nbd://h"}) != "");
  CHECK(problem({"-o", "max_read=4294967296", "m", "nbd://h"}) != "");
}

TEST_CASE("an unmatched bracket is said as such, before CLI11 would call it an unexpected argument") {
  auto problem = [](std::vector<std::string> args) {
    tools::Options options;
    nbd_client::Target target;
    return parse(std::move(args), options, target);
  };
  CHECK(problem({"m", "[", "nbdkit", "memory", "1G"}) == "'[' without a matching ']' around the server command");
  CHECK(problem({"m", "[", "nbdkit", "memory", "1G", "nbd://h"}) ==
        "'[' without a matching ']' around the server command");
  CHECK(problem({"m", "]", "nbd://h"}) == "']' without a matching '['");
  CHECK(problem({"m", "[", "a", "]", "[", "b", "]"}) == "only one [ CMD ... ] server command is allowed");
  // A server command's own --help is its own: the bracket problems are still said.
  CHECK(problem({"m", "[", "nbdkit", "--help", "]", "[", "b", "]"}) ==
        "only one [ CMD ... ] server command is allowed");
  CHECK(problem({"m", "[", "nbdkit", "--help"}) == "'[' without a matching ']' around the server command");
}

TEST_CASE("--help is help, unmatched bracket or not") {
  tools::Options options;
  CLI::App app{"nbdbridge"};
  tools::setup(app, options);
  CHECK_THROWS_AS(tools::parse_command_line(app, {"--help", "]"}, options), CLI::CallForHelp);
}
