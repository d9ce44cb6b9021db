#!/usr/bin/env python3
"""Sparse-file semantics: fallocate (punch hole, zero range, preallocate,
unsupported modes), zero-filled writes for servers without zero support,
lseek SEEK_DATA/SEEK_HOLE from NBD block status, st_blocks, and sparse
copies (cp --sparse=always, qemu-img map/convert) of mostly empty exports
served by nbdkit memory, nbdkit sparse-random and qemu-nbd (qcow2).
"""
import errno
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import semantics_util as su  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
SMALL = 16 * MiB + 4097          # deliberately not block aligned
SPARSE_LIMIT = 64 * MiB          # "stays small" for 1 GiB exports and their copies
COPIED = 256 * MiB               # exports copied whole (cp, cmp, qemu-img): big holes, short tests


def _fill(fd, size, rnd):
    data = bytearray(rnd.randbytes(size))
    for off in range(0, size, MiB):
        h.pwrite_full(fd, bytes(data[off:off + MiB]), off)
    return data


def _fallocate_cli(args, path):
    return h.run(["fallocate"] + args + [path], timeout=20)


# ---------------------------------------------------------------------------

def test_punch_hole_and_zero_range():
    rnd = random.Random(1)
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(SMALL), "logfile=" + logfile], opts=["--filter=log"]) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            fd = os.open(m.export, os.O_RDWR)
            try:
                shadow = _fill(fd, SMALL, rnd)
                # punch hole, unaligned both ends, through the fallocate CLI
                off, ln = MiB + 123, 200 * 1024 + 7
                r = _fallocate_cli(["--punch-hole", "--keep-size", "-o", str(off), "-l", str(ln)],
                                   m.export)
                h.check_eq(r.returncode, 0, "fallocate --punch-hole rc (%s)" % r.stderr.strip())
                shadow[off:off + ln] = bytes(ln)
                h.check_bytes(h.pread_full(fd, ln + 2, off - 1), bytes(shadow[off - 1:off + ln + 1]),
                              "punched range (with one byte either side)")
                # zero range, CLI
                off2, ln2 = 5 * MiB + 4095, 3 * MiB + 11
                r = _fallocate_cli(["--zero-range", "-o", str(off2), "-l", str(ln2)], m.export)
                h.check_eq(r.returncode, 0, "fallocate --zero-range rc (%s)" % r.stderr.strip())
                shadow[off2:off2 + ln2] = bytes(ln2)
                zeroed = h.live_stats(m.mountdir)["operations"]["trim_zero"]
                h.check_eq((zeroed["count"], zeroed["bytes"]), (2, ln + ln2), "trim_zero in the statistics")
                # zero range with KEEP_SIZE crossing EOF: zeroes up to EOF only
                off3 = SMALL - 5000
                e = su.fallocate(fd, su.FALLOC_FL_ZERO_RANGE | su.FALLOC_FL_KEEP_SIZE, off3, 20000)
                h.check_eq(h.errno_name(e), "OK", "zero-range KEEP_SIZE across EOF")
                shadow[off3:] = bytes(SMALL - off3)
                # punch hole, ctypes, tiny range inside one block
                e = su.fallocate(fd, su.FALLOC_FL_PUNCH_HOLE | su.FALLOC_FL_KEEP_SIZE, 9 * MiB + 17, 3)
                h.check_eq(h.errno_name(e), "OK", "punch-hole of 3 bytes")
                shadow[9 * MiB + 17:9 * MiB + 20] = bytes(3)
                h.check_eq(os.fstat(fd).st_size, SMALL, "st_size after fallocate")
                h.check_bytes(h.pread_full(fd, SMALL, 0), bytes(shadow), "whole export via mount")
            finally:
                os.close(fd)
        h.check_bytes(su.server_image(srv.uri), bytes(shadow), "server image (nbdcopy)")
    zeros = [r for r in su.log_requests(logfile) if r["act"] == "Zero"]
    h.check(any(r.get("trim") == "1" for r in zeros),
            "punch-hole should send NBD_CMD_WRITE_ZEROES without NO_HOLE (trim=1): %r"
            % [r["line"] for r in zeros])
    h.check(any(r.get("trim") == "0" for r in zeros),
            "zero-range should send NBD_CMD_WRITE_ZEROES with NO_HOLE (trim=0): %r"
            % [r["line"] for r in zeros])


