#!/usr/bin/env python3
"""Lifecycle: SIGINT / SIGTERM / fusermount3 -u, --pidfile and --daemon; an idle mount sleeps."""
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

SIZE = 4 * 1024 * 1024


def _server_kids(pid):
    return [p for p in h.descendants(pid) if "nbdkit" in " ".join(h.proc_cmdline(p))]


def _stop_and_check(how, target_kind):
    mp = h.tmpdir("mp")
    srv = None
    if target_kind == "subprocess":
        target = ["[", "nbdkit", "memory", str(SIZE), "]"]
    else:
        srv = h.Nbdkit(["memory", str(SIZE)]).start()
        target = [srv.uri]
    try:
        with h.Mount(mp, target) as m:
            with open(m.export, "r+b", buffering=0) as f:
                f.write(b"data")
                f.seek(0)
                h.check_eq(f.read(4), b"data", "readback")
            kids = _server_kids(m.pid)
            if target_kind == "subprocess":
                h.check(kids, "no subprocess server found")
            t0 = time.monotonic()
            if how == "fusermount":
                r = m.unmount()
                h.check_eq(r.returncode, 0, "fusermount3 -u rc (%s)" % r.stderr)
            else:
                m.signal(how)
            rc = m.wait_exit(timeout=h.DEADLINE)
            dt = time.monotonic() - t0
            h.check_eq(rc, 0, "exit status after %s (stderr: %s)" % (how, m.stderr()[-2000:]))
            h.check(not m.mounted(), "mount still present after %s" % how)
            h.check(dt < 10, "took %.1fs to stop after %s" % (dt, how))
            for p in kids:
                h.wait_until(lambda: not h.pid_alive(p), timeout=10,
                             what="subprocess server %d to be gone" % p)
            h.check_eq(os.listdir(mp), [], "mountpoint content after stop")
        if srv is not None:
            h.check(srv.proc.poll() is None, "external server died because of the bridge stop")
    finally:
        if srv is not None:
            srv.stop()


def test_sigint_external_server():
    _stop_and_check(signal.SIGINT, "external")


def test_sigterm_external_server():
    _stop_and_check(signal.SIGTERM, "external")


def test_fusermount_external_server():
    _stop_and_check("fusermount", "external")


def test_sigint_subprocess_server():
    _stop_and_check(signal.SIGINT, "subprocess")


def test_sigterm_subprocess_server():
    _stop_and_check(signal.SIGTERM, "subprocess")


def test_fusermount_subprocess_server():
    _stop_and_check("fusermount", "subprocess")


def test_signal_while_file_open():
    # SIGTERM while an application holds the file open: the process still
    # ends with status 0 and the mount is gone (lazily detached if needed).
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        m = h.Mount(h.tmpdir("mp"), [srv.uri])
        with m:
            fd = os.open(m.export, os.O_RDONLY)
            try:
                os.pread(fd, 10, 0)
                m.signal(signal.SIGTERM)
                rc = m.wait_exit(timeout=h.DEADLINE)
                h.check_eq(rc, 0, "exit status after SIGTERM with open file (%s)" % m.stderr())
                h.check(not m.mounted(), "mount still present after SIGTERM")
            finally:
                try:
                    os.close(fd)       # ENOTCONN is fine: the fs is gone
                except OSError:
                    pass


