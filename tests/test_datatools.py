"""The data tools (training.data.split, clean, resize, stats) on small generated images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data import clean, resize, split, stats
from training.data.datasets import SPLITS


def write_image(path: Path, seed: int, size=(40, 40), fmt="JPEG") -> Path:
    """A noise image: every seed gives different bytes, so no accidental duplicates."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt)
    return path


def flat_dataset(root: Path, sizes: dict[str, int]) -> Path:
    """ROOT/CLASS/img_XX.jpg with sizes[class] images each."""
    seed = 0
    for cls, n in sizes.items():
        for i in range(n):
            seed += 1
            write_image(root / cls / f"img_{i:02d}.jpg", seed)
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- split ---------------------------------------------------------------


@pytest.mark.parametrize(
    "n,expected", [(10, (8, 1, 1)), (20, (16, 2, 2)), (3, (1, 1, 1)), (4, (2, 1, 1)), (15, (11, 2, 2))]
)
def test_split_sizes_round_half_up_with_one_per_holdout(n, expected):
    assert split.split_sizes(n, (0.8, 0.1, 0.1)) == expected


def test_split_sizes_never_empties_train():
    assert split.split_sizes(4, (0.1, 0.45, 0.45)) == (1, 1, 2)
    with pytest.raises(ValueError):
        split.split_sizes(2, (0.8, 0.1, 0.1))


def test_plan_split_is_stratified_disjoint_and_complete(tmp_path):
    files = {
        "a": [tmp_path / "a" / f"{i}.jpg" for i in range(20)],
        "b": [tmp_path / "b" / f"{i}.jpg" for i in range(10)],
        "c": [tmp_path / "c" / f"{i}.jpg" for i in range(3)],
    }
    plan = split.plan_split(files, (0.8, 0.1, 0.1), seed=0)
    counts = {c: tuple(len(plan[s][c]) for s in SPLITS) for c in files}
    assert counts == {"a": (16, 2, 2), "b": (8, 1, 1), "c": (1, 1, 1)}
    for c, fs in files.items():
        parts = [set(plan[s][c]) for s in SPLITS]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert set().union(*parts) == set(fs)


def test_plan_split_is_deterministic_per_seed(tmp_path):
    files = {"a": [tmp_path / f"{i}.jpg" for i in range(30)]}
    same = split.plan_split(files, (0.8, 0.1, 0.1), seed=7)
    # The input order must not matter either: the list is sorted before shuffling.
    assert split.plan_split({"a": files["a"][::-1]}, (0.8, 0.1, 0.1), seed=7) == same
    assert split.plan_split(files, (0.8, 0.1, 0.1), seed=8) != same


def test_split_command_writes_counts_and_leaves_source(tmp_path, capsys):
    src = flat_dataset(tmp_path / "raw", {"cat": 10, "dog": 20})
    before = tree(src)
    out = tmp_path / "out"
    assert split.main(["--data", str(src), "--out", str(out), "--seed", "1"]) == 0
    got = {s: {c: len(list((out / s / c).iterdir())) for c in ("cat", "dog")} for s in SPLITS}
    assert got == {
        "train": {"cat": 8, "dog": 16},
        "valid": {"cat": 1, "dog": 2},
        "test": {"cat": 1, "dog": 2},
    }
    names = [p.name for s in SPLITS for p in (out / s / "dog").iterdir()]
    assert len(names) == len(set(names)) == 20
    assert tree(src) == before
    table = capsys.readouterr().out
    assert "TOTAL" in table and "dog" in table


def test_split_refuses_non_empty_out_without_force(tmp_path):
    src = flat_dataset(tmp_path / "raw", {"cat": 5})
    out = tmp_path / "out"
    (out / "train" / "old").mkdir(parents=True)
    (out / "train" / "old" / "stale.jpg").write_bytes(b"x")
    with pytest.raises(SystemExit, match="--force"):
        split.main(["--data", str(src), "--out", str(out)])
    assert (out / "train" / "old" / "stale.jpg").exists()
    split.main(["--data", str(src), "--out", str(out), "--force"])
    assert not (out / "train" / "old").exists()  # no stale file left mixed in
    assert sum(1 for _ in out.rglob("*.jpg")) == 5


def test_split_symlink_mode_points_at_source(tmp_path):
    src = flat_dataset(tmp_path / "raw", {"cat": 3})
    out = tmp_path / "out"
    split.main(["--data", str(src), "--out", str(out), "--mode", "symlink"])
    links = list(out.rglob("*.jpg"))
    assert len(links) == 3 and all(p.is_symlink() for p in links)
    assert {p.resolve() for p in links} == {p.resolve() for p in (src / "cat").iterdir()}


