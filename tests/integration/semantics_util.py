"""Helpers shared by the NBD-semantics integration tests (sparse files,
durability, multi-conn, TLS, block sizes, VM disks, error injection,
--list).  Python 3 standard library only; builds on harness.py.
"""
import ctypes
import ctypes.util
import json
import os
import re
import shutil

import harness as h

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd, mode, offset, length):
    """fallocate(2); returns 0 or the errno (never raises)."""
    r = _libc.fallocate(fd, mode, offset, length)
    return 0 if r == 0 else ctypes.get_errno()


def need(*programs):
    """Fail (not skip: the test would silently cover nothing) when a tool is missing."""
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise h.TestFailure("required program(s) not installed: %s" % ", ".join(missing))


# ---------------------------------------------------------------------------
# nbdkit log filter

_LOG_REQ = re.compile(r"connection=(\d+) (Read|Write|Zero|Trim|Extents|Cache|Flush) id=(\d+) (.*)$")
_LOG_REPLY = re.compile(r"connection=(\d+) \.\.\.(Read|Write|Zero|Trim|Extents|Cache|Flush) id=(\d+) (.*)$")
_LOG_CONNECT = re.compile(r"connection=(\d+) Connect (.*)$")


def _fields(text):
    out = {}
    for m in re.finditer(r"(\w+)=(\S+)", text):
        out[m.group(1)] = m.group(2)
    return out


def read_log(path):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def log_requests(path):
    """Request lines of an nbdkit log filter file, in order, as dicts with
    conn, act, id and the key=value fields (offset/count as int)."""
    res = []
    for ln in read_log(path):
        m = _LOG_REQ.search(ln)
        if not m:
            continue
        d = _fields(m.group(4))
        for k in ("offset", "count"):
            if k in d:
                d[k] = int(d[k], 0)
        d.update(conn=int(m.group(1)), act=m.group(2), id=int(m.group(3)), line=ln)
        res.append(d)
    return res


def log_failed_replies(path):
    """Reply lines that carry a non-zero return (failed requests)."""
    out = []
    for ln in read_log(path):
        m = _LOG_REPLY.search(ln)
        if m and not re.search(r"return=0\b", m.group(4)):
            out.append(ln)
    return out


def log_connects(path):
    """{connection number: Connect fields} from a log filter file."""
    res = {}
    for ln in read_log(path):
        m = _LOG_CONNECT.search(ln)
        if m:
            res[int(m.group(1))] = _fields(m.group(2))
    return res


def count_acts(path, act):
    return sum(1 for r in log_requests(path) if r["act"] == act)


# ---------------------------------------------------------------------------
# misc

def server_image(uri, timeout=120, request_size=None):
    """The export's bytes fetched straight from the server with nbdcopy
    (request_size: for servers that refuse large requests)."""
    path = os.path.join(h.tmpdir("img"), "img")
    opts = ["--request-size=%d" % request_size] if request_size else []
    h.run(["nbdcopy"] + opts + [uri, path], timeout=timeout, check=True)
    with open(path, "rb") as f:
        return f.read()


def fio_json(export, args, timeout=60):
    """Run fio against export; returns (CompletedProcess, parsed JSON)."""
    d = h.tmpdir("fio")
    out = os.path.join(d, "fio.json")
    cmd = ["fio", "--output-format=json", "--output=" + out, "--filename=" + export,
           "--thread", "--allow_file_create=0", "--fallocate=none", "--invalidate=0",
           "--verify_state_save=0"] + list(args)
    r = h.run(cmd, timeout=timeout, cwd=d)
    try:
        with open(out) as f:
            text = f.read()
        data = json.loads(text[text.index("{"):])
    except (OSError, ValueError) as e:
        raise h.TestFailure("fio produced no JSON (rc=%d): %s\ncmd: %r\nstderr: %s"
                            % (r.returncode, e, cmd, r.stderr[-2000:]))
    return r, data


def nonempty_lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


def check_one_line_error(stderr, what):
    lines = nonempty_lines(stderr)
    h.check(len(lines) == 1, "%s: expected exactly one line on stderr, got %d: %r"
            % (what, len(lines), stderr))
    h.check(lines[0].startswith("nbdbridge"), "%s: the line should name nbdbridge: %r"
            % (what, lines[0]))


def threads_named(pid, name):
    """How many threads of process pid are called name (/proc/PID/task/*/comm)."""
    count = 0
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, task)) as f:
                count += f.read().strip() == name
        except OSError:
            pass
    return count


def st_alloc(path):
    """Allocated bytes according to stat (st_blocks is in 512-byte units)."""
    return os.stat(path).st_blocks * 512


# ---------------------------------------------------------------------------
# child processes

_THREADED_IO_WORKER = r"""
import errno, os, random, sys, threading
path = sys.argv[1]
threads = 4
out = []
lock = threading.Lock()
started = threading.Barrier(threads + 1)
def work(i):
    rnd = random.Random(i)
    first = True
    fd = None
    try:
        fd = os.open(path, os.O_RDWR)
        while True:
            offset = rnd.randrange(START, END - 65536, ALIGNMENT)
            os.pwrite(fd, os.urandom(65536), offset)
            os.pread(fd, 65536, offset)
            if first:
                first = False
                started.wait()
    except OSError as e:
        with lock:
            out.append("T%d %s" % (i, errno.errorcode.get(e.errno, e.errno)))
        if first:
            started.abort()
    finally:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
for t in workers: t.start()
try:
    started.wait()
    print("progress", flush=True)
except threading.BrokenBarrierError:
    print("noprogress", flush=True)
for t in workers: t.join()
print("\n".join(out), flush=True)
"""


def threaded_io_worker(start, end, alignment=1):
    """Source of a child process that keeps I/O in flight on argv[1] while
    a test breaks the connection: 4 threads do 64 KiB pwrite+pread at random
    offsets in [start, end) (steps of alignment) until their first error.
    Prints "progress" once every thread has done a round ("noprogress" if one
    failed first), then "T<thread> <ERRNO>" per thread."""
    return ("START, END, ALIGNMENT = %d, %d, %d\n" % (start, end, alignment)
            + _THREADED_IO_WORKER)
