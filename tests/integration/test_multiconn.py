#!/usr/bin/env python3
"""Multi-conn: with a server that advertises NBD_FLAG_CAN_MULTI_CONN the
bridge opens -C N data connections (auto: 4 with 4 or more CPUs, else 1) and
spreads reads and writes over all of them, plus one connection that carries
block status only (--replies auto): the data connections ask for simple
replies, the block-status one for structured replies; and one connection, on a
thread of its own, for WRITEs of 128 KiB and more (--connection-threads writes,
the default).  With a server that does
not advertise multi-conn it uses one connection for everything.  The nbdkit log
filter shows the connections and which requests each carried; nbdkit -v shows
which connections asked for structured replies.
"""
import collections
import json
import mmap
import os
import random
import re
import signal
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import semantics_util as su  # noqa: E402

SIZE = 128 * 1024 * 1024
FIO_SIZE = 32 * 1024 * 1024


def _structured_connections(errpath):
    """From nbdkit -v: the positions (0 = first) of the connections that asked
    for structured replies, among those that went on to NBD_OPT_GO.  (nbdkit's
    own numbers count the harness's readiness probe too.)"""
    with open(errpath, errors="replace") as f:
        text = f.read()
    negotiated = sorted({int(n) for n in re.findall(r"\[(\d+)\]: debug: newstyle negotiation: NBD_OPT_GO", text)})
    structured = {int(n) for n in re.findall(
        r"\[(\d+)\]: debug: newstyle negotiation: NBD_OPT_STRUCTURED_REPLY", text)}
    return {negotiated.index(n) for n in structured}


def _seek_data(export):
    fd = os.open(export, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA)
    finally:
        os.close(fd)


def _per_connection(logfile):
    acts = collections.defaultdict(collections.Counter)
    for r in su.log_requests(logfile):
        acts[r["conn"]][r["act"]] += 1
    return acts


def _fio_load(export):
    r, data = su.fio_json(export, [
        "--name=mc", "--size=%d" % FIO_SIZE, "--direct=1", "--ioengine=libaio",
        "--iodepth=32", "--rw=randwrite", "--bs=4k", "--randseed=77",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--exitall_on_error=1"],
        timeout=80)
    h.check_eq(r.returncode, 0, "fio exit status (stderr: %s)" % r.stderr.strip()[-2000:])
    for job in data["jobs"]:
        h.check_eq(job.get("error"), 0, "fio job error")
        h.check(job["write"]["io_bytes"] >= FIO_SIZE, "fio wrote %d bytes" % job["write"]["io_bytes"])
        h.check(job["read"]["io_bytes"] >= FIO_SIZE, "fio verified %d bytes" % job["read"]["io_bytes"])


def _shadow_check(export, rnd, n=64):
    """Writes then reads that may travel on different connections."""
    fd = os.open(export, os.O_RDWR)
    try:
        for _ in range(n):
            off = rnd.randrange(0, SIZE - 70000)
            data = rnd.randbytes(rnd.randrange(1, 70000))
            h.pwrite_full(fd, data, off)
            h.check_bytes(h.pread_full(fd, len(data), off), data, "read-after-write off=%d" % off)
    finally:
        os.close(fd)


def test_four_connections_all_used():
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile], opts=["-v", "--filter=log"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["-C", "4"]) as m:
        conns = su.log_connects(logfile)
        # the first connection made stays for block status; data connections follow,
        # then the large-write connection (no large writes here: it stays idle)
        h.check_eq(sorted(conns), [1, 2, 3, 4, 5, 6], "connections opened for -C 4")
        h.check_eq(_structured_connections(srv.errpath), {0}, "connections that asked for structured replies")
        _fio_load(m.export)
        _shadow_check(m.export, random.Random(3))
        h.check_eq(_seek_data(m.export), 0, "SEEK_DATA after writing at 0")
        acts = _per_connection(logfile)
        data = [2, 3, 4, 5]
        for c in data:
            h.check(acts[c]["Write"] > 0 and acts[c]["Read"] > 0,
                    "connection %d carried no Read/Write traffic: %r (all: %r)"
                    % (c, dict(acts[c]), {k: dict(v) for k, v in acts.items()}))
            h.check_eq(acts[c]["Extents"], 0, "block status on data connection %d" % c)
        h.check(acts[1]["Extents"] > 0, "the block-status connection carried no Extents: %r" % dict(acts[1]))
        h.check_eq(acts[1]["Read"] + acts[1]["Write"], 0, "reads and writes on the block-status connection")
        h.check_eq(sum(acts[6].values()), 0, "requests on the large-write connection (all writes < 128 KiB)")
        # a fair spread: no connection carries almost everything
        total = sum(acts[c]["Write"] + acts[c]["Read"] for c in data)
        for c in data:
            share = (acts[c]["Write"] + acts[c]["Read"]) / total
            h.check(share < 0.7, "connection %d carried %.0f%% of the requests" % (c, share * 100))
        h.check_eq(set(acts) - set(conns), set(), "requests on connections never opened")
        fails = su.log_failed_replies(logfile)
        h.check(not fails, "server saw failed requests: %r" % fails[:5])


