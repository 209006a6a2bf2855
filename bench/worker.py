"""Run one configuration in this process and write its result row as JSON.

``python -m bench.worker JOB_JSON``: the sweep (``bench.run.run_one``) starts one of these per
configuration x device x repeat, because precision policy, XLA and visible devices are
process-global in TensorFlow, and so that peak memory is this configuration's alone. The job
document holds everything the worker needs: ``config`` (RunConfig fields), ``result`` (where
the row goes), ``progress``, ``cache``, ``figures`` (a folder, or null), ``machine_id`` (the
sweep's machine fingerprint, under which per-machine measurements are cached) and, for bench
tune, ``epochs_file``: where each epoch's progress goes (``train.RunContext.on_epoch``).
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from flowers_fast.errors import INTERRUPTED_EXIT_CODE, UnsupportedError, UserError
from flowers_fast.outputs import atomic_write


def _write(out: Path, row: dict) -> None:
    atomic_write(out, json.dumps(row, default=str))  # the sweep never reads half a result


def hardware_row(cfg, backbone_layer, row: dict, measured=None) -> dict:
    """How close the model runs to the hardware: counted FLOPs x model-only rate / matmul peak, at
    the precision the convolutions ran in. For featcache on a CPU the peak is the faster of
    TensorFlow's and OpenVINO's matmul, so every feature-pass engine is held to the same peak.

    The FLOP count and the matmul peaks belong to the model and the machine, not to the run:
    ``measured`` (a ``bench.machine.Measured``) measures each once per machine and TensorFlow
    version and the row says when (``matmul_peak_measured``); without it they are measured now."""
    from flowers_fast import engine, metrics

    def get(key, measure):
        return measured.get(key, measure) if measured is not None else (measure(), "now")

    handle = row.get("handle") or cfg.model_handle
    flops, _ = get(f"forward_flops/{handle}/{cfg.image_size}",
                   lambda: metrics.forward_flops_per_image(backbone_layer, cfg.image_size))
    ran = row.get("compute_dtype", "")
    dtype = ran if ran in ("float32", "bfloat16", "float16") else "float32" if cfg.precision == "fp32" \
        else cfg.mixed_dtype
    peaks = {"tensorflow": get(f"matmul_peak_flops/{cfg.device}/{dtype}",
                               lambda: metrics.matmul_peak_flops(cfg.device, dtype))}
    # OpenVINO would run a bf16 matmul in float32 on a CPU without bf16: no peak to take from it there.
    if cfg.pipeline == "featcache" and cfg.device == "cpu" and (dtype == "float32" or engine.cpu_has_bf16()):
        peaks["openvino"] = get(f"matmul_peak_flops/openvino/{dtype}", lambda: engine.matmul_peak_flops(dtype))
    source = max(peaks, key=lambda k: peaks[k][0])
    peak, when = peaks[source]
    # Frozen backbone: a train step costs about one forward; fine-tuning about three.
    per_image = flops * (3.0 if cfg.fine_tune else 1.0)
    out = {"backbone_gflops_per_image": flops / 1e9, "matmul_peak_gflops": peak / 1e9, "matmul_dtype": dtype,
           "matmul_peak_measured": when, "matmul_peak_source": source,
           **{f"matmul_peak_{k}_gflops": v[0] / 1e9 for k, v in peaks.items()}}
    # After a two-phase run the model-only rate is the partly trainable model's: its step costs one
    # forward plus the top's backward, a count not made here, so no utilisation is claimed for it.
    rate = row.get("model_only_img_s") if not cfg.fine_tune_epochs else None
    if rate:
        out["model_flops_utilization"] = per_image * rate / peak
    if row.get("feature_pass_img_s") and row["feature_pass_img_s"] == row["feature_pass_img_s"]:  # not NaN
        # The streamed pass, decoding included: what the feature pass really got out of the CPU.
        out["feature_pass_flops_utilization"] = flops * row["feature_pass_img_s"] / peak
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    out = Path(job["result"])
    try:
        from flowers_fast.config import RunConfig

        cfg = RunConfig(**job["config"])
        from flowers_fast import runtime

        runtime.setup(cfg)
        from flowers_fast import figures, train
        from flowers_fast.download import cache_dir
        from flowers_fast.tfkeras import tf

        from . import machine

        cache = cache_dir(job.get("cache"))
        epochs_file = job.get("epochs_file")  # bench tune reads it to stop a trial that is already too slow
        on_epoch = (lambda known: _write(Path(epochs_file), known)) if epochs_file else None
        result = train.run(cfg, cache, progress=job.get("progress", False), keep_model=cfg.breakdown,
                           predictions=bool(job.get("figures")), on_epoch=on_epoch)
        row = dict(result.row)
        if cfg.breakdown and result.backbone is not None:
            machine_id = job.get("machine_id") or machine.host_facts()["machine_id"]
            row.update(hardware_row(cfg, result.backbone.layer, row, machine.Measured(cache, machine_id,
                                                                                        tf.__version__)))
        row.update(machine.tf_build_facts())
        row.update(status="ok", error="", device_name=runtime.device_name(cfg.device), tf_version=tf.__version__)
        if job.get("figures"):
            figures.run_figures(result, Path(job["figures"]), Path(job["figures"]).name)
        _write(out, row)
        return 0
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT_CODE
    except Exception as exc:  # recorded as a result row, not a crash of the sweep
        if not isinstance(exc, UserError):
            traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, UnsupportedError):  # e.g. bf16 asked on a CPU without it: a row that says why
            _write(out, {"status": "skipped", "error": message[:500]})
        else:
            _write(out, {"status": "error", "error": f"{type(exc).__name__}: {message}"[:500]})
        return getattr(exc, "exit_code", 1)


if __name__ == "__main__":
    sys.exit(main())
