#!/usr/bin/env python3
"""Every TARGET form: URIs, [ CMD ARGS... ], --unix, --tcp, --fd; --wait-for-server."""
import os
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

SIZE = 2 * 1024 * 1024 + 8 * 3 + 5


def _check_pattern(m, size=SIZE):
    st = os.stat(m.export)
    h.check_eq(st.st_size, size, "export size")
    with open(m.export, "rb") as f:
        h.check_bytes(f.read(), h.pattern_bytes(0, size), "pattern content")


def _check_rw(m, size):
    fd = os.open(m.export, os.O_RDWR)
    try:
        data = os.urandom(65536 + 3)
        h.pwrite_full(fd, data, 12345)
        os.fsync(fd)
        h.check_bytes(h.pread_full(fd, len(data), 12345), data, "readback")
        h.check_eq(os.fstat(fd).st_size, size, "export size")
    finally:
        os.close(fd)


def test_uri_unix():
    with h.Nbdkit(["pattern", str(SIZE)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri]) as m:
        _check_pattern(m)


def test_uri_tcp():
    with h.Nbdkit(["pattern", str(SIZE)], tcp=True) as srv, \
            h.Mount(h.tmpdir("mp"), ["nbd://127.0.0.1:%d/" % srv.port]) as m:
        _check_pattern(m)


def test_uri_with_export_name():
    # The export name in the URI is honoured (the filter rejects others).
    with h.Nbdkit(["pattern", str(SIZE), "exportname-strict=true", "exportname=good"],
                  opts=["--filter=exportname"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri_export("good")]) as m:
        _check_pattern(m)
    with h.Nbdkit(["pattern", str(SIZE), "exportname-strict=true", "exportname=good"],
                  opts=["--filter=exportname"], tcp=True) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri_export("good")]) as m:
        _check_pattern(m)


def test_export_name_option():
    # -e names the export for --unix (and --tcp, --fd, [ CMD ]): the filter rejects others.
    with h.Nbdkit(["pattern", str(SIZE), "exportname-strict=true", "exportname=good"],
                  opts=["--filter=exportname"]) as srv:
        with h.Mount(h.tmpdir("mp"), ["--unix", srv.sock, "-e", "good"]) as m:
            _check_pattern(m)
        rc, err = h.nbdbridge_run([h.tmpdir("mp"), "--unix", srv.sock, "--export-name", "bad"], timeout=30)
        h.check(rc not in (0, "timeout"), "-e bad: exit status %r (stderr %r)" % (rc, err))


def test_unix_option():
    with h.Nbdkit(["memory", str(SIZE)]) as srv, \
            h.Mount(h.tmpdir("mp"), ["--unix", srv.sock]) as m:
        _check_rw(m, SIZE)


def test_tcp_option():
    with h.Nbdkit(["memory", str(SIZE)], tcp=True) as srv, \
            h.Mount(h.tmpdir("mp"), ["--tcp", "127.0.0.1", str(srv.port)]) as m:
        _check_rw(m, SIZE)


def _congestion_controls(pid):
    """The congestion control of each TCP socket of process pid, as `ss` reports it."""
    r = h.run(["ss", "-tnpiH"], timeout=10)
    h.check_eq(r.returncode, 0, "ss exit status (%s)" % r.stderr.strip())
    found, lines = [], r.stdout.splitlines()
    for index, line in enumerate(lines):
        if "pid=%d," % pid in line and index + 1 < len(lines):
            found.append(lines[index + 1].split()[0])  # the info line starts with the algorithm
    return found


def _named_congestion_control(system):
    """An available algorithm other than the system's default and reno (what auto sets):
    only then does the named case show the name was used. Loads a tcp_* module of the
    running kernel if none is available yet (modprobe: nothing is downloaded). None if
    there is no such algorithm."""
    def available():
        with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
            return [a for a in f.read().split() if a not in (system, "reno")]
    others = available()
    for module in ("tcp_cubic", "tcp_htcp", "tcp_vegas", "tcp_westwood"):
        if others:
            break
        try:
            h.run(["modprobe", "-q", module], timeout=10)
        except OSError:
            break         # (no modprobe)
        others = available()
    if not others:
        return None
    return "cubic" if "cubic" in others else others[0]


