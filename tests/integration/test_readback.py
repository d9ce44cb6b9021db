#!/usr/bin/env python3
"""Read-back of the nbdkit pattern plugin through the mount.

Every 8-byte big-endian word of the pattern export holds its own offset, so
any read can be checked exactly, at any alignment.
"""
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

# Not a multiple of 8 nor of 4096: the last word is truncated.
SIZE = 16 * 1024 * 1024 + 1003


def _check_read(fd, off, length, size=SIZE):
    got = h.pread_full(fd, length, off)
    h.check_bytes(got, h.pattern_bytes(off, length, size), "read(off=%d, len=%d)" % (off, length))


def test_aligned_and_unaligned_reads():
    with h.Nbdkit(["pattern", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDONLY)
        try:
            cases = [(0, 4096), (0, 1), (1, 1), (7, 1), (7, 2), (3, 13), (4095, 2),
                     (4096, 4096), (12345, 6789), (65536 - 3, 7), (131071, 131073),
                     (1 << 20, 1 << 20), (5, (1 << 20) + 5), (1000000, 3 * 131072 + 17)]
            for off, length in cases:
                _check_read(fd, off, length)
            # Also single os.pread calls (not looped) return the full amount
            # in the middle of the file.
            b = os.pread(fd, 8192, 8)
            h.check_bytes(b, h.pattern_bytes(8, 8192), "single pread")
        finally:
            os.close(fd)


def test_max_read_mount_option():
    # -o max_read=N: libfuse refuses the kernel's INIT unless the filesystem asks for
    # the same; the kernel then splits reads to N bytes (each READ is counted).
    with h.Nbdkit(["pattern", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["-o", "max_read=65536"]) as m:
        fd = os.open(m.export, os.O_RDONLY)
        try:
            before = h.live_stats(m.mountdir)["operations"]["read"]["count"]
            _check_read(fd, 12345, 1 << 20)
            reads = h.live_stats(m.mountdir)["operations"]["read"]["count"] - before
            h.check(reads >= 16, "a 1 MiB read under max_read=65536 came as %d READs" % reads)
        finally:
            os.close(fd)


def test_random_reads():
    rnd = random.Random(1234)
    with h.Nbdkit(["pattern", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        with open(m.export, "rb", buffering=0) as f:
            fd = f.fileno()
            for _ in range(300):
                off = rnd.randrange(0, SIZE)
                length = rnd.choice([1, 2, 8, 511, 512, 4096, 4097, 65536, 200000])
                _check_read(fd, off, length)


def test_eof_behaviour():
    with h.Nbdkit(["pattern", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDONLY)
        try:
            h.check_eq(os.fstat(fd).st_size, SIZE, "st_size")
            # The preferred I/O size (cmp, stdio): 128 KiB, not the server's 4 KiB block,
            # since every request is a round trip.
            h.check_eq(os.fstat(fd).st_blksize, 128 * 1024, "st_blksize")
            # read exactly at EOF -> 0 bytes
            h.check_eq(os.pread(fd, 4096, SIZE), b"", "read at EOF")
            # read past EOF -> 0 bytes
            h.check_eq(os.pread(fd, 4096, SIZE + 1), b"", "read 1 past EOF")
            h.check_eq(os.pread(fd, 10, SIZE + (1 << 30)), b"", "read far past EOF")
            # crossing EOF -> cut at EOF
            b = os.pread(fd, 4096, SIZE - 100)
            h.check_bytes(b, h.pattern_bytes(SIZE - 100, 100), "read crossing EOF")
            b = os.pread(fd, 1 << 20, SIZE - 5)
            h.check_bytes(b, h.pattern_bytes(SIZE - 5, 5), "1M read crossing EOF")
            # the very last byte
            h.check_bytes(os.pread(fd, 1, SIZE - 1), h.pattern_bytes(SIZE - 1, 1), "last byte")
            # sequential read through EOF via read()
            os.lseek(fd, SIZE - 3000, os.SEEK_SET)
            chunks = []
            while True:
                c = os.read(fd, 1024)
                if not c:
                    break
                chunks.append(c)
            h.check_bytes(b"".join(chunks), h.pattern_bytes(SIZE - 3000, 3000), "read() to EOF")
        finally:
            os.close(fd)


def test_whole_file_with_cmp_dd_cp():
    d = h.tmpdir("data")
    expected = os.path.join(d, "expected")
    h.write_pattern_file(expected, SIZE)
    with h.Nbdkit(["pattern", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        r = h.run(["cmp", expected, m.export], timeout=60)
        h.check_eq(r.returncode, 0, "cmp expected vs export (%s%s)" % (r.stdout, r.stderr))
        out = os.path.join(d, "dd.out")
        r = h.run(["dd", "if=" + m.export, "of=" + out, "bs=1M"], timeout=60)
        h.check_eq(r.returncode, 0, "dd rc (%s)" % r.stderr)
        h.check_eq(h.run(["cmp", expected, out]).returncode, 0, "cmp dd copy")
        out2 = os.path.join(d, "cp.out")
        r = h.run(["cp", m.export, out2], timeout=60)
        h.check_eq(r.returncode, 0, "cp rc (%s)" % r.stderr)
        h.check_eq(h.run(["cmp", expected, out2]).returncode, 0, "cmp cp copy")
        # odd block size dd with skip
        out3 = os.path.join(d, "dd3.out")
        r = h.run(["dd", "if=" + m.export, "of=" + out3, "bs=1000", "skip=7", "count=333"])
        h.check_eq(r.returncode, 0, "dd bs=1000 rc (%s)" % r.stderr)
        with open(out3, "rb") as f:
            h.check_bytes(f.read(), h.pattern_bytes(7000, 333000), "dd bs=1000 skip=7")


def test_large_offsets():
    # 8 TiB export: offsets far above 4 GiB must not be truncated anywhere.
    size = 8 << 40
    with h.Nbdkit(["pattern", str(size)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        st = os.stat(m.export)
        h.check_eq(st.st_size, size, "st_size of 8T export")
        fd = os.open(m.export, os.O_RDONLY)
        try:
            for off in [(4 << 30) - 3, (5 << 30) + 3, (1 << 40) + 12345, size - 4096, size - 1]:
                _check_read(fd, off, 4096, size)
            h.check_eq(os.pread(fd, 16, size), b"", "read at EOF of 8T export")
        finally:
            os.close(fd)


def test_page_cache_mode_and_mmap():
    import mmap
    with h.Nbdkit(["pattern", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--cache=page"]) as m:
        fd = os.open(m.export, os.O_RDONLY)
        try:
            for off, length in [(0, 4096), (3, 5), (777777, 123457), (SIZE - 10, 100)]:
                _check_read(fd, off, length)
            h.check_eq(os.pread(fd, 10, SIZE), b"", "read at EOF (page cache)")
            # mmap works with the page cache
            mm = mmap.mmap(fd, 1 << 20, prot=mmap.PROT_READ, offset=1 << 20)
            try:
                h.check_bytes(mm[12345:12345 + 5000], h.pattern_bytes((1 << 20) + 12345, 5000),
                              "mmap read")
            finally:
                mm.close()
        finally:
            os.close(fd)


def test_verbose_traces_requests():
    with h.Nbdkit(["pattern", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["-v"]) as m:
        before = len(m.stderr())
        fd = os.open(m.export, os.O_RDONLY)
        try:
            _check_read(fd, 4096 * 7, 4096)
            for i in range(5):
                _check_read(fd, 100000 * i + 1, 999)
        finally:
            os.close(fd)
        # One "#N READ offset=O length=L" line per read, and its "#N READ done: L bytes".
        wanted = [(4096 * 7, 4096)] + [(100000 * i + 1, 999) for i in range(5)]

        def traced():
            text = m.stderr()[before:]
            found = []
            for off, length in wanted:
                started = re.search(r"#(\d+) READ offset=%d length=%d\b" % (off, length), text)
                if not started or not re.search(r"#%s READ done: %d bytes\b" % (started.group(1), length), text):
                    return None
                found.append(started.group(1))
            return found
        try:
            ids = h.wait_until(traced, timeout=5, what="-v trace lines for the 6 reads")
        except h.TestFailure:
            raise h.TestFailure("-v: no READ trace (offset, length, done) for each of the reads %r: %r"
                                % (wanted, m.stderr()[before:].splitlines()[:20]))
        h.check_eq(len(set(ids)), len(wanted), "-v: request numbers of the 6 reads (%r)" % ids)


if __name__ == "__main__":
    h.main(globals())
