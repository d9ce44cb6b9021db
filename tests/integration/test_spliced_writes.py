#!/usr/bin/env python3
"""WRITEs sent by reference (--spliced-writes, on by default).

A WRITE of 128 KiB and more hands the pages of its FUSE receive buffer to the
NBD socket (vmsplice() and splice()) instead of copying them, so the buffer may
not change until the server has read them. These tests check that the server
gets the application's bytes at every size and alignment, over unix and TCP and
from a connection thread; that the statistics show the writes really went by
reference (and none with --spliced-writes off); and that a WRITE the server
fails retires its buffer (unmapped, never reused) while the mount goes on
writing correct bytes.
"""
import errno
import json
import mmap
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

MiB = 1024 * 1024
SIZE = 32 * MiB

# (offset, length): 128 KiB (the smallest WRITE sent by reference), odd 4 KiB
# multiples, 1 MiB at and off 1 MiB boundaries, and the export's last MiB.
WRITES = [(0, 128 * 1024), (4096, 132 * 1024), (3 * MiB, MiB), (5 * MiB + 4096, MiB),
          (7 * MiB - 8192, 516 * 1024), (SIZE - MiB, MiB)]


def _image(size=SIZE):
    path = os.path.join(h.tmpdir("img"), "disk.img")
    h.fill_random_file(path, size)
    with open(path, "rb") as f:
        return path, bytearray(f.read())


def _stats(mount):
    r = h.run([h.NBDBRIDGE, "stats", mount.mountdir], timeout=15)
    h.check_eq(r.returncode, 0, "nbdbridge stats exit (stderr %r)" % r.stderr)
    return json.loads(r.stdout)["spliced_writes"]


def _direct_write(path, offset, data):
    """One O_DIRECT pwrite from page-aligned memory: one FUSE WRITE (at most 1 MiB)."""
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        return os.pwritev(fd, [buf], offset)
    finally:
        os.close(fd)


def _write_all(mount, expected, rng, what):
    for offset, length in WRITES:
        data = rng.randbytes(length)
        h.check_eq(_direct_write(mount.export, offset, data), length,
                   "%s: O_DIRECT write of %d at %d" % (what, length, offset))
        expected[offset:offset + length] = data
    # Buffered: with direct I/O the kernel passes it on in pieces of up to 1 MiB.
    data = rng.randbytes(3 * MiB)
    with open(mount.export, "r+b") as f:
        f.seek(12345)
        h.check_eq(f.write(data), len(data), "%s: buffered write" % what)
    expected[12345:12345 + len(data)] = data


def _check_image(img, expected, what):
    with open(img, "rb") as f:
        h.check_bytes(f.read(), bytes(expected), "%s: the server's image" % what)


def test_spliced_writes_reach_the_server_intact():
    rng = random.Random(41)
    img, expected = _image()
    for tcp in (False, True):
        option_sets = ([[], ["--connection-threads", "off"]] if tcp
                       else [[], ["--connection-threads", "all"], ["--connection-threads", "off"]])
        for opts in option_sets:
            what = "%s %s" % ("tcp" if tcp else "unix", " ".join(opts) or "defaults")
            with h.Nbdkit(["file", img], tcp=tcp) as srv:
                with h.Mount(h.tmpdir("mp"), [srv.uri], opts=opts) as m:
                    _write_all(m, expected, rng, what)
                    spliced = _stats(m)
                    h.log("  %s: %r" % (what, spliced))
                    h.check(spliced["by_reference"] >= len(WRITES), "%s: writes went by reference: %r"
                            % (what, spliced))
                    h.check_eq(spliced["retired"], 0, "%s: buffers retired without a failure" % what)
            _check_image(img, expected, what)


def test_spliced_writes_off_copies():
    rng = random.Random(42)
    img, expected = _image()
    for opts in (["--spliced-writes", "off"], ["--socket-batching", "off"]):
        with h.Nbdkit(["file", img]) as srv:
            with h.Mount(h.tmpdir("mp"), [srv.uri], opts=opts) as m:
                _write_all(m, expected, rng, " ".join(opts))
                h.check_eq(_stats(m)["by_reference"], 0, "%s: writes went by reference" % " ".join(opts))
        _check_image(img, expected, " ".join(opts))


def test_a_failed_spliced_write_retires_its_buffer():
    # The server fails WRITEs while the switch file exists. A failed WRITE's
    # buffer is unmapped instead of reused; later WRITEs get fresh buffers and
    # their bytes arrive intact, and the failed range keeps its old bytes.
    rng = random.Random(43)
    img, expected = _image()
    switch = os.path.join(h.tmpdir("switch"), "fail-writes")
    open(switch, "w").close()
    args = ["file", img, "error-pwrite=EIO", "error-pwrite-rate=100%", "error-pwrite-file=" + switch]
    with h.Nbdkit(args, opts=["--filter=error"]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        for offset in (2 * MiB, 9 * MiB + 4096):
            err, _ = h.os_errno(_direct_write, m.export, offset, rng.randbytes(MiB))
            h.check_eq(err, errno.EIO, "1 MiB write at %d while the server fails writes" % offset)
        spliced = _stats(m)
        h.log("  after the failures: %r" % spliced)
        h.check(spliced["retired"] >= 2, "failed writes retired their buffers: %r" % spliced)
        os.unlink(switch)
        for round_ in range(3):  # more writes than buffers retired: the pool refills
            _write_all(m, expected, rng, "after the failures, round %d" % round_)
        h.check_eq(_stats(m)["retired"], spliced["retired"], "buffers retired after the failures stopped")
        h.check(m.mounted(), "mount vanished")
    _check_image(img, expected, "after failed writes")


if __name__ == "__main__":
    h.main(globals())
