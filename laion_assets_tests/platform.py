"""The real parts of a deployment for the platform test: Debian's PostgreSQL in a temporary folder, the Dagster
daemon and webserver against it, and a way to kill the process of a run as a failing node would."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import yaml

from laion_assets_tests import processes

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """Poll until check() is truthy; fail naming what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"gave up waiting {timeout:.0f} s for {what}")


def apt_install(*packages: str) -> None:
    """Debian packages a test needs and the machine lacks (as root, from the package registry)."""
    if os.geteuid() != 0:
        raise RuntimeError(f"{packages} are missing and only root can install them")
    subprocess.run(["apt-get", "install", "-y", "-q", *packages], check=True, capture_output=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


class Postgres:
    """A PostgreSQL server of its own, on 127.0.0.1, started as the unprivileged `postgres` user (it refuses root)."""

    def __init__(self) -> None:
        self.bin = self._binaries()
        self.port = free_port()
        # Outside pytest's root-only temp folders: the postgres user must reach its data directory.
        self.folder = Path(tempfile.mkdtemp(prefix="laion-pg-", dir="/tmp"))
        shutil.chown(self.folder, "postgres", "postgres")
        self.data = self.folder / "data"

    @staticmethod
    def _binaries() -> Path:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            apt_install("postgresql")
            found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        return Path(found[-1]).parent

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True)

    def start(self) -> Postgres:
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                          "-E", "UTF8")
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "log"), "-w", "-o",
                          f"-p {self.port} -h 127.0.0.1 -k {self.folder} -c fsync=off -c max_connections=200", "start")
        self._as_postgres(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                          "dagster")
        return self

    def _postmaster(self) -> int | None:
        """The server's pid (the first line of postmaster.pid) while it runs this data directory."""
        with contextlib.suppress(OSError, ValueError, IndexError, psutil.Error):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            if str(self.data) in psutil.Process(pid).cmdline():
                return pid
        return None

    def stop(self) -> None:
        """pg_ctl's immediate stop; should the server still run, SIGQUIT (Postgres's immediate shutdown) to it and
        its backends, then SIGKILL: pg_ctl started it outside the test's process tree, each backend in a session of
        its own. Then its folder goes."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                            "immediate", "-t", "30", "stop"], capture_output=True, timeout=40)
        if (postmaster := self._postmaster()) is not None:
            processes.stop(postmaster, sig=signal.SIGQUIT, timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)


def instance_yaml(pg: Postgres) -> dict[str, Any]:
    """The production instance's shape (Postgres, queued runs, pools, run retries), with short intervals."""
    # SQLAlchemy 2.1 maps postgresql:// to psycopg 3, whose server-side parameters break dagster-postgres's NOTIFY.
    db = {"hostname": "127.0.0.1", "port": pg.port, "username": "postgres", "password": "", "db_name": "dagster",
          "scheme": "postgresql+psycopg2"}
    return {
        "storage": {"postgres": {"postgres_db": db}},
        "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": {"dequeue_interval_seconds": 1}},
        "concurrency": {"runs": {"max_concurrent_runs": 3}, "pools": {"default_limit": 2}},
        "run_retries": {"enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": True},
        "run_monitoring": {"enabled": True, "poll_interval_seconds": 2, "start_timeout_seconds": 120},
        "auto_materialize": {"minimum_interval_seconds": 5},
        "telemetry": {"enabled": False},
    }


