#!/usr/bin/env python3
"""A TCP path that breaks silently: the server's host dies, or the network drops
every packet, and no reset ever arrives.

What is expected (--tcp-keepalive S, default 30): a connection whose server
acknowledges nothing for about S seconds, neither keepalive probes while idle nor
a request sent, is taken as lost ("lost ... reconnecting" on stderr); once the path
heals, the bridge reconnects and replays what was unanswered, so the application
only sees a delay. Without it a sent request waits ~15 minutes (tcp_retries2) and
an idle connection's loss is never noticed.

The server and the bridge run in a private network namespace (nsenter), whose
loopback gets an nftables rule that drops every packet the server sends. The mount
itself is in the host's mount namespace, as usual. All I/O on the mount runs in
child processes with deadlines.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

PORT = 10809
KEEPALIVE = 2
LOST_RE = re.compile(r"lost .*reconnecting for up to")
RECONNECTED_RE = re.compile(r"reconnected .*after \d+ ms")
# The data connection's (one, -C 1): the idle block-status and
# large-write connections are lost by keepalive anyway, request or no request.
DATA_LOST_RE = re.compile(r"lost the connection to the server .*reconnecting for up to")
DATA_RECONNECTED_RE = re.compile(r"reconnected the connection after \d+ ms")


class PrivateNetwork:
    """A network namespace held open by a sleeping process, its loopback up."""

    def __enter__(self):
        self.holder = h.popen(["unshare", "--net", "sleep", "600"])
        self.path = "/proc/%d/ns/net" % self.holder.pid
        try:
            h.wait_until(lambda: os.path.exists(self.path) and
                         os.readlink(self.path) != os.readlink("/proc/self/ns/net"),
                         timeout=10, what="the private network namespace")
            self.run(["ip", "link", "set", "lo", "up"])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        self.holder.kill()
        self.holder.wait(timeout=10)

    def prefix(self):
        return [shutil.which("nsenter"), "--net=" + self.path]

    def run(self, cmd):
        r = h.run(self.prefix() + cmd, timeout=15)
        if r.returncode != 0:
            raise h.TestFailure("%r failed (%d): %s" % (cmd, r.returncode, r.stderr))
        return r

    def drop_server_packets(self):
        self.run(["nft", "add table inet nbdbridge_test; "
                  "add chain inet nbdbridge_test input { type filter hook input priority 0; }; "
                  "add rule inet nbdbridge_test input tcp sport %d drop" % PORT])

    def heal(self):
        self.run(["nft", "delete table inet nbdbridge_test"])


class ServerInside:
    """nbdkit memory, listening on 127.0.0.1:PORT inside the namespace."""

    def __init__(self, net):
        self.net = net
        self.uri = "nbd://127.0.0.1:%d/" % PORT

    def __enter__(self):
        self.errpath = os.path.join(h.tmpdir("nbdkit"), "stderr")
        with open(self.errpath, "wb") as err:
            self.proc = h.popen(self.net.prefix() + ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1",
                                                     "-p", str(PORT), "memory", "64M"], stdout=err, stderr=err)
        h.wait_until(lambda: self.proc.poll() is not None or
                     h.run(self.net.prefix() + ["nbdinfo", "--size", self.uri], timeout=10).returncode == 0,
                     timeout=15, what="nbdkit to listen inside the namespace")
        if self.proc.poll() is not None:
            raise h.TestFailure("nbdkit did not start: %s" % h.read_text(self.errpath))
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait(timeout=10)


def mount_inside(net, server):
    # The command is "nsenter --net=... nbdbridge OPTIONS MOUNTPOINT TARGET": nsenter execs
    # the bridge, so the Mount's process is the bridge itself.
    return h.Mount(h.tmpdir("mp"), [server.uri], binary=shutil.which("nsenter"),
                   opts=["--net=" + net.path, h.NBDBRIDGE, "--tcp-keepalive", str(KEEPALIVE), "-C", "1"])


# Child: writes (w) or reads (r) LEN bytes of a seeded pattern at OFF; prints OK or
# the errno name; a read that returns other bytes prints MISMATCH.
IO_CHILD = r"""
import errno, os, random, sys
op, path, off, ln = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
data = random.Random(off).randbytes(ln)
fd = os.open(path, os.O_RDWR)
try:
    if op == "w":
        os.pwrite(fd, data, off)
        os.fsync(fd)
        print("OK")
    else:
        print("OK" if os.pread(fd, ln, off) == data else "MISMATCH")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e.errno)))
"""


def io_start(op, path, off, ln):
    return h.popen([sys.executable, "-c", IO_CHILD, op, path, str(off), str(ln)],
                   stdout=subprocess.PIPE, text=True)


def io_result(child, timeout, what):
    try:
        out, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout=10)
        raise h.TestFailure("%s: no answer within %s s" % (what, timeout))
    return out.strip()


def io(op, path, off, ln, timeout=15):
    return io_result(io_start(op, path, off, ln), timeout, "%s at %d" % (op, off))


def test_an_idle_connection_to_a_silent_server_is_noticed_and_restored():
    with PrivateNetwork() as net, ServerInside(net) as server, mount_inside(net, server) as m:
        h.check_eq(io("w", m.export, 1 << 20, 65536), "OK", "the write before the fault")
        net.drop_server_packets()
        t0 = time.monotonic()
        h.wait_until(lambda: LOST_RE.search(m.stderr()), timeout=20,
                     what="the idle connection's loss to be noticed ('lost' on stderr)")
        noticed = time.monotonic() - t0
        h.check(noticed <= 4 * KEEPALIVE + 2, "noticed after %.1f s with --tcp-keepalive %d" % (noticed, KEEPALIVE))
        net.heal()
        h.wait_until(lambda: RECONNECTED_RE.search(m.stderr()), timeout=20, what="the reconnect once healed")
        h.check_eq(io("r", m.export, 1 << 20, 65536), "OK", "the data written before the fault")


def test_a_request_sent_to_a_silent_server_is_replayed_once_the_path_heals():
    with PrivateNetwork() as net, ServerInside(net) as server, mount_inside(net, server) as m:
        h.check_eq(io("w", m.export, 3 << 20, 65536), "OK", "the write before the fault")
        net.drop_server_packets()
        reader = io_start("r", m.export, 3 << 20, 65536)
        try:
            h.wait_until(lambda: DATA_LOST_RE.search(m.stderr()), timeout=20,
                         what="the unanswered request's connection to be taken as lost")
            h.check(reader.poll() is None, "the read finished while the server was unreachable")
            net.heal()
            h.check_eq(io_result(reader, 20, "the read across the fault"), "OK", "the read across the fault")
            h.check(DATA_RECONNECTED_RE.search(m.stderr()), "the read came through a new connection:\n%s" % m.stderr())
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait(timeout=10)
        h.check_eq(io("w", m.export, 5 << 20, 65536), "OK", "a write after the reconnect")


if __name__ == "__main__":
    h.main(globals())
