#!/usr/bin/env python3
"""The NBD server dies (kill -9) or closes the connection while mounted.

Expected: pending and new requests fail with EIO promptly (no hang), the
bridge says so on stderr, the mount can still be removed with
`fusermount3 -u`, and nbdbridge then exits 0.

All I/O on the mount runs in child processes with deadlines, so a hang is
reported as a failure instead of blocking the suite.
"""
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import semantics_util as su  # noqa: E402

# These tests check the behaviour without reconnection (every request fails
# with EIO at once); test_reconnect.py covers the default, which waits.
NO_RECONNECT = ["--retry-timeout", "0"]

SIZE = 64 * 1024 * 1024
PROMPT = 10          # seconds within which failing requests must return
# What the bridge prints when a connection it does not reconnect goes (one line per connection).
LOST_RE = re.compile(r"lost .* to the server \(.+\); requests on it fail with EIO")

WORKER = su.threaded_io_worker(0, SIZE)

NEW_REQUEST = r"""
import os, sys, errno
path = sys.argv[1]
res = []
try:
    fd = os.open(path, os.O_RDWR)
except OSError as e:
    print("open", errno.errorcode.get(e.errno, e.errno)); sys.exit(0)
for name, fn in (("pread", lambda: os.pread(fd, 4096, 8192)),
                 ("pwrite", lambda: os.pwrite(fd, b"x" * 4096, 8192)),
                 ("fsync", lambda: os.fsync(fd))):
    try:
        fn(); res.append(name + " OK")
    except OSError as e:
        res.append(name + " " + errno.errorcode.get(e.errno, str(e.errno)))
print(";".join(res))
"""


def _check_new_requests_fail(m):
    t0 = time.monotonic()
    r = h.run_python(NEW_REQUEST, timeout=PROMPT + 10, args=[m.export])
    dt = time.monotonic() - t0
    h.check(dt < PROMPT, "new requests took %.1fs to fail" % dt)
    out = r.stdout.strip()
    if out.startswith("open"):
        h.check_eq(out, "open EIO", "open after server death")
    else:
        h.check_eq(out, "pread EIO;pwrite EIO;fsync EIO", "new requests after server death")


def _finish(m, lost=True, writes_unflushed=False):
    # The bridge must report the lost connection on stderr.
    if lost:
        try:
            h.wait_until(lambda: LOST_RE.search(m.stderr()), timeout=PROMPT,
                         what="'lost ... to the server (...); requests on it fail with EIO' on stderr")
        except h.TestFailure as e:
            raise h.TestFailure("%s; nbdbridge stderr: %s" % (e, m.stderr()[-2000:]))
    h.check(m.mounted(), "mount vanished by itself (expected it to stay until unmounted)")
    r = m.unmount()
    h.check_eq(r.returncode, 0, "fusermount3 -u after server death (%s)" % r.stderr.strip())
    rc = m.wait_exit(timeout=h.DEADLINE)
    # Writes the server acknowledged and no flush covered died with it: the exit says so.
    m.expect_exit = 1 if writes_unflushed else 0
    h.check_eq(rc, m.expect_exit, "nbdbridge exit status after unmount (stderr: %s)" % m.stderr()[-2000:])
    h.check(("may not be durable" in m.stderr()) == writes_unflushed,
            "what stderr says of the writes no flush covered: %s" % m.stderr()[-2000:])
    h.check(not m.mounted(), "mount still present")