class Dagster:
    """`dagster-daemon run` and `dagster-webserver` against an instance folder, with the code location's env."""

    def __init__(self, home: Path, env: dict[str, str], pg: Postgres) -> None:
        self.home, self.env = home, env
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml(pg)))
        (home / "workspace.yaml").write_text(yaml.safe_dump({"load_from": [{"python_module": {
            "module_name": "laion_assets.definitions", "working_directory": str(ROOT)}}]}))
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def _environ(self) -> dict[str, str]:
        return {**os.environ, **self.env, "DAGSTER_HOME": str(self.home)}

    def _start(self, name: str, *args: str) -> None:
        with open(self.home / f"{name}.log", "wb") as log:  # the child has its own copy of the descriptor
            self.processes.append(processes.start([str(BIN / name), *args], env=self._environ, stdout=log,
                                                  stderr=log, cwd=ROOT))

    def create_storage(self) -> None:
        """`dagster instance migrate`: the instance's tables, before a daemon and its code server (or a webserver)
        could both create them at once and leave two alembic heads (dagster issue #27390)."""
        result = subprocess.run([str(BIN / "dagster"), "instance", "migrate"], env=self._environ, cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    def start(self, webserver: bool = True) -> Dagster:
        """The instance's storage, then `dagster-daemon run`, and `dagster-webserver` unless told not to."""
        self.create_storage()
        self._start("dagster-daemon", "run", "-w", str(self.home / "workspace.yaml"))
        if webserver:
            self._start("dagster-webserver", "-h", "127.0.0.1", "-p", str(self.port), "-w",
                        str(self.home / "workspace.yaml"))
        return self

    def logs(self) -> str:
        return "\n".join((self.home / f"{n}.log").read_text(errors="replace")[-4000:]
                         for n in ("dagster-daemon", "dagster-webserver") if (self.home / f"{n}.log").exists())

    def stop(self) -> None:
        """The daemon and the webserver, and everything under them: code servers (a `--heartbeat` one outlives its
        parent while it waits for a run process), run workers, step processes."""
        processes.stop(*self.processes)
        self.processes.clear()


class _quiet:  # noqa: N801 - a tiny context manager, named as a statement
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError | PermissionError)


def process_on_local_port(port: int) -> psutil.Process | None:
    """The process whose TCP socket has this local port (the client side of a request a server saw)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    return None


def kill_run_of(process: psutil.Process) -> list[int]:
    """SIGKILL the run that a process belongs to, as a node failure would: the run worker (the child of the code
    server that launched it) and everything under it. Returns the killed pids."""
    chain = [process, *process.parents()]
    server = next(i for i, p in enumerate(chain) if _is_code_server(p))
    worker = chain[server - 1]
    victims = [worker, *worker.children(recursive=True)]
    for p in victims:
        with _quiet():
            p.kill()
    return [p.pid for p in victims]


def _is_code_server(process: psutil.Process) -> bool:
    try:
        cmdline = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return "dagster" in cmdline and ("grpc" in cmdline or "code-server" in cmdline)


@contextlib.contextmanager
def running_platform(tmp_path: Path, **extra_env: str) -> Iterator[tuple[Path, dict[str, str], Dagster]]:
    """Postgres started, and a Dagster home against it with the code location's environment (storage and mirror
    under tmp_path, the small models, a 3 s sensor interval, test crawl names; `extra_env` on top): (tmp_path, env,
    dagster), whose daemon and webserver the test starts. Both are stopped at the end."""
    from laion_assets_tests.conftest import MODELS_DIR
    from laion_assets_tests.graph import LAYOUT

    env = {"LAION_ASSETS_STORAGE": str(tmp_path / "data"), "LAION_ASSETS_SOURCE": str(tmp_path / "mirror"),
           "LAION_ASSETS_CHUNKS": str(LAYOUT.chunks), "LAION_ASSETS_BUCKETS": str(LAYOUT.buckets),
           "LAION_ASSETS_ALLOW_NETWORKS": "127.0.0.1/32", "LAION_ASSETS_MODELS_DIR": str(MODELS_DIR),
           "LAION_ASSETS_SENSOR_INTERVAL_S": "3", "LAION_ASSETS_CRAWL_PATTERN": r"CC-MAIN-2099-\d\d", **extra_env}
    with contextlib.ExitStack() as stack:  # what started is stopped, also when a later start fails
        pg = Postgres()
        stack.callback(pg.stop)
        pg.start()
        dagster = Dagster(tmp_path / "home", env, pg)
        stack.callback(dagster.stop)
        yield tmp_path, env, dagster


def crawled(dagster: Dagster, env: dict[str, str], crawl: str, sample: dict[str, int]) -> tuple[Any, Any]:
    """The platform's instance and a Graph on it, with the registry sources observed (as the running platform's
    sensor would have) and `crawl` materialized in-process from the mirror: (instance, graph)."""
    from dagster._core.definitions.observe import observe
    from dagster._core.instance.ref import InstanceRef

    from laion_assets_tests.graph import Graph, graph_resources

    instance = dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster.home)))
    mirror = Path(env["LAION_ASSETS_SOURCE"])
    graph = Graph(graph_resources(env["LAION_ASSETS_STORAGE"], mirror), instance)
    sources = [a for a in graph.assets if isinstance(a, dg.SourceAsset)]
    assert observe(sources, instance=instance, resources=graph.resources).success
    graph.whole_crawl(mirror, crawl, sample=sample)
    return instance, graph