def test_stop_during_a_long_injected_delay():
    # A read held by --inject-delay 30 s when SIGTERM comes: it is answered EIO after
    # --shutdown-timeout, and the bridge must exit then, not when the delay would end.
    import threading
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        m = h.Mount(h.tmpdir("mp"), [srv.uri], expect_exit=None,
                    opts=["-v", "--inject-delay", "30s:constant", "--shutdown-timeout", "1"])
        with m:
            outcome = []

            def reader():
                fd = os.open(m.export, os.O_RDONLY | os.O_DIRECT)
                try:
                    buf = mmap_buffer(4096)
                    os.preadv(fd, [buf], 0)
                    outcome.append("read")
                except OSError as e:
                    outcome.append(h.errno_name(e.errno))
                try:
                    os.close(fd)  # ENOTCONN once the mount is gone
                except OSError:
                    pass
            thread = threading.Thread(target=reader, daemon=True)
            thread.start()
            h.wait_until(lambda: " READ offset=0 " in m.stderr(), timeout=10, what="the read to reach the bridge")
            m.signal(signal.SIGTERM)
            m.wait_exit(timeout=8)
            thread.join(timeout=10)
            h.check_eq(outcome, ["EIO"], "the held read's outcome")
            h.check(not m.mounted(), "mount still present after SIGTERM")


def mmap_buffer(length):
    import mmap
    return mmap.mmap(-1, length)


def test_stderr_nobody_reads_stalls_nothing():
    # -v on a pipe nobody reads (`2>&1 | less` left alone): once the pipe is full the
    # trace lines are dropped, not waited for, and the mount goes on serving.
    import threading
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        mp = h.tmpdir("mp")
        read_end, write_end = os.pipe()
        proc = h.popen([h.NBDBRIDGE, "-v", mp, srv.uri], stdout=subprocess.DEVNULL, stderr=write_end,
                       start_new_session=True)
        os.close(write_end)
        output = []
        drain = threading.Thread(target=lambda: output.append(_read_all(read_end)), daemon=True)
        try:
            h.wait_until(lambda: h.is_mounted(mp) or proc.poll() is not None, what="the mount")
            h.check(proc.poll() is None, "the bridge exited")
            # 4000 reads: two trace lines each, ~400 KB against the pipe's 64 KiB.
            r = h.run(["dd", "if=" + os.path.join(mp, "nbd"), "of=/dev/null", "bs=1024", "count=4000",
                       "iflag=direct"], timeout=30)
            h.check_eq(r.returncode, 0, "dd through the mount: %s" % r.stderr)
        finally:
            drain.start()
            if h.is_mounted(mp):
                h.run(["fusermount3", "-u", mp], timeout=15)
            try:
                rc = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = None
            drain.join(timeout=10)
            os.close(read_end)
        h.check_eq(rc, 0, "exit status")
        text = output[0] if output else ""
        h.check(re.search(r"\d+ line\(s\) for stderr were dropped", text), "no line about the dropped lines: %s"
                % text[-1000:])


def _read_all(descriptor):
    chunks = []
    while True:
        chunk = os.read(descriptor, 65536)
        if not chunk:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(chunk)


def test_signal_while_connecting_extra_connections():
    # The first connection is up (and waiting for the server), the second one hangs in
    # its handshake: SIGINT must end the bridge at once, with nothing mounted.
    with h.Nbdkit(["memory", str(SIZE)]) as srv, h.StallingProxy(srv.sock) as proxy:
        mp = h.tmpdir("mp")
        err = os.path.join(h.tmpdir("stderr"), "nbdbridge.stderr")
        with open(err, "wb") as f:
            proc = h.popen([h.NBDBRIDGE, "--connections", "2", mp, proxy.uri], stdout=subprocess.DEVNULL,
                           stderr=f, start_new_session=True)
        try:
            h.wait_until(lambda: proxy.nconn >= 2, timeout=10, what="the bridge to open its second connection")
            proc.send_signal(signal.SIGINT)
            try:
                rc = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                rc = None
            h.check(rc is not None, "the bridge still runs 10 s after SIGINT (stderr: %s)" % h.read_text(err))
            h.check(rc != 0, "exit status after SIGINT before the mount: %r" % rc)
            h.check("interrupted" in h.read_text(err), "stderr says why: %r" % h.read_text(err))
            h.check(not h.is_mounted(mp), "nothing mounted")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_shutdown_timeout_bounds_requests_in_flight():
    # A read the server holds for 30 s when SIGTERM comes: the bridge waits at most
    # --shutdown-timeout for it, the read fails with EIO, and the bridge exits 0.
    with h.Nbdkit(["memory", str(SIZE), "rdelay=30"], opts=["--filter=delay"]) as srv, \
            h.Mount(h.tmpdir("mp"), [srv.uri], opts=["--shutdown-timeout", "1"]) as m:
        reader = h.popen([sys.executable, "-c", "import os, sys\n"
                          "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                          "try:\n    os.pread(fd, 4096, 0); print('OK')\n"
                          "except OSError as e:\n    print(e.errno)\n", m.export],
                         stdout=subprocess.PIPE, text=True)
        h.wait_until(lambda: _reads_in_flight(m) == 1, timeout=10, what="the read to reach the bridge")
        t0 = time.monotonic()
        m.signal(signal.SIGTERM)
        rc = m.wait_exit(timeout=20)
        took = time.monotonic() - t0
        out, _ = reader.communicate(timeout=10)
        h.check_eq(rc, 0, "exit status after SIGTERM")
        h.check(took < 6, "the bridge took %.1f s to stop (shutdown timeout 1 s)" % took)
        h.check_eq(out.strip(), str(errno.EIO), "the read held by the server")
        h.check(not m.mounted(), "mount left")


