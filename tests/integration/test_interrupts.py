#!/usr/bin/env python3
"""Signals reach a process waiting on a stalled server.

What is expected (README, "What the file promises"):
  * A read() or lseek(SEEK_DATA/SEEK_HOLE) the server has not answered 1 s after a
    signal ends: kill -9 ends the process (before, it stayed in D state until the
    server answered), and a caught signal makes the call fail with EINTR. A read the
    server answers within that second completes as usual.
  * The command the server still holds runs on and its answer is dropped; reads after
    it get the right bytes (also the spliced path of 1 MiB reads).
  * A write is not interrupted: it completes, since the server may still apply it.
  * A stop (Ctrl-Z) is not a signal that ends the call: the read completes.

The servers are nbdkit's file plugin behind its log filter (to see a request arrive)
and its delay filter (to hold it). Every child has a deadline.
"""
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

MiB = 1 << 20
SIZE = 16 * MiB

# argv: PATH OP OFFSET LENGTH [catch]. Prints "ready", then the outcome of one call:
# "OK <length> <first 32 bytes in hex>" (read), "OK <length>" (write), "OK <offset>"
# (seek), or "ERR <errno name>". With "catch", SIGUSR1 has a handler that does nothing,
# and reads and writes are libc's, called once: Python's own would retry after EINTR.
CHILD = r"""
import ctypes, errno, os, signal, sys
path, op, offset, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
catch = len(sys.argv) > 5
if catch:
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
libc = ctypes.CDLL(None, use_errno=True)
libc.pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
libc.pwrite.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_long]
fd = os.open(path, os.O_RDWR)
print("ready", flush=True)
try:
    if op == "read":
        buffer = ctypes.create_string_buffer(length)
        done = libc.pread(fd, buffer, length, offset)
        if done < 0:
            raise OSError(ctypes.get_errno(), "pread")
        print("OK", done, buffer.raw[:done].hex()[:64], flush=True)
    elif op == "write":
        done = libc.pwrite(fd, bytes([0x5a]) * length, length, offset)
        if done < 0:
            raise OSError(ctypes.get_errno(), "pwrite")
        print("OK", done, flush=True)
    elif op == "seek":
        print("OK", os.lseek(fd, offset, os.SEEK_DATA), flush=True)
except OSError as e:
    print("ERR", errno.errorcode.get(e.errno, str(e.errno)), flush=True)
"""

GRACE = 1.0  # seconds a read may go unanswered after a signal before it gets EINTR


def image():
    path = os.path.join(h.tmpdir("img"), "disk.img")
    h.fill_random_file(path, SIZE)
    return path


def pending_in_log(logfile, what, offset):
    try:
        with open(logfile) as f:
            return any((" %s id=" % what) in ln and "offset=0x%x" % offset in ln for ln in f)
    except OSError:
        return False