def test_tcp_congestion_control():
    # Over TCP to 127.0.0.1 the default (auto) sets reno on every connection: there
    # is no network to share, and a pacing algorithm (bbr) only delays our sends.
    # "system" keeps the system's choice; a name sets that one.
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        system = f.read().strip()
    cases = [([], "reno"), (["--tcp-congestion", "system"], system)]
    named = _named_congestion_control(system)
    if named:
        cases.append((["--tcp-congestion", named], named))
    else:
        h.log("  (no algorithm besides reno and the system's %s: the named case is left out)" % system)
    for opts, expected in cases:
        with h.Nbdkit(["memory", str(SIZE)], tcp=True) as srv, \
                h.Mount(h.tmpdir("mp"), ["nbd://127.0.0.1:%d/" % srv.port], opts=opts) as m:
            controls = _congestion_controls(m.proc.pid)
            h.check(controls and all(c == expected for c in controls),
                    "%r: congestion control of the bridge's connections %r, expected %s" % (opts, controls, expected))
            _check_rw(m, SIZE)
    # On a unix socket there is nothing to set: said, not ignored.
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        for option, value in (("--tcp-congestion", "reno"), ("--tcp-keepalive", "10")):
            for target in ([srv.uri], ["--unix", srv.sock]):
                rc, err = h.nbdbridge_run([option, value, h.tmpdir("mp")] + target)
                h.check(rc != 0 and "applies only to TCP" in err and len(err.strip().splitlines()) == 1,
                        "%s with %r: %d %r" % (option, target, rc, err))
        rc, err = h.nbdbridge_run(["--retry-timeout", "5", h.tmpdir("mp"), "[", "nbdkit", "memory", "1M", "]"])
        h.check(rc != 0 and "--retry-timeout does not apply" in err, "--retry-timeout with [ CMD ]: %d %r" % (rc, err))


def test_fd_unix_socket():
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.sock)
        fd = s.fileno()
        # our copy is closed right after the spawn: the bridge owns the socket
        with h.Mount(h.tmpdir("mp"), ["--fd", str(fd)], pass_fds=(fd,),
                     after_start=s.close) as m:
            _check_rw(m, SIZE)
        s.close()


def test_fd_tcp_socket():
    with h.Nbdkit(["pattern", str(SIZE)], tcp=True) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.settimeout(None)
        fd = s.fileno()
        with h.Mount(h.tmpdir("mp"), ["--fd", str(fd)], pass_fds=(fd,),
                     after_start=s.close) as m:
            _check_pattern(m)
        s.close()


def test_fd_survives_only_in_bridge():
    # After the bridge exits, the server sees the connection closed.
    d = h.tmpdir("log")
    logfile = os.path.join(d, "log")
    with h.Nbdkit(["pattern", str(SIZE), "logfile=" + logfile], opts=["--filter=log"]) as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.sock)
        fd = s.fileno()
        with h.Mount(h.tmpdir("mp"), ["--fd", str(fd)], pass_fds=(fd,),
                     after_start=s.close) as m:
            _check_pattern(m)
        s.close()

        def disconnected():
            with open(logfile) as f:
                return any(" Disconnect " in ln for ln in f)
        h.wait_until(disconnected, timeout=10, what="server to see the --fd connection close")


def test_subprocess_server_pattern():
    with h.Mount(h.tmpdir("mp"), ["[", "nbdkit", "pattern", str(SIZE), "]"]) as m:
        _check_pattern(m)
        kids = [p for p in h.descendants(m.pid) if "nbdkit" in " ".join(h.proc_cmdline(p))]
        h.check(kids, "no nbdkit child process found")
        # started with systemd socket activation
        env = h.proc_environ(kids[0])
        h.check_eq(env.get("LISTEN_FDS"), "1", "LISTEN_FDS in server environment")
        h.check_eq(env.get("LISTEN_PID"), str(kids[0]), "LISTEN_PID in server environment")
    for p in kids:
        h.check(not h.pid_alive(p), "server process %d still alive after unmount" % p)


