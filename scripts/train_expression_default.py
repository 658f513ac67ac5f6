"""Fine-tune the face-api.js expression net on ``../shared/data/expressions`` train: the shipped
day-0 classifier for expression projects (``models/face_expression_ft.pt`` + ``.json``).

Data: every ground-truth box of the train split (YOLO labels; 4,249 faces of 2,198 images), its
class mapped by name to face-api's 7 classes (``canonical_class``: fear->fearful, disgust->disgusted,
surprise->surprised); ``contempt`` has no examples and no column. The val split is never used for
training or for choosing anything: it is scored once, after training, for the report (recorded
in the ``.json`` as ``val_ground_truth_boxes``).

Recipe: :func:`facemodels.classifier.fine_tune` from ``models/face_expression.pt`` (the converted
port; all four dense blocks and the head, AdamW, cosine schedule to 0, label smoothing 0.1,
flip / box scale-shift / brightness-contrast augmentation: ``RECIPE``) with ``--epochs`` (15),
``--lr`` (1e-3) and the port's own crop margin 0.2 (the shipped day-0 margin, docs/classifier.md)
instead of the new-class recipe's -0.1. The class names and their order stay face-api's, so the
bundle's ``classes`` contract is unchanged.

Choosing a recipe without val: ``--holdout 0.15`` trains on train minus ~15% of its images,
taken as whole source subjects (``subject_groups``: BU-3DFE/Bosphorus/Dartmouth/``s##`` subject
ids from ``manifest.csv``'s original file names), and scores the held-out faces instead of val
(``holdout_train`` in the ``.json``). ``--set KEY=VALUE`` overrides any ``fine_tune`` RECIPE entry
(``balanced``, ``mixup``, ``label_smoothing``, ...); ``--init`` an earlier output continues its
fine-tune (the earlier run's provenance is kept under ``parent.fine_tune``).

Box style of serving (``--detector-crops``): each ground-truth face also gives a second crop with
the same class, the shipped detector's box on it (``--bundle``'s detector, face threshold and NMS
IoU; the shown box with the highest IoU >= 0.5, ``ml_worker.training.detector_boxes``) - the crops
the worker's retrain learns from with ``CLASSIFIER_DETECTOR_CROPS`` (``face_crops``). With
``--holdout`` the held-out faces are scored both on their ground-truth boxes and on the detector's
box matched to them ("found faces", what ``faceloop evaluate``'s class accuracy counts).
More people (``--extra DIR``, repeatable): every ground-truth box of DIR's train split (same YOLO
layout, classes mapped by name like the main data) is added to the faces fitted, never held out;
after training DIR's val split is scored too (``extra[i].val_accuracy`` in the ``.json``: faces of
other people and another source, e.g. ``../shared/data/faces_cropped_muxspace``, web photos,
Apache-2.0, noisy labels; see its ``SOURCE.md``).
``--average A.pt B.pt ...`` trains nothing: it writes the uniform average of the weights of
fine-tunes from the same init ("model soup", Wortsman et al. 2022, arXiv:2203.05482; same
architecture, classes and crop margin, so serving cost is unchanged) and scores it like a trained
run; ``--ensemble`` also scores the average of their probabilities (a diagnosis only: it costs one
classifier pass per member).

Output: the ``.pt`` (our classifier format, provenance in its metadata) and a ``.json`` beside it
with the source data (file list SHA-256), parent weights' SHA-256, recipe, seed, per-epoch loss,
train time and the ``.pt``'s SHA-256.

Run (65-80 CPU-seconds per epoch on one thread; 2 threads on a shared, loaded 2-core machine
were 4x slower per epoch):
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD nice -n 10 .venv/bin/python scripts/train_expression_default.py \
        --epochs 15 --threads 1 --out models/face_expression_ft.pt
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from backend.hashing import file_sha256  # noqa: E402
from facemodels.classifier import (FACEAPI_CLASSES, FaceClassifier, canonical_class,  # noqa: E402
                                   default_classifier_path, evaluate, fine_tune)

DATA = REPO.parent / "shared" / "data" / "expressions"


def class_names(root: Path) -> list[str]:
    import yaml

    names = yaml.safe_load((root / "data.yaml").read_text())["names"]
    return [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)


def subject_groups(root: Path) -> dict[str, str]:
    """``{image file name: source subject key}`` from ``manifest.csv``'s ``original_path``.

    The key is the source repository plus the first token of the original file name (split at
    ``_``, ``.`` or ``-``): the subject id of BU-3DFE (``F0040``/``M0006``), Bosphorus (``bs045``),
    Dartmouth children (``S105``), the ``s##`` posed set (``s22``), JAFFE (``KA``); for the other
    pictures a coarser bucket (``pixiz`` collages, Roboflow web photos ``1``/``2``/``3``, the
    Tneuron webcam person's ``angry``/``happy``/``sad`` frames), which keeps near-identical
    pictures together (see ``../shared/data/expressions/SOURCE.md``). Files missing from the
    manifest are their own group."""
    groups = {}
    mf = root / "manifest.csv"
    if mf.is_file():
        with mf.open(newline="") as f:
            for r in csv.DictReader(f):
                base = Path(r["original_path"]).name
                groups[Path(r["file"]).name] = r["source_repo"] + ":" + re.split(r"[_.\-]", base)[0]
    return groups


def holdout_images(root: Path, split: str, fraction: float, seed: int) -> set[str]:
    """Image names of a held-out part of ``split``: whole subject groups (:func:`subject_groups`)
    drawn in a seeded random order until at least ``fraction`` of the split's labelled images."""
    groups = subject_groups(root)
    imgs = sorted(p.name for p in (root / "images" / split).glob("*.jpg")
                  if (root / "labels" / split / (p.stem + ".txt")).exists())
    by_group: dict[str, list[str]] = {}
    for n in imgs:
        by_group.setdefault(groups.get(n, "file:" + n), []).append(n)
    keys = sorted(by_group)
    out: set[str] = set()
    for i in np.random.default_rng(seed).permutation(len(keys)):
        if len(out) >= fraction * len(imgs):
            break
        out.update(by_group[keys[i]])
    return out


def load_split(root: Path, split: str, classes: list[str], names_out: list | None = None):
    """``(samples, fingerprint, counts)``: samples ``[(image RGB uint8, box x1,y1,x2,y2 px, index into
    classes)]`` of every labelled box whose class maps by name onto ``classes``; fingerprint = SHA-256
    over the sorted ``name, sha256(image), sha256(label file)`` lines; counts per dataset class.
    ``names_out``: if given, the image file name of each sample is appended to it."""
    names = class_names(root)
    col = {canonical_class(c): i for i, c in enumerate(classes)}
    out, lines, counts = [], [], {}
    for img in sorted((root / "images" / split).glob("*.jpg")):
        lf = root / "labels" / split / (img.stem + ".txt")
        if not lf.exists():
            continue
        lines.append(f"{img.name}\t{file_sha256(img)}\t{file_sha256(lf)}\n")
        with Image.open(img) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        H, W = rgb.shape[:2]
        for line in lf.read_text().splitlines():
            p = line.split()
            if len(p) != 5:
                continue
            name = names[int(p[0])]
            counts[name] = counts.get(name, 0) + 1
            j = col.get(canonical_class(name))
            if j is None:
                continue
            xc, yc, w, h = map(float, p[1:])
            out.append((rgb, np.array([(xc - w / 2) * W, (yc - h / 2) * H, (xc + w / 2) * W, (yc + h / 2) * H]), j))
            if names_out is not None:
                names_out.append(img.name)
    return out, hashlib.sha256("".join(lines).encode()).hexdigest(), counts


def image_samples(samples: list, names: list[str]) -> tuple[list[str], list]:
    """Group flat ``(image, box, class)`` samples by image file name into
    ``ml_worker.dataset.Sample``-like records (``.image``, ``.boxes`` ``[(x1, y1, x2, y2, class)]``,
    ``.split`` = "train") for :func:`ml_worker.training.detector_boxes` / ``face_crops``.
    Returns ``(image names, records)`` in first-seen order."""
    from types import SimpleNamespace

    order: list[str] = []
    recs: dict[str, SimpleNamespace] = {}
    for (im, b, c), n in zip(samples, names):
        if n not in recs:
            order.append(n)
            recs[n] = SimpleNamespace(image=im, boxes=[], split="train")
        recs[n].boxes.append((*map(float, b), int(c)))
    return order, [recs[n] for n in order]


def shipped_detector_boxes(bundle_path: Path, recs: list) -> tuple[list[list], dict]:
    """The bundle's detector on each record's image (its ``imgsz``, ``nms_iou``, ``face_threshold``);
    per record, per labelled box: the matched detector box (pixels) or None (``detector_boxes``).
    Returns ``(boxes, info)``; info names the detector file, its sha256 and the settings."""
    from facemodels.detector import FaceModel
    from ml_worker.training import detector_boxes

    bundle = json.loads(bundle_path.read_text())
    det_path = bundle_path.parent / bundle["detector"]
    fm = FaceModel(det_path)
    fm.nms_iou = float(bundle.get("nms_iou") or fm.nms_iou)
    thr = float(bundle.get("face_threshold") or 0.5)
    imgsz = int(bundle.get("imgsz") or 256)
    dets = fm.detect([r.image for r in recs], conf=0.01, imgsz=imgsz)
    info = {"detector": det_path.name, "sha256": file_sha256(det_path), "imgsz": imgsz,
            "nms_iou": fm.nms_iou, "face_threshold": thr, "match_iou": 0.5}
    return detector_boxes(dets, recs, thr), info


def average_weights(paths: list[Path]) -> FaceClassifier:
    """Uniform average of the weights of classifiers with the same classes, crop margin and input
    size (a uniform "model soup"); raises SystemExit when they differ."""
    ms = [FaceClassifier.load(p) for p in paths]
    for p, m in zip(paths[1:], ms[1:]):
        if (m.classes, m.crop_margin, m.input_size) != (ms[0].classes, ms[0].crop_margin, ms[0].input_size):
            raise SystemExit(f"{p} differs from {paths[0]} in classes, crop margin or input size")
    sds = [m.net.state_dict() for m in ms]
    ms[0].net.load_state_dict({k: sum(sd[k].float() for sd in sds) / len(sds) for k in sds[0]})
    return ms[0]


def ensemble_accuracy(models: list, samples: list) -> float:
    """Accuracy of the mean of the models' probabilities on ``(image, box, class)`` samples."""
    ok = 0
    for im, b, c in samples:
        p = sum(m.predict_proba(im, np.asarray(b, float).reshape(1, 4)) for m in models)
        ok += int(p.argmax(1)[0] == c)
    return ok / len(samples) if samples else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--init", type=Path, default=default_classifier_path())
    ap.add_argument("--out", type=Path, default=REPO / "models" / "face_expression_ft.pt")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--margin", type=float, default=0.2, help="crop margin (fraction of the box side, each side)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-val", action="store_true", help="skip the after-training score on val")
    ap.add_argument("--holdout", type=float, default=0.0,
                    help="choose a recipe: train on all but this fraction of train's images (whole source "
                         "subjects, subject_groups) and score the held-out part; val is not touched")
    ap.add_argument("--holdout-seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a fine_tune RECIPE entry, e.g. --set balanced=True --set mixup=0.2")
    ap.add_argument("--detector-crops", action="store_true",
                    help="also train on the shipped detector's box matched to each face (same class)")
    ap.add_argument("--bundle", type=Path, default=REPO / "models" / "faceloop-default.json",
                    help="two-stage bundle whose detector gives the detector crops and the held-out found faces")
    ap.add_argument("--average", type=Path, nargs="+", default=None, metavar="PT",
                    help="train nothing: write and score the uniform weight average of these fine-tunes")
    ap.add_argument("--ensemble", action="store_true",
                    help="with --average and --holdout: also score the mean of the members' probabilities")
    ap.add_argument("--max-faces", type=int, default=0, help="smoke test: only the first N faces of each split")
    ap.add_argument("--extra", type=Path, action="append", default=[], metavar="DIR",
                    help="also fit every face of DIR's train split (never held out) and score DIR's val split")
    args = ap.parse_args()
    if not (args.data / "data.yaml").is_file():
        raise SystemExit(f"dataset not found: {args.data}")
    torch.set_num_threads(args.threads)
    overrides = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = json.loads(v.lower() if v in ("True", "False") else v)
        except json.JSONDecodeError:
            overrides[k] = v

    init = FaceClassifier.load(args.init)
    classes = list(init.classes)
    if [canonical_class(c) for c in classes] != [canonical_class(c) for c in FACEAPI_CLASSES]:
        raise SystemExit(f"{args.init} does not have face-api's 7 classes: {classes}")
    t0 = time.perf_counter()
    img_names: list[str] = []
    train, train_fp, train_counts = load_split(args.data, "train", classes, img_names)
    if args.max_faces:
        train, img_names = train[:args.max_faces], img_names[:args.max_faces]
    held: list = []
    held_names: list[str] = []
    if args.holdout:
        out_imgs = holdout_images(args.data, "train", args.holdout, args.holdout_seed)
        held = [s for s, n in zip(train, img_names) if n in out_imgs]
        held_names = [n for n in img_names if n in out_imgs]
        keep = [n not in out_imgs for n in img_names]
        train = [s for s, k in zip(train, keep) if k]
        img_names = [n for n, k in zip(img_names, keep) if k]
        print(f"holdout: {len(out_imgs)} images / {len(held)} faces held out (whole subjects), "
              f"{len(train)} faces to fit", flush=True)
    extra_info = []
    for root in args.extra:
        if not (root / "data.yaml").is_file():
            raise SystemExit(f"dataset not found: {root}")
        ex_names: list[str] = []
        ex, ex_fp, ex_counts = load_split(root, "train", classes, ex_names)
        if args.max_faces:
            ex, ex_names = ex[:args.max_faces], ex_names[:args.max_faces]
        train += ex
        img_names += [f"{root.name}/{n}" for n in ex_names]
        extra_info.append({"dataset": f"../shared/data/{root.name}", "split": "train", "n_faces": len(ex),
                           "boxes_per_class": ex_counts, "files_sha256": ex_fp})
        print(f"extra {root.name}: {len(ex)} faces ({ex_counts})", flush=True)
    print(f"train: {len(train)} faces ({train_counts}), loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    n_faces_fit = len(train)
    det_info = None
    if args.detector_crops and not args.average:
        from ml_worker.training import face_crops

        t = time.perf_counter()
        _, recs = image_samples(train, img_names)
        det_boxes, det_info = shipped_detector_boxes(args.bundle, recs)
        train = face_crops(recs, ("train",), det_boxes)
        det_info["n_detector_crops"] = len(train) - n_faces_fit
        print(f"detector crops: {det_info['n_detector_crops']} of {n_faces_fit} faces matched at IoU >= 0.5 "
              f"({time.perf_counter() - t:.0f} s); {len(train)} crops to fit", flush=True)

    if args.average:
        members = [{"file": p.name, "sha256": file_sha256(p),
                    "seed": FaceClassifier.load(p).meta.get("fine_tune", {}).get("seed")} for p in args.average]
        model = average_weights(args.average)
        first = FaceClassifier.load(args.average[0]).meta.get("fine_tune", {})
        met = {"n_train": first.get("data", {}).get("n_faces", n_faces_fit),
               "recipe": {"uniform_weight_average_of": members, "member_recipe": first.get("recipe")},
               "loss": [], "train_seconds": 0.0}
    else:
        t = time.perf_counter()
        model, met = fine_tune(init, train, classes, epochs=args.epochs, seed=args.seed, lr=args.lr,
                               crop_margin=args.margin, **overrides,
                               on_epoch=lambda e, n, l: print(f"epoch {e}/{n} loss {l:.4f} ({time.perf_counter() - t:.0f} s)",
                                                              flush=True))
    del train
    parent_sha = file_sha256(args.init)
    prov = {
        "description": "face-api.js expression net (the port, models/face_expression.pt) fine-tuned on "
                       "../shared/data/expressions train"
                       + "".join(f" + ../shared/data/{r.name} train" for r in args.extra)
                       + " (ground-truth face boxes); the day-0 classifier of expression projects"
                       + (f"; this run continues from {args.init.name} (parent.fine_tune)"
                          if init.meta.get("fine_tune") else "")
                       + ("; the uniform weight average of several such fine-tunes (recipe.uniform_weight_average_of)"
                          if args.average else ""),
        "trained_by": "scripts/train_expression_default.py",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "parent": {"file": args.init.name, "sha256": parent_sha, "source": init.meta.get("source"),
                   # a continued fine-tune (--init an earlier output): keep the earlier run's provenance
                   **({"fine_tune": init.meta["fine_tune"]} if init.meta.get("fine_tune") else {})},
        "data": {"dataset": "../shared/data/expressions", "split": "train", "n_faces": n_faces_fit,
                 "n_crops": met["n_train"], "detector_crops": det_info,
                 "boxes_per_class": train_counts,
                 "files_sha256": train_fp, "extra": extra_info,
                 "files_sha256_of": "sorted lines 'image name<TAB>sha256(image)<TAB>sha256(label file)\\n'",
                 "licence_caveat": "research-only source databases (BU-3DFE, Bosphorus, Dartmouth, JAFFE) among "
                                   "the pictures; see ../shared/data/expressions/SOURCE.md and models/MODEL_CARD.md"},
        "recipe": met["recipe"], "seed": None if args.average else args.seed, "threads": args.threads,
        "train_loss": [round(x, 4) for x in met["loss"]], "train_seconds": round(met["train_seconds"], 1),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    model.meta = {k: v for k, v in init.meta.items() if k != "fine_tune"}
    model.meta["fine_tune"] = {k: v for k, v in prov.items() if k not in ("description",)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    info = {"file": args.out.name, "sha256": file_sha256(args.out), "classes": model.classes,
            "crop_margin": model.crop_margin, "input_size": model.input_size,
            "n_parameters": sum(p.numel() for p in model.net.parameters()),
            "preprocessing": init.meta.get("preprocessing"), **prov}
    if held:
        ev = evaluate(model, held)
        ev0 = evaluate(init, held)
        info["data"]["holdout"] = {"fraction": args.holdout, "seed": args.holdout_seed, "n_faces_fit": n_faces_fit,
                                   "grouping": "whole source subjects (subject_groups)"}
        info["holdout_train"] = {
            "note": "held-out part of train (whole source subjects), used to choose the recipe",
            "n_faces": ev["n"], "accuracy": round(ev["accuracy"], 4),
            "per_class": {k: round(v, 3) for k, v in ev["per_class"].items()},
            "init_accuracy": round(ev0["accuracy"], 4)}
        print(f"held-out train ({ev['n']} faces): accuracy {ev['accuracy']:.4f} (init {ev0['accuracy']:.4f}); "
              f"per class {info['holdout_train']['per_class']}", flush=True)
        # found faces: the shipped detector's box matched (IoU >= 0.5) to each held-out face
        _, hrecs = image_samples(held, held_names)
        hdet, hinfo = shipped_detector_boxes(args.bundle, hrecs)
        found = [(r.image, np.asarray(d, float), int(b[4])) for r, row in zip(hrecs, hdet)
                 for b, d in zip(r.boxes, row) if d is not None]
        evf = evaluate(model, found)
        info["holdout_train"]["found_faces"] = {
            "note": "held-out faces the shipped detector finds (IoU >= 0.5), classified on its box",
            "detector": hinfo, "n_found": evf["n"], "accuracy": round(evf["accuracy"], 4),
            "per_class": {k: round(v, 3) for k, v in evf["per_class"].items()}}
        print(f"held-out found faces ({evf['n']} of {ev['n']}, detector's boxes): accuracy {evf['accuracy']:.4f}; "
              f"per class {info['holdout_train']['found_faces']['per_class']}", flush=True)
        if args.ensemble and args.average:
            members = [FaceClassifier.load(p) for p in args.average]
            info["holdout_train"]["ensemble_diagnosis"] = {
                "note": "mean of the members' probabilities (not shipped: one classifier pass per member)",
                "accuracy": round(ensemble_accuracy(members, held), 4),
                "found_faces_accuracy": round(ensemble_accuracy(members, found), 4),
                "members_accuracy": [round(evaluate(m, held)["accuracy"], 4) for m in members],
                "members_found_faces_accuracy": [round(evaluate(m, found)["accuracy"], 4) for m in members]}
            print(f"ensemble diagnosis: {info['holdout_train']['ensemble_diagnosis']}", flush=True)
    elif not args.no_val:
        val, val_fp, val_counts = load_split(args.data, "val", classes)
        if args.max_faces:
            val = val[:args.max_faces]
        ev = evaluate(model, val)
        ev0 = evaluate(init, val)
        info["val_ground_truth_boxes"] = {
            "note": "reporting only, scored once after training; nothing was chosen on it",
            "split": "val", "n_faces": ev["n"], "files_sha256": val_fp,
            "accuracy": round(ev["accuracy"], 4), "per_class": {k: round(v, 3) for k, v in ev["per_class"].items()},
            "parent_accuracy": round(ev0["accuracy"], 4),
            "parent_per_class": {k: round(v, 3) for k, v in ev0["per_class"].items()}}
        print(f"val (ground-truth boxes, {ev['n']} faces): accuracy {ev['accuracy']:.3f} "
              f"(parent {ev0['accuracy']:.3f}); per class {info['val_ground_truth_boxes']['per_class']}", flush=True)
    for root, ex in zip(args.extra, info["data"]["extra"]):
        xval, xfp, xcounts = load_split(root, "val", classes)
        if args.max_faces:
            xval = xval[:args.max_faces]
        ev, ev0 = evaluate(model, xval), evaluate(init, xval)
        ex["val_accuracy"] = {"note": "reporting only, scored once after training", "n_faces": ev["n"],
                              "files_sha256": xfp, "accuracy": round(ev["accuracy"], 4),
                              "per_class": {k: round(v, 3) for k, v in ev["per_class"].items()},
                              "parent_accuracy": round(ev0["accuracy"], 4)}
        print(f"extra {root.name} val ({ev['n']} faces): accuracy {ev['accuracy']:.4f} (parent {ev0['accuracy']:.4f}); "
              f"per class {ex['val_accuracy']['per_class']}", flush=True)
    js = args.out.with_suffix(".json")
    js.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out} (sha256 {info['sha256']}) and {js}", flush=True)


if __name__ == "__main__":
    main()
