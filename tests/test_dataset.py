"""ml_worker.dataset: the deterministic validation split and the YOLO dataset built from
annotated tasks (local-files images, background images, tasks left out with a problem)."""

from __future__ import annotations

import hashlib

import pytest
import yaml
from PIL import Image

from backend.labels import ProjectSchema
from backend.lsapi import SnapshotTask
from ml_worker.dataset import build_dataset, is_val, split_ids, write_yolo_dataset
from tests.helpers_unit import config_text, local_url, make_settings, rect_region, write_jpeg


# --- split ------------------------------------------------------------------------------------
def test_is_val_matches_its_definition():
    for i in (1, 2, 17, 123456):
        h = int(hashlib.sha1(str(i).encode()).hexdigest(), 16) % 1000
        assert is_val(i, 0.2) == (h < 200)
        assert is_val(i, 0.0) is False
        assert is_val(i, 1.0) is True


def test_split_ids_deterministic_and_complete():
    ids = list(range(1, 201))
    train, val = split_ids(ids, 0.2)
    assert split_ids(list(reversed(ids)) + ids[:10], 0.2) == (train, val)  # order and duplicates don't matter
    assert sorted(train + val) == ids and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    assert 0.1 < len(val) / len(ids) < 0.3


def test_split_is_stable_when_tasks_are_added():
    train50, val50 = split_ids(list(range(1, 51)), 0.2)
    train100, val100 = split_ids(list(range(1, 101)), 0.2)
    assert set(val50) <= set(val100) and set(train50) <= set(train100)
    assert val50  # the guarantee below did not have to move anything


@pytest.mark.parametrize("ids", [[1, 2], [5, 9, 11], list(range(1, 8))])
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 1.0])
def test_split_ids_both_splits_non_empty(ids, fraction):
    train, val = split_ids(ids, fraction)
    assert train and val
    assert sorted(train + val) == sorted(ids)


def test_split_ids_tiny():
    assert split_ids([], 0.2) == ([], [])
    train, val = split_ids([7], 0.2)
    assert train + val == [7]


# --- build_dataset ----------------------------------------------------------------------------
@pytest.fixture
def project(tmp_path):
    """A document root with images, and snapshot tasks that point at them."""
    root = tmp_path / "docroot"
    write_jpeg(root / "a.jpg", width=100, height=50)
    write_jpeg(root / "b.jpg", width=80, height=80)
    write_jpeg(root / "bg.jpg", width=60, height=40)
    write_jpeg(root / "nolabel.jpg", width=60, height=40)
    write_jpeg(root / "unknown.jpg", width=60, height=40)
    write_jpeg(root / "rot.jpg", width=120, height=60, orientation=6)  # displayed 60 x 120
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
    tasks = [
        # x 10, y 20, w 30, h 40 (%) -> cx .25, cy .4, w .3, h .4; "awake" = class 0
        SnapshotTask(1, {"image": local_url("a.jpg")}, [rect_region(10, 20, 30, 40, "awake", rid="a1")]),
        # two faces: sleep (class 1) x 0, y 0, w 50, h 50 -> .25 .25 .5 .5; awake x 50, y 50, w 50, h 50 -> .75 .75 .5 .5
        SnapshotTask(2, {"image": local_url("b.jpg")}, [rect_region(0, 0, 50, 50, "sleep", rid="b1"),
                                                        rect_region(50, 50, 50, 50, "Awake", rid="b2")]),
        SnapshotTask(3, {"image": local_url("bg.jpg")}, []),  # annotated, no face: background
        SnapshotTask(4, {"image": local_url("nolabel.jpg")}, [rect_region(10, 10, 10, 10, None, rid="n1")]),
        SnapshotTask(5, {"image": local_url("broken.jpg")}, [rect_region(10, 10, 10, 10, "awake", rid="x1")]),
        SnapshotTask(6, {"image": local_url("unknown.jpg")}, [rect_region(10, 10, 10, 10, "happy", rid="u1")]),
        # boxes are drawn on the displayed (EXIF-rotated) image: x 0, y 50, w 100, h 25 -> .5 .625 1 .25
        SnapshotTask(7, {"image": local_url("rot.jpg")}, [rect_region(0, 50, 100, 25, "sleep", rid="r1")]),
        SnapshotTask(8, {"image": local_url("missing.jpg")}, [rect_region(10, 10, 10, 10, "awake", rid="m1")]),
    ]
    settings = make_settings(tmp_path / "var", local_files_document_root=str(root), val_fraction=0.2)
    return tasks, settings


