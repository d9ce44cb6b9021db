#!/usr/bin/env python3
"""Bad input: one line on stderr, non-zero exit, nothing left mounted.

Each case runs nbdbridge to completion with a deadline and then checks
/proc/self/mountinfo and the process tree.
"""
import os
import stat
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402


def _expect_failure(args, mountdir, one_line=True, what="", must_mention=None):
    before = {m["mountpoint"] for m in h.fuse_mounts()}
    rc, err = h.nbdbridge_run(args, timeout=h.DEADLINE)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    h.check(rc != "timeout", "%s: nbdbridge did not exit within %ss: %r" % (what, h.DEADLINE, args))
    h.check(rc != 0, "%s: exit status 0 for bad input %r (stderr %r)" % (what, args, err))
    h.check(rc > 0, "%s: nbdbridge died from signal %d (stderr %r)" % (what, -rc, err))
    if one_line:
        h.check_eq(len(lines), 1, "%s: number of stderr lines (stderr %r)" % (what, err))
    else:
        h.check(len(lines) >= 1, "%s: no error message on stderr" % what)
    if must_mention:
        h.check(any(w.lower() in err.lower() for w in must_mention),
                "%s: stderr %r mentions none of %r" % (what, err, must_mention))
    if mountdir:
        h.check(not h.is_mounted(mountdir), "%s: %s left mounted" % (what, mountdir))
    after = {m["mountpoint"] for m in h.fuse_mounts()}
    h.check_eq(after - before, set(), "%s: new FUSE mounts left behind" % what)
    return rc, err


def test_unparsable_uris():
    mp = h.tmpdir("mp")
    for uri in ["not a uri", "nbd+unix:///", "nbd://127.0.0.1:notaport/",
                "http://127.0.0.1/", "nbd+unix:///?socket=", "nbd://[::1/"]:
        _expect_failure([mp, uri], mp, what="URI %r" % uri)