def start_child(path, op, offset, length, catch=False):
    p = h.popen([sys.executable, "-c", CHILD, path, op, str(offset), str(length)] + (["catch"] if catch else []),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    h.check_eq(h.readline_within(p.stdout, 20, "the child").strip(), "ready", "the child's first line")
    return p


def finish_child(p, timeout, what):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise h.TestFailure("%s: the child did not end within %s s" % (what, timeout))
    return p.returncode, out.strip(), err.strip()


class HeldServer:
    """A file export whose reads (or extents, or writes) nbdkit holds for `seconds`,
    mounted with a short --shutdown-timeout (the held command outlives the test)."""

    def __init__(self, hold, seconds, opts=()):
        self.img = image()
        self.logfile = os.path.join(h.tmpdir("log"), "log")
        self.server = h.Nbdkit(["file", self.img, "logfile=" + self.logfile, "%s=%s" % (hold, seconds)],
                               opts=["--filter=log", "--filter=delay"])
        self.opts = ["--shutdown-timeout", "1"] + list(opts)

    def __enter__(self):
        self.server.start()
        try:
            self.mount = h.Mount(h.tmpdir("mp"), ["--unix", self.server.sock], opts=self.opts).__enter__()
        except BaseException:
            self.server.stop()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.mount.__exit__(*exc)
        finally:
            self.server.stop()
        return False

    def wait_held(self, what, offset):
        h.wait_until(lambda: pending_in_log(self.logfile, what, offset),
                     what="the %s at %d to reach the server" % (what, offset))

    def expected(self, offset, length):
        with open(self.img, "rb") as f:
            f.seek(offset)
            return f.read(length)


def _kill9_while_held(hold, op, offset, length, log_name):
    with HeldServer(hold, 60) as held:
        child = start_child(held.mount.export, op, offset, length)
        held.wait_held(log_name, offset)
        h.check(child.poll() is None, "the %s returned while the server held it" % op)
        t0 = time.monotonic()
        child.kill()
        rc, out, _ = finish_child(child, 10, "the killed %s" % op)
        took = time.monotonic() - t0
        h.check_eq(rc, -signal.SIGKILL, "the child's exit status")
        h.check(took < 3.0, "kill -9 took %.1f s to end a process waiting in %s (the server holds it 60 s)"
                % (took, op))
        return held.mount.stderr()


def test_kill9_ends_a_read_the_server_holds():
    _kill9_while_held("delay-read", "read", MiB, 4096, "Read")


def test_kill9_ends_an_lseek_the_server_holds():
    _kill9_while_held("delay-extents", "seek", MiB, 0, "Extents")


def test_caught_signal_gives_eintr_to_a_held_read():
    # After the grace (1 s) the read fails with EINTR: the handler ran, nothing else.
    with HeldServer("delay-read", 60) as held:
        child = start_child(held.mount.export, "read", 2 * MiB, 4096, catch=True)
        held.wait_held("Read", 2 * MiB)
        t0 = time.monotonic()
        child.send_signal(signal.SIGUSR1)
        rc, out, err = finish_child(child, 10, "the interrupted read")
        took = time.monotonic() - t0
        h.check_eq(rc, 0, "the child's exit status (stderr: %s)" % err[-500:])
        h.check_eq(out, "ERR EINTR", "the read's outcome after SIGUSR1")
        h.check(GRACE * 0.9 <= took < GRACE + 3, "EINTR came %.2f s after the signal (grace %.1f s)" % (took, GRACE))
        stats = h.live_stats(held.mount.mountdir)
        read = stats["operations"]["read"]
        h.check_eq((read["count"], read["errors"]), (1, 0), "reads answered, and errors among them")
        # The server still holds the command: it is answered, and still running.
        h.check_eq(stats["in_flight"]["answered_running"], 1, "answered, still running")


def test_ctrl_z_during_a_held_read_is_not_an_error():
    # Ctrl-Z (SIGTSTP, left at its default) also makes the kernel send FUSE_INTERRUPT,
    # but the read goes on once the process is continued: stopped for longer than the
    # grace, it still gets its bytes when the server answers, not EINTR.
    with HeldServer("delay-read", 3) as held:
        child = start_child(held.mount.export, "read", 3 * MiB, 4096)
        held.wait_held("Read", 3 * MiB)
        child.send_signal(signal.SIGTSTP)
        time.sleep(GRACE + 1.0)  # how long it stays stopped: past the grace
        child.send_signal(signal.SIGCONT)
        rc, out, err = finish_child(child, 15, "the stopped read")
        h.check_eq(rc, 0, "the child's exit status (stderr: %s)" % err[-500:])
        h.check_eq(out, "OK 4096 " + held.expected(3 * MiB, 32).hex(), "the read's outcome after Ctrl-Z and fg")


def test_a_stopped_reader_still_ends_on_a_fatal_signal():
    # Ctrl-Z, then SIGTERM left at its default: with a stop already pending and the
    # reader asleep again (its interrupt sent), the kernel does not turn SIGTERM into
    # SIGKILL, but it ends the process all the same once the read returns: the read is
    # answered after the grace. (-v says when the interrupt came.)
    with HeldServer("delay-read", 60, opts=["-v"]) as held:
        child = start_child(held.mount.export, "read", 4 * MiB, 4096)
        held.wait_held("Read", 4 * MiB)
        child.send_signal(signal.SIGTSTP)
        h.wait_until(lambda: "READ interrupted by a signal" in held.mount.stderr(), timeout=10,
                     what="the bridge to receive the read's interrupt")
        t0 = time.monotonic()
        child.send_signal(signal.SIGTERM)
        rc, _, _ = finish_child(child, 10, "the stopped, then terminated reader")
        took = time.monotonic() - t0
        h.check_eq(rc, -signal.SIGTERM, "the child's exit status")
        h.check(took < GRACE + 3, "the reader ended %.2f s after SIGTERM (grace %.1f s)" % (took, GRACE))


def test_a_read_interrupted_during_an_outage_lets_go_at_once():
    # A read waiting for a reconnect that a signal answers stops waiting (and gives its
    # buffer back) then, not when the server comes back: against a server that stays
    # away, reads given up one after another would otherwise pile up.
    img = image()
    with h.Nbdkit(["file", img]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock], opts=["--retry-timeout", "30"]) as m:
        srv.kill(signal.SIGKILL)
        srv.proc.wait(timeout=10)
        os.unlink(srv.sock)
        h.wait_until(lambda: "reconnecting for up to" in m.stderr(), what="the loss to be seen")
        child = start_child(m.export, "read", 2 * MiB, 4096, catch=True)
        h.wait_until(lambda: h.live_stats(m.mountdir)["in_flight"]["now"] == 1, what="the read to wait for the reconnect")
        child.send_signal(signal.SIGUSR1)
        rc, out, err = finish_child(child, 10, "the interrupted read")
        h.check_eq((rc, out), (0, "ERR EINTR"), "the read's outcome after SIGUSR1 (stderr: %s)" % err[-500:])
        h.wait_until(lambda: h.live_stats(m.mountdir)["in_flight"]["answered_running"] == 0, timeout=3,
                     what="the answered read to stop waiting for the reconnect")
        srv.start()
        child = start_child(m.export, "read", 2 * MiB, 4096)
        rc, out, err = finish_child(child, 20, "the read after the reconnect")
        with open(img, "rb") as f:
            f.seek(2 * MiB)
            expected = f.read(4096)
        h.check_eq(out, "OK 4096 %s" % expected.hex()[:64], "the read after the reconnect")