def test_split_names_tiny_classes_or_skips_them(tmp_path):
    src = flat_dataset(tmp_path / "raw", {"cat": 5, "mouse": 2})
    with pytest.raises(SystemExit, match="mouse"):
        split.main(["--data", str(src), "--out", str(tmp_path / "o1")])
    split.main(["--data", str(src), "--out", str(tmp_path / "o2"), "--skip-small"])
    assert not (tmp_path / "o2" / "train" / "mouse").exists()
    assert (tmp_path / "o2" / "test" / "cat").is_dir()


# ---- clean ---------------------------------------------------------------


@pytest.fixture
def messy(tmp_path) -> Path:
    """A split dataset with one file of every problem kind, plus good images."""
    root = tmp_path / "messy"
    for i in range(3):
        write_image(root / "train" / "cat" / f"good_{i}.jpg", 100 + i)
        write_image(root / "train" / "dog" / f"good_{i}.jpg", 200 + i)
    write_image(root / "valid" / "cat" / "good_v.jpg", 300)
    (root / "train" / "cat" / "notes.jpg").write_text("these are my cat pictures\n")
    whole = write_image(tmp_path / "whole.jpg", 400, size=(64, 64)).read_bytes()
    (root / "train" / "cat" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    write_image(root / "train" / "dog" / "tiny.png", 500, size=(10, 10), fmt="PNG")
    write_image(root / "train" / "dog" / "strip.png", 600, size=(700, 20), fmt="PNG")  # 35:1
    shutil.copy(root / "train" / "cat" / "good_0.jpg", root / "train" / "cat" / "good_0_copy.jpg")
    shutil.copy(root / "train" / "dog" / "good_1.jpg", root / "train" / "cat" / "which.jpg")
    return root


EXPECTED = {
    "train/cat/notes.jpg": "not_image",
    "train/cat/cut.jpg": "corrupt",
    "train/dog/tiny.png": "too_small",
    "train/dog/strip.png": "extreme_aspect",
    "train/cat/good_0_copy.jpg": "duplicate",
    "train/cat/which.jpg": "label_conflict",
    "train/dog/good_1.jpg": "label_conflict",
}


def test_find_problems_finds_each_kind(messy):
    found = {p.path: p.kind for p in clean.find_problems(messy, min_size=32)}
    assert found == EXPECTED


def test_truncated_images_are_found_even_if_tolerated_globally(messy, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some training code does
    found = {p.path: p.kind for p in clean.find_problems(messy, min_size=32)}
    assert found["train/cat/cut.jpg"] == "corrupt"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_clean_reports_json_and_exit_code_without_moving(messy, tmp_path):
    before = tree(messy)
    report = tmp_path / "report.json"
    assert clean.main(["--data", str(messy), "--report", str(report)]) == clean.EXIT_PROBLEMS
    data = json.loads(report.read_text())
    assert {p["path"]: p["kind"] for p in data["problems"]} == EXPECTED
    assert data["counts"]["label_conflict"] == 2 and data["counts"]["duplicate"] == 1
    assert data["files_scanned"] == 13 and data["counts"]["extreme_aspect"] == 1
    assert tree(messy) == before


def test_clean_default_report_is_outside_the_dataset(messy):
    clean.main(["--data", str(messy)])
    assert (messy.parent / "messy-clean-report.json").is_file()
    assert not list(messy.rglob("*.json"))


def test_clean_move_to_moves_aside_and_leaves_a_clean_dataset(messy, tmp_path):
    before = tree(messy)
    aside = tmp_path / "flagged"
    assert (
        clean.main(["--data", str(messy), "--move-to", str(aside), "--report", str(tmp_path / "r1.json")])
        == clean.EXIT_PROBLEMS
    )
    for path in EXPECTED:
        assert not (messy / path).exists()
        assert (aside / path).read_bytes() == before[path]  # moved, not deleted
    assert (messy / "train" / "cat" / "good_0.jpg").exists()  # first copy kept
    assert clean.main(["--data", str(messy), "--report", str(tmp_path / "r2.json")]) == 0
    assert len(tree(messy)) + len(tree(aside)) == len(before)


def test_clean_refuses_move_into_the_dataset(messy):
    with pytest.raises(SystemExit, match="overlaps"):
        clean.main(["--data", str(messy), "--move-to", str(messy / "flagged")])


# ---- resize --------------------------------------------------------------


def test_resize_stretches_keeps_layout_and_skips_undecodable(tmp_path, capsys):
    src = tmp_path / "src"
    write_image(src / "train" / "cat" / "a.png", 1, size=(60, 30), fmt="PNG")
    write_image(src / "test" / "dog" / "b.jpg", 2, size=(20, 50))
    (src / "test" / "dog" / "bad.jpg").write_text("not an image")
    out = tmp_path / "out"
    assert resize.main(["--data", str(src), "--out", str(out), "--size", "24"]) == 0
    assert sorted(tree(out)) == ["test/dog/b.jpg", "train/cat/a.jpg"]
    for p in out.rglob("*.jpg"):
        with Image.open(p) as img:
            assert img.format == "JPEG" and img.size == (24, 24)
    assert "skipped test/dog/bad.jpg" in capsys.readouterr().out


def test_resize_keep_aspect_fits_short_side(tmp_path):
    src = tmp_path / "src"
    write_image(src / "cat" / "wide.jpg", 1, size=(60, 30))
    out = tmp_path / "out"
    resize.main(["--data", str(src), "--out", str(out), "--size", "20", "--keep-aspect"])
    with Image.open(out / "cat" / "wide.jpg") as img:
        assert img.size == (40, 20)


def test_resize_refuses_non_empty_out(tmp_path):
    src = flat_dataset(tmp_path / "src", {"cat": 1})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--force"):
        resize.main(["--data", str(src), "--out", str(out)])


def test_resize_output_names_do_not_collide():
    root = Path("/d")
    plan = resize.plan_outputs([root / "c" / "a.jpg", root / "c" / "a.png"], root)
    assert sorted(plan.values()) == ["c/a.jpg", "c/a.png.jpg"]


# ---- stats ---------------------------------------------------------------


def test_count_images_flat_layout_counts_what_imagefolder_reads(tmp_path):
    flat = flat_dataset(tmp_path / "flat", {"cat": 3, "dog": 2})
    (flat / "cat" / "readme.txt").write_text("not counted: ImageFolder skips it")
    (flat / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    assert stats.count_images(flat) == {"all": {"cat": 3, "dog": 2}}


def test_stats_counts_of_a_split_dataset(tmp_path):
    root = tmp_path / "d"
    for s, n in (("train", 6), ("valid", 2), ("test", 1)):
        for i in range(n):
            write_image(root / s / "cat" / f"{i}.jpg", i)
            write_image(root / s / "dog" / f"{i}.jpg", 50 + i)
    (root / "train" / "dog" / "0.jpg").unlink()
    assert stats.count_images(root) == {
        "train": {"cat": 6, "dog": 5},
        "valid": {"cat": 2, "dog": 2},
        "test": {"cat": 1, "dog": 1},
    }


def test_imbalance_warning_only_when_imbalanced():
    balanced = {"train": {"a": 10, "b": 8, "c": 6}}
    assert stats.imbalance_warnings(balanced, 2.0) == []
    skewed = {"train": {"a": 30, "b": 8, "c": 10}, "valid": {"a": 3, "b": 2, "c": 2}}
    [line] = stats.imbalance_warnings(skewed, 2.0)
    assert line.startswith("WARNING: train:") and "a has 30" in line and "b has 8" in line
    assert "3.8x" in line
    [empty] = stats.imbalance_warnings({"test": {"a": 2, "b": 0}}, 2.0)
    assert "class b has no images" in empty


def test_stats_command_prints_warning_chart_and_json(tmp_path, capsys):
    root = flat_dataset(tmp_path / "d", {"big": 7, "small": 2})
    chart, js = tmp_path / "c.png", tmp_path / "c.json"
    assert stats.main(["--data", str(root), "--chart", str(chart), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: all: imbalanced classes: big has 7 images, small has 2" in out
    assert "--balance" in out
    with Image.open(chart) as img:
        assert img.format == "PNG" and img.size[0] > 0 and img.size[1] > 0
    assert json.loads(js.read_text())["counts"] == {"all": {"big": 7, "small": 2}}
    stats.main(["--data", str(root), "--chart", str(chart), "--imbalance-ratio", "4"])
    assert "WARNING" not in capsys.readouterr().out


# ---- every tool ----------------------------------------------------------


@pytest.mark.parametrize("tool", [split, clean, resize, stats])
def test_help_lists_kebab_case_flags(tool, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--data" in text and "_" not in " ".join(w for w in text.split() if w.startswith("--"))