def test_default_connections_follow_cpus():
    # -C auto (the default): 4 data connections with 4 or more CPUs, else 1 (on 2
    # CPUs one loop thread over one connection measured fastest; see README), and
    # the block-status and large-write connections.
    expected = [1, 2, 3, 4, 5, 6] if (os.cpu_count() or 1) >= 4 else [1, 2, 3]
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile], opts=["--filter=log"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]):
        h.check_eq(sorted(su.log_connects(logfile)), expected, "connections by default")


def test_two_connections():
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile], opts=["--filter=log"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["-C", "2"]) as m:
        h.check_eq(sorted(su.log_connects(logfile)), [1, 2, 3, 4],
                   "connections for -C 2 (+ block status, + large writes)")
        _shadow_check(m.export, random.Random(4), n=32)


def test_replies_structured_one_kind_of_connection():
    # --replies structured: every connection asks for structured replies and
    # serves everything, block status included; no block-status connection (the
    # large-write connection asks for them too: "structured" means every one).
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile], opts=["-v", "--filter=log"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["-C", "2", "--replies", "structured"]) as m:
        h.check_eq(sorted(su.log_connects(logfile)), [1, 2, 3], "connections for -C 2 --replies structured")
        h.check_eq(_structured_connections(srv.errpath), {0, 1, 2}, "connections that asked for structured replies")
        _shadow_check(m.export, random.Random(6), n=32)
        fd = os.open(m.export, os.O_WRONLY)
        try:
            h.pwrite_full(fd, b"x" * 4096, 0)
        finally:
            os.close(fd)
        h.check_eq(_seek_data(m.export), 0, "SEEK_DATA after writing at 0")
        h.check(su.count_acts(logfile, "Extents") > 0, "block status was asked for")


