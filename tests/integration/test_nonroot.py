#!/usr/bin/env python3
"""Mounting as an unprivileged user (through setuid fusermount3).

Runs nbdbridge as the system user nbdbridge-test (created if missing) with
`runuser -u`.  The nbdkit server runs as root; its socket is made
world-connectable.  All I/O on the mount is done as the unprivileged user
(without allow_other, nobody else, not even root, may access the mount).
"""
import hashlib
import os
import pwd
import shutil
import stat
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

USER = "nbdbridge-test"
SIZE = 4 * 1024 * 1024 + 512
FUSE_CONF = "/etc/fuse.conf"


def _ensure_fuse_device():
    """fusermount3 opens /dev/fuse with the *calling user's* file system uid,
    so unprivileged FUSE mounts need /dev/fuse to be 0666 (the usual udev
    default).  Where it is 0600 (as on some containers) make it 0666 for the
    duration of this file and restore the original mode afterwards."""
    st = os.stat("/dev/fuse")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o006 == 0o006:
        return
    h.log("NOTE: /dev/fuse is %o; setting 0666 for the non-root tests (restored at exit)" % mode)
    os.chmod("/dev/fuse", 0o666)
    h.add_cleanup(lambda: os.chmod("/dev/fuse", mode))


def _ensure_user():
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    if os.getuid() != 0:
        raise h.SkipTest("must run as root to create user %s" % USER)
    r = h.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER])
    if r.returncode != 0:
        raise h.TestFailure("useradd failed: %s" % r.stderr)
    return pwd.getpwnam(USER)


def _as_user(cmd, timeout=h.DEADLINE):
    return h.run(["runuser", "-u", USER, "--"] + cmd, timeout=timeout)


def _setup():
    """Returns (pw, dir visible to the user, binary path usable by the user)."""
    if os.getuid() != 0:
        raise h.SkipTest("needs root (to run as another user)")
    pw = _ensure_user()
    _ensure_fuse_device()
    os.chmod(h.BASE, 0o755)
    d = h.tmpdir("user")
    os.chmod(d, 0o755)
    binary = h.NBDBRIDGE
    if _as_user(["test", "-x", binary]).returncode != 0:
        # the build dir is not reachable for the user: use a copy
        binary = os.path.join(d, "nbdbridge")
        shutil.copy2(h.NBDBRIDGE, binary)
        os.chmod(binary, 0o755)
    return pw, d, binary


def _user_mountpoint(pw, d, name="mp"):
    mp = os.path.join(d, name)
    os.mkdir(mp)
    os.chown(mp, pw.pw_uid, pw.pw_gid)
    os.chmod(mp, 0o755)
    return mp


def _server(d, args):
    srv = h.Nbdkit(args, socket_mode=0o777, d=h.tmpdir("nbdkit"))
    os.chmod(srv.d, 0o755)
    return srv


def test_user_mount_write_read():
    pw, d, binary = _setup()
    mp = _user_mountpoint(pw, d)
    src = os.path.join(d, "src")
    h.fill_random_file(src, SIZE)
    os.chmod(src, 0o644)
    with _server(d, ["memory", str(SIZE)]) as srv, \
            h.Mount(mp, [srv.uri], user=USER, binary=binary) as m:
        entry = h.mount_entry(mp)
        h.check(entry is not None, "no FUSE mount on %s" % mp)
        # stat as the user: owner is the mounting user, mode 0644, size
        r = _as_user(["stat", "-c", "%u %a %s", m.export])
        h.check_eq(r.returncode, 0, "stat as user (%s)" % r.stderr)
        h.check_eq(r.stdout.split(), [str(pw.pw_uid), "644", str(SIZE)], "stat as user")
        r = _as_user(["ls", "-l", mp])
        h.check_eq(r.returncode, 0, "ls -l as user (%s)" % r.stderr)
        h.check("nbd" in r.stdout, "ls -l output %r" % r.stdout)
        # write as the user with dd, compare with cmp
        r = _as_user(["dd", "if=" + src, "of=" + m.export, "bs=64k", "conv=notrunc,fsync"],
                     timeout=60)
        h.check_eq(r.returncode, 0, "dd as user (%s)" % r.stderr)
        r = _as_user(["cmp", src, m.export], timeout=60)
        h.check_eq(r.returncode, 0, "cmp as user (%s%s)" % (r.stdout, r.stderr))
        # os.pwrite/os.pread as the user (system python: usable by any user)
        code = ("import os,sys\nfd=os.open(sys.argv[1],os.O_RDWR)\n"
                "d=bytes(range(256))*20\nassert os.pwrite(fd,d,777)==len(d)\n"
                "os.fsync(fd)\nassert os.pread(fd,len(d),777)==d\nprint('ok')\n")
        r = h.run_python(code, user=USER, args=[m.export])
        h.check_eq(r.stdout.strip(), "ok", "python I/O as user (%s)" % r.stderr.strip())
        # unmount as the user via fusermount3 happens in Mount.__exit__
    h.check(not h.is_mounted(mp), "mount left after user unmount")


