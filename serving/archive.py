"""Package exported models into TorchServe .mar archives with torch-model-archiver.

    python -m serving.archive --exports export --model-store model_store

Each subfolder of --exports that holds a model.pt (written by training.export)
becomes <folder name>.mar. An archive holds the TorchScript file, the handler,
the modules the handler imports (the ``models`` package's preprocessing),
index_to_name.json and model-config.yaml: nothing pickled, no Python objects.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HANDLER = ROOT / "handlers" / "image_classifier.py"
# What the handler imports from this project, as paths relative to ROOT.
HANDLER_MODULES = ("models/__init__.py", "models/presets.py")
EXPORT_FILES = ("model.pt", "index_to_name.json", "model-config.yaml")


def archiver() -> str:
    """torch-model-archiver from this interpreter's environment, else from PATH."""
    local = Path(sys.executable).parent / "torch-model-archiver"
    found = str(local) if local.exists() else shutil.which("torch-model-archiver")
    if not found:
        sys.exit("torch-model-archiver not found: install requirements.txt (make venv)")
    return found


def build_archive(export_dir: Path, name: str, model_store: Path, version: str = "1.0",
                  handler: Path = HANDLER) -> Path:
    """Write ``model_store/<name>.mar`` from an export folder; returns its path."""
    missing = [f for f in EXPORT_FILES if not (export_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{export_dir} lacks {', '.join(missing)}: run training.export first")
    model_store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as stage:
        # torch-model-archiver copies a folder's *contents* to the archive root,
        # so the staging folder holds the package folder itself.
        for rel in HANDLER_MODULES:
            dst = Path(stage) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst)
        cmd = [archiver(), "--model-name", name, "--version", version,
               "--serialized-file", str(export_dir / "model.pt"),
               "--handler", str(handler),
               "--extra-files", f"{export_dir / 'index_to_name.json'},{stage}",
               "--config-file", str(export_dir / "model-config.yaml"),
               "--export-path", str(model_store), "--force"]
        subprocess.run(cmd, check=True)
    mar = model_store / f"{name}.mar"
    print(f"archived {name} -> {mar} ({mar.stat().st_size / 1e6:.1f} MB)")
    return mar


def main(argv=None):
    p = argparse.ArgumentParser(description="Build one .mar per exported model.")
    p.add_argument("--exports", type=Path, default=Path("export"),
                   help="folder of export folders (one per model, named as the served model)")
    p.add_argument("--model-store", type=Path, default=Path("model_store"), help="where .mar files go")
    p.add_argument("--version", default="1.0", help="model version recorded in the archive")
    p.add_argument("--only", nargs="*", help="archive only these model names")
    a = p.parse_args(argv)
    dirs = sorted(d for d in a.exports.glob("*") if (d / "model.pt").is_file())
    if a.only:
        dirs = [d for d in dirs if d.name in a.only]
    if not dirs:
        sys.exit(f"no exported models under {a.exports}/ (expected {a.exports}/<name>/model.pt): "
                 "run training.export first")
    for d in dirs:
        build_archive(d, d.name, a.model_store, a.version)


if __name__ == "__main__":
    main()