def test_replies_simple_no_block_status():
    # --replies simple: no connection asks for structured replies, so there is no
    # block status: the whole export is data (SEEK_HOLE finds only EOF).
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile], opts=["-v", "--filter=log"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--replies", "simple"]) as m:
        data_connections = 4 if (os.cpu_count() or 1) >= 4 else 1
        h.check_eq(len(su.log_connects(logfile)), data_connections + 1,
                   "connections (data and large-write, no block-status one)")
        h.check_eq(_structured_connections(srv.errpath), set(), "connections that asked for structured replies")
        _shadow_check(m.export, random.Random(7), n=16)
        fd = os.open(m.export, os.O_RDONLY)
        try:
            h.check_eq(os.lseek(fd, 4096, os.SEEK_DATA), 4096, "SEEK_DATA in never-written space")
            h.check_eq(os.lseek(fd, 0, os.SEEK_HOLE), SIZE, "SEEK_HOLE finds only EOF")
        finally:
            os.close(fd)
        h.check_eq(su.count_acts(logfile, "Extents"), 0, "block status requests")


def test_block_status_connection_lost_alone():
    # The server closes only the block-status connection (the first one made):
    # reads and writes go on over the data connection meanwhile, and the bridge
    # reconnects the block-status connection, so SEEK_DATA works again.
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Proxy(srv.sock) as proxy, \
            h.Mount(h.tmpdir("mp"), [proxy.uri], opts=["-C", "1", "--retry-timeout", "10"]) as m:
        h.check_eq(proxy.nconn, 3, "connections through the proxy (data, large writes, block status)")
        fd = os.open(m.export, os.O_RDWR)
        try:
            h.pwrite_full(fd, b"before" * 1000, 1 << 20)
            proxy.close_one(0)
            h.wait_until(lambda: "lost the block-status connection" in m.stderr(),
                         what="the bridge to notice the block-status connection closing")
            data = random.Random(8).randbytes(65536)
            h.pwrite_full(fd, data, 8 << 20)
            h.check_bytes(h.pread_full(fd, len(data), 8 << 20), data, "read-after-write on the data connection")
            h.wait_until(lambda: "reconnected the block-status connection" in m.stderr(),
                         what="the block-status connection to come back")
            h.check_eq(os.lseek(fd, 0, os.SEEK_DATA), 1 << 20, "SEEK_DATA after the reconnect")
            h.check_eq(proxy.nconn, 4, "connections through the proxy after the reconnect")
        finally:
            os.close(fd)


def _odirect_write_read(fd, data, off, what):
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    h.check_eq(os.pwritev(fd, [buf], off), len(data), "%s: O_DIRECT write" % what)
    back = mmap.mmap(-1, len(data))
    h.check_eq(os.preadv(fd, [back], off), len(data), "%s: O_DIRECT read" % what)
    h.check_bytes(bytes(back), data, "%s: read back" % what)


def test_large_write_connection_lost_alone():
    # The server closes only the large-write connection (the third one made:
    # block status, data, large writes). Large writes go on meanwhile over the
    # data connection, the bridge reconnects it on its thread, and large writes
    # use it again.
    rnd = random.Random(10)
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Proxy(srv.sock) as proxy, \
            h.Mount(h.tmpdir("mp"), [proxy.uri], opts=["-C", "1", "--retry-timeout", "10"]) as m:
        h.check_eq(proxy.nconn, 3, "connections through the proxy (block status, data, large writes)")
        fd = os.open(m.export, os.O_RDWR | os.O_DIRECT)
        try:
            _odirect_write_read(fd, rnd.randbytes(1 << 20), 1 << 20, "before the loss")
            proxy.close_one(2)
            h.wait_until(lambda: "lost the large-write connection" in m.stderr(),
                         what="the bridge to notice the large-write connection closing")
            _odirect_write_read(fd, rnd.randbytes(1 << 20), 4 << 20, "while it is away")
            h.wait_until(lambda: "reconnected the large-write connection" in m.stderr(),
                         what="the large-write connection to come back")
            h.check_eq(proxy.nconn, 4, "connections through the proxy after the reconnect")
            _odirect_write_read(fd, rnd.randbytes(1 << 20), 8 << 20, "after the reconnect")
        finally:
            os.close(fd)
        links = json.loads(h.run([h.NBDBRIDGE, "stats", m.mountdir], timeout=15).stdout)["connections"]
        large = [c for c in links if c["role"] == "large_writes"]
        h.check_eq(len(large), 1, "one large_writes connection in the statistics: %r" % links)
        h.check(large[0]["disconnects"] == 1 and large[0]["reconnects"] == 1,
                "large_writes connection counted its loss and reconnect: %r" % large[0])


def _single_connection_case(opts, server_opts, args_extra, what, expected_connections=1):
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile] + args_extra,
                  opts=["--filter=log"] + server_opts) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=opts) as m:
        _fio_load(m.export)
        _shadow_check(m.export, random.Random(5), n=32)
        conns = su.log_connects(logfile)
        h.check_eq(len(conns), expected_connections, "%s: connections opened (%r)" % (what, sorted(conns)))
        acts = _per_connection(logfile)
        data = [c for c in conns if acts[c]["Read"] + acts[c]["Write"] > 0]
        h.check_eq(len(data), 1, "%s: connections that carried reads and writes (%r)" % (what, dict(acts)))
        fails = su.log_failed_replies(logfile)
        h.check(not fails, "server saw failed requests: %r" % fails[:5])


def test_no_multiconn_server_one_connection():
    _single_connection_case(["-C", "4"], ["--filter=multi-conn"], ["multi-conn-mode=disable"],
                            "server without multi-conn")


def test_C1_one_data_connection():
    _single_connection_case(["-C", "1"], [], [], "-C 1", expected_connections=3)


