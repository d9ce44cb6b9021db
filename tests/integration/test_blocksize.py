#!/usr/bin/env python3
"""Block-size constraints: against nbdkit's blocksize-policy filter with
blocksize-error-policy=error (the server refuses any request that is not
aligned to the minimum or is larger than the maximum), unaligned application
I/O must still be byte-exact (read-modify-write at the edges, splitting at
the maximum), concurrent unaligned writes into the same blocks must not lose
each other's bytes, and the server must never see a badly formed request.
The log filter sits outside the policy filter, so it sees what the bridge sent.
"""
import errno
import os
import random
import re
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import semantics_util as su  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB
MAXIMUM = 65536


class PolicyServer(h.Nbdkit):
    def __init__(self, minimum, preferred=4096, maximum=MAXIMUM, size=SIZE, delay_write=None):
        self.minimum, self.maximum = minimum, maximum
        d = h.tmpdir("nbdkit")
        self.logfile = os.path.join(d, "nbdkit.log")
        args = ["memory", str(size), "logfile=" + self.logfile,
                "blocksize-minimum=%d" % minimum, "blocksize-preferred=%d" % preferred,
                "blocksize-maximum=%d" % maximum, "blocksize-error-policy=error"]
        filters = ["--filter=log", "--filter=blocksize-policy"]
        if delay_write:  # innermost: the server holds each write before performing it
            args.append("delay-write=" + delay_write)
            filters.append("--filter=delay")
        super().__init__(args, opts=filters, d=d)

    def check_clean(self, what):
        """Every request the bridge sent obeyed the constraints; none failed."""
        conns = su.log_connects(self.logfile)
        h.check(conns, "%s: no connection logged" % what)
        for c in conns.values():
            h.check_eq(int(c["minsize"], 0), self.minimum, "%s: advertised minimum" % what)
            h.check_eq(int(c["maxsize"], 0), self.maximum, "%s: advertised maximum" % what)
        bad = []
        for r in su.log_requests(self.logfile):
            if r["act"] in ("Read", "Write", "Zero", "Trim", "Cache"):
                # alignment applies to every request; the maximum to payloads
                # (NBD spec: WRITE_ZEROES/TRIM may be longer than the maximum)
                if r["offset"] % self.minimum or r["count"] % self.minimum or r["count"] == 0 or \
                        (r["act"] in ("Read", "Write") and r["count"] > self.maximum):
                    bad.append(r["line"])
        h.check(not bad, "%s: %d request(s) break the block-size constraints, e.g. %r"
                % (what, len(bad), bad[:5]))
        fails = su.log_failed_replies(self.logfile)
        h.check(not fails, "%s: server answered with errors: %r" % (what, fails[:5]))
        # (the harness's own socket probe makes nbdkit complain about the handshake)
        errs = [ln for ln in self.stderr().splitlines()
                if "error" in ln.lower() and "handshake" not in ln]
        h.check(not errs, "%s: nbdkit stderr has errors: %r" % (what, errs[:5]))


def _random_io(minimum):
    rnd = random.Random(1000 + minimum)
    shadow = bytearray(SIZE)
    with PolicyServer(minimum) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            fd = os.open(m.export, os.O_RDWR)
            try:
                cases = [(1, 1), (minimum - 1, 2), (minimum + 1, minimum - 2), (0, SIZE % 7 + 5),
                         (SIZE - 3, 3), (SIZE - minimum - 1, minimum + 1), (MAXIMUM - 1, MAXIMUM + 2)]
                cases += [(rnd.randrange(0, SIZE - 1), rnd.randrange(1, 300001)) for _ in range(120)]
                for off, ln in cases:
                    ln = min(ln, SIZE - off)
                    data = rnd.randbytes(ln)
                    h.check_eq(os.pwrite(fd, data, off), ln, "pwrite(off=%d,len=%d)" % (off, ln))
                    shadow[off:off + ln] = data
                    # read back a slightly larger unaligned window
                    a, b = max(0, off - rnd.randrange(0, 5000)), min(SIZE, off + ln + rnd.randrange(0, 5000))
                    h.check_bytes(h.pread_full(fd, b - a, a), bytes(shadow[a:b]),
                                  "pread(off=%d,len=%d) after pwrite(off=%d,len=%d)" % (a, b - a, off, ln))
                for _ in range(60):
                    a = rnd.randrange(0, SIZE - 1)
                    b = min(SIZE, a + rnd.randrange(1, 300001))
                    h.check_bytes(h.pread_full(fd, b - a, a), bytes(shadow[a:b]),
                                  "random pread(off=%d,len=%d)" % (a, b - a))
                os.fsync(fd)
            finally:
                os.close(fd)
        h.check_bytes(su.server_image(srv.uri, request_size=MAXIMUM), bytes(shadow), "server image (nbdcopy)")
        srv.check_clean("minimum %d" % minimum)


