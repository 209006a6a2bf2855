"""Checks on a gpu_check.sh sweep: the mixed-precision compute dtype, and the issue's targets
as ratios measured in the same run. ``python -m bench.gpu_check CSV --device gpu|cpu``."""

from __future__ import annotations

import sys

import pandas as pd

from flowers_fast.clikit import OneLineParser, run_main

from .results import load, median


def checks(df: pd.DataFrame, device: str) -> list[tuple[str, bool, str]]:
    df = df[df["device"] == device]
    want = "float16" if device == "gpu" else "bfloat16"
    out = []
    for name in ("tfdata-mixed", "featcache-mixed", "modelonly-mixed"):
        rows = df[(df["name"] == name) & (df["status"] == "ok")]
        if len(rows):
            dtype = str(rows["compute_dtype"].iloc[0])
            out.append((f"{name}: backbone convolutions run in {want}", want in dtype, f"compute_dtype={dtype}"))
    fp32, mixed = median(df, "modelonly", "model_only_img_s"), median(df, "modelonly-mixed", "model_only_img_s")
    ratio = mixed / fp32 if fp32 else float("nan")  # no (or a zero) fp32 rate: not judged as a pass
    out.append(("mixed precision model-only >= 1.5x fp32", ratio >= 1.5,
                f"{mixed:.0f} vs {fp32:.0f} img/s = {ratio:.2f}x"))
    frac = median(df, "tfdata", "e2e_fraction_of_model")
    if frac == frac:
        out.append(("tfdata: end-to-end >= 90% of model-only", frac >= 0.9, f"{frac:.0%}"))
    # featcache streams decoding and the backbone together: judge the stream against its slower stage.
    stream = median(df, "featcache", "feature_pass_img_s")
    stages = [median(df, "featcache", c) for c in ("model_only_img_s", "input_only_img_s")]
    slower = min(stages) if all(v == v for v in stages) else float("nan")
    if stream == stream and slower == slower and slower > 0:
        out.append(("featcache: streamed feature pass >= 90% of its slower stage (decode or backbone)",
                    stream >= 0.9 * slower, f"{stream:.0f} vs {slower:.0f} img/s = {stream / slower:.0%}"))
    for name in ("modelonly-xla", "modelonly-mixed-xla"):
        rate = median(df, name, "model_only_img_s")
        base = median(df, name.replace("-xla", ""), "model_only_img_s")
        if rate == rate:
            out.append((f"{name}: XLA vs no XLA (reported, not judged)", True,
                        f"{rate / base:.2f}x" if base else "no baseline rate"))
    errors = df[df["status"] != "ok"]
    out.append(("every configuration finished", errors.empty,
                "; ".join(f"{r['name']}: {r['status']} {r['error']}" for _, r in errors.iterrows()) or "all ok"))
    return out


def cmd_check(args) -> int:
    results = checks(load(args.csv), args.device)
    for label, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {label}: {detail}")
    # On CPU the targets are GPU targets: report them, fail only if something did not run.
    judged = results if args.device == "gpu" else [r for r in results if "finished" in r[0] or "runs in" in r[0]]
    return 0 if all(ok for _, ok, _ in judged) else 1


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m bench.gpu_check")
    parser.add_argument("csv", help="a bench run CSV, e.g. OUT_DIR/latest.csv")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="gpu", help="(default: gpu)")
    parser.set_defaults(func=cmd_check)
    return run_main(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
