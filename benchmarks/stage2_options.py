"""Stage-2 (face classifier) options at a fixed detector, through the product's evaluation path.

For each seed, the 40-image draw of ``faceloop bench-accept --sizes 40 --strategies random`` is
rebuilt (``build_dataset``), the detector and face threshold of an earlier bench-accept run's round
(``--models DIR``: ``DIR/models/random_s{seed}_n{size}/bundle.json``) are kept, only stage 2 is
retrained (the recipe on the train split = the gated classifier, then the refit on both splits),
and the val split is scored with :func:`ml_worker.evaluation.evaluate_model` (classifier served by
torch). With ``--variant base`` it reproduces the worker's stage 2 of that run, so variants compare
on the same draws and the same boxes. Measured in docs/classifier.md ("Fourth round").

Variants: ``base`` (recipe + refit ``--refit`` epochs), ``refitE`` (refit E epochs),
``soupN_E`` (uniform weight average of N refits of E epochs with seeds s + 1000k; Wortsman et al.
2022, "Model soups"), ``wiseA`` (WiSE-FT: weights ``(1-A)·init + A·base``, the init being the port
with the class-mean head), ``detbox`` (the detector's matched box instead of the person's),
``detbox_add`` (both boxes, both passes), ``detbox_dup`` (the person's box twice: its compute
control), ``steps2x`` (twice the epochs of both passes: another compute control), ``detref``
(both boxes in the refit only). Fifth round (all on ``detbox_add``'s crops, both passes):
``l2spA`` (L2-SP, Li et al. 2018: ``A/2·‖w − w_port‖²`` on the backbone instead of its decay towards
zero, the port being the anchor of both passes), ``l2spSA`` (the same, each pass anchored at its
own start: the refit at the gated classifier), ``bssE`` (Batch Spectral Shrinkage, Chen et al.
2019: ``E·σ_min²`` of the batch's pooled features), ``pardet`` (the second crop of a face is the
box of the detector the retrain started from, the shipped default's, at its face threshold: a
box from a detector that never saw the image, as at serving; the retrained detector's box where
the parent's misses the face).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/stage2_options.py \\
        --models /tmp/acc-base --seeds 0,1,2,3,4 --variant base --variant detbox_add

Prints one JSON line per seed and variant, then the mean ± std per variant and the per-seed
difference to the first variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "awake_sleep"))
    ap.add_argument("--models", required=True, help="an earlier bench-accept --out folder (its models/ hold the detectors)")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--size", type=int, default=40)
    ap.add_argument("--refit", type=int, default=20, help="refit epochs of the base")
    ap.add_argument("--variant", action="append", default=None)
    ap.add_argument("--init", default=None, help="the classifier every pass starts from (default: the port, "
                    "models/face_expression.pt), e.g. another face-api net converted to a FaceClassifier")
    args = ap.parse_args()
    os.environ["INFERENCE_BACKEND"] = "torch"
    import torch

    torch.set_num_threads(1)
    from backend.config import get_settings
    from facemodels.classifier import FaceClassifier, fine_tune
    from facemodels.detector import FaceModel
    from facemodels.two_stage import TwoStageModel, read_bundle, write_bundle
    from ml_worker import bench as B
    from ml_worker.dataset import build_dataset
    from ml_worker.evaluation import evaluate_model
    from ml_worker.training import (
        _init_classifier,
        classifier_epochs,
        detector_boxes,
        face_crops,
    )

    data = Path(args.data).resolve()
    settings = get_settings().model_copy(update={"local_files_document_root": str(data)})
    names = B.folder_names(data)
    schema = B.schema_for(names)
    pool = B.read_split(data, "train")
    test = B._samples(B.read_split(data, "val"), names)
    port = Path(args.init) if args.init else ROOT / "models" / "face_expression.pt"
    variants = args.variant or ["base"]
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    tmp = Path(tempfile.mkdtemp(prefix="stage2-"))
    for seed in seeds:
        rng = np.random.default_rng(seed)
        picks = rng.choice(len(pool), size=args.size, replace=False)
        tasks = B._tasks([pool[i] for i in picks], data, schema, first_id=1)
        ds = build_dataset(tasks, schema, tmp / f"s{seed}" / "dataset", settings)
        b = read_bundle(Path(args.models) / "models" / f"random_s{seed}_n{args.size}" / "bundle.json")
        dets = FaceModel(b["detector_path"]).detect([s.image for s in ds.samples], conf=0.01, imgsz=settings.imgsz)
        det_boxes = detector_boxes(dets, ds.samples, b["face_threshold"])
        gt_only = face_crops(ds.samples, ("train",))
        gated_cache: dict[str, FaceClassifier] = {}

        def gated(crops, key, cache=gated_cache, seed=seed, **kw):
            if key not in cache:
                clf = _init_classifier(port, schema)
                cache[key] = fine_tune(clf, crops, list(schema.labels), epochs=classifier_epochs(settings),
                                       seed=seed, **kw)[0]
            return cache[key]

        def refit(g, crops, epochs, s=seed, **kw):
            return fine_tune(g, crops, list(g.classes), epochs=epochs, seed=s, **kw)[0]

        def doubled(splits, samples=ds.samples):
            return [c for c in face_crops(samples, splits) for _ in range(2)]

        for v in variants:
            c0 = time.process_time()
            both = face_crops(ds.samples, ("train", "val"))
            if v == "base":
                clf = refit(gated(gt_only, "gt"), both, args.refit)
            elif v == "steps2x":  # twice the epochs of both passes on the person's boxes (compute control)
                g2 = gated_cache.get("gt2x")
                if g2 is None:
                    g2 = gated_cache["gt2x"] = fine_tune(_init_classifier(port, schema), gt_only, list(schema.labels),
                                                         epochs=2 * classifier_epochs(settings), seed=seed)[0]
                clf = refit(g2, both, 2 * args.refit)
            elif v.startswith("refit"):
                clf = refit(gated(gt_only, "gt"), both, int(v[5:]))
            elif v.startswith("soup"):
                n, e = (int(x) for x in v[4:].split("_"))
                g = gated(gt_only, "gt")
                ms = [refit(g, both, e, seed + 1000 * k) for k in range(n)]
                sds = [m.net.state_dict() for m in ms]
                clf = copy.deepcopy(ms[0])
                clf.net.load_state_dict({k: sum(sd[k].float() for sd in sds) / n for k in sds[0]})
            elif v.startswith("wise"):
                a = float(v[4:])
                ft = refit(gated(gt_only, "gt"), both, args.refit)
                z = fine_tune(_init_classifier(port, schema), both, list(ft.classes), epochs=1, seed=seed, lr=0.0)[0]
                s0, s1 = z.net.state_dict(), ft.net.state_dict()
                clf = copy.deepcopy(ft)
                clf.net.load_state_dict({k: (1 - a) * s0[k].float() + a * s1[k].float() for k in s1})
            elif v == "detbox":
                swapped = {"train": [], "val": []}  # the detector's box where it found the face
                for s, row in zip(ds.samples, det_boxes):
                    for bx, d in zip(s.boxes, row):
                        swapped[s.split].append((s.image, np.asarray(d if d is not None else bx[:4], float), int(bx[4])))
                clf = refit(gated(swapped["train"], "detbox"), swapped["train"] + swapped["val"], args.refit)
            elif v == "detbox_add":
                clf = refit(gated(face_crops(ds.samples, ("train",), det_boxes), "add"),
                            face_crops(ds.samples, ("train", "val"), det_boxes), args.refit)
            elif v.startswith("l2spS"):  # L2-SP towards each pass's own start (the refit: the gated classifier)
                kw = {"l2sp": float(v[5:])}
                clf = refit(gated(face_crops(ds.samples, ("train",), det_boxes), v, **kw),
                            face_crops(ds.samples, ("train", "val"), det_boxes), args.refit, **kw)
            elif v.startswith("l2sp"):  # L2-SP towards the port in both passes
                kw = {"l2sp": float(v[4:]), "anchor": _init_classifier(port, schema)}
                clf = refit(gated(face_crops(ds.samples, ("train",), det_boxes), v, **kw),
                            face_crops(ds.samples, ("train", "val"), det_boxes), args.refit, **kw)
            elif v.startswith("bss"):
                kw = {"bss": float(v[3:])}
                clf = refit(gated(face_crops(ds.samples, ("train",), det_boxes), v, **kw),
                            face_crops(ds.samples, ("train", "val"), det_boxes), args.refit, **kw)
            elif v.startswith("gem") or v == "attn":  # another pooling in place of the mean, both passes
                kw = {"pool": "gem", "gem_p": float(v[3:])} if v.startswith("gem") else {"pool": "attn"}
                clf = refit(gated(face_crops(ds.samples, ("train",), det_boxes), v, **kw),
                            face_crops(ds.samples, ("train", "val"), det_boxes), args.refit, **kw)
            elif v == "pardet":
                if "pardet_boxes" not in gated_cache:
                    pb = read_bundle(settings.default_model_path)
                    pd = FaceModel(pb["detector_path"]).detect([s.image for s in ds.samples], conf=0.01,
                                                                imgsz=pb.get("imgsz") or settings.imgsz)
                    par = detector_boxes(pd, ds.samples, pb["face_threshold"])
                    mixed = [[p if p is not None else d for p, d in zip(pr, dr)] for pr, dr in zip(par, det_boxes)]
                    n_par = sum(p is not None for pr in par for p in pr)
                    print(json.dumps({"seed": seed, "pardet_matched": n_par,
                                      "faces": sum(len(s.boxes) for s in ds.samples)}), flush=True)
                    gated_cache["pardet_boxes"] = mixed
                mixed = gated_cache["pardet_boxes"]
                clf = refit(gated(face_crops(ds.samples, ("train",), mixed), "pardet"),
                            face_crops(ds.samples, ("train", "val"), mixed), args.refit)
            elif v == "detbox_dup":
                clf = refit(gated(doubled(("train",)), "dup"), doubled(("train", "val")), args.refit)
            elif v == "detref":
                clf = refit(gated(gt_only, "gt"), face_crops(ds.samples, ("train", "val"), det_boxes), args.refit)
            else:
                raise SystemExit(f"unknown variant {v!r}")
            cpu = time.process_time() - c0
            clf.save(tmp / "clf.pt")
            out = tmp / f"{v}_s{seed}"
            if out.exists():
                shutil.rmtree(out)
            bp = write_bundle(out, Path(b["detector_path"]), tmp / "clf.pt", list(b["classes"]), onnx=False,
                              imgsz=b.get("imgsz"), face_threshold=b.get("face_threshold"), nms_iou=b.get("nms_iou"))
            r = evaluate_model(TwoStageModel(bp, backend="torch"), test, schema, settings)
            row = {"variant": v, "seed": seed, "stage2_cpu_s": round(cpu, 1),
                   **{k: round(float(r[k]), 4) for k in ("acceptance_rate", "class_accuracy", "mAP50", "mAP50_top1",
                                                         "boxes_per_face")}}
            pooling = clf.net.features.pool
            if pooling is not None and hasattr(pooling, "p"):  # GeM: the learned exponent
                row["gem_p"] = round(float(pooling.p.detach()), 3)
            elif pooling is not None:  # attention: how peaked its weights are on the labelled crops (uniform: 1/49)
                import torch

                with torch.no_grad():
                    xs = np.concatenate([clf.inputs(im, np.asarray(bx, float).reshape(1, 4)) for im, bx, _ in both])
                    fm = clf.net.features
                    m = fm.dense3(fm.dense2(fm.dense1(fm.dense0(torch.from_numpy(xs)))))
                    w = torch.softmax(pooling.conv(m).flatten(1), dim=1)
                    ent = -(w * w.clamp(min=1e-12).log()).sum(1)
                row["attn_max_w"] = round(float(w.max(1).values.mean()), 4)
                row["attn_eff_cells"] = round(float(ent.exp().mean()), 1)
                # mean weight per row of the 7x7 map, top to bottom (uniform: 1/7 = 0.143 a row)
                row["attn_row_w"] = [round(float(r), 3) for r in w.view(len(w), *m.shape[2:]).sum(2).mean(0)]
            results[v].append(row)
            print(json.dumps(row), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    first = results[variants[0]]
    for v in variants:
        rs = results[v]
        for k in ("acceptance_rate", "class_accuracy", "mAP50", "mAP50_top1"):
            x = np.array([r[k] for r in rs])
            d = x - np.array([r[k] for r in first])
            print(f"{v:12s} {k:16s} {x.mean():.3f} ± {x.std():.3f} ({' / '.join(f'{y:.3f}' for y in x)})"
                  f"  Δ {d.mean():+.3f} [{int((d > 0).sum())} better / {int((d < 0).sum())} worse]")


if __name__ == "__main__":
    main()