def test_export_size_not_a_multiple_of_the_minimum_block():
    # 10000 bytes with a 4096-byte minimum: the last 1808 cannot be reached with aligned
    # requests, so the file ends at 8192 (as qemu's client rounds down), with a note.
    # Before, the last partial block's reads and writes failed with EINVAL.
    with PolicyServer(4096, size=10000) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        h.check_eq(os.stat(m.export).st_size, 8192, "the file's size")
        h.check(re.search(r"not a multiple of its minimum block .*the file is 8192 bytes", m.stderr()),
                "no note of the unreachable bytes: %r" % m.stderr()[-1000:])
        fd = os.open(m.export, os.O_RDWR)
        try:
            data = random.Random(5).randbytes(100)
            h.check_eq(os.pwrite(fd, data, 8092), 100, "a write that ends at the file's end")
            h.check_eq(h.errno_name(h.os_errno(os.pwrite, fd, b"x", 8192)[0]), "ENOSPC", "a write at the end")
            whole = os.pread(fd, 10000, 0)
            h.check_eq(len(whole), 8192, "bytes read from 0 asking for 10000")
            h.check_bytes(whole[8092:], data, "the last 100 bytes of the file")
        finally:
            os.close(fd)
        srv.check_clean("the rounded-down export")


def test_random_unaligned_io_min4096():
    _random_io(4096)


def test_random_unaligned_io_min512():
    _random_io(512)


def test_concurrent_unaligned_writes_same_blocks():
    """16 threads own interleaved 37-byte runs of the same 4 KiB blocks (runs
    cross block boundaries); after several rounds every run holds its
    owner's last value."""
    nthreads, run, rounds = 16, 37, 20
    base = 3 * 4096 + 100
    span = 8 * 4096
    nruns = span // run
    owner = [i % nthreads for i in range(nruns)]
    final = bytearray(span)
    errors = []
    with PolicyServer(4096) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            fds = [os.open(m.export, os.O_RDWR) for _ in range(nthreads)]
            barrier = threading.Barrier(nthreads)

            def worker(t):
                try:
                    rnd = random.Random(t)
                    mine = [i for i in range(nruns) if owner[i] == t]
                    for r in range(rounds):
                        barrier.wait(timeout=30)
                        rnd.shuffle(mine)
                        for i in mine:
                            val = bytes([(t * 16 + r * 3 + i) % 251 + 1]) * run
                            n = os.pwrite(fds[t], val, base + i * run)
                            if n != run:
                                errors.append("thread %d: short write %d" % (t, n))
                except Exception as e:  # noqa: BLE001
                    errors.append("thread %d: %r" % (t, e))
                    barrier.abort()

            threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(nthreads)]
            try:
                for th in threads:
                    th.start()
                end = time.monotonic() + 60          # one deadline for all
                for th in threads:
                    th.join(timeout=max(0.0, end - time.monotonic()))
                h.check(not any(th.is_alive() for th in threads), "writer threads still running")
            finally:
                for fd in fds:
                    os.close(fd)
            h.check(not errors, "writer errors: %r" % errors[:5])
            for i in range(nruns):
                t = owner[i]
                final[i * run:(i + 1) * run] = bytes([(t * 16 + (rounds - 1) * 3 + i) % 251 + 1]) * run
            used = nruns * run
            with open(m.export, "rb") as f:
                f.seek(base)
                got = f.read(used)
            h.check_bytes(got, bytes(final[:used]), "runs after concurrent unaligned writes")
            with open(m.export, "rb") as f:
                f.seek(base - 100)
                h.check_bytes(f.read(100), bytes(100), "bytes before the runs")
                f.seek(base + used)
                h.check_bytes(f.read(4096), bytes(4096), "bytes after the runs")
        img = su.server_image(srv.uri, request_size=MAXIMUM)
        h.check_bytes(img[base:base + used], bytes(final[:used]), "runs on the server")
        srv.check_clean("concurrent writes")


