"""Figures for models/MODEL_CARD.md: evaluate the shipped default model.

- per-class precision, recall, mAP50, mAP50-95 on ``expressions`` val and
  ``faces_cropped_muxspace`` val (8 expression classes);
- class-agnostic face localisation (``single_cls``) on ``awake_sleep`` val (real scenes) and on
  ``expressions`` val;
- inference time per image on this machine (median of 3 passes over 40 images, plain
  ultralytics predict at the model's image size).

Run: .venv/bin/python benchmarks/model_card_metrics.py [--weights models/faceloop-base.pt]
Writes ``benchmarks/out/model_card_metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backend.config import DEFAULT_MODEL_PATH, Settings, configure_ultralytics  # noqa: E402
from ml_worker.base_model import SHARED_DATA, dataset_yaml  # noqa: E402
from ml_worker.training import evaluate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=DEFAULT_MODEL_PATH)
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out")
    args = ap.parse_args()
    work = args.out / "model_card_work"
    settings = Settings(var_dir=work / "var", imgsz=args.imgsz, train_batch=32)
    configure_ultralytics(settings.var_dir)
    from ultralytics import YOLO

    res = {"weights": str(args.weights), "imgsz": args.imgsz}
    for name in ("expressions", "faces_cropped_muxspace"):
        y = dataset_yaml(SHARED_DATA / name, work / f"{name}.yaml")
        res[name] = evaluate(args.weights, y, work, settings, name=f"val_{name}")
        print(name, {k: v for k, v in res[name].items() if k != "per_class"}, flush=True)
    for name in ("awake_sleep", "expressions"):
        y = dataset_yaml(SHARED_DATA / name, work / f"{name}_faces.yaml")
        m = YOLO(str(args.weights)).val(data=str(y), split="val", imgsz=args.imgsz, single_cls=True, verbose=False,
                                        plots=True, project=str(work), name=f"faces_{name}", exist_ok=True,
                                        workers=0, device="cpu")
        res[f"faces_{name}"] = {"mAP50": float(m.box.map50), "mAP50-95": float(m.box.map),
                                "precision": float(m.box.mp), "recall": float(m.box.mr)}
        print("faces", name, res[f"faces_{name}"], flush=True)
    files = sorted((SHARED_DATA / "awake_sleep" / "images" / "val").glob("*.jpg"))[:40]
    model = YOLO(str(args.weights))
    model.predict(str(files[0]), imgsz=args.imgsz, verbose=False)
    passes = []
    for _ in range(3):
        t = time.perf_counter()
        for f in files:
            model.predict(str(f), imgsz=args.imgsz, verbose=False)
        passes.append((time.perf_counter() - t) / len(files) * 1000)
    import torch

    res["inference_ms_per_image"] = round(statistics.median(passes), 1)
    res["inference_setup"] = f"CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s), 640x480 scenes"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_card_metrics.json").write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__" and "--tables" not in sys.argv:
    main()


def tables(res: dict) -> str:
    """Markdown tables of a ``model_card_metrics.json`` (for models/MODEL_CARD.md)."""
    out = []
    for name in ("expressions", "faces_cropped_muxspace"):
        r = res[name]
        out.append(f"**{name} val** - all classes: P {r['precision']:.3f}, R {r['recall']:.3f}, "
                   f"mAP50 {r['mAP50']:.3f}, mAP50-95 {r['mAP50-95']:.3f}\n")
        out.append("| class | instances | precision | recall | mAP50 | mAP50-95 |\n|---|---|---|---|---|---|")
        for c, m in r["per_class"].items():
            out.append(f"| {c} | {m['instances']} | {m['precision']:.3f} | {m['recall']:.3f} | {m['mAP50']:.3f} | "
                       f"{m['mAP50-95']:.3f} |")
        out.append("")
    out.append("**Face localisation, class-agnostic** (`single_cls`)\n\n| split | precision | recall | mAP50 | mAP50-95 |\n"
               "|---|---|---|---|---|")
    for name in ("awake_sleep", "expressions"):
        m = res[f"faces_{name}"]
        out.append(f"| {name} val | {m['precision']:.3f} | {m['recall']:.3f} | {m['mAP50']:.3f} | {m['mAP50-95']:.3f} |")
    out.append(f"\nInference: {res['inference_ms_per_image']} ms/image ({res['inference_setup']}, imgsz {res['imgsz']}).")
    return "\n".join(out)


if __name__ == "__main__" and "--tables" in sys.argv:
    print(tables(json.loads((REPO / "benchmarks" / "out" / "model_card_metrics.json").read_text())))
