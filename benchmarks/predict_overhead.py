"""Benchmark: what the backend adds to the model's own time, and pool-scoring throughput.

Times, on the same images and the same weights, in one run:
  A. plain ultralytics ``YOLO.predict(path)`` per image (decode + letterbox + forward + NMS);
  B. the backend's ``POST /predict`` with one task per request (what opening a task costs),
     images read from disk through ``/data/local-files/?d=`` (no Label Studio involved);
  C. ``POST /predict`` with all tasks in one request (what *Retrieve Predictions* sends);
  D. pool scoring's inner loop (``predict_tasks`` with embeddings, 32 tasks a chunk).
Prints ms/image for each, the ratios B/A and C/A (goal <= 1.15) and D's images per second.
The machine is noisy: each figure is the median of ``--repeats`` passes, interleaved.

``--model`` picks the version the backend serves (default: the shipped two-stage bundle); for a
bundle, A times plain ultralytics on its detector weights. ``--model models/faceloop-base.pt``
measures the first release's single-stage model, the reference of the issue-10 target
(two-stage ``/predict`` per image <= 1.3x the single-stage one).

Run: .venv/bin/python benchmarks/predict_overhead.py [--n 40] [--repeats 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from backend.config import Settings, configure_ultralytics  # noqa: E402
from backend.stack import free_port, wait_http  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "awake_sleep" / "images" / "val")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None, help="bundle .json or YOLO .pt (default: the shipped one)")
    args = ap.parse_args()
    files = sorted(args.images.glob("*.jpg"))[: args.n]
    if not files:
        sys.exit(f"no images under {args.images} (is ../shared/data there?)")
    work = Path(tempfile.mkdtemp(prefix="faceloop-bench-"))
    settings = Settings(var_dir=work / "var", local_files_document_root=str(args.images),
                        **({"default_model_path": args.model.resolve()} if args.model else {}))
    configure_ultralytics(settings.var_dir)
    from ultralytics import YOLO

    from backend.labels import ProjectSchema
    from backend.predict import predict_tasks
    from facemodels.detector import ModelCache
    from facemodels.two_stage import is_bundle, read_bundle

    xml = (REPO / "label_config" / "awake_sleep.xml").read_text()
    tasks = [{"id": i + 1, "project": 1, "data": {"image": f"/data/local-files/?d={f.name}"}} for i, f in enumerate(files)]

    port = free_port()
    env = dict(os.environ, VAR_DIR=str(settings.var_dir), LOCAL_FILES_DOCUMENT_ROOT=str(args.images),
               LABEL_STUDIO_API_KEY="unused", CELERY_BROKER_URL="redis://127.0.0.1:1/0",
               DEFAULT_MODEL_PATH=str(settings.default_model_path))
    log = open(work / "backend.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "backend.main:app", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "warning"], cwd=REPO, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 60, proc, work / "backend.log")
        c = httpx.Client(base_url=url, timeout=600)
        version = c.post("/setup", json={"project": "1.0", "schema": xml}).json()["model_version"]
        weights = settings.default_model_path
        detector = read_bundle(weights)["detector_path"] if is_bundle(weights) else weights
        plain = YOLO(str(detector), task="detect")
        # warm both up
        plain.predict(str(files[0]), imgsz=settings.imgsz, conf=settings.candidate_threshold, verbose=False)
        c.post("/predict", json={"tasks": tasks[:2], "label_config": xml}).raise_for_status()
        fm = ModelCache().get(weights)
        schema = ProjectSchema.parse(xml)
        predict_tasks(tasks[:2], schema, fm, settings, embed=True)

        a, b, cc, d = [], [], [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            for f in files:
                plain.predict(str(f), imgsz=settings.imgsz, conf=settings.candidate_threshold, verbose=False,
                              agnostic_nms=True)
            a.append((time.perf_counter() - t) / len(files))
            t = time.perf_counter()
            for task in tasks:
                r = c.post("/predict", json={"tasks": [task], "label_config": xml})
                r.raise_for_status()
            b.append((time.perf_counter() - t) / len(files))
            t = time.perf_counter()
            r = c.post("/predict", json={"tasks": tasks, "label_config": xml})
            r.raise_for_status()
            assert len(r.json()["results"]) == len(tasks)
            cc.append((time.perf_counter() - t) / len(files))
            t = time.perf_counter()
            for i in range(0, len(tasks), 32):
                predict_tasks(tasks[i : i + 32], schema, fm, settings, embed=True)
            d.append((time.perf_counter() - t) / len(files))
        ma, mb, mc, md = (statistics.median(x) * 1000 for x in (a, b, cc, d))
        print(f"images: {len(files)} from {args.images}, imgsz {settings.imgsz}, model {weights.name} ({version}), "
              f"repeats {args.repeats}, torch threads {__import__('torch').get_num_threads()}")
        print(f"A plain ultralytics predict      {ma:7.1f} ms/image")
        print(f"B backend /predict, 1 task/req   {mb:7.1f} ms/image   B/A = {mb / ma:.3f}")
        print(f"C backend /predict, all in one   {mc:7.1f} ms/image   C/A = {mc / ma:.3f}")
        print(f"D pool scoring loop (embeddings) {md:7.1f} ms/image   = {1000 / md:.1f} images/s")
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