def test_unreachable_servers():
    mp = h.tmpdir("mp")
    d = h.tmpdir("sock")
    missing = os.path.join(d, "missing.sock")
    # a socket file with nobody listening (bound, never listen()ed, closed)
    dead = os.path.join(d, "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(dead)
    s.close()
    port = h.free_tcp_port()
    for args in ([mp, "nbd+unix:///?socket=" + missing],
                 [mp, "nbd+unix:///?socket=" + dead],
                 [mp, "--unix", missing],
                 [mp, "nbd://127.0.0.1:%d/" % port],
                 [mp, "--tcp", "127.0.0.1", str(port)]):
        _expect_failure(args, mp, what="unreachable %r" % args[1:])


def test_silent_server_and_connect_timeout():
    # A server that accepts (the kernel's backlog does) and never says a word: the mount
    # gives up after --connect-timeout, with one line and nothing mounted.
    mp = h.tmpdir("mp")
    path = os.path.join(h.tmpdir("sock"), "silent.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        s.listen(8)
        t0 = time.monotonic()
        _, err = _expect_failure([mp, "--connect-timeout", "1.5", "--unix", path], mp, what="silent server",
                                 must_mention=["answer"])
        took = time.monotonic() - t0
        h.check("within 1.5 s" in err, "the timeout as given: %r" % err)
        h.check(1.4 <= took <= 10, "gave up after %.1f s (connect timeout 1.5 s)" % took)
    finally:
        s.close()


def test_unknown_export_name():
    mp = h.tmpdir("mp")
    with h.Nbdkit(["memory", "1M", "exportname-strict=true", "exportname=good"],
                  opts=["--filter=exportname"]) as srv:
        _expect_failure([mp, srv.uri_export("bad")], mp, what="unknown export",
                        must_mention=["bad", "export"])
        # the good name works (so the failure above is really about the name)
        with h.Mount(mp, [srv.uri_export("good")]) as m:
            h.check_eq(os.stat(m.export).st_size, 1 << 20, "size of export 'good'")


def test_missing_mountpoint():
    base = h.tmpdir("mp")
    with h.Nbdkit(["memory", "1M"]) as srv:
        for mp in [os.path.join(base, "no", "such", "dir"),
                   os.path.join(base, "nodir", "name")]:
            _expect_failure([mp, srv.uri], None, what="missing mountpoint %s" % mp)
            h.check(not os.path.exists(os.path.dirname(mp)), "missing parent was created")
        h.check_eq(os.listdir(base), [], "mountpoint base dir content")


def test_mountpoint_already_fuse_mounted():
    mp = h.tmpdir("mp")
    with h.Nbdkit(["pattern", "1M"]) as srv, h.Mount(mp, [srv.uri]) as m:
        _expect_failure([mp, srv.uri], None, what="second mount on same dir")
        # exactly one FUSE mount on mp, and the first mount still works
        n = sum(1 for e in h.fuse_mounts() if e["mountpoint"] == m.mountdir)
        h.check_eq(n, 1, "number of FUSE mounts on %s" % mp)
        with open(m.export, "rb") as f:
            h.check_bytes(f.read(4096), h.pattern_bytes(0, 4096), "first mount after 2nd attempt")
        # also in DIR/NAME form and file form on top of the existing mount
        _expect_failure([os.path.join(mp, "other"), srv.uri], None,
                        what="DIR/NAME on already-mounted dir", must_mention=["already a FUSE mount"])
        n = sum(1 for e in h.fuse_mounts() if e["mountpoint"].startswith(m.mountdir))
        h.check_eq(n, 1, "FUSE mounts at/below %s" % mp)


def test_tls_required_but_not_configured():
    mp = h.tmpdir("mp")
    d = h.tmpdir("psk")
    psk = os.path.join(d, "keys.psk")
    with open(psk, "w") as f:
        f.write("user:%s\n" % os.urandom(16).hex())
    os.chmod(psk, 0o600)
    with h.Nbdkit(["memory", "1M"], opts=["--tls=require", "--tls-psk=" + psk]) as srv:
        _expect_failure([mp, srv.uri], mp, what="TLS required", must_mention=["tls"])


def test_subprocess_server_fails_to_start():
    mp = h.tmpdir("mp")
    for args in ([mp, "[", "nbdkit", "no-such-plugin", "]"],
                 [mp, "[", "/nonexistent/cmd", "]"],
                 [mp, "[", "nbdkit", "memory", "]"],      # missing required size
                 [mp, "[", "false", "]"]):
        # the server's own messages may add lines, so don't insist on one
        _expect_failure(args, mp, one_line=False, what="server %r" % args[1:])
        # no stray server process left behind
        h.check_eq(_stray_servers(), [], "server processes left after %r" % args[1:])


def _stray_servers():
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and h.pid_alive(int(pid)):
            cl = h.proc_cmdline(int(pid))
            if cl and ("no-such-plugin" in cl or "/nonexistent/cmd" in cl
                       or cl[-2:] == ["nbdkit", "memory"]
                       or (os.path.basename(cl[0]) == "nbdkit" and cl[-1] == "memory")):
                out.append((int(pid), cl))
    return out


def test_unknown_tcp_congestion_control():
    # Named explicitly, an algorithm the kernel does not have (or does not allow)
    # fails the mount with one line that says which.
    mp = h.tmpdir("mp")
    with h.Nbdkit(["memory", "1M"], tcp=True) as srv:
        _expect_failure(["--tcp-congestion", "no_such_cc", mp, "nbd://127.0.0.1:%d/" % srv.port], mp,
                        what="unknown congestion control", must_mention=["congestion control \"no_such_cc\""])


def test_usage_errors():
    mp = h.tmpdir("mp")
    with h.Nbdkit(["memory", "1M"]) as srv:
        for args in ([],                                   # nothing
                     [mp],                                 # no target
                     ["--no-such-option", mp, srv.uri],
                     ["--cache=bogus", mp, srv.uri],
                     ["--socket-batching=maybe", mp, srv.uri],
                     ["--tcp-congestion", "no such", mp, srv.uri],
                     [mp, "[", "nbdkit", "memory", "1M"],  # unterminated [
                     [mp, "[", "]"],                       # empty command
                     [mp, "--tcp", "127.0.0.1"],           # missing port
                     [mp, "--fd", "notanumber"],
                     [mp, "--fd", "97"],                   # fd not open
                     [mp, srv.uri, "extra-arg"]):
            _expect_failure(args, mp, one_line=False, what="usage %r" % args)


def test_contradictory_or_out_of_range_options():
    # Each is refused before anything is connected or mounted, in one line naming it.
    mp = h.tmpdir("mp")
    with h.Nbdkit(["memory", "1M"]) as srv:
        for args, named in (
                (["--list", "--daemon", srv.uri], "--daemon"),
                (["--list", "-P", os.path.join(h.tmpdir("p"), "pid"), srv.uri], "--pidfile"),
                (["--list", "--cache=page", srv.uri], "--cache"),
                (["--spliced-reads", "on", "--socket-batching", "off", mp, srv.uri], "--spliced-reads"),
                (["--spliced-writes", "on", "--socket-batching", "off", mp, srv.uri], "--spliced-writes"),
                (["--stats-interval", "0.0001", mp, srv.uri], "--stats-interval"),
                (["--retry-timeout", "1e17", mp, srv.uri], "--retry-timeout"),
                (["--shutdown-timeout", "nan", mp, srv.uri], "--shutdown-timeout"),
                (["--connect-timeout", "0", mp, srv.uri], "--connect-timeout"),
                (["--wait-for-server", "-1", mp, srv.uri], "--wait-for-server"),
                (["--wait-for-server", "1", mp, "--fd", "0"], "--wait-for-server"),
                # --list would ignore these: said, not ignored.
                (["--list", "-v", srv.uri], "--verbose"),
                (["--list", "-e", "other", srv.uri], "--export-name"),
                (["--list", "--tcp-keepalive", "5", srv.uri], "--tcp-keepalive"),
                (["--seed", "7", mp, srv.uri], "--seed"),  # nothing injected to seed
                (["-o", "bogus_opt", mp, srv.uri], "-o bogus_opt"),  # libfuse's word, not our own options
                # Fractions are refused, not truncated (0.5 would turn polling off).
                (["--busy-poll", "0.5", mp, srv.uri], "--busy-poll"),
                (["--tcp-keepalive", "2.9", mp, srv.uri], "--tcp-keepalive"),
                # An unmatched bracket is said as such, not as an unexpected argument.
                ([mp, "[", "nbdkit", "memory", "1M", srv.uri], "'[' without a matching ']'"),
                ([mp, "]", srv.uri], "']' without a matching '['")):
            _expect_failure(args, mp, what="options %r" % args[:-2], must_mention=[named])
        # The same options alone are fine: --list prints the export, and a mount with
        # batching off (splicing then off too) comes up.
        r = h.run([h.NBDBRIDGE, "--list", "--connect-timeout", "5", srv.uri], timeout=h.DEADLINE)
        h.check_eq(r.returncode, 0, "--list with --connect-timeout (stderr %r)" % r.stderr)
        with h.Mount(mp, [srv.uri], opts=["--socket-batching", "off", "--retry-timeout", "0.5"]) as m:
            h.check_eq(os.path.getsize(m.export), 1 << 20, "size through a mount without batching")


def test_unwritable_pidfile_or_statistics_file():
    # Found before --force or the mount touch anything: a script waiting for the pidfile
    # would otherwise wait for ever.
    mp = h.tmpdir("mp")
    missing = os.path.join(h.tmpdir("p"), "no", "such")
    with h.Nbdkit(["memory", "1M"]) as srv:
        for option in ("-P", "--stats-file"):
            _expect_failure([option, os.path.join(missing, "f"), mp, srv.uri], mp,
                            what="%s in a missing directory" % option, must_mention=[missing])
        _expect_failure(["-P", h.tmpdir("p"), mp, srv.uri], mp, what="pidfile is a directory",
                        must_mention=["directory"])
        # The pidfile replaces what is at its path and is removed at exit: never a FIFO
        # (or a device: -P /dev/full made it a file, then removed it) or a symlink.
        d = h.tmpdir("p")
        fifo = os.path.join(d, "fifo")
        os.mkfifo(fifo)
        link = os.path.join(d, "link")
        os.symlink(os.path.join(d, "target"), link)
        for path in (fifo, link):
            _expect_failure(["-P", path, mp, srv.uri], mp, what="pidfile %s" % path,
                            must_mention=["not a regular file"])
        h.check(os.path.islink(link) and stat.S_ISFIFO(os.lstat(fifo).st_mode), "the refused paths are untouched")
        h.check_eq(sorted(os.listdir(d)), ["fifo", "link"], "nothing else left in the pidfile's directory")
        # A pidfile some other process replaced meanwhile is theirs: left at exit.
        pidfile = os.path.join(d, "pid")
        with h.Mount(mp, [srv.uri], opts=["-P", pidfile], wait_pidfile=pidfile):
            with open(pidfile + ".new", "w") as f:
                f.write("1\n")
            os.rename(pidfile + ".new", pidfile)
        h.check_eq(open(pidfile).read(), "1\n", "another's pidfile left at exit")


def test_dir_slash_name_refuses_to_hide_files():
    # DIR/NAME mounts on DIR: with other files in DIR (or DIR the working directory, where
    # a shell would not see the mount) that is refused, pointing at file mode instead.
    base = h.tmpdir("mp")
    keep = os.path.join(base, "keep.txt")
    with open(keep, "w") as f:
        f.write("still here")
    with h.Nbdkit(["memory", "1M"]) as srv:
        _expect_failure([os.path.join(base, "disk.raw"), srv.uri], base, what="DIR/NAME in a non-empty DIR",
                        must_mention=["hiding the 1 entry"])
        h.check_eq(sorted(os.listdir(base)), ["keep.txt"], "DIR after the refusal")
        empty = h.tmpdir("mp")
        cwd = os.getcwd()
        os.chdir(empty)
        try:
            _expect_failure(["disk.raw", srv.uri], empty, what="NAME in the working directory",
                            must_mention=["working directory"])
        finally:
            os.chdir(cwd)
        # The way it points to: create the file, and the mount covers only that file.
        open(os.path.join(base, "disk.raw"), "w").close()
        with h.Mount(os.path.join(base, "disk.raw"), [srv.uri]) as m:
            h.check_eq(os.path.getsize(m.export), 1 << 20, "size of the file-mode mount")
            h.check_eq(open(keep).read(), "still here", "the other file beside the mount")


if __name__ == "__main__":
    h.main(globals())
