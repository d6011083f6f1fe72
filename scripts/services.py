"""Local services for align: a Prefect server, its work pools and workers, an MLflow server; the demo.

    python -m scripts up        # start what is not running (idempotent), deploy prefect.yaml
    python -m scripts demo      # up, then `align/full` on the tiny recipe, streamed, then a summary
    python -m scripts status
    python -m scripts down      # stop what `up` started, by PID: workers, then MLflow, then the server

Everything lives under one state folder (default <repo>/.align, or ALIGN_STATE): the Prefect home and
its SQLite DB, the MLflow SQLite DB and artifact folder, PID files (pids/) and logs (logs/). Servers bind
127.0.0.1 only. Ports: ALIGN_PREFECT_PORT (4200), ALIGN_MLFLOW_PORT (5000). Tests use the same class
with a temporary folder and free ports.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from schemas.hashing import content_hash

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
POOLS = {"cpu": "data, evaluation and orchestration", "gpu": "training stages (sft, cai, reward, dpo)"}
DEPLOYMENTS = {  # prefect.yaml deployment → entrypoint file; deployed when the file exists
    "align/full": "flows/align.py",
    "align/retrain": "flows/align.py",
    "ingest/tiny": "flows/ingest.py",
    "promote/manual": "flows/promote.py",
    "score/file": "flows/score.py",
    "stage/gpu": "flows/stage.py",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Services:
    state: Path = field(default_factory=lambda: Path(os.environ.get("ALIGN_STATE", ROOT / ".align")))
    prefect_port: int = field(default_factory=lambda: int(os.environ.get("ALIGN_PREFECT_PORT", 4200)))
    mlflow_port: int = field(default_factory=lambda: int(os.environ.get("ALIGN_MLFLOW_PORT", 5000)))
    gpu_slots: int = field(default_factory=lambda: int(os.environ.get("ALIGN_GPU_SLOTS", 0)) or _gpu_count())
    extra_env: dict = field(default_factory=dict)

    def __post_init__(self):
        self.state = Path(self.state).resolve()
        self.pids, self.logs = self.state / "pids", self.state / "logs"

    # ---- environment every process shares ------------------------------------------------------
    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.state / 'mlflow.db'}"

    def env(self) -> dict:
        return {
            **os.environ,
            "PREFECT_HOME": str(self.state / "prefect"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_CLI_COLORS": "false",
            "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",  # flow results readable by the caller
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick a new run up in ≤ 2 s (default 10)
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "ALIGN_ROOT": str(ROOT),
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            **self.extra_env,
        }

    # ---- processes by PID file ----------------------------------------------------------------
    def pid(self, name: str) -> int | None:
        f = self.pids / f"{name}.pid"
        if not f.is_file():
            return None
        pid = int(f.read_text().split()[0])
        return pid if _alive(pid) else None

    def spawn(self, name: str, cmd: list[str]) -> int:
        self.pids.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
        # Own session: `down` signals the whole group (a server's own children included), nothing else.
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        (self.pids / f"{name}.pid").write_text(f"{proc.pid}\n")
        return proc.pid

    def stop(self, name: str, grace: float = 15.0, crash: bool = False) -> None:
        """Stop a process group by its PID file; ``crash`` kills at once (tests simulate a dead host)."""
        pid = self.pid(name)
        (self.pids / f"{name}.pid").unlink(missing_ok=True)
        if pid is None:
            return
        # A worker exits promptly on the second SIGINT; servers on one. SIGKILL after the grace period.
        if (
            crash
        ):  # a dead host takes the flow-run processes with it (a process worker starts them in their own session)
            for child in _descendants(pid):
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        steps = ((signal.SIGINT, 3.0), (signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0))
        for sig, wait in ((signal.SIGKILL, 5.0),) if crash else steps:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            if _wait_gone(pid, wait):
                break
        log(f"stopped {name} (pid {pid})")

    # ---- services ------------------------------------------------------------------------------
    def start_prefect(self) -> tuple | None:
        """Launch the Prefect server unless it runs; returns what to wait on (both servers boot in parallel)."""
        if self.pid("prefect-server") and _healthy(f"{self.api_url}/health"):
            log(f"Prefect server already running: {self.ui_url}")
            return None
        _require_free(self.prefect_port, "Prefect", "ALIGN_PREFECT_PORT")
        (self.state / "prefect").mkdir(parents=True, exist_ok=True)
        pid = self.spawn(
            "prefect-server",
            [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.prefect_port)],
        )
        log(f"starting Prefect server (pid {pid}) on {self.ui_url} …")
        return "Prefect server", f"{self.api_url}/health", self.logs / "prefect-server.log"

    def start_mlflow(self) -> tuple | None:
        if self.pid("mlflow") and _healthy(f"{self.mlflow_url}/health"):
            log(f"MLflow server already running: {self.mlflow_url}")
            return None
        _require_free(self.mlflow_port, "MLflow", "ALIGN_MLFLOW_PORT")
        artifacts = self.state / "mlartifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        pid = self.spawn(
            "mlflow",
            [
                str(VENV_BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                self.tracking_uri,
                "--default-artifact-root",
                artifacts.as_uri(),
            ],
        )
        log(f"starting MLflow server (pid {pid}) on {self.mlflow_url} …")
        return "MLflow server", f"{self.mlflow_url}/health", self.logs / "mlflow.log"

    def api(self):
        """Prefect client settings of this process pointed at our server (settings are read at import)."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self.api_url})

    def ensure_pools(self) -> None:
        """Work pools `cpu` and `gpu` (process type) and the `gpu` tag concurrency limit."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectNotFound

        with self.api(), get_client(sync_client=True) as client:
            for name, purpose in POOLS.items():
                try:
                    client.read_work_pool(name)
                except ObjectNotFound:
                    client.create_work_pool(WorkPoolCreate(name=name, type="process", description=purpose))
                    log(f"work pool {name!r} created ({purpose})")
            client.create_concurrency_limit(tag="gpu", concurrency_limit=self.gpu_slots)

    def deploy(self, force: bool = False) -> None:
        names = [n for n, f in DEPLOYMENTS.items() if (ROOT / f).is_file()]
        missing = sorted({f for n, f in DEPLOYMENTS.items() if n not in names})
        stamp_file = self.state / "deployed.json"
        stamp = _files_hash([ROOT / "prefect.yaml", *(ROOT / DEPLOYMENTS[n] for n in names)])
        if (
            not force
            and stamp_file.is_file()
            and json.loads(stamp_file.read_text()) == {"digest": stamp, "names": names}
            and self._deployed(names)
        ):
            log(f"deployments up to date: {', '.join(names)}")
            return
        if missing:
            log(f"not deployed (entrypoint file missing): {', '.join(missing)}")
        log(f"deploying {', '.join(names)} from prefect.yaml …")
        cmd = [str(VENV_BIN / "prefect"), "--no-prompt", "deploy"] + [a for n in names for a in ("-n", n)]
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(
                f"prefect deploy failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        stamp_file.write_text(json.dumps({"digest": stamp, "names": names}))
        log("deployed")

    def _deployed(self, names: list[str]) -> bool:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with self.api(), get_client(sync_client=True) as client:
            try:
                for n in names:
                    client.read_deployment_by_name(n)
            except ObjectNotFound:
                return False
        return True

    def start_workers(self, pools=tuple(POOLS)) -> None:
        for pool in pools:
            name = f"worker-{pool}"
            if self.pid(name):
                log(f"{pool} worker already running (pid {self.pid(name)})")
                continue
            pid = self.spawn(
                name,
                [
                    str(VENV_BIN / "prefect"),
                    "worker",
                    "start",
                    "--pool",
                    pool,
                    "--type",
                    "process",
                    "--name",
                    f"{pool}-{socket.gethostname()}",
                ],
            )
            log(f"{pool} worker started (pid {pid}; log {self.logs / (name + '.log')})")

    def up(self, mlflow: bool = True, workers=tuple(POOLS)) -> None:
        for what, url, logfile in filter(None, [self.start_prefect(), self.start_mlflow() if mlflow else None]):
            _wait_healthy(url, 120, logfile)
            log(f"{what} healthy")
        self.ensure_pools()
        self.deploy()
        self.start_workers(workers)

    def down(self) -> None:
        for pool in POOLS:  # workers before the server: they would otherwise crash-loop
            self.stop(f"worker-{pool}")
        self.stop("mlflow")
        self.stop("prefect-server")

    def status(self) -> dict:
        names = [f"worker-{p}" for p in POOLS] + ["mlflow", "prefect-server"]
        return {n: self.pid(n) for n in names}


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
        return max(1, sum(1 for line in out.splitlines() if line.startswith("GPU")))
    except (OSError, subprocess.SubprocessError):
        return 1


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (from /proc), children first found."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return not _alive(pid)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _wait_healthy(url: str, timeout: float, logfile: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if _healthy(url):
            return
        time.sleep(0.5)
    tail = logfile.read_text(errors="replace")[-3000:] if logfile.is_file() else ""
    raise SystemExit(f"{url} not healthy after {timeout:.0f}s; last log lines ({logfile}):\n{tail}")


def _require_free(port: int, what: str, var: str) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise SystemExit(
                f"port {port} on 127.0.0.1 is taken by another process: not starting {what} "
                f"(stop that process, or set {var} to a free port)"
            )


def _files_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return content_hash(h)
