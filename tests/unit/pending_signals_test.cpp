// Unit tests for bridge/pending_signals.hpp: which pending signals end a FUSE wait.
#include <doctest/doctest.h>

#include <string>

#include "bridge/pending_signals.hpp"

namespace {

std::string status(const char* thread_pending, const char* shared_pending, const char* blocked,
                   const char* caught) {
  return std::string("Name:\tcp\nState:\tS (sleeping)\nSigQ:\t1/95000\nSigPnd:\t") + thread_pending +
         "\nShdPnd:\t" + shared_pending + "\nSigBlk:\t" + blocked + "\nSigIgn:\t0000000000000000\nSigCgt:\t" +
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

TEST_CASE("stop signals, a freezer and signals left at their default do not end the wait") {
  // SIGTSTP (20) is bit 19, SIGSTOP (19) bit 18, SIGCHLD (17) bit 16.
  CHECK(bridge::signal_ends_wait(status("0000000000080000", "0000000000000000", "0000000000000000",
                                        "0000000000010000")) == false);
  CHECK(bridge::signal_ends_wait(status("0000000000000000", "0000000000040000", "0000000000000000",
                                        "0000000000000000")) == false);
  CHECK(bridge::signal_ends_wait(status("0000000000000000", "0000000000000000", "0000000000000000",
                                        "0000000000010000")) == false);
}

TEST_CASE("a status without the signal fields is not understood") {
  CHECK_FALSE(bridge::signal_ends_wait("Name:\tcp\nState:\tS (sleeping)\n").has_value());
  CHECK_FALSE(bridge::signal_ends_wait(status("zz", "0", "0", "0")).has_value());
  // A field name that only starts like one is not taken for it.
  CHECK_FALSE(bridge::signal_ends_wait("SigPndX:\t1\nShdPnd:\t0\nSigBlk:\t0\nSigCgt:\t0\n").has_value());
}
