"""Benchmark, side by side in one run: plain ultralytics, faceloop ``/predict`` over torch and over
ONNX Runtime, and pool scoring with one and two pinned workers (issues 10 and 12).

On the same images and the same weights (the shipped two-stage bundle unless ``--model``):

  A. plain ultralytics ``YOLO(detector.pt).predict(path)`` per image (decode + letterbox +
     forward + NMS), torch, the detector alone;
  B. ``POST /predict`` with one task per request (what opening a task costs), through a real
     uvicorn backend on 127.0.0.1, images read from disk via ``/data/local-files/?d=``;
  C. ``POST /predict`` with all tasks in one request (what *Retrieve Predictions* sends);
  B and C run against three backends started side by side: the two-stage model over torch
  (``INFERENCE_BACKEND=torch``), over ONNX (``INFERENCE_BACKEND=onnx``), and the single-stage
  ``models/faceloop-base.pt`` (torch; the reference of issue 10's target "two-stage ≤ 1.3× today's
  single-stage"; ``--single-stage ''`` skips it);
  D. pool scoring's inner loop (``backend.predict.predict_tasks`` with embeddings, 32 tasks a
     chunk, as ``ml_worker.scoring.score_pool`` runs it, without Label Studio) in images/s, over
     ``--pool-n`` images: one worker process pinned to one core (``taskset -c 0``), and two worker
     processes pinned to one core each (cores 0 and 1), splitting the images, started together;
     the workers are started (and warmed up) once and then given each round's images.
     Pinned workers run with ``OMP_NUM_THREADS=1``; ONNX Runtime takes its thread count from the
     affinity (one).

The machine is shared and noisy: A, B and C (and D's configurations) are interleaved ``--repeats``
times; each figure is the median over repeats, and each ratio is the median of the per-repeat
ratios. Beside wall-clock times it reports CPU time per image (all threads of the process doing the
work: the benchmark for A, the backend for B and C, each pool worker for D), which other processes'
load changes much less; for one pinned worker, images per CPU-second is its rate on a core of its own.
Prints Markdown tables.

Run: PYTHONPATH=. .venv/bin/python benchmarks/predict_overhead.py [--n 40] [--repeats 5] [--pool-n 96]
Only what a change touches: ``--backends onnx --single-stage '' --no-bulk --pool-n 0``; before and
after in one run: ``--baseline-tree DIR`` (a checkout of the commit before, e.g. from ``git worktree
add`` or ``git archive``; it uses this checkout's venv) adds a backend served from DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

XML = (REPO / "label_config" / "awake_sleep.xml").read_text()


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tasks(files):
    return [{"id": i + 1, "project": 1, "data": {"image": f"/data/local-files/?d={f.name}"}} for i, f in enumerate(files)]


def backend_env(name: str) -> dict:
    """Settings of a ``--backends`` entry: ``torch`` or ``onnx``, then optional ``-spinning``
    (``INFERENCE_SPINNING=1``) and ``-clfN`` (``INFERENCE_CLASSIFIER_THREADS=N``), e.g. ``onnx-clf2``."""
    kind, *opts = name.split("-")
    env = dict(INFERENCE_BACKEND=kind, INFERENCE_SPINNING="0")
    for o in opts:
        if o == "spinning":
            env["INFERENCE_SPINNING"] = "1"
        elif o.startswith("clf") and o[3:].isdigit():
            env["INFERENCE_CLASSIFIER_THREADS"] = o[3:]
        else:
            raise SystemExit(f"unknown backend option {o!r} in {name!r} (spinning, clfN)")
    return env


def pool_worker(args) -> None:
    """One pool-scoring process: load and warm up, print ``ready``, then for each ``START COUNT``
    line on stdin score those images and print one JSON line ``{"n", "seconds", ...}``."""
    settings = Settings(local_files_document_root=str(args.images))
    configure_ultralytics(settings.var_dir)
    from backend.labels import ProjectSchema
    from backend.predict import predict_tasks
    from facemodels.detector import ModelCache
    from ml_worker.scoring import SCORE_CHUNK

    all_tasks = _tasks(sorted(args.images.glob("*.jpg")))
    model = ModelCache(settings.device).get(settings.default_model_path)
    schema = ProjectSchema.parse(XML)
    predict_tasks(all_tasks[:4], schema, model, settings, embed=True)
    print("ready", flush=True)
    for line in sys.stdin:
        start, count = map(int, line.split())
        tasks = all_tasks[start : start + count]
        t, cpu = time.perf_counter(), time.process_time()
        n = 0
        for i in range(0, len(tasks), SCORE_CHUNK):
            out = predict_tasks(tasks[i : i + SCORE_CHUNK], schema, model, settings, embed=True)
            n += sum(p.error is None for p in out)
        print(json.dumps({"n": n, "seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu,
                          "backend": getattr(model, "backend", "torch"),
                          "cpus": sorted(os.sched_getaffinity(0))}), flush=True)


class PoolWorkers:
    """Worker processes of one backend, each pinned to one core (``taskset -c``), started once."""

    def __init__(self, args, backend: str, cores: list[int], env: dict):
        self.backend = backend
        e = dict(env, INFERENCE_BACKEND=backend, OMP_NUM_THREADS="1")
        self.procs = [subprocess.Popen(["taskset", "-c", str(c), sys.executable, __file__, "--pool-worker", "--images",
                                        str(args.images)], cwd=REPO, env=e, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                      for c in cores]

    def wait_ready(self) -> None:
        for p in self.procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"pool worker ({self.backend}) did not start: {line!r}")

    def score(self, n_images: int, k: int) -> tuple[float, float]:
        """Images/s of the first ``k`` workers scoring ``n_images`` split between them, started
        together, and images per CPU-second of one worker (the rate of a core of its own)."""
        share = n_images // k
        for j, p in enumerate(self.procs[:k]):
            p.stdin.write(f"{j * share} {share}\n")
            p.stdin.flush()
        res = [json.loads(p.stdout.readline()) for p in self.procs[:k]]
        assert all(r["backend"] == self.backend for r in res), res
        return (sum(r["n"] for r in res) / max(r["seconds"] for r in res),
                sum(r["n"] for r in res) / sum(r["cpu_seconds"] for r in res))

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()
            p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "awake_sleep" / "images" / "val")
    ap.add_argument("--n", type=int, default=40, help="images of A, B, C")
    ap.add_argument("--pool-n", type=int, default=96, help="images of each pool-scoring measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", type=Path, default=None, help="bundle .json or YOLO .pt (default: the shipped one)")
    ap.add_argument("--single-stage", default=str(REPO / "models" / "faceloop-base.pt"),
                    help="single-stage reference model ('' to skip)")
    ap.add_argument("--backends", default="torch,onnx",
                    help="two-stage backends of B and C, comma-separated (default torch,onnx; "
                         "onnx-spinning: ONNX with INFERENCE_SPINNING=1; onnx-clf2: the classifier on 2 threads)")
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="also serve ONNX from this other checkout (e.g. a `git worktree` of the commit before a "
                         "change): before and after, interleaved in one run")
    ap.add_argument("--no-bulk", action="store_true", help="skip C (all tasks in one request)")
    ap.add_argument("--pool-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pool_worker:
        return pool_worker(args)
    load0 = os.getloadavg()
    files = sorted(args.images.glob("*.jpg"))[: args.n]
    if not files:
        sys.exit(f"no images under {args.images} (is ../shared/data there?)")
    work = Path(tempfile.mkdtemp(prefix="faceloop-bench-"))
    settings = Settings(var_dir=work / "var", local_files_document_root=str(args.images),
                        **({"default_model_path": args.model.resolve()} if args.model else {}))
    configure_ultralytics(settings.var_dir)
    from ultralytics import YOLO

    from facemodels.two_stage import is_bundle, read_bundle

    weights = Path(settings.default_model_path)
    tasks = _tasks(files)
    base_env = dict(os.environ, LOCAL_FILES_DOCUMENT_ROOT=str(args.images), LABEL_STUDIO_API_KEY="unused",
                    CELERY_BROKER_URL="redis://127.0.0.1:1/0", DEFAULT_MODEL_PATH=str(weights),
                    VAR_DIR=str(work / "var"))
    servers = {b: backend_env(b) for b in args.backends.split(",") if b}
    trees = {}
    if args.baseline_tree:
        servers["onnx, baseline tree"] = dict(INFERENCE_BACKEND="onnx")
        trees["onnx, baseline tree"] = args.baseline_tree.resolve()
    if args.single_stage:
        servers["single-stage torch"] = dict(INFERENCE_BACKEND="torch", DEFAULT_MODEL_PATH=args.single_stage)
    procs, clients = {}, {}
    try:
        for name, extra in servers.items():
            port = free_port()
            var = work / f"var-{name.replace(' ', '-')}"
            env = dict(base_env, **extra, VAR_DIR=str(var))
            if name in trees:
                env["PYTHONPATH"] = str(trees[name])
            log = open(work / f"backend-{name.replace(' ', '-')}.log", "wb")
            procs[name] = subprocess.Popen([sys.executable, "-m", "uvicorn", "backend.main:app", "--host", "127.0.0.1",
                                            "--port", str(port), "--log-level", "warning"], cwd=trees.get(name, REPO), env=env,
                                           stdout=log, stderr=log)
            url = f"http://127.0.0.1:{port}"
            wait_http(url + "/health", 90, procs[name], work / "backend.log")
            clients[name] = httpx.Client(base_url=url, timeout=600)
        detector = read_bundle(weights)["detector_path"] if is_bundle(weights) else weights
        plain = YOLO(str(detector), task="detect")
        kw = dict(imgsz=settings.imgsz, conf=settings.candidate_threshold, verbose=False, agnostic_nms=True)
        plain.predict(str(files[0]), **kw)
        for name, c in clients.items():  # warm up (the backend loads its model at start, exporting it when needed)
            c.post("/setup", json={"project": "1.0", "schema": XML}).raise_for_status()
            for _ in range(2):
                c.post("/predict", json={"tasks": tasks[:2], "label_config": XML}).raise_for_status()

        A: list[float] = []
        B: dict[str, list[float]] = {n: [] for n in clients}
        C: dict[str, list[float]] = {n: [] for n in clients}
        cpu: dict[str, list[float]] = {}  # CPU seconds per image of the process doing the work
        for rep in range(args.repeats):
            t, c0 = time.perf_counter(), time.process_time()
            for f in files:
                plain.predict(str(f), **kw)
            A.append((time.perf_counter() - t) / len(files))
            cpu.setdefault("A", []).append((time.process_time() - c0) / len(files))
            names = list(clients)
            names = names[rep % len(names):] + names[: rep % len(names)]  # rotate the order
            for name in names:
                c, pid = clients[name], procs[name].pid
                t, c0 = time.perf_counter(), proc_cpu(pid)
                for task in tasks:
                    c.post("/predict", json={"tasks": [task], "label_config": XML}).raise_for_status()
                B[name].append((time.perf_counter() - t) / len(files))
                cpu.setdefault(("B", name), []).append((proc_cpu(pid) - c0) / len(files))
                if args.no_bulk:
                    continue
                t, c0 = time.perf_counter(), proc_cpu(pid)
                r = c.post("/predict", json={"tasks": tasks, "label_config": XML})
                r.raise_for_status()
                assert len(r.json()["results"]) == len(tasks)
                C[name].append((time.perf_counter() - t) / len(files))
                cpu.setdefault(("C", name), []).append((proc_cpu(pid) - c0) / len(files))
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(10)

    pool_cfgs = [(b, k) for b in ("onnx", "torch") for k in (1, 2)] if args.pool_n > 0 else []
    D: dict[tuple, list[float]] = {cfg: [] for cfg in pool_cfgs}
    Dcpu: dict[tuple, list[float]] = {cfg: [] for cfg in pool_cfgs}
    pool_env = dict(base_env, VAR_DIR=str(work / "var-onnx"))  # reuse the ONNX export made above
    workers = {b: PoolWorkers(args, b, [0, 1], pool_env) for b in ("onnx", "torch")} if pool_cfgs else {}
    try:
        for w in workers.values():
            w.wait_ready()
        for rep in range(args.repeats if pool_cfgs else 0):
            for b, k in pool_cfgs[rep % len(pool_cfgs):] + pool_cfgs[: rep % len(pool_cfgs)]:
                rate, per_cpu = workers[b].score(args.pool_n, k)
                D[(b, k)].append(rate)
                Dcpu[(b, k)].append(per_cpu)
    finally:
        for w in workers.values():
            w.close()

    med = statistics.median
    ms = lambda xs: 1000 * med(xs)  # noqa: E731
    ratio = lambda xs, ys: med([x / y for x, y in zip(xs, ys)])  # noqa: E731 - per-repeat ratios
    print(f"\n{len(files)} images from {args.images} ({args.pool_n} for pool scoring), imgsz {settings.imgsz}, "
          f"model {weights.name}, {args.repeats} interleaved repeats, {os.cpu_count()} cores, "
          f"load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print("\n| | ms/image (median) | ÷ plain ultralytics (A) | CPU ms/image | CPU ÷ A |")
    print("|---|---|---|---|---|")
    print(f"| A plain ultralytics predict (torch, detector alone) | {ms(A):.1f} | 1.00 | {ms(cpu['A']):.1f} | 1.00 |")
    for k, X in (("B", B), ("C", C)):
        for name in clients if X[next(iter(clients))] else []:
            what = "one task per request" if k == "B" else f"all {len(files)} in one request"
            print(f"| {k} `/predict` {what}, {name} | {ms(X[name]):.1f} | {ratio(X[name], A):.2f} "
                  f"| {ms(cpu[(k, name)]):.1f} | {ratio(cpu[(k, name)], cpu['A']):.2f} |")
    if "onnx, baseline tree" in clients and "onnx" in clients:
        base = "onnx, baseline tree"
        print(f"\nthis tree ÷ baseline tree (ONNX, per-repeat medians): single task wall {ratio(B['onnx'], B[base]):.3f}, "
              f"CPU {ratio(cpu[('B', 'onnx')], cpu[('B', base)]):.3f}; per repeat, CPU ms/image this tree / baseline: "
              + ", ".join(f"{1000 * x:.1f}/{1000 * y:.1f}" for x, y in zip(cpu[("B", "onnx")], cpu[("B", base)])))
    if "single-stage torch" in clients and "torch" in clients and "onnx" in clients and C["onnx"]:
        s = "single-stage torch"
        print(f"\ntwo-stage ÷ single-stage (issue 10, ≤ 1.3): single task onnx {ratio(B['onnx'], B[s]):.2f}, "
              f"torch {ratio(B['torch'], B[s]):.2f}; bulk onnx {ratio(C['onnx'], C[s]):.2f}, torch {ratio(C['torch'], C[s]):.2f}")
    if D:
        print("\n| pool scoring (D) | images/s (median) | per-repeat values | images per CPU-second of a worker |")
        print("|---|---|---|---|")
        for (b, k), xs in D.items():
            print(f"| {b}, {k} worker(s) pinned to {k} core(s) | {med(xs):.1f} | {', '.join(f'{x:.0f}' for x in xs)} "
                  f"| {med(Dcpu[(b, k)]):.1f} |")
        for b in ("onnx", "torch"):
            print(f"two pinned workers ÷ one ({b}): {ratio(D[(b, 2)], D[(b, 1)]):.2f}")
    shutil.rmtree(work, ignore_errors=True)  # kept when the run fails: backend logs are there


if __name__ == "__main__":
    main()
