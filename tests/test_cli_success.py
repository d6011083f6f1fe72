"""A successful command is quiet (issue 13.4): no traceback, no ERROR line (Prefect's telemetry offline), one
line saying which Prefect server it uses: a running local one (`make up`), else a temporary one."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

from test_cli_errors import ROOT, command_env


def test_ingest_tiny_recipe_success_prints_no_traceback_no_error_and_its_mode(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.ingest", "--recipe", "recipes/tiny.yaml", "--output", str(tmp_path / "data")],
        cwd=ROOT,
        env=command_env(tmp_path),  # PREFECT_SERVER_ANALYTICS_ENABLED unset, as at a user's shell
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "ERROR" not in output, output
    assert "prefect: no local server is running (`make up` starts one): a temporary server" in proc.stderr
    version = Path(proc.stdout.strip().splitlines()[-1])
    assert (version / "manifest.json").is_file() and version.parent == tmp_path / "data"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


def test_prefect_mode_uses_the_running_local_server_and_says_so(tmp_path, monkeypatch, capfd):
    """A local server as `make up` leaves it: a PID file of a live process under the state folder and a
    healthy API on its port; the command's Prefect client is pointed there."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED

    from scripts.cli import prefect_mode

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "pids").mkdir()
    (tmp_path / "pids" / "prefect-server.pid").write_text(f"{os.getpid()}\n")
    monkeypatch.setenv("ALIGN_STATE", str(tmp_path))
    monkeypatch.setenv("ALIGN_PREFECT_PORT", str(server.server_port))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    try:
        with prefect_mode():
            assert PREFECT_API_URL.value() == f"http://127.0.0.1:{server.server_port}/api"
            assert PREFECT_SERVER_ANALYTICS_ENABLED.value() is False
        assert f"prefect: the local server http://127.0.0.1:{server.server_port} (started by `make up`" in (
            capfd.readouterr().err
        )
        server.shutdown()  # the PID file stays, the server is gone: a temporary server, said so
        server.server_close()
        with prefect_mode():
            assert not PREFECT_API_URL.value()
        assert "a temporary server for this command" in capfd.readouterr().err
    finally:
        server.server_close()


def test_prefect_mode_api_url_in_the_environment_wins_and_is_named(monkeypatch, capfd):
    from scripts.cli import prefect_mode

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    with prefect_mode():
        pass
    assert "prefect: the server at http://127.0.0.1:1/api (PREFECT_API_URL)" in capfd.readouterr().err
