"""What the suite starts, and the proof that it ends it.

Servers are started in a session of their own (`start`), so that one signal to the process group reaches the
server and every process it spawned (Dagster's code servers and run workers, Postgres's backends); `stop` sends
SIGTERM, waits for the whole group and what the server had spawned, and SIGKILLs what is left.

The session-end check (`left_behind`) finds what outlived its test, orphans reparented to init included: the
conftest marks the pytest process's environment with a token of its own (`mark_session`), every process the suite
starts inherits it, and /proc/<pid>/environ still shows it after its parent is gone. A pytest process's
descendants are looked at too, for a child that was started with an environment of its own.
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


def _signal(procs: Iterable[subprocess.Popen], tree: list[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for p in tree:  # psutil checks that the pid is still the process it was
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def _remaining(procs: Iterable[subprocess.Popen], tree: list[psutil.Process]) -> list[int]:
    for proc in procs:
        proc.poll()  # reap our own children
    left = {p for proc in procs for p in _group(proc.pid)}
    for p in tree:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.add(p.pid)
        except psutil.Error:
            pass
    return sorted(left)


def stop(*procs: subprocess.Popen, timeout: float = 15.0) -> list[int]:
    """End processes started by `start`, their process groups, and every descendant they have when called (one that
    left the group too): SIGTERM, up to `timeout` seconds for all of them to exit, then SIGKILL. Returns the pids
    that had to be killed."""
    tree = [p for proc in procs for p in _tree(proc.pid)]
    _signal(procs, tree, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (left := _remaining(procs, tree)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not left:
        return []
    tree += [p for pid in left for p in _tree(pid)]  # what they spawned meanwhile
    _signal(procs, tree, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _remaining(procs, tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def stop_group(pgid: int, timeout: float = 15.0) -> None:
    """End a process group that a daemonizing command left (its leader called setsid): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + timeout
        while _group(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _group(pgid):
            return


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
    found = {pid for pid in _pids() if pid != me and _marked(pid, mark)}
    found |= {p.pid for p in _tree(me)[1:]}
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
