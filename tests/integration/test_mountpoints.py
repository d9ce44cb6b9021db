#!/usr/bin/env python3
"""The three mountpoint forms, directory listing and file attributes."""
import os
import stat
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

SIZE = 3 * 1024 * 1024 + 17


def _check_attrs(path, size=SIZE, mode=0o644):
    st = os.stat(path)
    h.check(stat.S_ISREG(st.st_mode), "%s is not a regular file (mode %o)" % (path, st.st_mode))
    h.check_eq(oct(stat.S_IMODE(st.st_mode)), oct(mode), "mode of %s" % path)
    h.check_eq(st.st_size, size, "size of %s" % path)
    h.check_eq(st.st_uid, os.getuid(), "owner uid of %s" % path)
    h.check_eq(st.st_gid, os.getgid(), "owner gid of %s" % path)
    # stat(1) agrees
    r = h.run(["stat", "-c", "%s %a %u %F", path])
    h.check_eq(r.returncode, 0, "stat(1) rc (%s)" % r.stderr)
    h.check_eq(r.stdout.split(None, 3),
               [str(size), "%o" % mode, str(os.getuid()), "regular file\n"], "stat(1) output")


def _check_content(path, data_fn):
    fd = os.open(path, os.O_RDWR)
    try:
        payload = os.urandom(10000)
        h.pwrite_full(fd, payload, 4093)
        h.check_bytes(h.pread_full(fd, 10000, 4093), payload, "readback via %s" % path)
        h.check_bytes(h.pread_full(fd, 100, SIZE - 100), data_fn(SIZE - 100, 100), "tail")
    finally:
        os.close(fd)


def test_directory_mountpoint():
    mp = h.tmpdir("mp")
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Mount(mp, [srv.uri]) as m:
        h.check_eq(m.export, os.path.join(mp, "nbd"), "export path")
        entry = h.mount_entry(mp)
        h.check(entry is not None, "no FUSE mount on %s" % mp)
        h.check_eq(sorted(os.listdir(mp)), ["nbd"], "directory listing")
        r = h.run(["ls", "-l", mp])
        h.check_eq(r.returncode, 0, "ls -l rc (%s)" % r.stderr)
        lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("total")]
        h.check_eq(len(lines), 1, "ls -l lines: %r" % r.stdout)
        fields = lines[0].split()
        h.check(fields[0].startswith("-rw-r--r--"), "ls -l mode: %r" % lines[0])
        h.check_eq(fields[4], str(SIZE), "ls -l size")
        h.check_eq(fields[-1], "nbd", "ls -l name")
        h.check(stat.S_ISDIR(os.stat(mp).st_mode), "mount root is not a directory")
        r = h.run(["ls", "-la", mp])
        h.check_eq(r.returncode, 0, "ls -la rc (%s)" % r.stderr)
        _check_attrs(m.export)
        _check_content(m.export, lambda o, n: bytes(n))
        # nothing else exists in the directory
        h.check(not os.path.exists(os.path.join(mp, "other")), "unexpected entry 'other'")
        # Changing the directory is not permitted (EPERM, as chmod and chown are), not
        # "Function not implemented".
        other = os.path.join(mp, "other")
        attempts = [("open(O_CREAT)", lambda: os.open(other, os.O_CREAT | os.O_WRONLY, 0o644)),
                    ("mknod", lambda: os.mknod(other, 0o644 | stat.S_IFREG)),
                    ("mkdir", lambda: os.mkdir(other)),
                    ("symlink", lambda: os.symlink("nbd", other)),
                    ("link", lambda: os.link(m.export, other)),
                    ("rename", lambda: os.rename(m.export, other)),
                    ("unlink", lambda: os.unlink(m.export))]
        for name, attempt in attempts:
            h.check_eq(h.errno_name(h.os_errno(attempt)[0]), "EPERM", name + " in the mount's directory")
        h.check_eq(sorted(os.listdir(mp)), ["nbd"], "directory listing after the refused changes")
    h.check_eq(os.listdir(mp), [], "mountpoint dir after unmount")


def test_dir_slash_name_mountpoint():
    d = h.tmpdir("mp")
    name = "disk.raw"
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(os.path.join(d, name), [srv.uri]) as m:
        h.check_eq(m.mountdir, d, "mounted dir")
        h.check(h.mount_entry(d) is not None, "no FUSE mount on %s" % d)
        h.check_eq(sorted(os.listdir(d)), [name], "directory listing")
        r = h.run(["ls", "-l", d])
        h.check_eq(r.returncode, 0, "ls -l rc (%s)" % r.stderr)
        h.check(r.stdout.rstrip().endswith(name), "ls -l output %r" % r.stdout)
        _check_attrs(os.path.join(d, name))
        _check_content(os.path.join(d, name), lambda o, n: bytes(n))
        h.check(not os.path.exists(os.path.join(d, "nbd")), "'nbd' exists in DIR/NAME form")
    h.check_eq(os.listdir(d), [], "dir after unmount")