def _collect_after_kill(child, what):
    """Waits (bounded) for the I/O child once the server is killed; returns
    its stdout, stderr and how long it took to finish."""
    t0 = time.monotonic()
    try:
        out, err = child.communicate(timeout=PROMPT + 10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate(timeout=10)
        raise h.TestFailure("%s hung after the server was killed" % what)
    return out, err, time.monotonic() - t0

def test_kill9_server_mid_io():
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=NO_RECONNECT) as m:
        child = h.popen([sys.executable, "-c", WORKER, m.export],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # wait (with deadline) for the workers to make progress
        line = h.readline_within(child.stdout, h.DEADLINE, "the I/O workers")
        h.check_eq(line.strip(), "progress", "I/O workers did not get going")
        srv.kill(signal.SIGKILL)
        srv.proc.wait(timeout=10)
        out, err, dt = _collect_after_kill(child, "I/O workers")
        h.check(dt < PROMPT, "pending requests took %.1fs to fail" % dt)
        res = sorted(ln for ln in out.split("\n") if ln.startswith("T"))
        h.check_eq(res, ["T%d EIO" % i for i in range(4)], "per-thread errors (stderr %s)" % err)
        _check_new_requests_fail(m)
        _finish(m, writes_unflushed=True)


def test_pending_request_fails_when_server_killed():
    # A read is parked in the server by the delay filter; the server is
    # killed while it is pending; the read must fail with EIO promptly.
    d = h.tmpdir("log")
    logfile = os.path.join(d, "log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile, "delay-read=60"],
                  opts=["--filter=log", "--filter=delay"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=NO_RECONNECT) as m:
        code = ("import os,sys,errno\nfd=os.open(sys.argv[1],os.O_RDONLY)\n"
                "try:\n os.pread(fd,4096,1<<20); print('OK')\n"
                "except OSError as e: print(errno.errorcode.get(e.errno,e.errno))\n")
        child = h.popen([sys.executable, "-c", code, m.export],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def read_pending():
            try:
                with open(logfile) as f:
                    # request lines: "connection=N Read id=K offset=0x100000 ... ..."
                    # (completion lines are "...Read id=K return=..." without offset)
                    return any(" Read id=" in ln and "offset=0x100000" in ln for ln in f)
            except OSError:
                return False
        h.wait_until(read_pending, what="the read to reach the server")
        h.check(child.poll() is None, "read finished before the server was killed")
        srv.kill(signal.SIGKILL)
        out, err, dt = _collect_after_kill(child, "pending read")
        h.check(dt < PROMPT, "pending read took %.1fs to fail" % dt)
        h.check_eq(out.strip(), "EIO", "pending read result (stderr %s)" % err.strip())
        _check_new_requests_fail(m)
        _finish(m)


def test_server_closes_connection_idle():
    # "The server" closes the connection in an orderly way (FIN) while
    # nothing is in flight (a proxy in front of nbdkit does the closing).
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Proxy(srv.sock) as px, \
            h.Mount(h.tmpdir("mp"), [px.uri], opts=NO_RECONNECT) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            os.pwrite(fd, b"hello", 0)
            h.check_eq(os.pread(fd, 5, 0), b"hello", "before the connection closes")
        finally:
            os.close(fd)
        h.check(px.nconn >= 1, "no connection went through the proxy")
        px.close_all()
        _check_new_requests_fail(m)
        _finish(m)


def _signal_pending(pid, sig):
    """Whether sig is still waiting to be handled by process pid (ShdPnd)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("ShdPnd:"):
                    return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except OSError:
        pass
    return False


def test_server_sigterm_idle():
    # nbdkit asked to quit (SIGTERM) while the bridge is connected and idle: nbdkit stays
    # until its clients leave and refuses every new request as shutting down. Without
    # reconnection that refusal is the request's EIO, at once; the connection is kept (no
    # "lost" line), and the unmount's disconnect lets the server finish its stop.
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=NO_RECONNECT) as m:
        with open(m.export, "rb") as f:
            f.read(10)
        srv.kill(signal.SIGTERM)
        h.wait_until(lambda: not _signal_pending(srv.proc.pid, signal.SIGTERM), timeout=PROMPT,
                     what="nbdkit to take the SIGTERM")
        _check_new_requests_fail(m)
        h.check(srv.proc.poll() is None, "test set-up: nbdkit left at SIGTERM with a client connected "
                "(status %s), so this tests a dead server, not a stopping one" % srv.proc.poll())
        h.check("lost" not in m.stderr(),
                "a refusal by a stopping server was taken for a lost connection: %s" % m.stderr()[-2000:])
        _finish(m, lost=False)
        try:
            status = srv.proc.wait(timeout=PROMPT)
        except subprocess.TimeoutExpired:
            raise h.TestFailure("nbdkit still waits for a client %ss after the unmount: the bridge did not "
                                "disconnect" % PROMPT)
        h.check_eq(status, 0, "nbdkit's exit status after its graceful stop")


def test_subprocess_server_ends_with_a_killed_bridge():
    # `[ CMD ]` form: kill -9 of nbdbridge. auto_unmount removes the mount and the server
    # it started must not stay behind. (qemu-nbd --persistent outlives its clients; nbdkit
    # happens to leave on its own.)
    img = os.path.join(h.tmpdir("img"), "disk.img")
    with open(img, "wb") as f:
        f.truncate(4 * 1024 * 1024)
    server = ["qemu-nbd", "--persistent", "-f", "raw", img]
    with h.Mount(h.tmpdir("mp"), ["["] + server + ["]"], expect_exit=None) as m:
        kids = [p for p in h.descendants(m.pid) if "qemu-nbd" in " ".join(h.proc_cmdline(p))]
        h.check(kids, "no qemu-nbd child of nbdbridge found")
        os.kill(m.pid, signal.SIGKILL)
        m.proc.wait(timeout=10)
        try:
            h.wait_until(lambda: not any(h.pid_alive(p) for p in kids), timeout=10,
                         what="the server to end with nbdbridge")
        finally:
            for p in kids:
                if h.pid_alive(p):
                    os.kill(p, signal.SIGKILL)
        h.wait_until(lambda: not m.mounted(), timeout=10, what="auto_unmount to remove the mount")


def test_subprocess_server_killed():
    # `[ nbdkit ... ]` form: kill -9 the server child of nbdbridge.
    with h.Mount(h.tmpdir("mp"), ["[", "nbdkit", "memory", str(SIZE), "]"]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            os.pwrite(fd, b"x" * 4096, 0)
        finally:
            os.close(fd)
        kids = [p for p in h.descendants(m.pid) if "nbdkit" in " ".join(h.proc_cmdline(p))]
        h.check(kids, "no nbdkit child of nbdbridge found")
        for p in kids:
            os.kill(p, signal.SIGKILL)
        _check_new_requests_fail(m)
        _finish(m)


if __name__ == "__main__":
    h.main(globals())
