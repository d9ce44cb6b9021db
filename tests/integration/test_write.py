#!/usr/bin/env python3
"""Write-then-read through the mount, backed by the nbdkit memory plugin.

Data is checked three ways: read back through the same mount, read back
through a fresh mount of the same server, and fetched directly from the
server with nbdcopy (so a write that only lives in a cache is caught).
"""
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

SIZE = 8 * 1024 * 1024 + 4097          # deliberately not block aligned


def _server_image(srv):
    return h.nbdcopy_to_file(srv.uri, os.path.join(h.tmpdir("img"), "img"))


def test_write_read_unaligned():
    rnd = random.Random(42)
    shadow = bytearray(SIZE)                       # memory plugin starts zeroed
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            st = os.stat(m.export)
            h.check_eq(st.st_size, SIZE, "st_size")
            fd = os.open(m.export, os.O_RDWR)
            try:
                cases = [(0, 4096), (1, 1), (7, 9), (4095, 2), (12345, 67891),
                         (131072 - 5, 131072 + 10), (1 << 20, 1 << 20), (3, 3 * 131072 + 1)]
                for _ in range(100):
                    cases.append((rnd.randrange(0, SIZE - 300000), rnd.randrange(1, 300000)))
                for off, length in cases:
                    data = rnd.randbytes(length)
                    n = os.pwrite(fd, data, off)
                    h.check_eq(n, length, "pwrite(off=%d,len=%d) count" % (off, length))
                    shadow[off:off + length] = data
                    got = h.pread_full(fd, length, off)
                    h.check_bytes(got, data, "read-after-write off=%d len=%d" % (off, length))
                os.fsync(fd)
                h.check_bytes(h.pread_full(fd, SIZE, 0), bytes(shadow), "whole export via mount")
            finally:
                os.close(fd)
        # The data must be on the server, not in some cache of the bridge.
        h.check_bytes(_server_image(srv), bytes(shadow), "server image (nbdcopy)")
        # And a fresh mount of the same server sees it.
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            with open(m.export, "rb") as f:
                h.check_bytes(f.read(), bytes(shadow), "whole export via fresh mount")


def test_dd_in_cmp_out():
    d = h.tmpdir("data")
    src = os.path.join(d, "src")
    h.fill_random_file(src, SIZE)
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            r = h.run(["dd", "if=" + src, "of=" + m.export, "bs=64k", "conv=notrunc,fsync"],
                      timeout=60)
            h.check_eq(r.returncode, 0, "dd into export rc (%s)" % r.stderr)
            r = h.run(["cmp", src, m.export], timeout=60)
            h.check_eq(r.returncode, 0, "cmp src export (%s%s)" % (r.stdout, r.stderr))
            # cp out of the export
            out = os.path.join(d, "copy")
            r = h.run(["cp", m.export, out], timeout=60)
            h.check_eq(r.returncode, 0, "cp out rc (%s)" % r.stderr)
            h.check_eq(h.run(["cmp", src, out]).returncode, 0, "cmp src copy")
        with open(src, "rb") as f:
            h.check_bytes(_server_image(srv), f.read(), "server image after dd")


