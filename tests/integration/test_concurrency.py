#!/usr/bin/env python3
"""Concurrent readers and writers (threads, os.pread/os.pwrite) on one mount.

Writers own disjoint regions so the final content is deterministic; readers
check a region that nobody writes while the writers are busy.
"""
import os
import random
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

NTHREADS = 8
JOIN_DEADLINE = 60


def _run_threads(targets, mount=None):
    """Start daemon threads; join each with a deadline; collect errors."""
    errors = []
    lock = threading.Lock()

    def wrap(fn, arg):
        try:
            fn(arg)
        except BaseException as e:  # noqa: BLE001 - report everything
            with lock:
                errors.append("%s(%r): %s: %s" % (fn.__name__, arg, type(e).__name__, e))

    threads = [threading.Thread(target=wrap, args=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    end = time.monotonic() + JOIN_DEADLINE          # one deadline for all
    for t in threads:
        t.join(timeout=max(0.0, end - time.monotonic()))
    hung = [t for t in threads if t.is_alive()]
    if hung and mount is not None:
        h.log("HANG diagnostics:\n" + h.hang_report(mount))
    h.check(not hung, "%d of %d threads still running after %ss (hang)"
            % (len(hung), len(threads), JOIN_DEADLINE))
    h.check(not errors, "thread errors:\n  " + "\n  ".join(errors[:20]))


def test_concurrent_readers_pattern():
    size = 64 * 1024 * 1024 + 5
    with h.Nbdkit(["pattern", str(size)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        shared_fd = os.open(m.export, os.O_RDONLY)

        def reader(i):
            rnd = random.Random(i)
            # half the threads share one fd, half open their own
            fd = shared_fd if i % 2 else os.open(m.export, os.O_RDONLY)
            try:
                for _ in range(150):
                    off = rnd.randrange(0, size)
                    length = rnd.choice([1, 100, 4096, 4099, 65536, 131072, 262147, 1 << 20])
                    got = os.pread(fd, length, off)
                    exp = h.pattern_bytes(off, length, size)
                    if got != exp:
                        raise AssertionError("reader %d: pread(off=%d,len=%d) wrong data "
                                             "(got %d bytes, first diff +%d)"
                                             % (i, off, length, len(got), h.first_diff(got, exp)))
            finally:
                if fd != shared_fd:
                    os.close(fd)
        try:
            _run_threads([(reader, i) for i in range(NTHREADS)], m)
        finally:
            os.close(shared_fd)


def test_concurrent_readers_and_writers():
    region = 4 * 1024 * 1024
    size = 2 * NTHREADS * region       # first half: read-only area, second: writers
    d = h.tmpdir("data")
    src = os.path.join(d, "src")
    h.fill_random_file(src, NTHREADS * region)
    with open(src, "rb") as f:
        ro_data = f.read()
    with h.Nbdkit(["memory", str(size)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        r = h.run(["dd", "if=" + src, "of=" + m.export, "bs=1M", "conv=notrunc,fsync"], timeout=60)
        h.check_eq(r.returncode, 0, "prefill dd (%s)" % r.stderr)
        shadows = [bytearray(region) for _ in range(NTHREADS)]
        shared_fd = os.open(m.export, os.O_RDWR)

        def writer(i):
            rnd = random.Random(1000 + i)
            base = NTHREADS * region + i * region
            fd = shared_fd if i % 2 else os.open(m.export, os.O_RDWR)
            try:
                for _ in range(120):
                    off = rnd.randrange(0, region - 1)
                    length = min(rnd.choice([1, 7, 512, 4096, 5000, 65536, 131072, 300001]),
                                 region - off)
                    data = rnd.randbytes(length)
                    n = os.pwrite(fd, data, base + off)
                    if n != length:
                        raise AssertionError("writer %d: short pwrite %d/%d" % (i, n, length))
                    shadows[i][off:off + length] = data
                    if rnd.random() < 0.3:      # read back own data now and then
                        c = rnd.randrange(0, region - 4096)
                        got = os.pread(fd, 4096, base + c)
                        if got != bytes(shadows[i][c:c + 4096]):
                            raise AssertionError("writer %d: readback mismatch at +%d" % (i, c))
                    if rnd.random() < 0.05:
                        os.fsync(fd)
            finally:
                if fd != shared_fd:
                    os.close(fd)

        def reader(i):
            rnd = random.Random(2000 + i)
            fd = shared_fd if i % 2 else os.open(m.export, os.O_RDONLY)
            try:
                for _ in range(150):
                    length = rnd.choice([1, 4096, 4097, 65536, 131072 + 3, 1 << 20])
                    off = rnd.randrange(0, len(ro_data) - length)   # stay in the area
                    got = os.pread(fd, length, off)
                    if got != ro_data[off:off + length]:
                        raise AssertionError("reader %d: wrong data at off=%d len=%d (diff +%d)"
                                             % (i, off, length,
                                                h.first_diff(got, ro_data[off:off + length])))
            finally:
                if fd != shared_fd:
                    os.close(fd)

        try:
            _run_threads([(writer, i) for i in range(NTHREADS)] +
                         [(reader, i) for i in range(NTHREADS)], m)
            os.fsync(shared_fd)
            for i in range(NTHREADS):
                base = NTHREADS * region + i * region
                got = h.pread_full(shared_fd, region, base)
                h.check_bytes(got, bytes(shadows[i]), "writer %d region after join" % i)
            h.check_bytes(h.pread_full(shared_fd, len(ro_data), 0), ro_data, "read-only area")
        finally:
            os.close(shared_fd)
        # and the server has exactly the same bytes
        img = h.nbdcopy_to_file(srv.uri, os.path.join(d, "img"))
        h.check_bytes(img[:len(ro_data)], ro_data, "server read-only area")
        h.check_bytes(img[len(ro_data):], b"".join(bytes(s) for s in shadows), "server writer area")


def test_concurrent_processes_with_dd():
    # Several dd processes in parallel on distinct 1 MiB-aligned areas.
    nproc = NTHREADS
    chunk = 2 * 1024 * 1024
    size = nproc * chunk
    d = h.tmpdir("data")
    srcs = []
    for i in range(nproc):
        p = os.path.join(d, "src%d" % i)
        h.fill_random_file(p, chunk)
        srcs.append(p)
    with h.Nbdkit(["memory", str(size)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        procs = [h.popen(["dd", "if=" + srcs[i], "of=" + m.export, "bs=65536",
                          "seek=%d" % (i * chunk // 65536), "conv=notrunc"],
                         stdout=h.subprocess.DEVNULL, stderr=h.subprocess.PIPE)
                 for i in range(nproc)]
        for p in procs:
            try:
                _, err = p.communicate(timeout=60)
            except h.subprocess.TimeoutExpired:
                raise h.TestFailure("dd writer hung")
            h.check_eq(p.returncode, 0, "dd writer rc (%s)" % err)
        fd = os.open(m.export, os.O_RDONLY)
        try:
            for i in range(nproc):
                with open(srcs[i], "rb") as f:
                    h.check_bytes(h.pread_full(fd, chunk, i * chunk), f.read(), "dd area %d" % i)
        finally:
            os.close(fd)


if __name__ == "__main__":
    h.main(globals())