def _reads_in_flight(mount):
    r = h.run([h.NBDBRIDGE, "stats", mount.mountdir], timeout=15)
    return json.loads(r.stdout)["operations"]["read"]["in_flight"] if r.returncode == 0 else -1


def test_pidfile_written_only_when_live():
    d = h.tmpdir("pid")
    pidfile = os.path.join(d, "nbdbridge.pid")
    mp = h.tmpdir("mp")
    # Poll every millisecond: the pidfile must never be seen before the
    # mount is visible in /proc/self/mountinfo.
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        m = h.Mount(mp, [srv.uri], opts=["-P", pidfile], wait_pidfile=pidfile)
        m.start()
        try:
            seen_early = []

            def pidfile_ok():
                if m.proc.poll() is not None:
                    return True
                if os.path.exists(pidfile):
                    # pidfile visible => mount must already be live
                    if not m.mounted():
                        seen_early.append(True)
                    return True
                return False
            h.wait_until(pidfile_ok, interval=0.001, what="pidfile %s" % pidfile)
            h.check(m.proc.poll() is None, "nbdbridge exited: %s" % m.stderr())
            h.check(not seen_early, "pidfile appeared before the mount was live")
            # pidfile content: the pid of the process serving the mount
            h.wait_until(lambda: open(pidfile).read().strip(), timeout=5, what="pidfile content")
            h.check_eq(open(pidfile).read().strip(), str(m.pid), "pidfile content")
        except BaseException:
            m.cleanup()
            raise
        m.wait_mounted()
        with m:
            with open(m.export, "rb") as f:
                h.check_eq(f.read(16), bytes(16), "read through mount")


def test_pidfile_long_option_subprocess_server():
    d = h.tmpdir("pid")
    pidfile = os.path.join(d, "p")
    with h.Mount(h.tmpdir("mp"), ["[", "nbdkit", "pattern", "1M", "]"],
                 opts=["--pidfile", pidfile]) as m:
        h.wait_until(lambda: os.path.exists(pidfile), timeout=5, what="pidfile")
        h.check_eq(open(pidfile).read().strip(), str(m.pid), "pidfile content")
        with open(m.export, "rb") as f:
            h.check_bytes(f.read(), h.pattern_bytes(0, 1 << 20), "pattern content")