def test_subprocess_server_memory_rw():
    size = 16 * 1024 * 1024
    with h.Mount(h.tmpdir("mp"), ["[", "nbdkit", "memory", "16M", "]"]) as m:
        _check_rw(m, size)
        kids = h.descendants(m.pid)
    for p in kids:
        h.wait_until(lambda: not h.pid_alive(p), timeout=10,
                     what="server process %d to exit" % p)


def test_subprocess_server_with_options():
    # arguments are passed through verbatim, including ones starting with '-'
    with h.Mount(h.tmpdir("mp"), ["[", "nbdkit", "-r", "--filter=offset", "pattern", "4M",
                                  "offset=4096", "range=65536", "]"]) as m:
        st = os.stat(m.export)
        h.check_eq(st.st_size, 65536, "size with offset filter")
        h.check_eq(st.st_mode & 0o777, 0o444, "mode of server-readonly export")
        with open(m.export, "rb") as f:
            h.check_bytes(f.read(), h.pattern_bytes(4096, 65536), "offset pattern")


def test_subprocess_server_full_path():
    nbdkit = h.run(["sh", "-c", "command -v nbdkit"]).stdout.strip()
    with h.Mount(h.tmpdir("mp"), ["[", nbdkit, "pattern", str(SIZE), "]"]) as m:
        _check_pattern(m)


# --wait-for-server: a server a script starts just before the bridge (`nbdkit -f -U sock
# ... &`) may not listen yet. The bridge keeps trying while nothing is there (no socket
# at the path, ECONNREFUSED), up to S seconds; anything else fails at once.

WAITING = "waiting up to"   # the line -v says as the wait begins


def _said_waiting(m):
    h.wait_until(lambda: WAITING in m.stderr() or m.proc.poll() is not None, timeout=h.DEADLINE,
                 what="the bridge to say it waits for the server")
    h.check(m.proc.poll() is None, "the bridge exited instead of waiting: %r" % m.stderr())
    h.check(not m.mounted(), "mounted before the server was there")


def _catches(pid, sig):
    """Whether process pid has a handler for sig (SigCgt in /proc/PID/status)."""
    for line in h.read_text("/proc/%d/status" % pid).splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


def test_wait_for_server_started_later():
    # The bridge is seen waiting (-v says so), and only then is the server started:
    # the mount appears, the bytes are the server's, and unmounting ends it with 0.
    for target_of in (lambda srv: ["nbd+unix:///?socket=" + srv.sock],
                      lambda srv: ["--unix", srv.sock]):
        srv = h.Nbdkit(["pattern", str(SIZE)])   # not started yet: no socket at srv.sock
        m = h.Mount(h.tmpdir("mp"), target_of(srv), opts=["-v", "--wait-for-server", "20"])
        m.start()
        with m:
            _said_waiting(m)
            h.check(srv.sock in m.stderr().split(WAITING, 1)[1].splitlines()[0],
                    "the waiting line names the socket: %r" % m.stderr())
            with srv:
                m.wait_mounted()
                _check_pattern(m)
                h.check_eq(m.unmount().returncode, 0, "fusermount3 -u")
                h.check_eq(m.wait_exit(), 0, "exit status after the unmount")


def test_wait_for_server_tcp_started_later():
    # Over TCP a closed port refuses (ECONNREFUSED): waited for as well. The server
    # must come on the port the bridge was given (Nbdkit picks one of its own).
    port = h.free_tcp_port()
    m = h.Mount(h.tmpdir("mp"), ["nbd://127.0.0.1:%d/" % port], opts=["-v", "--wait-for-server", "20"])
    m.start()
    with m:
        _said_waiting(m)
        d = h.tmpdir("nbdkit")
        with open(os.path.join(d, "stderr"), "wb") as err:
            server = h.popen(["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
                              "memory", str(SIZE)], stdout=err, stderr=err)
        try:
            m.wait_mounted()
            _check_rw(m, SIZE)
            h.check_eq(m.unmount().returncode, 0, "fusermount3 -u")
            h.check_eq(m.wait_exit(), 0, "exit status after the unmount")
        finally:
            server.terminate()
            server.wait(timeout=10)