def test_file_mountpoint():
    d = h.tmpdir("mp")
    f = os.path.join(d, "image.bin")
    orig = b"original content, must survive\n" * 10
    with open(f, "wb") as fh:
        fh.write(orig)
    os.chmod(f, 0o600)
    with h.Nbdkit(["pattern", str(SIZE)]) as srv, h.Mount(f, [srv.uri]) as m:
        h.check_eq(m.export, f, "export path in file mode")
        entry = h.mount_entry(f)
        h.check(entry is not None, "no FUSE mount on the file %s" % f)
        _check_attrs(f, mode=0o444)                 # pattern is read-only
        with open(f, "rb") as fh:
            h.check_bytes(fh.read(), h.pattern_bytes(0, SIZE), "file-mode content")
        r = h.run(["ls", "-l", f])
        h.check_eq(r.returncode, 0, "ls -l file rc (%s)" % r.stderr)
        h.check(str(SIZE) in r.stdout.split(), "ls -l size: %r" % r.stdout)
        h.check_eq(sorted(os.listdir(d)), ["image.bin"], "parent dir listing")
    with open(f, "rb") as fh:
        h.check_eq(fh.read(), orig, "original file content after unmount")
    h.check_eq(stat.S_IMODE(os.stat(f).st_mode), 0o600, "original file mode after unmount")


def test_file_mountpoint_writable():
    d = h.tmpdir("mp")
    f = os.path.join(d, "disk.img")
    with open(f, "wb") as fh:
        fh.write(b"x")
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Mount(f, [srv.uri]):
        _check_attrs(f)
        _check_content(f, lambda o, n: bytes(n))
    with open(f, "rb") as fh:
        h.check_eq(fh.read(), b"x", "original file after unmount")


def test_mount_options_passed():
    # -o passes FUSE options through; as root allow_other is permitted.
    mp = h.tmpdir("mp")
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(mp, [srv.uri], opts=["-o", "allow_other"]) as m:
        entry = h.mount_entry(mp)
        h.check("allow_other" in entry["super_opts"].split(","),
                "allow_other not in mount options: %r" % entry)
        _check_attrs(m.export)


def test_two_bridges_started_at_once_on_one_mountpoint():
    # Both used to pass the "already a FUSE mount" check before either had mounted,
    # and stacked two mounts (stopping one then took the other's away). One mounts;
    # the other says why not, with exit 1.
    import subprocess
    with h.Nbdkit(["memory", str(1 << 20)]) as srv:
        for round_number in range(3):
            mp = h.tmpdir("mp")
            errs = [os.path.join(h.tmpdir("err"), "stderr") for _ in range(2)]
            procs = []
            try:
                for err in errs:
                    with open(err, "wb") as f:
                        procs.append(h.popen([h.NBDBRIDGE, mp, srv.uri], stdout=subprocess.DEVNULL, stderr=f,
                                             start_new_session=True))
                h.wait_until(lambda: any(p.poll() is not None for p in procs), timeout=15,
                             what="one of the two bridges to give up")
                h.wait_until(lambda: h.is_mounted(mp), what="the other one's mount")
                mounts = [m for m in h.fuse_mounts() if m["mountpoint"] == os.path.realpath(mp)]
                h.check_eq(len(mounts), 1, "round %d: FUSE mounts on the mountpoint" % round_number)
                loser = next(i for i, p in enumerate(procs) if p.poll() is not None)
                h.check_eq(procs[loser].returncode, 1, "the second bridge's exit status")
                text = h.read_text(errs[loser])
                h.check(("another nbdbridge" in text or "already a FUSE mount" in text)
                        and len(text.strip().splitlines()) == 1, "the second bridge's line: %r" % text)
            finally:
                if h.is_mounted(mp):
                    h.run(["fusermount3", "-u", mp], timeout=15)
                for p in procs:
                    try:
                        p.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        p.kill()
            h.check_eq([p.returncode for p in procs if p is not procs[loser]], [0], "the first bridge's exit")


def test_mountinfo_entry():
    mp = h.tmpdir("mp")
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Mount(mp, [srv.uri]):
        entry = h.mount_entry(mp)
        h.check(entry["fstype"] == "fuse" or entry["fstype"].startswith("fuse."),
                "fstype %r" % entry["fstype"])
        h.check_eq(len([e for e in h.fuse_mounts() if e["mountpoint"] == mp]), 1,
                   "exactly one mount on the dir")
    h.check(h.mount_entry(mp) is None, "mount left after exit")


if __name__ == "__main__":
    h.main(globals())
