// Unit tests for bridge/pending_signals.hpp: which pending signals end a FUSE wait.
#include <doctest/doctest.h>

#include <string>

#include "bridge/pending_signals.hpp"

namespace {

std::string status(const char* thread_pending, const char* shared_pending, const char* blocked,
                   const char* caught, const char* ignored = "0000000000000000") {
  return std::string("Name:\tcp\nState:\tS (sleeping)\nSigQ:\t1/95000\nSigPnd:\t") + thread_pending +
         "\nShdPnd:\t" + shared_pending + "\nSigBlk:\t" + blocked + "\nSigIgn:\t" + ignored + "\nSigCgt:\t" +
         caught + "\nCapInh:\t0000000000000000\n";
}

}  // namespace

TEST_CASE("a pending SIGKILL ends the wait, whatever is caught or blocked") {
  CHECK(bridge::signal_ends_wait(status("0000000000000100", "0000000000000000", "0000000000000000",
                                        "0000000000000000")) == true);
  CHECK(bridge::signal_ends_wait(status("0000000000000000", "0000000000000100", "fffffffffffffeff",
                                        "0000000000000000")) == true);
}

TEST_CASE("a caught, unblocked signal ends the wait; a blocked one does not") {
  // SIGUSR1 (10) is bit 9.
  CHECK(bridge::signal_ends_wait(status("0000000000000200", "0000000000000000", "0000000000000000",
                                        "0000000000000200")) == true);
  CHECK(bridge::signal_ends_wait(status("0000000000000000", "0000000000000200", "0000000000000000",
                                        "0000000000000200")) == true);
  CHECK(bridge::signal_ends_wait(status("0000000000000200", "0000000000000000", "0000000000000200",
                                        "0000000000000200")) == false);
}

TEST_CASE("stop signals, a freezer (nothing pending) and SIGCHLD do not end the wait") {
  // SIGTSTP (20) is bit 19, SIGSTOP (19) bit 18, SIGCHLD (17) bit 16.
  CHECK(bridge::signal_ends_wait(status("0000000000080000", "0000000000000000", "0000000000000000",
                                        "0000000000010000")) == false);
  CHECK(bridge::signal_ends_wait(status("0000000000000000", "0000000000040000", "0000000000000000",
                                        "0000000000000000")) == false);
  CHECK(bridge::signal_ends_wait(status("0000000000000000", "0000000000000000", "0000000000000000",
                                        "0000000000010000")) == false);
}

TEST_CASE("a signal left at a default that ends the process ends the wait, also behind a stop") {
  // Ctrl-Z then Ctrl-C: SIGTSTP (bit 19) and SIGINT (bit 1) pending, neither caught; the
  // kernel did not turn SIGINT into SIGKILL, since a signal was pending already.
  CHECK(bridge::signal_ends_wait(status("0000000000080000", "0000000000000002", "0000000000000000",
                                        "0000000000000000")) == true);
  // Ctrl-\ (SIGQUIT, bit 2), which dumps core: never turned into SIGKILL.
  CHECK(bridge::signal_ends_wait(status("0000000000000000", "0000000000000004", "0000000000000000",
                                        "0000000000000000")) == true);
  // SIGINT ignored (a background job of a script), SIGWINCH (bit 27) at its default: not.
  CHECK(bridge::signal_ends_wait(status("0000000000000000", "0000000000000002", "0000000000000000",
                                        "0000000000000000", "0000000000000002")) == false);
  CHECK(bridge::signal_ends_wait(status("0000000000000000", "0000000008000000", "0000000000000000",
                                        "0000000000000000")) == false);
}

TEST_CASE("a status without the signal fields is not understood") {
  CHECK_FALSE(bridge::signal_ends_wait("Name:\tcp\nState:\tS (sleeping)\n").has_value());
  CHECK_FALSE(bridge::signal_ends_wait(status("zz", "0", "0", "0")).has_value());
  // A field name that only starts like one is not taken for it.
  CHECK_FALSE(bridge::signal_ends_wait("SigPndX:\t1\nShdPnd:\t0\nSigBlk:\t0\nSigCgt:\t0\n").has_value());
}