def _daemon_case(target, srv=None):
    d = h.tmpdir("daemon")
    pidfile = os.path.join(d, "pid")
    mp = h.tmpdir("mp")
    mountdir = mp
    outp, errp = os.path.join(d, "out"), os.path.join(d, "err")
    # output goes to files: the daemon may keep them open after the parent exits
    with open(outp, "wb") as out, open(errp, "wb") as err:
        try:
            r = subprocess.run([h.NBDBRIDGE, "--daemon", "-P", pidfile, mp] + target,
                               stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                               timeout=h.DEADLINE)
        except subprocess.TimeoutExpired:
            h.force_unmount(mountdir)
            raise h.TestFailure("nbdbridge --daemon did not return within %ss" % h.DEADLINE)
    # right when the parent has returned, the mount must be live
    live = h.is_mounted(mountdir)
    daemon_pid = None
    try:
        h.check_eq(r.returncode, 0, "--daemon parent exit status (stderr %s)" % open(errp).read())
        h.check(live, "--daemon returned before the mount was live")
        h.check(os.path.exists(pidfile), "pidfile missing right after --daemon returned")
        daemon_pid = int(open(pidfile).read().strip())
        h.check(h.pid_alive(daemon_pid), "daemon pid %d not alive" % daemon_pid)
        h.check_eq(os.path.basename(h.proc_cmdline(daemon_pid)[0]), "nbdbridge",
                   "command of the pidfile's process")
        with open(os.path.join(mp, "nbd"), "r+b", buffering=0) as f:
            f.write(b"daemonized")
            f.seek(0)
            h.check_eq(f.read(10), b"daemonized", "I/O through daemon mount")
        kids = _server_kids(daemon_pid)
        r2 = h.run(["fusermount3", "-u", mountdir])
        h.check_eq(r2.returncode, 0, "fusermount3 -u of daemon mount (%s)" % r2.stderr)
        h.wait_until(lambda: not h.pid_alive(daemon_pid), what="daemon process to exit")
        for p in kids:
            h.wait_until(lambda: not h.pid_alive(p), timeout=10, what="server %d to exit" % p)
        h.check(not h.is_mounted(mountdir), "mount still present")
        # A stderr redirected to a file is the daemon's log: it stays open after going
        # to the background.
        h.check("stats at exit" in open(errp).read(), "the daemon's exit line in its stderr file")
        return kids
    finally:
        if h.is_mounted(mountdir):
            h.force_unmount(mountdir)
        if daemon_pid and h.pid_alive(daemon_pid) and \
                os.path.basename(h.proc_cmdline(daemon_pid)[0]) == "nbdbridge":
            os.kill(daemon_pid, signal.SIGKILL)


def test_daemon_external_server():
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        _daemon_case([srv.uri], srv)
        h.check(srv.proc.poll() is None, "server died")


def test_daemon_subprocess_server():
    kids = _daemon_case(["[", "nbdkit", "memory", str(SIZE), "]"])
    h.check(kids, "no subprocess server found under the daemon")


def test_daemon_failure_reported_by_parent():
    # If mounting fails, the --daemon parent must exit non-zero.
    d = h.tmpdir("sock")
    rc, err = h.nbdbridge_run(["--daemon", h.tmpdir("mp"),
                               "nbd+unix:///?socket=" + os.path.join(d, "none.sock")])
    h.check(rc != 0 and rc != "timeout", "--daemon with unreachable server: rc %r" % rc)
    h.check(err.strip(), "--daemon failure printed nothing on stderr")