def test_eof_write_semantics():
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            # write starting exactly at EOF -> ENOSPC
            e, _ = h.os_errno(os.pwrite, fd, b"x" * 10, SIZE)
            h.check_eq(h.errno_name(e), "ENOSPC", "pwrite at EOF")
            # write starting past EOF -> ENOSPC
            e, _ = h.os_errno(os.pwrite, fd, b"x" * 10, SIZE + 4096)
            h.check_eq(h.errno_name(e), "ENOSPC", "pwrite past EOF")
            # write crossing EOF: short count, the part that fits is written
            data = bytes(range(256)) * 16          # 4096 bytes
            e, n = h.os_errno(os.pwrite, fd, data, SIZE - 1000)
            h.check_eq(h.errno_name(e), "OK", "pwrite crossing EOF errno")
            h.check_eq(n, 1000, "pwrite crossing EOF count")
            h.check_bytes(os.pread(fd, 4096, SIZE - 1000), data[:1000], "data written before EOF")
            # write() continuing at the file position: 1st cut, then ENOSPC
            os.lseek(fd, SIZE - 10, os.SEEK_SET)
            n = os.write(fd, b"A" * 100)
            h.check_eq(n, 10, "write() crossing EOF count")
            e, _ = h.os_errno(os.write, fd, b"B" * 100)
            h.check_eq(h.errno_name(e), "ENOSPC", "write() after reaching EOF")
            h.check_bytes(os.pread(fd, 100, SIZE - 10), b"A" * 10, "tail after write()")
            # size did not change
            h.check_eq(os.fstat(fd).st_size, SIZE, "st_size after EOF writes")
        finally:
            os.close(fd)
        h.check_eq(os.stat(m.export).st_size, SIZE, "stat size after EOF writes")


