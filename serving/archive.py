"""Package exported models into TorchServe .mar archives with torch-model-archiver.

    python -m serving.archive --exports export --model-store model_store

Each subfolder of --exports that holds a model.pt (written by training.export)
becomes <folder name>.mar. An archive holds the TorchScript file, index_to_name.json,
model-config.yaml and the runtime: the ``handlers`` package, whole (the handlers,
decoding, the eval preset, the optimisation and the served settings; it imports nothing
else of this project). Nothing pickled, no Python objects, nothing of training.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# The runtime every archive carries: what a TorchServe worker imports of this project.
RUNTIME = ROOT / "handlers"


def runtime_files() -> list[Path]:
    """The runtime package's modules, as paths relative to ROOT."""
    return sorted(p.relative_to(ROOT) for p in RUNTIME.glob("*.py"))


def handler_of(export_dir: Path) -> Path:
    """The handler file an export names in its model-config.yaml (handler.name)."""
    cfg = yaml.safe_load((export_dir / "model-config.yaml").read_text()) or {}
    name = (cfg.get("handler") or {}).get("name", "image_classifier")
    path = ROOT / "handlers" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir}/model-config.yaml names handler {name!r}: no {path}")
    return path


EXPORT_FILES = ("model.pt", "index_to_name.json", "model-config.yaml")
SUMS_FILE = "SHA256SUMS"  # in the model store, in `sha256sum` format


class ArchiveMismatch(RuntimeError):
    """An archive is not the one `make archive` built: unknown, or its SHA-256 differs."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sums(model_store: Path) -> dict[str, str]:
    f = model_store / SUMS_FILE
    if not f.exists():
        return {}
    pairs = (line.split(None, 1) for line in f.read_text().splitlines() if line.strip())
    return {name.strip().lstrip("*"): digest for digest, name in pairs}


def record_sum(mar: Path) -> str:
    """Add or update ``mar``'s line in its model store's SHA256SUMS."""
    sums = read_sums(mar.parent)
    sums[mar.name] = sha256(mar)
    text = "".join(f"{d}  {n}\n" for n, d in sorted(sums.items()))
    (mar.parent / SUMS_FILE).write_text(text)
    return sums[mar.name]


def verify_archive(mar: Path) -> None:
    """Raise ArchiveMismatch unless ``mar`` matches its recorded SHA-256."""
    expected = read_sums(mar.parent).get(mar.name)
    if expected is None:
        raise ArchiveMismatch(
            f"{mar.name} has no entry in {mar.parent / SUMS_FILE}: "
            "only archives built by `make archive` are registered"
        )
    actual = sha256(mar)
    if actual != expected:
        raise ArchiveMismatch(
            f"{mar.name} does not match its SHA-256 in {mar.parent / SUMS_FILE} "
            f"(expected {expected[:12]}..., found {actual[:12]}...): "
            "rebuild it with `make archive`"
        )


def archiver() -> str:
    """torch-model-archiver from this interpreter's environment, else from PATH."""
    local = Path(sys.executable).parent / "torch-model-archiver"
    found = str(local) if local.exists() else shutil.which("torch-model-archiver")
    if not found:
        sys.exit("torch-model-archiver not found: install requirements.txt (make venv)")
    return found


def mar_name(name: str, version: str) -> str:
    """Archive file name: <name>.mar for version 1.0, <name>_v<version>.mar otherwise,
    so that several versions of a model can sit in one model store."""
    return f"{name}.mar" if version == "1.0" else f"{name}_v{version}.mar"


def build_archive(export_dir: Path, name: str, model_store: Path, version: str = "1.0") -> Path:
    """Write the archive of ``export_dir`` into ``model_store`` (see mar_name); returns its path."""
    missing = [f for f in EXPORT_FILES if not (export_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{export_dir} lacks {', '.join(missing)}: run training.export first")
    model_store.mkdir(parents=True, exist_ok=True)
    handler = handler_of(export_dir)
    with tempfile.TemporaryDirectory() as stage:
        # torch-model-archiver copies a folder's *contents* to the archive root,
        # so the staging folder holds the package folders themselves.
        for rel in runtime_files():
            dst = Path(stage) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst)
        cmd = [
            archiver(),
            "--model-name",
            name,
            "--version",
            version,
            "--serialized-file",
            str(export_dir / "model.pt"),
            "--handler",
            str(handler),
            "--extra-files",
            f"{export_dir / 'index_to_name.json'},{stage}",
            "--config-file",
            str(export_dir / "model-config.yaml"),
            "--export-path",
            stage,
            "--force",
        ]
        subprocess.run(cmd, check=True)
        # torch-model-archiver names the file after the model; move it to its versioned name.
        mar = model_store / mar_name(name, version)
        shutil.move(Path(stage) / f"{name}.mar", mar)
    digest = record_sum(mar)
    print(f"archived {name} -> {mar} ({mar.stat().st_size / 1e6:.1f} MB, sha256 {digest[:12]}...)")
    return mar


def main(argv=None):
    p = argparse.ArgumentParser(description="Build one .mar per exported model.")
    p.add_argument(
        "--exports",
        type=Path,
        default=Path("export"),
        help="folder of export folders (one per model, named as the served model)",
    )
    p.add_argument("--model-store", type=Path, default=Path("model_store"), help="where .mar files go")
    p.add_argument("--version", default="1.0", help="model version recorded in the archive")
    p.add_argument("--only", nargs="*", help="archive only these model names")
    p.add_argument(
        "--verify",
        action="store_true",
        help="build nothing; check every .mar in the model store against SHA256SUMS",
    )
    a = p.parse_args(argv)
    if a.verify:
        try:
            for mar in sorted(a.model_store.glob("*.mar")):
                verify_archive(mar)
        except ArchiveMismatch as e:
            sys.exit(f"error: {e}")
        return
    dirs = sorted(d for d in a.exports.glob("*") if (d / "model.pt").is_file())
    if a.only:
        dirs = [d for d in dirs if d.name in a.only]
    if not dirs:
        sys.exit(
            f"no exported models under {a.exports}/ (expected {a.exports}/<name>/model.pt): "
            "run training.export first"
        )
    for d in dirs:
        build_archive(d, d.name, a.model_store, a.version)


if __name__ == "__main__":
    main()
