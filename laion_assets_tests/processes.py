"""What the suite starts, and the proof that it ends it.

Servers are started in a session of their own (`start`), so that one signal to the process group reaches the
server and every process it spawned (Dagster's code servers, run workers and step processes); `stop` signals the
group and every descendant (one that left the group too), waits for all of them, and SIGKILLs what is left.

The session-end check (`left_behind`) finds what outlived its test, orphans reparented to init included: the
conftest marks the pytest process's environment with a token of its own (`mark_session`), every process the suite
starts inherits it, and /proc/<pid>/environ still shows it after its parent is gone. The descendants of marked
processes and of pytest count too: a process that rewrote its environment (Postgres's backends write their titles
over it) or was given one of its own is found below its parent. What the check cannot see is a process that both
dropped the mark and lost its parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

MARK = "LAION_ASSETS_TEST_SESSION"
# The pytest process's own multiprocessing helpers (the download distributor's fork server and the resource tracker
# it starts): they read a pipe that only this process writes, and end when it does.
_OWN_HELPERS = ("from multiprocessing.forkserver import main", "from multiprocessing.resource_tracker import main")


def mark_session() -> str:
    """Mark this process's environment, which every process it starts inherits, with a new token."""
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    os.environ[MARK] = token
    return token


def start(args: list[str], **kwargs) -> subprocess.Popen:
    """Popen in a new session (so in a process group of its own, whose id is the pid)."""
    return subprocess.Popen(args, start_new_session=True, **kwargs)


@dataclass(frozen=True)
class _Stat:
    pid: int
    ppid: int
    pgid: int
    state: str


def _stat(pid: int) -> _Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:  # gone
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name, in parentheses, may hold spaces
    return _Stat(pid, int(fields[1]), int(fields[2]), fields[0])


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _alive(stat: _Stat | None) -> bool:
    return stat is not None and stat.state not in ("Z", "X")  # a zombie has ended; only its exit status is left


def _group(pgid: int) -> list[int]:
    """The live processes of a process group."""
    return [p for p in _pids() if (s := _stat(p)) is not None and s.pgid == pgid and _alive(s)]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _signal(groups: Iterable[int], tree: list[psutil.Process], sig: signal.Signals) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for p in tree:  # psutil checks that the pid is still the process it was
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _remaining(procs: Iterable[subprocess.Popen], groups: Iterable[int], tree: list[psutil.Process]) -> list[int]:
    for proc in procs:
        proc.poll()  # reap our own children
    left = {p for pgid in groups for p in _group(pgid)}
    for p in tree:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.add(p.pid)
        except psutil.Error:
            pass
    return sorted(left)


def stop(*targets: subprocess.Popen | int, timeout: float = 15.0, sig: signal.Signals = signal.SIGTERM) -> list[int]:
    """End processes, each a Popen from `start` or the pid of one (a server that a daemonizing command left):
    their process groups, and every descendant they have when called (one in a session of its own too). `sig`
    (SIGTERM), up to `timeout` seconds for all of them to exit, then SIGKILL. Returns the pids that had to be
    killed."""
    procs = [t for t in targets if isinstance(t, subprocess.Popen)]
    pids = [t.pid if isinstance(t, subprocess.Popen) else t for t in targets]
    # A Popen from `start` leads its group even once it has exited; a pid, only if it still does.
    groups = [p.pid for p in procs] + [pid for pid in pids if (s := _stat(pid)) is not None and s.pgid == pid]
    tree = [p for pid in pids for p in _tree(pid)]
    _signal(groups, tree, sig)
    deadline = time.monotonic() + timeout
    while (left := _remaining(procs, groups, tree)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not left:
        return []
    tree += [p for pid in left for p in _tree(pid)]  # what they spawned meanwhile
    _signal(groups, tree, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _remaining(procs, groups, tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _marked(pid: int, mark: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return mark in f.read().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


def _own_helper(pid: int, me: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.ppid() == me and any(h in " ".join(p.cmdline()) for h in _OWN_HELPERS)
    except psutil.Error:
        return True  # gone meanwhile


def _left(token: str) -> list[int]:
    me = os.getpid()
    mark = f"{MARK}={token}".encode()
    marked = [pid for pid in _pids() if pid != me and _marked(pid, mark)]
    # With their descendants: a process that rewrites its title over its environment (Postgres's backends) or
    # was given an environment of its own is still found below a marked parent, or below pytest.
    found = {p.pid for pid in [*marked, me] for p in _tree(pid)} - {me}
    return sorted(pid for pid in found if _alive(_stat(pid)) and not _own_helper(pid, me))


@dataclass(frozen=True)
class Leftover:
    pid: int
    ppid: int
    cmdline: str

    def __str__(self) -> str:
        return f"pid {self.pid} (parent {self.ppid}): {self.cmdline}"


def left_behind(token: str, grace_s: float = 10.0) -> list[Leftover]:
    """The processes of this test session still alive besides the pytest process and its own multiprocessing
    helpers, after up to `grace_s` seconds for those still ending (a server signalled by the last teardown)."""
    deadline = time.monotonic() + grace_s
    while (pids := _left(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out.append(Leftover(pid, p.ppid(), " ".join(p.cmdline()) or f"[{p.name()}]"))
        except psutil.Error:
            pass
    return out


def kill(pids: Iterable[int]) -> None:
    """SIGKILL what the check found, so that a failed run leaves nothing behind either."""
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
