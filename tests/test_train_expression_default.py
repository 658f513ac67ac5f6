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