def test_large_writes_on_their_own_connection():
    # --connection-threads writes (the default): WRITEs of 128 KiB and more go to
    # one more connection, driven by a thread of its own; smaller writes, reads and
    # block status do not. Bytes written there read back through the data connection.
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile], opts=["--filter=log"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["-C", "1"]) as m:
        conns = sorted(su.log_connects(logfile))
        h.check_eq(conns, [1, 2, 3], "connections: block status, data, large writes")
        rnd = random.Random(9)
        fd = os.open(m.export, os.O_RDWR | os.O_DIRECT)
        try:
            for length in (128 << 10, 1 << 20, 4096, 64 << 10):
                buf = mmap.mmap(-1, length)
                data = rnd.randbytes(length)
                buf.write(data)
                off = rnd.randrange(0, SIZE // length) * length
                h.check_eq(os.pwritev(fd, [buf], off), length, "O_DIRECT write of %d bytes" % length)
                back = mmap.mmap(-1, length)
                h.check_eq(os.preadv(fd, [back], off), length, "O_DIRECT read of %d bytes" % length)
                h.check_bytes(bytes(back), data, "read back %d bytes at %d" % (length, off))
        finally:
            os.close(fd)
        h.check(su.threads_named(m.proc.pid, "nbdbridge-conn") == 1, "one connection thread")
        acts = _per_connection(logfile)
        h.check_eq(dict(acts[3]), {"Write": 2}, "the large-write connection carried the two large writes")
        h.check(acts[2]["Write"] == 2 and acts[2]["Read"] >= 4,
                "the data connection carried the small writes and every read: %r" % dict(acts[2]))
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile + ".off"], opts=["--filter=log"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["-C", "1", "--connection-threads", "off"]) as m:
        h.check_eq(sorted(su.log_connects(logfile + ".off")), [1, 2], "connections with --connection-threads off")
        h.check_eq(su.threads_named(m.proc.pid, "nbdbridge-conn"), 0, "connection threads with off")



class HostCrashProxy(h.Proxy):
    """crash(new_upstream): every connection open now goes silent and stays open, as
    to a host that died without a reset; connections made later reach new_upstream.
    end_silent() then closes the silent ones, as keepalive would find them dead."""

    def __init__(self, upstream_sock):
        super().__init__(upstream_sock)
        self.silent = set()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if src in self.silent or dst in self.silent:
                    continue            # swallowed: nobody answers
                dst.sendall(data)
        except OSError:
            pass
        if src in self.silent or dst in self.silent:
            return                      # stays open, silent
        for x in (src, dst):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def crash(self, new_upstream, close_now):
        with self._lock:
            self.silent = {x for pair in self.conns for x in pair}
            self.upstream = new_upstream
            closing = self.conns[close_now][0]
        closing.shutdown(socket.SHUT_RDWR)     # this one's loss is seen at once

    def end_silent(self):
        with self._lock:
            ending = [pair[0] for pair in self.conns if pair[0] in self.silent]
        for c in ending:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


# Child: opens the file, writes 4 KiB at 0 without flushing, says "written", waits for a
# line on stdin, then prints the result of one fsync and of another.
FSYNC_CHILD = r"""
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, b"x" * 4096, 0)
print("written", flush=True)
sys.stdin.readline()
for _ in range(2):
    try:
        os.fsync(fd)
        print("OK", flush=True)
    except OSError as e:
        print(errno.errorcode[e.errno], flush=True)
"""


def test_fsync_after_a_host_crash_that_idle_connections_have_not_noticed():
    # Multi-conn (block status, data, large writes). The server's host dies without a
    # reset and a new server (empty) comes up at the same address: the data connection,
    # which held an unflushed write, is lost at once and reconnects to the new server;
    # the other two, idle, still look alive. A flush that succeeds on the reconnected
    # connection reaches only the new server, so it must not vouch for the write: fsync
    # tells EIO once the old connections are found dead, and is not fooled meanwhile.
    import select
    with h.Nbdkit(["memory", str(SIZE)]) as first, h.Nbdkit(["memory", str(SIZE)]) as second, \
            HostCrashProxy(first.sock) as proxy, \
            h.Mount(h.tmpdir("mp"), [proxy.uri], opts=["-C", "1", "--retry-timeout", "10"]) as m:
        h.check_eq(proxy.nconn, 3, "connections through the proxy (block status, data, large writes)")
        child = h.popen([sys.executable, "-c", FSYNC_CHILD, m.export], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)
        try:
            def line(what, timeout=15):
                return h.readline_within(child.stdout, timeout, "the child's " + what).strip()
            h.check_eq(line("write"), "written", "the child's write")
            proxy.crash(second.sock, close_now=1)
            first.kill(signal.SIGKILL)          # the write dies with the old server
            h.wait_until(lambda: re.search(r"reconnected the connection", m.stderr()),
                         what="the data connection to reach the new server")
            child.stdin.write("go\n")
            child.stdin.flush()
            # The fsync must wait on an old connection (or fail), not succeed through the new one.
            answers = []
            if select.select([child.stdout], [], [], 1.0)[0]:
                answers.append(line("first fsync"))
                h.check(answers[0] != "OK", "fsync succeeded through a connection to the new server")
            proxy.end_silent()
            while len(answers) < 2:
                answers.append(line("fsync"))
            h.check_eq(answers, ["EIO", "OK"], "fsyncs once the old connections are found dead")
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=10)


if __name__ == "__main__":
    h.main(globals())