def _bridges_for(mountpoint):
    """Live nbdbridge processes whose command line names mountpoint."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and h.pid_alive(int(entry)):
            words = h.proc_cmdline(int(entry))
            if words and os.path.basename(words[0]) == "nbdbridge" and mountpoint in words:
                found.append(int(entry))
    return found


def test_daemon_caller_gone_while_it_connects():
    # The server takes 2 s to open the export. Ctrl-C (SIGINT; SIGTERM and SIGHUP take
    # the same way) for the --daemon parent ends the start: it no longer reaches the
    # detached child by itself. A parent killed outright (SIGKILL) hears of no mount,
    # so none stays.
    with h.Nbdkit(["memory", str(SIZE), "delay-open=2"], opts=["--filter=delay"]) as srv:
        for how in (signal.SIGINT, signal.SIGKILL):
            mp = h.tmpdir("mp")
            d = h.tmpdir("daemon")
            pidfile, errp = os.path.join(d, "pid"), os.path.join(d, "err")
            try:
                with open(errp, "wb") as err:
                    parent = h.popen([h.NBDBRIDGE, "--daemon", "-P", pidfile, mp, srv.uri], stderr=err)
                h.wait_until(lambda: len(_bridges_for(mp)) == 2, timeout=10, what="the daemon child to start")
                parent.send_signal(how)
                try:
                    rc = parent.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    raise h.TestFailure("the --daemon parent did not end within 15 s of %s" % how.name)
                h.check(rc != 0, "the --daemon parent's exit status after %s: %r" % (how.name, rc))
                h.wait_until(lambda: not _bridges_for(mp), timeout=20,
                             what="the daemon child to end after its caller's %s" % how.name)
                h.check(not h.is_mounted(mp), "mounted after the caller's %s" % how.name)
                h.check(not os.path.exists(pidfile), "a pidfile after the caller's %s" % how.name)
                if how == signal.SIGKILL:
                    h.check("is gone" in open(errp).read(), "the child's stderr: %s" % open(errp).read())
                else:
                    h.check("interrupted" in open(errp).read(), "no reason on stderr: %s" % open(errp).read())
            finally:
                for pid in _bridges_for(mp):
                    os.kill(pid, signal.SIGKILL)
                if h.is_mounted(mp):
                    h.force_unmount(mp)


def test_repeated_mount_unmount():
    # The same server and mountpoint can be mounted again and again.
    mp = h.tmpdir("mp")
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        for i in range(5):
            with h.Mount(mp, [srv.uri]) as m:
                with open(m.export, "r+b", buffering=0) as f:
                    prev = f.read(1)
                    h.check_eq(prev, bytes([i]) if i else b"\0", "value from previous round")
                    f.seek(0)
                    f.write(bytes([i + 1]))


def _cpu_seconds(pid):
    """User + system CPU time of a process and its threads, from /proc/PID/stat."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_mount_uses_no_cpu():
    # Busy-polling must end once work stops: an idle mount sleeps in epoll.
    # Measured as CPU time over a window (not wall time): a loop that kept
    # polling would use about the whole window.
    for busy_poll in ("50", "1000"):
        with h.Nbdkit(["memory", str(SIZE)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri],
                                                              opts=["--busy-poll", busy_poll]) as m:
            with open(m.export, "r+b", buffering=0) as f:
                for i in range(200):
                    f.seek((i * 4096) % SIZE)
                    f.write(b"x" * 4096)
            before = _cpu_seconds(m.pid)
            window = 1.0
            time.sleep(window)  # the measurement window, not a wait for a condition
            used = _cpu_seconds(m.pid) - before
            h.check(used < 0.3 * window,
                    "idle mount used %.2f s of CPU in %.1f s with --busy-poll %s" % (used, window, busy_poll))


