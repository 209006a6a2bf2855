"""A stand-in for bench.worker in bench tune's tests: no TensorFlow. Its times follow from the
configuration (featcache faster than tfdata, batch 64 fastest, cache none and dct slow), so that
a search has something to find; it reports each epoch as the real worker does, sleeping
FAKE_TUNE_EPOCH_S between them (the wall time budgets count)."""

import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    job = json.loads(Path(sys.argv[1]).read_text())
    cfg = job["config"]
    Path(os.environ["FAKE_TUNE_LOG"]).open("a").write(json.dumps(cfg) + "\n") if os.environ.get("FAKE_TUNE_LOG") \
        else None
    epoch = 1.0 * (0.3 if cfg["pipeline"] == "featcache" else 1.0) * (1.0 + abs(cfg["batch_size"] - 64) / 64)
    if cfg["pipeline"] in ("naive", "tutorial"):
        epoch *= 3
    if cfg.get("cache") == "none" and cfg["pipeline"] == "tfdata":
        epoch *= 20  # far slower: pruned once something faster is known
    prep = 2.0 + (1.0 if cfg["dct_decode"] else 0.0)
    times = []
    for k in range(cfg["epochs"]):
        times.append(epoch * (1.5 if k == 0 else 1.0))
        if job.get("epochs_file"):
            tmp = Path(job["epochs_file"] + ".tmp")
            tmp.write_text(json.dumps({"prep_s": prep, "epoch_times_s": times, "epochs": cfg["epochs"]}))
            os.replace(tmp, job["epochs_file"])
        time.sleep(float(os.environ.get("FAKE_TUNE_EPOCH_S", "0.05")))
    total = prep + sum(times)
    row = {"status": "ok", "error": "", "test_accuracy": 0.9 - (0.2 if cfg["precision"] == "int8" else 0.0),
           "test_loss": 0.3, "test_images": 1000, "train_images": 3000, "total_s": total,
           "first_epoch_s": times[0], "steady_epoch_s": min(times), "train_img_s": 3000 / min(times),
           "data_prep_s": prep, "epoch_times_s": " ".join(map(str, times))}
    Path(job["result"]).write_text(json.dumps(row))
