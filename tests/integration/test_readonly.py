#!/usr/bin/env python3
"""Read-only exports: by -r/--readonly, or because the server is read-only."""
import os
import stat
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

SIZE = 4 * 1024 * 1024
OK_OPEN_ERRNOS = ("EROFS", "EACCES")


def _check_readonly(m, expect_data):
    st = os.stat(m.export)
    h.check_eq(oct(stat.S_IMODE(st.st_mode)), oct(0o444), "mode of read-only export")
    h.check(stat.S_ISREG(st.st_mode), "export is not a regular file")
    h.check_eq(st.st_size, SIZE, "st_size")
    for flags, name in ((os.O_WRONLY, "O_WRONLY"), (os.O_RDWR, "O_RDWR"),
                        (os.O_WRONLY | os.O_APPEND, "O_WRONLY|O_APPEND")):
        e, fd = h.os_errno(os.open, m.export, flags)
        if e == 0:
            # Opening should already fail; at the very least a write must not succeed.
            we, n = h.os_errno(os.pwrite, fd, b"X" * 512, 0)
            os.close(fd)
            raise h.TestFailure("open(%s) of read-only export succeeded (pwrite then gave %s, %r)"
                                % (name, h.errno_name(we), n))
        h.check(h.errno_name(e) in OK_OPEN_ERRNOS,
                "open(%s): expected EROFS or EACCES, got %s" % (name, h.errno_name(e)))
    # a writer tool must fail too, and nothing may change
    r = h.run(["dd", "if=/dev/zero", "of=" + m.export, "bs=4096", "count=1", "conv=notrunc"])
    h.check(r.returncode != 0, "dd into read-only export succeeded")
    # truncate / chmod must not make it writable
    e, _ = h.os_errno(os.truncate, m.export, 0)
    h.check(e != 0, "truncate of read-only export succeeded")
    fd = os.open(m.export, os.O_RDONLY)
    try:
        h.check_bytes(h.pread_full(fd, SIZE, 0), expect_data, "read-only export content")
        # a write through an O_RDONLY fd fails with EBADF (sanity)
        e, _ = h.os_errno(os.pwrite, fd, b"x", 0)
        h.check_eq(h.errno_name(e), "EBADF", "pwrite on O_RDONLY fd")
    finally:
        os.close(fd)


def test_pattern_server_is_readonly():
    # The pattern plugin is read-only on the server side; no -r given.
    with h.Nbdkit(["pattern", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        _check_readonly(m, h.pattern_bytes(0, SIZE))


def test_nbdkit_r_server_is_readonly():
    with h.Nbdkit(["memory", str(SIZE)], opts=["-r"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        _check_readonly(m, bytes(SIZE))


def test_client_readonly_short_option():
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        # put recognisable data on the writable server first
        data = os.urandom(SIZE)
        with h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
            fd = os.open(m.export, os.O_WRONLY)
            try:
                h.pwrite_full(fd, data, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        with h.Mount(h.tmpdir("mp"), [srv.uri], opts=["-r"]) as m:
            _check_readonly(m, data)
        # the server still holds exactly the data: nothing was written
        img = h.nbdcopy_to_file(srv.uri, os.path.join(h.tmpdir("img"), "img"))
        h.check_bytes(img, data, "server content after read-only mount")


def test_client_readonly_long_option():
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--readonly"]) as m:
        _check_readonly(m, bytes(SIZE))


def test_mount_option_ro_is_readonly_and_rw_is_refused_on_a_readonly_server():
    # -o ro is --readonly said the FUSE way: the file is 0444 too. -o rw cannot make a
    # read-only export writable: refused with one line, nothing mounted.
    with h.Nbdkit(["memory", str(SIZE)], opts=["-r"]) as srv:
        with h.Nbdkit(["memory", str(SIZE)]) as writable, \
                h.Mount(h.tmpdir("mp"), [writable.uri], opts=["-o", "ro"]) as m:
            h.check_eq(os.stat(m.export).st_mode & 0o777, 0o444, "mode of the file under -o ro")
            _check_readonly(m, bytes(SIZE))
        mp = h.tmpdir("mp")
        rc, err = h.nbdbridge_run(["-o", "rw", mp, srv.uri])
        h.check(rc not in (0, "timeout"), "-o rw on a read-only export: rc %r" % rc)
        h.check("read-only" in err and len(err.strip().splitlines()) <= 2, "stderr: %r" % err)
        h.check(not h.is_mounted(mp), "mounted after -o rw was refused")


def test_readonly_file_mode_mountpoint():
    d = h.tmpdir("fm")
    f = os.path.join(d, "disk.img")
    with open(f, "wb") as fh:
        fh.write(b"original")
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(f, [srv.uri], opts=["-r"]) as m:
        h.check_eq(m.export, f, "file-mode export path")
        _check_readonly(m, bytes(SIZE))
    with open(f, "rb") as fh:
        h.check_eq(fh.read(), b"original", "underlying file after unmount")


if __name__ == "__main__":
    h.main(globals())