def _write_count(m):
    with open(os.path.join(m.mountdir, ".stats")) as f:
        return json.load(f)["operations"]["write"]["count"]


def test_fallocate_modes():
    with h.Nbdkit(["memory", str(SMALL)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            os.pwrite(fd, b"keep me", 4096)
            # mode 0 within the size: succeeds and changes nothing
            os.posix_fallocate(fd, 0, SMALL)
            e = su.fallocate(fd, 0, 100, 5000)
            h.check_eq(h.errno_name(e), "OK", "fallocate(mode 0) within size")
            e = su.fallocate(fd, su.FALLOC_FL_KEEP_SIZE, SMALL - 10, MiB)
            h.check_eq(h.errno_name(e), "OK", "fallocate(KEEP_SIZE) across EOF")
            h.check_bytes(os.pread(fd, 7, 4096), b"keep me", "data after preallocation")
            h.check_eq(os.fstat(fd).st_size, SMALL, "st_size after preallocation")
            # mode 0 past the end would grow the file: ENOSPC at once, as a write there gets.
            # (EOPNOTSUPP would make glibc's posix_fallocate write into every block instead.)
            writes = _write_count(m)
            e = su.fallocate(fd, 0, SMALL - 10, MiB)
            h.check_eq(h.errno_name(e), "ENOSPC", "fallocate(mode 0) across EOF")
            e, _ = h.os_errno(os.posix_fallocate, fd, SMALL - 10, MiB)
            h.check_eq(h.errno_name(e), "ENOSPC", "posix_fallocate across EOF")
            h.check_eq(_write_count(m), writes, "writes sent for a refused preallocation")
            # collapse / insert range: EOPNOTSUPP (ctypes and CLI)
            for name, mode in (("collapse", su.FALLOC_FL_COLLAPSE_RANGE),
                               ("insert", su.FALLOC_FL_INSERT_RANGE)):
                e = su.fallocate(fd, mode, 0, 65536)
                h.check_eq(e, errno.EOPNOTSUPP, "fallocate(%s-range) errno" % name)
                r = _fallocate_cli(["--%s-range" % name, "-o", "0", "-l", "65536"], m.export)
                h.check(r.returncode != 0, "fallocate --%s-range should fail" % name)
                h.check("Operation not supported" in r.stderr,
                        "fallocate --%s-range error text: %r" % (name, r.stderr))
            # punch hole without KEEP_SIZE is refused as on any Linux file system
            e = su.fallocate(fd, su.FALLOC_FL_PUNCH_HOLE, 0, 4096)
            h.check_eq(e, errno.EOPNOTSUPP, "punch-hole without KEEP_SIZE errno")
            h.check_bytes(os.pread(fd, 7, 4096), b"keep me", "data after refused modes")
            h.check_eq(os.fstat(fd).st_size, SMALL, "st_size after refused modes")
        finally:
            os.close(fd)


def test_nozero_server_gets_full_zero_writes():
    """Without zero support on the server, zeroing becomes written zeros that
    must cover every byte of a large, odd-sized range."""
    rnd = random.Random(2)
    size = 12 * MiB + 777
    logfile = os.path.join(h.tmpdir("log"), "nbdkit.log")
    with h.Nbdkit(["memory", str(size), "logfile=" + logfile],
                  opts=["--filter=log", "--filter=nozero"]) as srv:
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            fd = os.open(m.export, os.O_RDWR)
            try:
                shadow = _fill(fd, size, rnd)
                cases = [(su.FALLOC_FL_ZERO_RANGE, MiB + 333, 3 * MiB + 12345),
                         (su.FALLOC_FL_PUNCH_HOLE | su.FALLOC_FL_KEEP_SIZE, 6 * MiB - 1,
                          3 * MiB + 4099),
                         (su.FALLOC_FL_ZERO_RANGE | su.FALLOC_FL_KEEP_SIZE, size - 100, 4096)]
                for mode, off, ln in cases:
                    n0 = len(su.log_requests(logfile))
                    e = su.fallocate(fd, mode, off, ln)
                    h.check_eq(h.errno_name(e), "OK", "fallocate mode=%#x off=%d len=%d"
                               % (mode, off, ln))
                    end = min(off + ln, size)
                    # the zero-filled writes cover exactly [off, end)
                    writes = sorted((r["offset"], r["offset"] + r["count"])
                                    for r in su.log_requests(logfile)[n0:] if r["act"] == "Write")
                    pos = off
                    for a, b in writes:
                        h.check(a <= pos, "gap in the zero-filled writes at %d: %r" % (pos, writes))
                        pos = max(pos, b)
                    h.check(writes and writes[0][0] >= off and pos == end,
                            "zero-filled writes for [%d,%d) cover %r" % (off, end, writes))
                    shadow[off:end] = bytes(end - off)
                    got = h.pread_full(fd, end - off, off)
                    h.check_bytes(got, bytes(end - off), "zeroed range off=%d len=%d" % (off, ln))
                h.check_bytes(h.pread_full(fd, size, 0), bytes(shadow), "whole export via mount")
            finally:
                os.close(fd)
        h.check_bytes(su.server_image(srv.uri), bytes(shadow), "server image (nbdcopy)")
    reqs = su.log_requests(logfile)
    h.check(not [r for r in reqs if r["act"] in ("Zero", "Trim")],
            "no Zero/Trim may reach a server without zero support")
    fails = su.log_failed_replies(logfile)
    h.check(not fails, "server saw failed requests: %r" % fails[:5])


def test_seek_data_hole():
    size = GiB
    a_off, a_len = 100 * MiB + 4096 * 3, 4096
    b_off, b_len = 500 * MiB, MiB
    with h.Nbdkit(["memory", str(size)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            os.pwrite(fd, b"\xaa" * a_len, a_off)
            os.pwrite(fd, b"\xbb" * b_len, b_off)
            d1 = os.lseek(fd, 0, os.SEEK_DATA)
            h.check(a_off - MiB < d1 <= a_off, "SEEK_DATA(0)=%d, first data at %d" % (d1, a_off))
            h1 = os.lseek(fd, d1, os.SEEK_HOLE)
            h.check(a_off + a_len <= h1 < b_off, "SEEK_HOLE(%d)=%d, data ends at %d, next data %d"
                    % (d1, h1, a_off + a_len, b_off))
            h.check(h1 <= a_off + a_len + MiB, "SEEK_HOLE(%d)=%d far past the data end %d"
                    % (d1, h1, a_off + a_len))
            h.check_eq(os.lseek(fd, 0, os.SEEK_HOLE), 0, "SEEK_HOLE(0) on an unwritten start")
            h.check_eq(os.lseek(fd, a_off, os.SEEK_HOLE), h1, "SEEK_HOLE(inside first data)")
            h.check_eq(os.lseek(fd, a_off + 100, os.SEEK_DATA), a_off + 100,
                       "SEEK_DATA(inside data) returns the offset itself")
            d2 = os.lseek(fd, h1, os.SEEK_DATA)
            h.check(b_off - MiB < d2 <= b_off, "SEEK_DATA(%d)=%d, second data at %d" % (h1, d2, b_off))
            h2 = os.lseek(fd, d2, os.SEEK_HOLE)
            h.check(b_off + b_len <= h2 <= b_off + b_len + MiB, "SEEK_HOLE(%d)=%d, data ends at %d"
                    % (d2, h2, b_off + b_len))
            # no data after the second extent
            e, _ = h.os_errno(os.lseek, fd, h2, os.SEEK_DATA)
            h.check_eq(h.errno_name(e), "ENXIO", "SEEK_DATA after the last data")
            e, _ = h.os_errno(os.lseek, fd, size, os.SEEK_DATA)
            h.check_eq(h.errno_name(e), "ENXIO", "SEEK_DATA at EOF")
            e, _ = h.os_errno(os.lseek, fd, size + 4096, os.SEEK_DATA)
            h.check_eq(h.errno_name(e), "ENXIO", "SEEK_DATA past EOF")
            e, _ = h.os_errno(os.lseek, fd, size, os.SEEK_HOLE)
            h.check_eq(h.errno_name(e), "ENXIO", "SEEK_HOLE at EOF")
            h.check_eq(os.lseek(fd, size - 1, os.SEEK_HOLE), size - 1, "SEEK_HOLE(EOF-1) in a hole")
            # data at the very end: SEEK_HOLE there answers EOF (the virtual hole)
            os.pwrite(fd, b"\xcc" * 8192, size - 8192)
            h.check_eq(os.lseek(fd, size - 1, os.SEEK_HOLE), size, "SEEK_HOLE(EOF-1) in data")
            h.check_eq(os.lseek(fd, size - 1, os.SEEK_DATA), size - 1, "SEEK_DATA(EOF-1) in data")
            # punching the second extent turns it into a hole again
            e = su.fallocate(fd, su.FALLOC_FL_PUNCH_HOLE | su.FALLOC_FL_KEEP_SIZE, b_off, b_len)
            h.check_eq(h.errno_name(e), "OK", "punch-hole of the second extent")
            d3 = os.lseek(fd, h1, os.SEEK_DATA)
            h.check(size - 8192 - MiB < d3 <= size - 8192,
                    "SEEK_DATA(%d) after punching: %d, expected the tail data at %d"
                    % (h1, d3, size - 8192))
        finally:
            os.close(fd)


def test_seek_without_block_status():
    size = 64 * MiB
    with h.Nbdkit(["memory", str(size)], opts=["--filter=noextents"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDONLY)
        try:
            for x in (0, 1, 4096, 12345678, size - 1):
                h.check_eq(os.lseek(fd, x, os.SEEK_DATA), x, "SEEK_DATA(%d) without block status" % x)
                h.check_eq(os.lseek(fd, x, os.SEEK_HOLE), size, "SEEK_HOLE(%d) without block status" % x)
            e, _ = h.os_errno(os.lseek, fd, size, os.SEEK_DATA)
            h.check_eq(h.errno_name(e), "ENXIO", "SEEK_DATA at EOF without block status")
        finally:
            os.close(fd)
        # everything counts as allocated
        h.wait_until(lambda: su.st_alloc(m.export) >= size, timeout=10,
                     what="st_blocks covering the whole export without block status")


def test_st_blocks_follow_allocation():
    size = GiB
    with h.Nbdkit(["memory", str(size)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        h.check_eq(os.stat(m.export).st_size, size, "st_size")
        h.wait_until(lambda: su.st_alloc(m.export) < MiB, timeout=10,
                     what="st_blocks of an empty 1 GiB export to become small")
        fd = os.open(m.export, os.O_RDWR)
        try:
            for i in range(4):
                os.pwrite(fd, os.urandom(MiB), (100 + 200 * i) * MiB)
        finally:
            os.close(fd)
        h.wait_until(lambda: 4 * MiB <= su.st_alloc(m.export) < SPARSE_LIMIT, timeout=10,
                     what="st_blocks*512 in [4 MiB, 64 MiB) after writing 4 MiB")
        r = h.run(["du", "-B1", m.export], timeout=10)
        du = int(r.stdout.split()[0])
        h.check(4 * MiB <= du < SPARSE_LIMIT, "du of the export: %d" % du)
        # punching everything makes it small again
        fd = os.open(m.export, os.O_RDWR)
        try:
            e = su.fallocate(fd, su.FALLOC_FL_PUNCH_HOLE | su.FALLOC_FL_KEEP_SIZE, 0, size)
            h.check_eq(h.errno_name(e), "OK", "punch-hole of the whole export")
        finally:
            os.close(fd)
        h.wait_until(lambda: su.st_alloc(m.export) < MiB, timeout=10,
                     what="st_blocks to drop after punching everything")


def test_st_blocks_cover_writes_at_the_first_stat():
    # The first stat after this mount's writes must already count them (the count
    # from the server comes later): tar -S takes st_blocks == 0 for a file that is all
    # holes and archives none of its data.
    with h.Nbdkit(["memory", str(64 * MiB)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        h.wait_until(lambda: su.st_alloc(m.export) < MiB, timeout=10,
                     what="st_blocks of an empty export to become small")
        data = os.urandom(MiB)
        fd = os.open(m.export, os.O_RDWR)
        try:
            for i in range(1, 4):
                os.pwrite(fd, data, i * 8 * MiB)
                os.fsync(fd)
                h.check(su.st_alloc(m.export) >= i * MiB,
                        "st_blocks*512 at the first stat after writing %d MiB: %d" % (i, su.st_alloc(m.export)))
        finally:
            os.close(fd)
        d = h.tmpdir("tar")
        archive = os.path.join(d, "export.tar")
        h.run(["tar", "-S", "-cf", archive, "-C", m.mountdir, os.path.basename(m.export)], timeout=30, check=True)
        h.run(["tar", "-xf", archive, "-C", d], timeout=30, check=True)
        with open(os.path.join(d, os.path.basename(m.export)), "rb") as f:
            f.seek(8 * MiB)
            h.check_bytes(f.read(MiB), data, "the written MiB in tar -S's archive")


def test_st_blocks_follow_another_clients_writes():
    # Another client of the export (here a second mount) writes: this mount, which wrote
    # nothing, counts again at a stat once its last count is 5 s old.
    with h.Nbdkit(["memory", str(GiB)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as watcher, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as writer:
        h.wait_until(lambda: su.st_alloc(watcher.export) < MiB, timeout=10,
                     what="st_blocks of an empty 1 GiB export to become small")
        fd = os.open(writer.export, os.O_RDWR)
        try:
            os.pwrite(fd, os.urandom(4 * MiB), 300 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        h.wait_until(lambda: 4 * MiB <= su.st_alloc(watcher.export) < SPARSE_LIMIT, timeout=10,
                     what="the other mount's st_blocks to show the 4 MiB written through this one")


def test_st_blocks_counted_when_the_mount_is_live():
    # "Live" (the pidfile, --daemon returning) waits for the first count of the allocation
    # (bounded by 2 s), so a cp started then sees a sparse file and seeks past the holes.
    # The server answers block status 500 ms late, so the count is still running when
    # the kernel's INIT has been answered.
    pidfile = os.path.join(h.tmpdir("pid"), "pid")
    with h.Nbdkit(["memory", str(GiB), "delay-extents=500ms"], opts=["--filter=delay"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["-P", pidfile], wait_pidfile=pidfile) as m:
        h.check(su.st_alloc(m.export) < SPARSE_LIMIT,
                "st_blocks*512 of an empty 1 GiB export when the pidfile appeared: %d" % su.st_alloc(m.export))


def _bytes_read(m):
    """Bytes the application has read from the export so far (the mount's .stats)."""
    with open(os.path.join(m.mountdir, ".stats")) as f:
        return json.load(f)["operations"]["read"]["bytes"]


def _check_read_only_the_data(m, before, what):
    """cp --sparse=always and qemu-img convert would find zero blocks themselves and still
    write a small copy: that SEEK_DATA/SEEK_HOLE let them skip the holes shows in what
    they read."""
    read = _bytes_read(m) - before
    h.check(read < SPARSE_LIMIT, "%s read %d bytes of the export (limit %d): it did not skip the holes"
            % (what, read, SPARSE_LIMIT))


def _sparse_copy_check(m, what):
    export = m.export
    d = h.tmpdir("copy")
    out = os.path.join(d, "copy.img")
    # cp seeks for data only in a file whose st_blocks says it is sparse; until the
    # bridge's first count of the allocation ends, st_blocks covers the whole export (the
    # bridge is live, and writes its pidfile, only after that count; Mount returns once
    # the mount exists, which is earlier)
    h.wait_until(lambda: su.st_alloc(export) < SPARSE_LIMIT, timeout=10,
                 what="%s: st_blocks to show the export is sparse (below %d bytes)" % (what, SPARSE_LIMIT))
    before = _bytes_read(m)
    r = h.run(["cp", "--sparse=always", export, out], timeout=60)
    h.check_eq(r.returncode, 0, "%s: cp --sparse=always rc (%s)" % (what, r.stderr.strip()))
    _check_read_only_the_data(m, before, "%s: cp --sparse=always" % what)
    st = os.stat(out)
    h.check_eq(st.st_size, os.stat(export).st_size, "%s: size of the copy" % what)
    h.check(st.st_blocks * 512 < SPARSE_LIMIT, "%s: copy allocates %d bytes (limit %d)"
            % (what, st.st_blocks * 512, SPARSE_LIMIT))
    # (cmp itself reads in st_blksize pieces, 128 KiB, one round trip each through
    # the direct-I/O mount; dd with 1 MiB blocks feeds it faster still)
    r = h.run(["sh", "-c", 'dd if="$1" bs=1M status=none | cmp - "$2"', "sh", export, out],
              timeout=60)
    h.check_eq(r.returncode, 0, "%s: cmp export copy (%s%s)" % (what, r.stdout, r.stderr))
    return out


def test_cp_sparse_memory():
    with h.Nbdkit(["memory", str(COPIED)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        fd = os.open(m.export, os.O_RDWR)
        try:
            for i, off in enumerate((0, 31 * MiB + 4096, 160 * MiB + 77, COPIED - 2 * MiB)):
                os.pwrite(fd, bytes([i + 1]) * (2 * MiB), off)
        finally:
            os.close(fd)
        out = _sparse_copy_check(m, "nbdkit memory")
        with open(out, "rb") as f:
            f.seek(160 * MiB + 77)
            h.check_bytes(f.read(2 * MiB), b"\x03" * (2 * MiB), "copied data at 160 MiB+77")
        h.check(os.stat(out).st_blocks * 512 >= 8 * MiB - 4096 * 4,
                "the copy must still hold the 8 MiB of data (allocates %d bytes)"
                % (os.stat(out).st_blocks * 512))


def test_cp_sparse_random():
    args = ["sparse-random", str(COPIED), "seed=1", "percent=4", "runlength=1048576"]
    with h.Nbdkit(args) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        out = _sparse_copy_check(m, "nbdkit sparse-random")
        h.check(os.stat(out).st_blocks > 0, "sparse-random copy holds no data at all")
        # the source itself reports its allocation
        h.wait_until(lambda: 0 < su.st_alloc(m.export) < SPARSE_LIMIT, timeout=10,
                     what="st_blocks of the sparse-random export to be small but not 0")


def test_qcow2_qemu_nbd_sparse():
    su.need("qemu-img", "qemu-io", "qemu-nbd")
    d = h.tmpdir("qcow2")
    img = os.path.join(d, "disk.qcow2")
    h.run(["qemu-img", "create", "-q", "-f", "qcow2", img, str(COPIED)], timeout=20, check=True)
    writes = [(0xab, 25 * MiB, 2 * MiB), (0xcd, 175 * MiB + 65536, MiB)]
    for pat, off, ln in writes:
        h.run(["qemu-io", "-f", "qcow2", "-c", "write -P %d %d %d" % (pat, off, ln), img],
              timeout=20, check=True)
    target = ["[", "qemu-nbd", "-f", "qcow2", img, "]"]
    with h.Mount(h.tmpdir("mp"), target) as m:
        h.check_eq(os.stat(m.export).st_size, COPIED, "st_size of the qcow2 export")
        out = _sparse_copy_check(m, "qemu-nbd qcow2")
        with open(out, "rb") as f:
            for pat, off, ln in writes:
                f.seek(off)
                h.check_bytes(f.read(ln), bytes([pat]) * ln, "copied data at %d" % off)
        # qemu-img map of the mounted file (raw) sees the holes through SEEK_DATA/SEEK_HOLE
        r = h.run(["qemu-img", "map", "-f", "raw", "--output=json", m.export], timeout=30)
        h.check_eq(r.returncode, 0, "qemu-img map rc (%s)" % r.stderr.strip())
        extents = json.loads(r.stdout)
        data = [e for e in extents if e.get("data")]
        total = sum(e["length"] for e in data)
        h.check(total < SPARSE_LIMIT, "qemu-img map: %d data bytes (limit %d): %r"
                % (total, SPARSE_LIMIT, data))
        for pat, off, ln in writes:
            h.check(any(e["start"] <= off and off + ln <= e["start"] + e["length"] for e in data),
                    "qemu-img map: written range [%d,+%d) not inside a data extent: %r"
                    % (off, ln, data))
        # qemu-img convert -O raw keeps the holes
        conv = os.path.join(h.tmpdir("conv"), "conv.raw")
        before = _bytes_read(m)
        r = h.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", m.export, conv], timeout=60)
        h.check_eq(r.returncode, 0, "qemu-img convert rc (%s)" % r.stderr.strip())
        _check_read_only_the_data(m, before, "qemu-img convert")
        h.check(os.stat(conv).st_blocks * 512 < SPARSE_LIMIT, "converted raw allocates %d bytes"
                % (os.stat(conv).st_blocks * 512))
        r = h.run(["cmp", conv, out], timeout=60)
        h.check_eq(r.returncode, 0, "cmp convert-output cp-output (%s%s)" % (r.stdout, r.stderr))


if __name__ == "__main__":
    h.main(globals())