def _labels(out, tid, info):
    split = "val" if tid in info.val_ids else "train"
    return (out / "labels" / split / f"task_{tid}.txt").read_text(), out / "images" / split / f"task_{tid}.jpg"


def test_build_dataset(project, tmp_path):
    tasks, settings = project
    schema = ProjectSchema.parse(config_text("awake_sleep"))
    out = tmp_path / "ds"
    info = build_dataset(tasks, schema, out, settings)

    assert sorted(info.train_ids + info.val_ids) == [1, 2, 3, 7]
    assert info.train_ids and info.val_ids
    assert (info.train_ids, info.val_ids) == split_ids([1, 2, 3, 7], 0.2)
    assert info.boxes == 4

    problems = dict(info.problems)
    assert sorted(problems) == [4, 5, 6, 8]
    assert "has no label" in problems[4]
    assert "not a readable image" in problems[5] or "broken image data" in problems[5]
    assert "happy" in problems[6] and "not in the project's labels" in problems[6]
    assert "local file not found" in problems[8]

    text, img = _labels(out, 1, info)
    assert text == "0 0.250000 0.400000 0.300000 0.400000\n"
    assert Image.open(img).size == (100, 50)

    text, _ = _labels(out, 2, info)
    assert text.splitlines() == ["1 0.250000 0.250000 0.500000 0.500000", "0 0.750000 0.750000 0.500000 0.500000"]

    text, img = _labels(out, 3, info)
    assert text == ""  # background image: empty label file
    assert img.exists()

    text, img = _labels(out, 7, info)
    assert text == "1 0.500000 0.625000 1.000000 0.250000\n"
    with Image.open(img) as im:  # written in the displayed frame, without the EXIF rotation
        assert im.size == (60, 120)
        assert im.getexif().get(0x0112) in (None, 1)

    for tid in (4, 5, 6, 8):
        assert not list(out.glob(f"*/*/task_{tid}.*"))

    data = yaml.safe_load(info.yaml_path.read_text())
    assert data["names"] == {0: "awake", 1: "sleep"}
    assert data["train"] == "images/train" and data["val"] == "images/val"
    assert data["path"] == str(out.resolve())
    assert len(list((out / "images" / "train").iterdir())) == len(info.train_ids)
    assert len(list((out / "labels" / "val").iterdir())) == len(info.val_ids)


def test_build_dataset_is_deterministic(project, tmp_path):
    tasks, settings = project
    schema = ProjectSchema.parse(config_text("awake_sleep"))
    a = build_dataset(tasks, schema, tmp_path / "ds1", settings)
    b = build_dataset(list(reversed(tasks)), schema, tmp_path / "ds2", settings)
    assert (a.train_ids, a.val_ids, a.boxes) == (b.train_ids, b.val_ids, b.boxes)
    assert sorted(a.problems) == sorted(b.problems)


def test_build_dataset_task_without_image_field(project, tmp_path):
    _, settings = project
    schema = ProjectSchema.parse(config_text("awake_sleep"))
    info = build_dataset([SnapshotTask(9, {"other": "x"}, [])], schema, tmp_path / "ds", settings)
    assert info.train_ids == [] and info.val_ids == []
    assert [tid for tid, _ in info.problems] == [9]
    assert "no image URL" in info.problems[0][1]


def test_write_yolo_dataset_with_paths(tmp_path):
    src = write_jpeg(tmp_path / "src" / "x.jpg", width=10, height=10)
    y = write_yolo_dataset(tmp_path / "ds", ["a", "b"], [("train", "t1", src, [(0.5, 0.5, 0.2, 0.2, 1)]),
                                                         ("val", "t2", src, [])])
    link = tmp_path / "ds" / "images" / "train" / "t1.jpg"
    assert link.is_symlink() and link.resolve() == src.resolve()
    assert (tmp_path / "ds" / "labels" / "train" / "t1.txt").read_text() == "1 0.500000 0.500000 0.200000 0.200000\n"
    assert (tmp_path / "ds" / "labels" / "val" / "t2.txt").read_text() == ""
    # writing again over an existing dataset replaces the links
    write_yolo_dataset(tmp_path / "ds", ["a", "b"], [("train", "t1", src, [])])
    assert link.is_symlink()
    assert yaml.safe_load(y.read_text())["names"] == {0: "a", 1: "b"}
