"""tasks/data/preload.py: slow imports in a background thread, finished before the caller imports again."""

from __future__ import annotations

import sys
import time

from tasks.data import preload


def _slow_module(tmp_path, monkeypatch, name: str, seconds: float) -> None:
    (tmp_path / f"{name}.py").write_text(f"import time\ntime.sleep({seconds})\nVALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_import_in_background_module_imported_after_wait(tmp_path, monkeypatch):
    _slow_module(tmp_path, monkeypatch, "align_slow_import_a", 0.3)
    started = time.perf_counter()
    preload.import_in_background("align_slow_import_a")
    assert time.perf_counter() - started < 0.2, "the caller does not wait for the import"
    preload.wait_for_background_imports()
    assert sys.modules["align_slow_import_a"].VALUE == 42


def test_import_in_background_failure_surfaces_at_the_callers_import(tmp_path, monkeypatch):
    (tmp_path / "align_broken_import.py").write_text("raise RuntimeError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    preload.import_in_background("align_broken_import")
    preload.wait_for_background_imports()
    try:
        import align_broken_import  # noqa: F401
    except RuntimeError as e:
        assert "broken on purpose" in str(e)
    else:
        raise AssertionError("the import error must reach the caller")