def test_user_mount_data_reaches_server():
    pw, d, binary = _setup()
    mp = _user_mountpoint(pw, d)
    payload = os.urandom(100000)
    src = os.path.join(d, "payload")
    with open(src, "wb") as f:
        f.write(payload)
    os.chmod(src, 0o644)
    with _server(d, ["memory", str(SIZE)]) as srv:
        with h.Mount(mp, [srv.uri], user=USER, binary=binary) as m:
            r = _as_user(["dd", "if=" + src, "of=" + m.export, "bs=4096", "seek=3",
                          "conv=notrunc,fsync"])
            h.check_eq(r.returncode, 0, "dd as user (%s)" % r.stderr)
        img = h.nbdcopy_to_file(srv.uri, os.path.join(h.tmpdir("img"), "img"))
        h.check_bytes(img[3 * 4096:3 * 4096 + len(payload)], payload, "server data")


def test_user_mount_not_accessible_to_others():
    # Without allow_other, root cannot open the user's mount (FUSE rule);
    # checks the mount really is a user mount.
    pw, d, binary = _setup()
    mp = _user_mountpoint(pw, d)
    with _server(d, ["memory", str(SIZE)]) as srv, \
            h.Mount(mp, [srv.uri], user=USER, binary=binary) as m:
        code = ("import os,sys,errno\ntry:\n os.stat(sys.argv[1]); print('OK')\n"
                "except OSError as e: print(errno.errorcode[e.errno])\n")
        r = h.run_python(code, args=[m.export])
        h.check_eq(r.stdout.strip(), "EACCES", "root stat of user mount without allow_other")
        entry = h.mount_entry(mp)
        h.check("user_id=%d" % pw.pw_uid in entry["super_opts"],
                "user_id not the user's: %r" % entry["super_opts"])


def test_user_fusermount_exit_zero():
    pw, d, binary = _setup()
    mp = _user_mountpoint(pw, d)
    with _server(d, ["pattern", str(SIZE)]) as srv:
        with h.Mount(mp, [srv.uri], user=USER, binary=binary) as m:
            r = _as_user(["dd", "if=" + m.export, "of=/dev/null", "bs=1M"])
            h.check_eq(r.returncode, 0, "read as user (%s)" % r.stderr)
            r = m.unmount()        # runs fusermount3 -u as the user
            h.check_eq(r.returncode, 0, "fusermount3 -u as user (%s)" % r.stderr)
            rc = m.wait_exit()     # runuser passes the exit status through
            h.check_eq(rc, 0, "exit status (%s)" % m.stderr())
            h.check(not m.mounted(), "mount still present")


def test_user_sigterm_exit_zero():
    pw, d, binary = _setup()
    mp = _user_mountpoint(pw, d)
    with _server(d, ["pattern", str(SIZE)]) as srv:
        with h.Mount(mp, [srv.uri], user=USER, binary=binary) as m:
            # signal the nbdbridge process itself (runuser is its parent)
            pids = [p for p in [m.pid] + h.descendants(m.pid)
                    if os.path.basename((h.proc_cmdline(p) or [""])[0]) == "nbdbridge"]
            h.check(pids, "nbdbridge process not found under runuser")
            os.kill(pids[0], 15)
            rc = m.wait_exit()
            h.check_eq(rc, 0, "exit status after SIGTERM (%s)" % m.stderr())
            h.check(not m.mounted(), "mount still present after SIGTERM")


def test_user_allow_other_denied():
    pw, d, binary = _setup()
    with open(FUSE_CONF) as f:
        conf = f.read()
    if any(ln.strip() == "user_allow_other" for ln in conf.splitlines()):
        raise h.SkipTest("user_allow_other is enabled in %s" % FUSE_CONF)
    mp = _user_mountpoint(pw, d)
    with _server(d, ["memory", str(SIZE)]) as srv:
        cmd = ["runuser", "-u", USER, "--", binary, "-o", "allow_other", mp, srv.uri]
        r = h.run(cmd)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        h.check(r.returncode != 0, "allow_other as non-root without user_allow_other: rc 0")
        h.check(lines, "no error message")
        h.check("allow_other" in r.stderr, "error does not mention allow_other: %r" % r.stderr)
        h.check(not h.is_mounted(mp), "mount left behind")


