"""Run in a subprocess by test_bombs.py: one backend (TestClient, real model), then one /predict
per case; prints JSON with the process's peak RSS (VmHWM) after each case (test_bombs.py runs one
case per process, so that is the case's peak), the seconds it took and the predicted regions
(percent ``x, y, width, height`` and ``original_width/height``). An optional 4th argument is a
JSON object of settings (e.g. ``{"max_image_side": 0}``); test_large_images.py uses it too."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient


def vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def main(root: str, var: str, cases_json: str, settings_json: str = "{}") -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from backend.app import create_app
    from tests.helpers_unit import config_text, make_settings

    cases = json.loads(cases_json)
    s = make_settings(Path(var), local_files_document_root=root, **json.loads(settings_json))
    out = {"cases": {}}
    with TestClient(create_app(s), client=("127.0.0.1", 1)) as c:
        c.post("/setup", json={"project": 1, "schema": config_text("awake_sleep")})
        r = c.post("/predict", json={"tasks": [{"id": 1, "project": 1, "data": {"image": "/data/local-files/?d=small.jpg"}}]})
        assert r.status_code == 200 and "result" in r.json()["results"][0], r.text
        out["baseline_rss"] = vm("VmRSS")
        out["baseline_hwm"] = vm("VmHWM")
        for name, files in cases.items():
            t0 = time.perf_counter()
            tasks = [{"id": i, "project": 1, "data": {"image": f"/data/local-files/?d={f}"}} for i, f in enumerate(files, 1)]
            r = c.post("/predict", json={"tasks": tasks})
            res = r.json().get("results", []) if r.status_code == 200 else []
            out["cases"][name] = {"status": r.status_code, "seconds": round(time.perf_counter() - t0, 2),
                                  "peak_rss": vm("VmHWM"),
                                  "outcomes": [x.get("error", "ok")[:120] for x in res],
                                  "regions": [[[g["value"][k] for k in ("x", "y", "width", "height")]
                                               + [g["original_width"], g["original_height"]]
                                               for g in x.get("result", [])] for x in res]}
    out["overall_hwm"] = vm("VmHWM")
    print("BOMB-RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:5])