def _rss_mib(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise h.TestFailure("no VmRSS for pid %d" % pid)


def test_idle_mount_gives_memory_back():
    # A burst of 1 MiB requests at depth leaves tens of MiB in the bridge's free
    # buffers; after --idle-release seconds without requests they go back to the
    # system, and the next burst still gets its bytes right.
    size = 64 << 20
    with h.Nbdkit(["memory", str(size)]) as srv, h.Mount(h.tmpdir("mp"), [srv.uri],
                                                          opts=["--idle-release", "0.5", "-v"]) as m:
        before = _rss_mib(m.pid)
        d = h.tmpdir("fio")
        # Writes, then reads them back to verify them: both kinds of buffer.
        h.run(["fio", "--name=burst", "--filename=" + m.export, "--rw=write", "--bs=1M", "--size=%d" % size,
               "--direct=1", "--ioengine=io_uring", "--iodepth=16", "--verify=crc32c",
               "--verify_state_save=0"], timeout=60, check=True, cwd=d)
        # The burst's buffers are resident right after it, unless the release already
        # came (it may, 0.5 s after the last request): then the log says so.
        after_burst = _rss_mib(m.pid)
        h.check(after_burst > before + 16 or "buffer memory given back" in m.stderr(),
                "RSS %.1f MiB after 1 MiB bursts at depth 16, %.1f before: the test measures nothing"
                % (after_burst, before))
        h.wait_until(lambda: _rss_mib(m.pid) < before + 8, timeout=10,
                     what="RSS back near its %.1f MiB before the burst (%.1f after it)" % (before, after_burst))
        h.check("buffer memory given back" in m.stderr(), "no -v line for the release")
        r = h.run(["fio", "--name=burst", "--filename=" + m.export, "--rw=read", "--bs=1M", "--size=%d" % size,
                   "--direct=1", "--ioengine=io_uring", "--iodepth=16", "--verify=crc32c", "--verify_only",
                   "--verify_state_save=0"], timeout=60, cwd=d)
        h.check_eq(r.returncode, 0, "fio verify after the release: %s %s" % (r.stdout, r.stderr))


def test_daemon_holds_no_other_descriptor_of_the_caller():
    # A supervisor that waits for EOF on a pipe it gave as fd 3 (`3>&1 | cat`): the
    # daemon must not keep it open once the parent has returned.
    import select
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        mp = h.tmpdir("mp")
        pidfile = os.path.join(h.tmpdir("d"), "pid")
        read_end, write_end = os.pipe()
        # One the command line names stays: --stats-file /dev/fd/N.
        stats_path = os.path.join(h.tmpdir("s"), "stats.json")
        stats = os.open(stats_path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            r = subprocess.run([h.NBDBRIDGE, "--daemon", "-P", pidfile, "--stats-file", "/dev/fd/%d" % stats,
                                mp, srv.uri], pass_fds=(write_end, stats),
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=15)
            os.close(write_end)
            write_end = None
            os.close(stats)
            h.check_eq(r.returncode, 0, "--daemon exit status (stderr %r)" % r.stderr)
            ready, _, _ = select.select([read_end], [], [], 5)
            h.check(ready and os.read(read_end, 1) == b"", "the caller's pipe on another descriptor is still open")
            daemon_pid = int(open(pidfile).read())
            h.run(["fusermount3", "-u", mp], timeout=15, check=True)
            h.wait_until(lambda: not h.pid_alive(daemon_pid), what="the daemon to exit")
            h.check(json.loads(open(stats_path).read())["version"] == 1, "the statistics through /dev/fd/N")
        finally:
            if write_end is not None:
                os.close(write_end)
            os.close(read_end)
            daemon_pid = int(open(pidfile).read()) if os.path.exists(pidfile) else None
            if h.is_mounted(mp):
                h.run(["fusermount3", "-u", mp])
            if daemon_pid:
                h.wait_until(lambda: not h.pid_alive(daemon_pid), what="the daemon to exit")


def test_daemon_with_captured_output_returns():
    # $(nbdbridge --daemon ...), ssh, or a pipe: the caller reads until end of file, so
    # neither the daemon nor what it starts (fusermount3's auto_unmount watcher, a
    # [ CMD ] server, also with -v) may keep the caller's pipes open once the mount is live.
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        for target in ([srv.uri], ["-v", "[", "nbdkit", "memory", str(SIZE), "]"]):
            mp = h.tmpdir("mp")
            pidfile = os.path.join(h.tmpdir("d"), "pid")
            try:
                try:
                    r = subprocess.run([h.NBDBRIDGE, "--daemon", "-P", pidfile, mp] + target,
                                       stdin=subprocess.DEVNULL, capture_output=True, timeout=15)
                except subprocess.TimeoutExpired:
                    raise h.TestFailure("nbdbridge --daemon %r with its output on pipes did not return in 15 s"
                                        % target)
                h.check_eq(r.returncode, 0, "--daemon exit status (stderr %r)" % r.stderr)
                h.check(h.is_mounted(mp), "not mounted after --daemon returned")
            finally:
                daemon_pid = int(open(pidfile).read()) if os.path.exists(pidfile) else None
                if h.is_mounted(mp):
                    h.run(["fusermount3", "-u", mp])
                if daemon_pid:
                    h.wait_until(lambda: not h.pid_alive(daemon_pid), what="the daemon to exit")


def test_daemon_with_the_nbd_socket_as_stdin():
    # inetd style: --fd 0. Going to the background must not replace the socket with
    # /dev/null (an --fd target is not reconnected: every request would fail).
    mp = h.tmpdir("mp")
    with h.Nbdkit(["memory", str(SIZE)]) as srv:
        import socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(srv.sock)
        errpath = os.path.join(h.tmpdir("d"), "stderr")
        try:
            with open(errpath, "wb") as err:
                r = subprocess.run([h.NBDBRIDGE, "--daemon", mp, "--fd", "0"], stdin=sock.fileno(),
                                   stdout=subprocess.DEVNULL, stderr=err, timeout=15)
        except subprocess.TimeoutExpired:
            raise h.TestFailure("nbdbridge --daemon --fd 0 did not return in 15 s")
        finally:
            sock.close()
        try:
            h.check_eq(r.returncode, 0, "--daemon --fd 0 exit status (stderr %r)" % h.read_text(errpath))
            export = os.path.join(mp, "nbd")
            rc = h.run(["dd", "if=/dev/urandom", "of=" + export, "bs=64k", "count=4", "conv=notrunc,fsync"],
                       timeout=15)
            h.check_eq(rc.returncode, 0, "dd through the daemon's --fd 0 mount (%s)" % rc.stderr)
        finally:
            if h.is_mounted(mp):
                h.run(["fusermount3", "-u", mp])


READ_ONE_BLOCK = r"""
import hashlib, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    print(hashlib.sha256(os.pread(fd, 65536, 0)).hexdigest())
except OSError as e:
    print("error", e.errno)
"""


def test_ctrl_c_lets_the_bracketed_servers_requests_finish():
    # A terminal's Ctrl-C signals the whole foreground process group. The [ CMD ] server
    # must not get it: it would drop the read in flight (a [ CMD ] target is not
    # reconnected, so the reader would get EIO). The bridge lets the read finish, then
    # stops the server itself.
    mp = h.tmpdir("mp")
    # Held 3 s: long enough that the signal surely comes while the read waits (a slow
    # `nbdbridge stats` under the sanitizers could otherwise see it in flight too late).
    with h.Mount(mp, ["[", "nbdkit", "--filter=delay", "pattern", "1M", "rdelay=3", "]"]) as m:
        reader = h.popen([sys.executable, "-c", READ_ONE_BLOCK, m.export], stdout=subprocess.PIPE, text=True)
        try:
            def read_in_flight():
                r = h.run([h.NBDBRIDGE, "stats", m.mountdir], timeout=15)
                return r.returncode == 0 and json.loads(r.stdout)["in_flight"]["now"] > 0
            h.wait_until(read_in_flight, timeout=10, what="the read to be in flight")
            os.killpg(m.pid, signal.SIGINT)      # as the terminal does: the bridge's process group
            h.check(reader.poll() is None, "the read ended before the Ctrl-C it was to outlive")
            out, _ = reader.communicate(timeout=15)
        finally:
            if reader.poll() is None:
                reader.kill()
        h.check_eq(out.split(), [hashlib.sha256(h.pattern_bytes(0, 65536)).hexdigest()],
                   "the read in flight at Ctrl-C")
        h.check_eq(m.wait_exit(), 0, "exit status after Ctrl-C")
        h.check(not h.is_mounted(m.mountdir), "still mounted after Ctrl-C")


if __name__ == "__main__":
    h.main(globals())