def test_user_allow_other_permitted():
    pw, d, binary = _setup()
    with open(FUSE_CONF, "rb") as f:
        orig = f.read()
    st = os.stat(FUSE_CONF)
    mp = _user_mountpoint(pw, d)

    def restore():
        with open(FUSE_CONF, "wb") as f:
            f.write(orig)
        os.chmod(FUSE_CONF, stat.S_IMODE(st.st_mode))
    # Also when the watchdog ends the file: a line left behind would skip the test above
    # in every later run.
    h.add_cleanup(restore)
    try:
        with open(FUSE_CONF, "ab") as f:
            f.write(b"\nuser_allow_other\n")
        with _server(d, ["pattern", str(SIZE)]) as srv, \
                h.Mount(mp, [srv.uri], opts=["-o", "allow_other"], user=USER,
                        binary=binary) as m:
            # now root (another user) can read the file
            with open(m.export, "rb") as f:
                h.check_bytes(f.read(4096), h.pattern_bytes(0, 4096), "root read via allow_other")
            h.check_eq(os.stat(m.export).st_uid, pw.pw_uid, "owner")
    finally:
        restore()
    with open(FUSE_CONF, "rb") as f:
        h.check_eq(f.read(), orig, "/etc/fuse.conf restored")


def test_user_unwritable_stats_file():
    # A statistics file the user may not write (root's, 0644) is refused at start, in one
    # line saying why, not found at exit with the run's statistics lost.
    pw, d, binary = _setup()
    mp = _user_mountpoint(pw, d)
    stats = os.path.join(d, "roots-stats.json")
    with open(stats, "w") as f:
        f.write("{}\n")
    os.chmod(stats, 0o644)
    with _server(d, ["memory", str(SIZE)]) as srv:
        r = _as_user([binary, "--stats-file", stats, mp, srv.uri])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        h.check(r.returncode != 0, "an unwritable --stats-file: rc %r" % r.returncode)
        h.check_eq(len(lines), 1, "one error line (%r)" % r.stderr)
        h.check(stats in r.stderr and "Permission denied" in r.stderr, "says which file and why: %r" % r.stderr)
        h.check(not h.is_mounted(mp), "mount left behind")


def test_user_thread_limit_never_hangs():
    # Under a limit on processes (RLIMIT_NPROC, which counts threads; root is exempt,
    # so as the user), each thread the bridge wants may be refused: every connection's
    # own (--connection-threads all), the reply thread, fusermount3's fork. Whatever
    # the limit, the mount either fails with a message and leaves nothing mounted, or
    # serves the right bytes; it never hangs (a connection whose thread could not start
    # used to be left with commands no thread would run).
    pw, d, binary = _setup()
    code = ("import hashlib,os,sys\nfd=os.open(sys.argv[1],os.O_RDONLY|os.O_DIRECT)\n"
            "import mmap\nb=mmap.mmap(-1,1<<22)\nos.preadv(fd,[b],0)\n"
            "print(hashlib.sha256(b).hexdigest())\n")
    expected = hashlib.sha256(h.pattern_bytes(0, 1 << 22)).hexdigest()
    outcomes = []
    # LeakSanitizer (the sanitizer pass) needs a thread of its own at exit, which the
    # limit may refuse: the leak check is the other tests' to make.
    env = dict(os.environ, ASAN_OPTIONS=os.environ.get("ASAN_OPTIONS", "") + ":detect_leaks=0")
    with _server(d, ["pattern", str(SIZE)]) as srv:
        for limit in range(1, 13):
            mp = _user_mountpoint(pw, d, "mp%d" % limit)
            mount = h.Mount(mp, [srv.uri], user=USER, binary=shutil.which("prlimit"), env=env,
                            opts=["--nproc=%d" % limit, binary, "--connection-threads", "all", "-C", "3"])
            try:
                with mount as m:
                    r = h.run_python(code, user=USER, args=[m.export])
                    h.check_eq(r.stdout.strip(), expected, "4 MiB read under --nproc=%d (%s)" % (limit, r.stderr))
                    said = "the system refused a thread" in m.stderr()
                    outcomes.append("served" + (" (said a thread was refused)" if said else ""))
            except h.MountFailed as failed:
                h.check(failed.returncode not in (0, None) and failed.stderr.strip(),
                        "under --nproc=%d: exit %r, stderr %r" % (limit, failed.returncode, failed.stderr))
                h.check(not h.is_mounted(mp), "left mounted under --nproc=%d" % limit)
                outcomes.append("refused")
    h.log("  outcomes by limit 1..12: %s" % outcomes)
    h.check(outcomes[-1].startswith("served"), "the mount under the largest limit: %s" % outcomes[-1])
    # Under the low limits that still mount, connections go without their threads: said.
    h.check(any("refused" in outcome and outcome.startswith("served") for outcome in outcomes),
            "no mount said it went without a connection thread: %s" % outcomes)


if __name__ == "__main__":
    h.main(globals())
