"""Run a tiny sweep on its own local Ray and scrape Ray's Prometheus endpoint while it runs.

Used by tests/test_dashboard_metrics.py as a subprocess (its own ray.init, with a short metrics
report interval, so the session-wide Ray of the other tests is left alone). Prints one JSON line:
every scrape's ``sweeper_*`` samples, plus the callback's own totals.

    python tests/_metrics_probe.py MANIFEST
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import urllib.request

os.environ.setdefault("RAY_metrics_report_interval_ms", "500")

SAMPLE = re.compile(r'^(ray_sweeper_[a-z_]+)\{([^}]*)\}\s+([-+0-9.eEinfNa]+)\s*$')


def scrape(port: int) -> list[dict]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return []
    out = []
    for ln in text.splitlines():
        m = SAMPLE.match(ln)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out.append({"name": m.group(1), "labels": labels, "value": float(m.group(3))})
    return out


def main() -> int:
    import ray

    from sweeper import manifest, runner

    loaded = manifest.load(sys.argv[1], [])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ports = sorted({n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]})
    scrapes: list[dict] = []
    done = threading.Event()
    box: dict = {}

    def sweep():
        try:
            box["dir"], box["rows"] = runner.run_sweep(loaded, quiet=True)
        except BaseException as e:  # noqa: BLE001
            box["error"] = repr(e)
        finally:
            done.set()

    threading.Thread(target=sweep, daemon=True).start()
    t0 = time.time()
    while not done.is_set():
        scrapes.append({"t": time.time() - t0, "during": True, "samples": [s for p in ports for s in scrape(p)]})
        done.wait(1.0)
    # the last values reach the endpoint a report interval (or, on a loaded machine, a few) later:
    # scrape until the endpoint shows every trial ended, for at most 30 s
    n = len(box.get("rows") or [])
    end = time.time() + 30
    while time.time() < end:
        samples = [s for p in ports for s in scrape(p)]
        scrapes.append({"t": time.time() - t0, "during": False, "samples": samples})
        v = {s["name"]: s["value"] for s in samples if s["labels"].get("sweep") == loaded.manifest.name}
        ended = sum(v.get(f"ray_sweeper_trials_{k}", 0) for k in ("finished", "stopped", "errored"))
        if v.get("ray_sweeper_trials_running") == 0 and ended == n and "ray_sweeper_best_metric" in v:
            break
        time.sleep(1.0)
    rows = box.get("rows") or []
    print(json.dumps({"ports": ports, "error": box.get("error"), "sweep_s": scrapes[-1]["t"],
                      "statuses": [r["status"] for r in rows],
                      "best": min((r["best"] for r in rows if r.get("rank")), default=None),
                      "scrapes": scrapes}))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