def test_wait_for_server_under_daemon():
    # The parent waits while the daemon waits, and exits 0 once the mount is live.
    srv = h.Nbdkit(["pattern", str(SIZE)])
    pidfile = os.path.join(h.tmpdir("pid"), "pid")
    m = h.Mount(h.tmpdir("mp"), [srv.uri], opts=["-v", "--daemon", "-P", pidfile, "--wait-for-server", "20"])
    m.start()
    with m:
        _said_waiting(m)
        with srv:
            h.check_eq(m.wait_exit(), 0, "--daemon parent's exit status once the server came")
            h.check(m.mounted(), "mounted when the --daemon parent exited 0")
            with open(pidfile) as f:
                daemon = int(f.read())
            _check_pattern(m)
            h.check_eq(m.unmount().returncode, 0, "fusermount3 -u")
            h.wait_until(lambda: not h.pid_alive(daemon), what="the daemon to exit after the unmount")


def test_wait_for_server_gives_up():
    # No server ever: the wait ends after S seconds with the line a missing server gets
    # without the option (naming the target), a non-zero exit, and nothing mounted.
    d = h.tmpdir("nobody")
    missing = os.path.join(d, "missing.sock")
    port = h.free_tcp_port()
    for target, named in ((["nbd+unix:///?socket=" + missing], missing),
                          (["--unix", missing], missing),
                          (["--tcp", "127.0.0.1", str(port)], "127.0.0.1:%d" % port)):
        mp = h.tmpdir("mp")
        t0 = time.monotonic()
        rc, err = h.nbdbridge_run(["--wait-for-server", "1", mp] + target, timeout=h.DEADLINE)
        took = time.monotonic() - t0
        h.check(rc not in (0, "timeout") and rc > 0, "%r: exit status %r (stderr %r)" % (target, rc, err))
        h.check(0.9 <= took <= 6, "%r: gave up after %.1f s (--wait-for-server 1)" % (target, took))
        h.check_eq(len(_lines(err)), 1, "%r: stderr lines (%r)" % (target, err))
        h.check(named in err and "cannot connect" in err and "--wait-for-server 1 s" in err,
                "%r: the line names the target and the wait: %r" % (target, err))
        h.check(not h.is_mounted(mp), "%r: left mounted" % target)
    # --list waits the same way.
    t0 = time.monotonic()
    r = h.run([h.NBDBRIDGE, "--list", "--wait-for-server", "1", "--unix", missing], timeout=h.DEADLINE)
    took = time.monotonic() - t0
    h.check(r.returncode == 1 and r.stdout == "" and len(_lines(r.stderr)) == 1 and missing in r.stderr,
            "--list: %d %r %r" % (r.returncode, r.stdout, r.stderr))
    h.check(0.9 <= took <= 6, "--list gave up after %.1f s (--wait-for-server 1)" % took)


def test_without_wait_missing_server_fails_at_once():
    # Without the option nothing is waited for, as before it existed.
    d = h.tmpdir("nobody")
    missing = os.path.join(d, "missing.sock")
    for target in (["nbd+unix:///?socket=" + missing], ["--tcp", "127.0.0.1", str(h.free_tcp_port())]):
        mp = h.tmpdir("mp")
        t0 = time.monotonic()
        rc, err = h.nbdbridge_run([mp] + target, timeout=h.DEADLINE)
        took = time.monotonic() - t0
        h.check(rc not in (0, "timeout") and rc > 0 and len(_lines(err)) == 1,
                "%r: %r %r" % (target, rc, err))
        h.check(took < 5, "%r: took %.1f s to fail without --wait-for-server" % (target, took))
        h.check("wait" not in err, "%r: %r" % (target, err))


