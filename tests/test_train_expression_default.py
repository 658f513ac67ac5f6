"""scripts/train_expression_default.py: the held-out part of train used to choose the expression
recipe (--holdout) holds whole source subjects, and a held-out run scores it instead of val."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import SHARED_DATA, require_data

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))


def test_holdout_is_whole_subjects_of_train():
    import train_expression_default as t

    data = require_data(SHARED_DATA / "expressions")
    groups = t.subject_groups(data)
    imgs = {p.name for p in (data / "images" / "train").glob("*.jpg")}
    held = t.holdout_images(data, "train", 0.15, 0)
    assert held <= imgs and 0.15 * len(imgs) <= len(held) < 0.25 * len(imgs)
    fit = imgs - held
    # no subject (BU-3DFE F0040, Bosphorus bs045, Dartmouth S105, ...) on both sides
    assert not {groups[n] for n in held} & {groups[n] for n in fit}
    # a subject is grouped per source repository (F0040 is in two of them); sorted, not set order
    f0040 = sorted({groups[n] for n in imgs if groups[n].endswith(":F0040")})
    assert any(g.startswith("owais142002/") for g in f0040), f0040
    assert t.holdout_images(data, "train", 0.15, 0) == held  # seeded: the same split every run


def test_holdout_run_scores_the_held_out_part_not_val(tmp_path):
    data = require_data(SHARED_DATA / "expressions")
    out = tmp_path / "clf.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "train_expression_default.py"), "--data", str(data),
                        "--epochs", "1", "--max-faces", "120", "--holdout", "0.15", "--set", "mixup=0.2",
                        "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(out.with_suffix(".json").read_text())
    assert "val_ground_truth_boxes" not in info
    ho = info["holdout_train"]
    assert ho["n_faces"] > 0 and 0.0 <= ho["accuracy"] <= 1.0
    assert info["data"]["holdout"]["n_faces_fit"] + ho["n_faces"] == 120
    assert info["recipe"]["mixup"] == 0.2 and info["recipe"]["epochs"] == 1


def test_detector_crops_found_faces_and_weight_average(tmp_path):
    """--detector-crops adds the shipped detector's box of each fitted face as a second crop; a
    held-out run also scores the faces the detector finds on its boxes; --average writes the
    uniform weight average of two runs (same classes and margin) and scores it the same way."""
    import torch

    data = require_data(SHARED_DATA / "expressions")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    script = [sys.executable, str(REPO / "scripts" / "train_expression_default.py"), "--data", str(data),
              "--max-faces", "120", "--holdout", "0.15"]
    a, b, soup = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "soup.pt"
    r = subprocess.run([*script, "--epochs", "1", "--detector-crops", "--out", str(a)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(a.with_suffix(".json").read_text())
    det = info["data"]["detector_crops"]
    assert det["detector"] == "faceloop-face.pt" and det["match_iou"] == 0.5
    assert 0 < det["n_detector_crops"] <= info["data"]["n_faces"]
    assert info["data"]["n_crops"] == info["data"]["n_faces"] + det["n_detector_crops"]
    assert info["data"]["holdout"]["n_faces_fit"] == info["data"]["n_faces"]
    found = info["holdout_train"]["found_faces"]
    assert 0 < found["n_found"] <= info["holdout_train"]["n_faces"] and 0.0 <= found["accuracy"] <= 1.0

    r = subprocess.run([*script, "--epochs", "1", "--seed", "1", "--out", str(b)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([*script, "--average", str(a), str(b), "--ensemble", "--out", str(soup)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    sds = [torch.load(p, weights_only=True)["state_dict"] for p in (a, b, soup)]
    for k in sds[0]:
        assert torch.allclose(sds[2][k], (sds[0][k] + sds[1][k]) / 2, atol=1e-6), k
    info = json.loads(soup.with_suffix(".json").read_text())
    assert [m["file"] for m in info["recipe"]["uniform_weight_average_of"]] == ["a.pt", "b.pt"]
    assert info["seed"] is None and info["train_loss"] == []
    ens = info["holdout_train"]["ensemble_diagnosis"]
    assert len(ens["members_accuracy"]) == 2 and 0.0 <= ens["accuracy"] <= 1.0


def test_extra_data_is_fitted_never_held_out_and_its_val_scored(tmp_path):
    """--extra DIR adds every face of DIR's train split to the faces fitted (after the held-out
    part of the main data is taken out, so none of it is held out) and scores DIR's val split
    once after training; the .json records the extra data's counts and fingerprint."""
    data = require_data(SHARED_DATA / "expressions")
    extra = require_data(SHARED_DATA / "faces_cropped_muxspace")
    out = tmp_path / "clf.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "train_expression_default.py"), "--data", str(data),
                        "--epochs", "1", "--max-faces", "60", "--holdout", "0.15", "--extra", str(extra),
                        "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(out.with_suffix(".json").read_text())
    ex = info["data"]["extra"]
    assert len(ex) == 1 and ex[0]["dataset"] == "../shared/data/faces_cropped_muxspace" and ex[0]["n_faces"] == 60
    assert len(ex[0]["files_sha256"]) == 64 and ex[0]["boxes_per_class"]["contempt"] > 0  # counted, no column
    # the held-out part is the main data's only: fitted = main faces not held out + every extra face
    assert info["data"]["n_faces"] + info["holdout_train"]["n_faces"] == 60 + 60
    assert info["data"]["holdout"]["n_faces_fit"] == info["data"]["n_faces"]
    va = ex[0]["val_accuracy"]
    assert va["n_faces"] == 60 and 0.0 <= va["accuracy"] <= 1.0 and 0.0 <= va["parent_accuracy"] <= 1.0