def test_a_signal_during_a_read_the_server_answers_in_time_is_not_an_error():
    # Programs catch signals all the time (SIGCHLD, timers): a read the server answers
    # within the grace completes as usual, though the kernel sent FUSE_INTERRUPT.
    with HeldServer("delay-read", "300ms") as held:
        child = start_child(held.mount.export, "read", 6 * MiB, 4096, catch=True)
        held.wait_held("Read", 6 * MiB)
        child.send_signal(signal.SIGUSR1)
        rc, out, err = finish_child(child, 10, "the signalled read")
        h.check_eq(rc, 0, "the child's exit status (stderr: %s)" % err[-500:])
        h.check_eq(out, "OK 4096 %s" % held.expected(6 * MiB, 4096).hex()[:64], "the signalled read")


def test_interrupted_reads_leave_later_reads_right():
    # Held 3 s: the interrupted reads' answers (EINTR after the 1 s grace) come before
    # the server's, which then arrive while the next reads wait. A 1 MiB read goes
    # through a pipe (spliced), a 4 KiB one is copied.
    cases = ((3 * MiB, MiB), (5 * MiB, 4096))
    with HeldServer("delay-read", 3) as held:
        children = [start_child(held.mount.export, "read", offset, length) for offset, length in cases]
        for offset, _ in cases:
            held.wait_held("Read", offset)
        t0 = time.monotonic()
        for child in children:
            child.kill()
        for child in children:
            finish_child(child, 10, "a killed read")
        h.check(time.monotonic() - t0 < 2.5, "kill -9 did not end the reads before the server answered")
        later = [(o + n, n) for o, n in cases] + [(o - n, n) for o, n in cases]
        children = [start_child(held.mount.export, "read", o, n) for o, n in later]
        for (o, n), p in zip(later, children):
            rc, out, err = finish_child(p, 20, "a read after the interrupted ones")
            h.check_eq(out, "OK %d %s" % (n, held.expected(o, n).hex()[:64]), "the read of %d bytes at %d" % (n, o))


def test_a_write_the_server_holds_is_not_interrupted():
    with HeldServer("delay-write", 2) as held:
        child = start_child(held.mount.export, "write", 4 * MiB, 4096, catch=True)
        held.wait_held("Write", 4 * MiB)
        child.send_signal(signal.SIGUSR1)
        rc, out, err = finish_child(child, 20, "the held write")
        h.check_eq(rc, 0, "the child's exit status (stderr: %s)" % err[-500:])
        h.check_eq(out, "OK 4096", "the signalled write's outcome")
        with open(held.img, "rb") as f:
            f.seek(4 * MiB)
            got = f.read(4096)
        h.check_eq(got, bytes([0x5a]) * 4096, "the bytes of the signalled write, on the server")


if __name__ == "__main__":
    h.main(globals())