def test_fsync_sends_flush():
    d = h.tmpdir("log")
    logfile = os.path.join(d, "nbdkit.log")
    with h.Nbdkit(["memory", str(SIZE), "logfile=" + logfile], opts=["--filter=log"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        def flushes():
            with open(logfile) as f:
                # request lines look like "connection=1 Flush id=7 ..."; the
                # replies are "connection=1 ...Flush id=7 return=0"
                return sum(1 for ln in f if re.search(r"connection=\d+ Flush id=", ln))
        fd = os.open(m.export, os.O_RDWR)
        try:
            os.pwrite(fd, b"hello", 100)
            n0 = flushes()
            os.fsync(fd)
            # fsync only returns after the flush reply, so it must be logged now
            h.wait_until(lambda: flushes() > n0, timeout=5, what="NBD flush after fsync")
            n1 = flushes()
            os.fdatasync(fd)
            h.wait_until(lambda: flushes() > n1, timeout=5, what="NBD flush after fdatasync")
        finally:
            os.close(fd)
        with open(logfile) as f:
            text = f.read()
        h.check("Write" in text, "no NBD write in nbdkit log")


def _random_image(size):
    """A file of random bytes, for nbdcopy to put on the server behind the mount's back;
    returns its path and its bytes."""
    img = os.path.join(h.tmpdir("data"), "new.img")
    h.fill_random_file(img, size)
    with open(img, "rb") as f:
        return img, f.read()


def test_default_mode_is_uncached():
    # Default --cache=none: every read goes to the server, so a change made
    # on the server by another client is visible at once through the mount.
    img, new = _random_image(SIZE)
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDONLY)
        try:
            h.check_bytes(h.pread_full(fd, 65536, 4096), bytes(65536), "initial zeros")
            h.run(["nbdcopy", img, srv.uri], timeout=60, check=True)   # behind our back
            h.check_bytes(h.pread_full(fd, 65536, 4096), new[4096:4096 + 65536],
                          "data changed on the server, read again through the same fd")
        finally:
            os.close(fd)
        with open(m.export, "rb") as f:
            h.check_bytes(f.read(), new, "whole export after server-side change")


def test_page_cache_mode_drops_cached_pages_at_open():
    # --cache=page: pages cached by one open are dropped at the next open, so a change
    # made on the server in between is seen then (and only a new open promises it).
    img, new = _random_image(SIZE)
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--cache=page"]) as m:
        with open(m.export, "rb") as f:
            h.check_bytes(f.read(65536), bytes(65536), "zeros, read into the page cache")
        h.run(["nbdcopy", img, srv.uri], timeout=60, check=True)   # behind our back
        with open(m.export, "rb") as f:
            h.check_bytes(f.read(65536), new[:65536], "the server's new data after reopening")


def test_size_is_fixed_truncate_and_o_trunc():
    # The export cannot grow or shrink: truncate to another size fails with EINVAL, to
    # its own size succeeds; O_TRUNC is ignored, so cp into the file keeps its size.
    img, small = _random_image(SIZE // 2)
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        for size in (SIZE // 2, SIZE * 2, 0):
            e, _ = h.os_errno(os.truncate, m.export, size)
            h.check_eq(h.errno_name(e), "EINVAL", "truncate to %d" % size)
        e, _ = h.os_errno(os.truncate, m.export, SIZE)
        h.check_eq(h.errno_name(e), "OK", "truncate to the export's own size")
        with open(m.export, "r+b") as f:
            f.write(b"\xaa" * 8192)
        r = h.run(["cp", img, m.export], timeout=60)
        h.check_eq(r.returncode, 0, "cp into the export (%s)" % r.stderr.strip())
        h.check_eq(os.stat(m.export).st_size, SIZE, "size after cp (O_TRUNC ignored)")
        with open(m.export, "rb") as f:
            data = f.read()
        h.check_bytes(data[:len(small)], small, "the copied bytes")
        h.check_bytes(data[len(small):], bytes(SIZE - len(small)), "the bytes past the copy")


def test_cp_of_a_sparse_image_that_ends_in_a_hole():
    # cp opens with O_TRUNC (ignored), skips the holes and sets the size it expects
    # with ftruncate at the end: on that descriptor a size within the export is
    # accepted (nothing changes); on any other, truncation is still refused.
    d = h.tmpdir("img")
    img = os.path.join(d, "sparse.img")
    data = os.urandom(65536)
    with open(img, "wb") as f:
        f.truncate(SIZE // 2)
        f.seek(SIZE // 8)
        f.write(data)
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        for sparse in ("--sparse=auto", "--sparse=always"):
            r = h.run(["cp", sparse, img, m.export], timeout=60)
            h.check_eq(r.returncode, 0, "cp %s of an image that ends in a hole (%s)" % (sparse, r.stderr.strip()))
        h.check_eq(os.stat(m.export).st_size, SIZE, "size after cp")
        with open(m.export, "rb") as f:
            f.seek(SIZE // 8)
            h.check_bytes(f.read(len(data)), data, "the copied data")
        fd = os.open(m.export, os.O_WRONLY)
        try:
            e, _ = h.os_errno(os.ftruncate, fd, SIZE // 2)
            h.check_eq(h.errno_name(e), "EINVAL", "ftruncate on a descriptor opened without O_TRUNC")
        finally:
            os.close(fd)


def test_mode_and_owner_are_fixed_but_may_be_set_to_themselves():
    # chmod/chown to other values: EPERM. To the values they have: accepted, so that
    # `cp -p` (which sets mode, owner and times) into the export works.
    img, data = _random_image(SIZE // 4)
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        st = os.stat(m.export)
        e, _ = h.os_errno(os.chmod, m.export, st.st_mode & 0o7777)
        h.check_eq(h.errno_name(e), "OK", "chmod to the mode it has")
        e, _ = h.os_errno(os.chown, m.export, st.st_uid, st.st_gid)
        h.check_eq(h.errno_name(e), "OK", "chown to the owner it has")
        e, _ = h.os_errno(os.chmod, m.export, (st.st_mode & 0o7777) ^ 0o040)
        h.check_eq(h.errno_name(e), "EPERM", "chmod to another mode")
        e, _ = h.os_errno(os.chown, m.export, st.st_uid + 1, -1)
        h.check_eq(h.errno_name(e), "EPERM", "chown to another owner")
        h.check_eq(os.stat(m.export).st_mode, st.st_mode, "mode after the refused chmod")
        os.chmod(img, st.st_mode & 0o7777)
        r = h.run(["cp", "-p", img, m.export], timeout=60)
        h.check_eq(r.returncode, 0, "cp -p into the export (%s)" % r.stderr.strip())
        with open(m.export, "rb") as f:
            h.check_bytes(f.read(len(data)), data, "the bytes cp -p copied")
        stats = os.path.join(m.mountdir, ".stats")
        e, _ = h.os_errno(os.truncate, stats, 0)
        h.check_eq(h.errno_name(e), "EPERM", "truncate of .stats (root passes its 0444)")


def test_statfs_and_fixed_timestamps():
    # df shows the export's size, all used; the timestamps stay those of the mount.
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fs = os.statvfs(m.export)
        total = fs.f_blocks * fs.f_frsize
        h.check(SIZE <= total < SIZE + fs.f_frsize, "statfs total size %d for a %d-byte export" % (total, SIZE))
        h.check_eq(fs.f_bfree, 0, "statfs free blocks")
        h.check_eq(fs.f_bavail, 0, "statfs available blocks")
        before = os.stat(m.export)
        with open(m.export, "r+b") as f:
            f.write(b"x" * 4096)
        os.utime(m.export)  # touch: accepted, and the times stay
        after = os.stat(m.export)
        h.check_eq((after.st_mtime_ns, after.st_ctime_ns), (before.st_mtime_ns, before.st_ctime_ns),
                   "mtime and ctime after a write and a touch")


def test_page_cache_mode_write():
    rnd = random.Random(7)
    shadow = bytearray(SIZE)
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--cache=page"]) as m:
            fd = os.open(m.export, os.O_RDWR)
            try:
                for _ in range(50):
                    off = rnd.randrange(0, SIZE - 70000)
                    data = rnd.randbytes(rnd.randrange(1, 70000))
                    h.pwrite_full(fd, data, off)
                    shadow[off:off + len(data)] = data
                os.fsync(fd)
                h.check_bytes(h.pread_full(fd, SIZE, 0), bytes(shadow), "page-cache readback")
            finally:
                os.close(fd)
        h.check_bytes(_server_image(srv), bytes(shadow), "server image after --cache=page writes")


def _kernel_at_least(major, minor):
    version = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return version is not None and (int(version.group(1)), int(version.group(2))) >= (major, minor)


def test_shared_mmap_in_default_mode():
    # --cache=none opens the file with FOPEN_DIRECT_IO, where the kernel refuses
    # MAP_SHARED (ENODEV) unless the INIT reply allows it (FUSE_DIRECT_IO_ALLOW_MMAP,
    # Linux 6.6), which the bridge patches in. Stores through the mapping reach the
    # server at msync; a direct write through another descriptor is seen through
    # the mapping (the kernel drops the mapped pages it overwrites).
    import mmap
    if not _kernel_at_least(6, 6):
        raise h.SkipTest("FUSE_DIRECT_IO_ALLOW_MMAP needs Linux 6.6 (this is %s)" % os.uname().release)
    rnd = random.Random(11)
    shadow = bytearray(SIZE)
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            mapped = mmap.mmap(fd, 1 << 20, flags=mmap.MAP_SHARED, offset=1 << 20)
            try:
                data = rnd.randbytes(300000)
                mapped[12345:12345 + len(data)] = data
                shadow[(1 << 20) + 12345:(1 << 20) + 12345 + len(data)] = data
                mapped.flush()
                h.check_bytes(_server_image(srv), bytes(shadow), "server image after msync")
                h.check_bytes(h.pread_full(fd, len(data), (1 << 20) + 12345), data,
                              "pread through the mount of what was stored through the mapping")
                other = rnd.randbytes(8192)
                h.pwrite_full(fd, other, (1 << 20) + 4096)
                shadow[(1 << 20) + 4096:(1 << 20) + 4096 + len(other)] = other
                h.check_bytes(mapped[4096:4096 + len(other)], other,
                              "the mapping after a direct write through the descriptor")
            finally:
                mapped.close()
        finally:
            os.close(fd)
        h.check_bytes(_server_image(srv), bytes(shadow), "server image at the end")


if __name__ == "__main__":
    h.main(globals())