_LOG_WRITE_REPLY = re.compile(r"connection=(\d+) \.\.\.Write id=(\d+) ")


def _log_write_at_zero(logfile):
    """(request id, answered?) of the first 4 KiB write at offset 0 in the log, or None."""
    for r in su.log_requests(logfile):
        if r["act"] == "Write" and r["offset"] == 0 and r["count"] == 4096:
            replies = {(int(c), int(i)) for c, i in _LOG_WRITE_REPLY.findall(h.read_text(logfile))}
            return r["id"], (r["conn"], r["id"]) in replies
    return None


def _rmw_behind_an_aligned_write(hold):
    """The aligned write and the one-byte write into its block, with the server holding
    each write `hold`; returns block 0 afterwards, or None when the aligned write was
    answered before the one-byte write could start (a slow machine: try a longer hold)."""
    block = b"\xbb" * 4096
    with PolicyServer(4096, delay_write=hold) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            outcome = {}
            aligned = threading.Thread(target=lambda: outcome.setdefault("n", os.pwrite(fd, block, 0)))
            aligned.start()
            try:
                # The log filter is outside the delay: it shows the write once the bridge sent it.
                logged = h.wait_until(lambda: _log_write_at_zero(srv.logfile), timeout=10,
                                      what="the aligned write to reach the server")
                in_flight = not logged[1] and "n" not in outcome
                if in_flight:
                    h.check_eq(os.pwrite(fd, b"\x01", 10), 1, "the one-byte write")
            finally:
                aligned.join(timeout=30)
            h.check(not aligned.is_alive(), "the aligned write did not finish")
            h.check_eq(outcome.get("n"), 4096, "the aligned write")
            if not in_flight:
                return None
            got = h.pread_full(fd, 4096, 0)
        finally:
            os.close(fd)
        srv.check_clean("aligned write and read-modify-write")
    return block, got


def test_read_modify_write_waits_for_an_aligned_write_in_flight():
    """An aligned write in flight holds its blocks: a read-modify-write of a partial block
    inside them must read after it and not write the block's older bytes back over it.
    The server holds every write for a while, so the aligned one is still in flight when
    the one-byte write reads its block."""
    for hold in ("500ms", "3s"):
        result = _rmw_behind_an_aligned_write(hold)
        if result:
            break
        h.log("  the aligned write was answered before the one-byte write started (hold %s)" % hold)
    else:
        raise h.TestFailure("test set-up: the aligned write never stayed in flight long enough")
    block, got = result
    # The one-byte write came second, so its byte is on top of the aligned block.
    h.check_bytes(got, block[:10] + b"\x01" + block[11:], "block 0 after both writes")


def test_a_write_answered_while_waiting_for_its_block_lets_go():
    """--request-timeout answers a read-modify-write waiting for a block that a write the
    server holds has: it stops waiting (and gives its receive buffer back) then, not when
    the held write ends."""
    with PolicyServer(4096, delay_write="6") as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--request-timeout", "1", "--shutdown-timeout", "1"]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            results = {}

            def write(name, data, offset):
                try:
                    results[name] = os.pwrite(fd, data, offset)
                except OSError as e:
                    results[name] = errno.errorcode[e.errno]
            held = threading.Thread(target=write, args=("held", b"\xaa" * 4096, 0))
            held.start()
            h.wait_until(lambda: _log_write_at_zero(srv.logfile), timeout=10,
                         what="the aligned write to reach the server")
            waiting = threading.Thread(target=write, args=("waiting", b"\x01", 10))
            waiting.start()
            for thread in (held, waiting):
                thread.join(timeout=10)
            h.check_eq(results, {"held": "EIO", "waiting": "EIO"}, "both writes, answered by the timeout")
            # The held write is still at the server (6 s); the one that waited for its block is gone.
            h.wait_until(lambda: h.live_stats(m.mountdir)["in_flight"]["answered_running"] == 1, timeout=2,
                         what="the write that waited for the block to let go")
        finally:
            os.close(fd)