def test_wait_for_server_does_not_wait_for_refusals():
    # A server that is there and refuses (no such export, no TLS) fails at once: only a
    # server that is not there is waited for.
    with h.Nbdkit(["memory", "1M", "exportname-strict=true", "exportname=good"],
                  opts=["--filter=exportname"]) as srv:
        for target, what in (([srv.uri_export("bad")], "unknown export"),
                             (["nbds+unix:///good?socket=" + srv.sock], "TLS the server does not do")):
            mp = h.tmpdir("mp")
            t0 = time.monotonic()
            rc, err = h.nbdbridge_run(["--wait-for-server", "30", mp] + target, timeout=h.DEADLINE)
            took = time.monotonic() - t0
            h.check(rc not in (0, "timeout") and rc > 0 and len(_lines(err)) == 1, "%s: %r %r" % (what, rc, err))
            h.check(took < 5, "%s: took %.1f s with --wait-for-server 30" % (what, took))
            h.check(not h.is_mounted(mp), "%s: left mounted" % what)
    # Nor is what getaddrinfo() cannot resolve (see ConnectionPool::connect_first); here
    # the port's name, which needs no name server to fail.
    mp = h.tmpdir("mp")
    t0 = time.monotonic()
    rc, err = h.nbdbridge_run(["--wait-for-server", "30", mp, "--tcp", "127.0.0.1", "no-such-service"],
                              timeout=h.DEADLINE)
    took = time.monotonic() - t0
    h.check(rc not in (0, "timeout") and rc > 0 and "getaddrinfo" in err, "unresolvable name: %r %r" % (rc, err))
    h.check(took < 5, "unresolvable name: took %.1f s with --wait-for-server 30" % took)


def test_wait_for_server_stopped_by_signal():
    # SIGTERM (or Ctrl-C) during the wait ends it at once: exit 1, one line, no mount.
    d = h.tmpdir("nobody")
    missing = os.path.join(d, "missing.sock")
    for sig, extra in ((signal.SIGTERM, []), (signal.SIGINT, []), (signal.SIGTERM, ["--daemon"])):
        m = h.Mount(h.tmpdir("mp"), ["--unix", missing], opts=["-v", "--wait-for-server", "60"] + extra,
                    expect_exit=1)
        m.start()
        with m:
            _said_waiting(m)
            t0 = time.monotonic()
            m.signal(sig)
            h.check_eq(m.wait_exit(timeout=10), 1, "exit status after %s %r" % (sig.name, extra))
            took = time.monotonic() - t0
            h.check(took < 5, "%s %r: took %.1f s to end the wait" % (sig.name, extra, took))
            h.check(not m.mounted(), "mounted after %s" % sig.name)
            after = m.stderr().split(WAITING, 1)[1].split("\n", 1)[1]   # the lines after it
            h.check_eq(len(_lines(after)), 1, "%s %r: lines after the waiting line (%r)" % (sig.name, extra, after))
            h.check("interrupted" in after, "%s %r: %r" % (sig.name, extra, after))
    # --list, which runs before any loop, likewise: once it catches SIGTERM (before
    # that, the signal would only show the default action's effect).
    p = h.popen([h.NBDBRIDGE, "--list", "--wait-for-server", "60", "--unix", missing],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        h.wait_until(lambda: p.poll() is not None or _catches(p.pid, signal.SIGTERM),
                     what="--list to catch SIGTERM")
        h.check(p.poll() is None, "--list ended before the signal")
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    h.check(time.monotonic() - t0 < 5, "--list: took %.1f s to end the wait" % (time.monotonic() - t0))
    h.check(p.returncode == 1 and out == b"" and len(_lines(err.decode())) == 1 and b"interrupted" in err,
            "--list after SIGTERM: %r %r %r" % (p.returncode, out, err))


def test_wait_for_server_refused_where_nothing_is_waited_for():
    # An --fd socket is connected already, and a [ CMD ] server is started by the bridge
    # on a socket that listens first: the option is refused there, in one line (exit 2).
    # Its value is checked as the other durations' are.
    mp = h.tmpdir("mp")
    for args, said in ((["--wait-for-server", "5", mp, "--fd", "3"], "does not apply to --fd"),
                       (["--wait-for-server", "5", mp, "[", "nbdkit", "memory", "1M", "]"], "does not apply to [ CMD ]"),
                       (["--wait-for-server", "-1", mp, "--unix", "x.sock"], "0, or 0.001 to 1e9 seconds"),
                       (["--wait-for-server", "5s", mp, "--unix", "x.sock"], "expected a number of seconds"),
                       (["--wait-for-server", "2e9", mp, "--unix", "x.sock"], "0, or 0.001 to 1e9 seconds")):
        rc, err = h.nbdbridge_run(args)
        h.check(rc == 2 and said in err and "--wait-for-server" in err and len(_lines(err)) == 1,
                "%r: %r %r" % (args, rc, err))
        h.check(not h.is_mounted(mp), "%r: mounted" % args)


if __name__ == "__main__":
    h.main(globals())
