"""Offline copies of the assets Great Expectations Data Docs load from CDNs, shipped as package data.

GX 1.24.1 pages load Bootstrap, jQuery, bootstrap-table, bootstrap-datepicker, Font Awesome and Vega from
CDNs (16 remote assets). The same versions, byte for byte, live in ``tasks/data/docs_assets/`` (copied
into each version's ``data_docs/static/vendor/``). ``docs_assets/assets.json`` is the lock: per npm
package the files kept and the tarball's integrity as the registry reports it, each file's sha256, and the
remote URL each local file stands for. Nothing is fetched at install or run time; refreshing the copies
(``make docs-assets``, i.e. ``python -m tasks.data.docs_vendor``) runs ``npm pack`` against the registry.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

ASSETS_DIR = Path(__file__).resolve().parent / "docs_assets"
LOCK = ASSETS_DIR / "assets.json"
VENDOR = "vendor"  # data_docs/static/<VENDOR>/<package>@<version>/<file>


class AssetError(RuntimeError):
    """A vendored file is missing or differs from the lock."""


def load_lock() -> dict:
    return json.loads(LOCK.read_text(encoding="utf-8"))


def url_map() -> dict[str, str]:
    """Remote URL (no query string) → path under data_docs/static/."""
    return dict(load_lock()["urls"])


def vendored_files(lock: dict | None = None) -> dict[str, str]:
    """Path under docs_assets/ ("<package>@<version>/<file>") → its locked sha256 (None before a refresh)."""
    lock = lock or load_lock()
    return {
        f"{spec}/{f}": meta.get("sha256", {}).get(f) for spec, meta in lock["packages"].items() for f in meta["files"]
    }


def copy_assets(static_dir: Path) -> None:
    """Copy every vendored file into <static_dir>/vendor/ (the version folder carries its own assets)."""
    for rel in vendored_files():
        src, dst = ASSETS_DIR / rel, Path(static_dir) / VENDOR / rel
        if not src.is_file():
            raise AssetError(f"{src}: vendored Data Docs asset missing (restore it from git or `make docs-assets`)")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def verify() -> list[str]:
    """Every vendored file as locked: the problems found, one line each (empty when all is well)."""
    problems = []
    for rel, sha in vendored_files().items():
        path = ASSETS_DIR / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha is None or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            problems.append(f"{path}: sha256 differs from {LOCK.name}")
    return problems


def sri(path: Path, algorithm: str = "sha384") -> str:
    """Subresource-integrity value of a file ("sha384-…"), as in a <script integrity=…> attribute."""
    digest = hashlib.new(algorithm, Path(path).read_bytes()).digest()
    return f"{algorithm}-{base64.b64encode(digest).decode()}"


# ------------------------------------------------------------------------------------------- refresh (npm)


def refresh(update_integrity: bool = False) -> dict:
    """Fetch each locked package with `npm pack`, check its integrity, extract the files kept, re-lock.

    A tarball whose integrity differs from the lock fails the refresh unless `update_integrity` (a version
    deliberately changed in assets.json)."""
    npm = shutil.which("npm")
    if npm is None:
        raise AssetError("npm not found: `apt-get install -y npm` (only needed to refresh the vendored assets)")
    lock = load_lock()
    with tempfile.TemporaryDirectory(prefix="align-npm-") as tmp:
        for spec, meta in lock["packages"].items():
            packed = _npm_pack(npm, spec, Path(tmp))
            if meta.get("integrity") not in (None, packed["integrity"]) and not update_integrity:
                raise AssetError(f"{spec}: registry integrity {packed['integrity']} != locked {meta['integrity']}")
            meta["integrity"] = packed["integrity"]
            meta["sha256"] = _extract(Path(tmp) / packed["filename"], spec, meta["files"])
    LOCK.write_text(json.dumps(lock, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return lock


def _npm_pack(npm: str, spec: str, dest: Path) -> dict:
    out = subprocess.run(
        [npm, "pack", spec, "--json", "--pack-destination", str(dest)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if out.returncode != 0:
        raise AssetError(f"npm pack {spec}: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
    return json.loads(out.stdout)[0]


def _extract(tarball: Path, spec: str, files: list[str]) -> dict[str, str]:
    """The listed files of an npm tarball (all under package/) into docs_assets/<spec>/; their sha256."""
    target = ASSETS_DIR / spec
    shutil.rmtree(target, ignore_errors=True)
    hashes = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for name in files:
            if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                raise AssetError(f"{spec}: file {name!r} must be a relative path inside the package")
            try:
                member = tar.extractfile(f"package/{name}")
            except KeyError:
                member = None
            if member is None:
                raise AssetError(f"{spec}: {name} is not a file in the package")
            data = member.read()
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(data)
            hashes[name] = hashlib.sha256(data).hexdigest()
    return hashes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verify", action="store_true", help="check the vendored files against the lock only")
    parser.add_argument("--update-integrity", action="store_true", help="accept new tarball integrity values")
    args = parser.parse_args(argv)
    try:
        if not args.verify:
            refresh(args.update_integrity)
        problems = verify()
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not problems:
        print(f"{len(vendored_files())} vendored Data Docs assets match {LOCK}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