def test_seek_from_unaligned_offsets():
    """lseek(SEEK_DATA/SEEK_HOLE) from an offset inside a block asks the server about whole
    blocks and answers for the offset itself."""
    with PolicyServer(4096) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            h.check_eq(os.pwrite(fd, b"x" * 8192, MiB), 8192, "data at 1 MiB")
            data_end = os.lseek(fd, MiB, os.SEEK_HOLE)
            h.check(MiB + 8192 <= data_end < SIZE, "hole after the data at %d" % data_end)
            for offset, whence, expected in ((100, os.SEEK_DATA, MiB), (100, os.SEEK_HOLE, 100),
                                             (MiB + 100, os.SEEK_DATA, MiB + 100),
                                             (MiB + 100, os.SEEK_HOLE, data_end)):
                name = "SEEK_DATA" if whence == os.SEEK_DATA else "SEEK_HOLE"
                try:
                    got = os.lseek(fd, offset, whence)
                except OSError as e:
                    got = h.errno_name(e.errno)
                h.check_eq(got, expected, "lseek(%d, %s)" % (offset, name))
        finally:
            os.close(fd)
        srv.check_clean("seeks from unaligned offsets")


def test_large_request_is_split():
    rnd = random.Random(9)
    with PolicyServer(4096) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            fd = os.open(m.export, os.O_RDWR)
            try:
                for off, ln in ((0, MiB), (4096 * 7 + 3, MiB), (5 * MiB + 1, MiB - 2)):
                    data = rnd.randbytes(ln)
                    n0 = len(su.log_requests(srv.logfile))
                    h.check_eq(os.pwrite(fd, data, off), ln, "1 MiB pwrite count")
                    writes = [r for r in su.log_requests(srv.logfile)[n0:] if r["act"] == "Write"]
                    h.check(len(writes) >= MiB // MAXIMUM,
                            "a 1 MiB write should need at least %d requests of at most 64 KiB, got %d"
                            % (MiB // MAXIMUM, len(writes)))
                    n1 = len(su.log_requests(srv.logfile))
                    h.check_bytes(h.pread_full(fd, ln, off), data, "1 MiB read back at %d" % off)
                    reads = [r for r in su.log_requests(srv.logfile)[n1:] if r["act"] == "Read"]
                    h.check(len(reads) >= MiB // MAXIMUM, "1 MiB read: %d requests" % len(reads))
            finally:
                os.close(fd)
        srv.check_clean("1 MiB requests")


def test_unaligned_punch_and_zero():
    rnd = random.Random(12)
    size = 4 * MiB
    with PolicyServer(4096, size=size) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            fd = os.open(m.export, os.O_RDWR)
            try:
                shadow = bytearray(rnd.randbytes(size))
                for off in range(0, size, MiB):
                    h.pwrite_full(fd, bytes(shadow[off:off + MiB]), off)
                cases = [(su.FALLOC_FL_PUNCH_HOLE | su.FALLOC_FL_KEEP_SIZE, 4096 * 3 + 100, 50000),
                         (su.FALLOC_FL_ZERO_RANGE, MiB + 1, 3000),        # inside one block
                         (su.FALLOC_FL_PUNCH_HOLE | su.FALLOC_FL_KEEP_SIZE, 2 * MiB - 7, 14),
                         (su.FALLOC_FL_ZERO_RANGE, 3 * MiB - 4095, 300001)]
                for mode, off, ln in cases:
                    e = su.fallocate(fd, mode, off, ln)
                    h.check_eq(h.errno_name(e), "OK", "fallocate(mode=%#x, %d, %d)" % (mode, off, ln))
                    shadow[off:off + ln] = bytes(ln)
                    a, b = max(0, off - 5000), min(size, off + ln + 5000)
                    h.check_bytes(h.pread_full(fd, b - a, a), bytes(shadow[a:b]),
                                  "around fallocate(mode=%#x, %d, %d)" % (mode, off, ln))
                h.check_bytes(h.pread_full(fd, size, 0), bytes(shadow), "whole export")
            finally:
                os.close(fd)
        h.check_bytes(su.server_image(srv.uri, request_size=MAXIMUM), bytes(shadow), "server image (nbdcopy)")
        srv.check_clean("unaligned punch/zero")


if __name__ == "__main__":
    h.main(globals())
