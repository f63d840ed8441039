"""``python -m benchmarks``: prints a table per section and writes one JSON file.

Sections: ``preprocess``, ``detokenize``, ``memory``, ``serving`` (overhead, concurrency,
load time).
``--model tiny`` uses the bundled fixture (quick); ``--model 1b`` builds a random
checkpoint with the real Ovis2-1B dimensions locally first (several GB, minutes).
``--smoke`` runs everything on the tiny fixture with the fewest repetitions: CI uses it
to check the benchmarks still run, never to judge timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "src" / "ovis2_xinf" / "assets" / "tiny-ovis2"
TINY_GPTQ = ROOT / "tests" / "fixtures" / "tiny-ovis2-gptq-int4"
SECTIONS = ("preprocess", "detokenize", "memory", "serving")


def _table(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    def fmt(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _checkpoints(model: str, workdir: Path) -> Dict[str, Path]:
    if model == "tiny":
        return {"pytorch": TINY, "gptq": TINY_GPTQ}
    from . import realshape

    size = model.rstrip("bB")
    print(f"building random Ovis2-{size}B-shaped checkpoints under {workdir} ...", flush=True)
    return {
        "pytorch": realshape.build_pytorch(size, workdir / f"ovis2-{size}b-bf16-v2"),
        "gptq": realshape.build_gptq(size, workdir / f"ovis2-{size}b-gptq-int4-v2"),
    }


def run_preprocess(args) -> Dict[str, Any]:
    from . import preprocess

    rows = preprocess.run(repeats=2 if args.smoke else 10,
                          sizes=[(640, 480)] if args.smoke else preprocess.SIZES)
    print(_table(rows, ["width", "height", "max_partition", "grid", "crops", "ms_median", "ms_min",
                        "back_to_back_ms_min", "pillow_ms_min", "speedup"]))
    requests = preprocess.run_requests(repeats=2 if args.smoke else 10,
                                       requests=[("2 photos", 2, (640, 480), 4)] if args.smoke else preprocess.REQUESTS)
    print(_table(requests, ["request", "images", "size", "max_partition", "crops", "ms_min", "stacked_apart_ms_min",
                            "speedup"]))
    return {"rows": rows, "requests": requests}


def run_detokenize(args) -> Dict[str, Any]:
    from . import detokenize

    # The bundled tokenizer: the real-shape checkpoints are built with it too.
    rows = detokenize.run(TINY, lengths=(64,) if args.smoke else detokenize.LENGTHS)
    print(_table(rows, ["tokens", "stream_ms", "us_per_token", "one_decode_ms"]))
    return {"rows": rows}


def run_memory(args, paths) -> Dict[str, Any]:
    from . import memory, realshape

    result = memory.compare(paths["pytorch"], paths["gptq"], args.model)
    rows = [{"format": fmt, **{k: result[fmt][k] for k in ("dtype", "llm_decoder_bytes", "llm_bytes", "total_bytes",
                                                              "peak_rss_delta", "load_seconds")}}
            for fmt in ("pytorch", "gptq")]
    print(_table(rows, ["format", "dtype", "llm_decoder_bytes", "llm_bytes", "total_bytes", "peak_rss_delta", "load_seconds"]))
    print(f"quantized / pytorch: decoder {result['llm_decoder_ratio']:.3f}, LLM {result['llm_ratio']:.3f}, "
          f"whole model {result['total_ratio']:.3f}")
    fp32 = memory.measure_load(paths["pytorch"], "pytorch", "float32")
    result["pytorch_float32"] = fp32
    result["checkpoint_bytes"] = realshape.checkpoint_bytes(paths["pytorch"])
    print(f"float32 load: peak RSS {fp32['peak_rss_delta'] / 2**20:.0f} MiB for {fp32['total_bytes'] / 2**20:.0f} MiB "
          f"of loaded weights ({fp32['peak_over_loaded_bytes']:.2f}x); checkpoint {result['checkpoint_bytes'] / 2**20:.0f} MiB")
    return result


def run_serving(args, paths, workdir: Path) -> Dict[str, Any]:
    from . import serving

    tokens = 4 if args.smoke else args.max_tokens
    runs = 1 if args.smoke else 3
    levels = (1, 2) if args.smoke else (1, 2, 4, 8)
    direct = serving.direct(paths["pytorch"], tokens, runs)
    served = serving.served(paths["pytorch"], tokens, runs, levels, 4 if args.smoke else 16)
    loads = serving.load_times(paths["pytorch"], workdir / f"native-{args.model}-bf16")
    result = {
        "direct": direct, "served": {k: v for k, v in served.items() if k != "concurrency"},
        "concurrency": served["concurrency"], "load": loads,
        "decode_ratio": (served["decode_tok_s"] / direct["decode_tok_s"]
                         if served["decode_tok_s"] and direct["decode_tok_s"] else None),
        "ttft_over_direct_s": served["ttft_s"] - direct["ttft_s"],
    }
    print(_table([
        {"path": "direct generate", "ttft_s": direct["ttft_s"], "decode_tok_s": direct["decode_tok_s"]},
        {"path": "xinference + openai", "ttft_s": served["ttft_s"], "decode_tok_s": served["decode_tok_s"]},
    ], ["path", "ttft_s", "decode_tok_s"]))
    ratio = "n/a (every token of a run came in one chunk)" if result["decode_ratio"] is None else f"{result['decode_ratio']:.3f}"
    print(f"decode ratio served/direct {ratio}; TTFT +{result['ttft_over_direct_s'] * 1000:.0f} ms")
    print(_table(served["concurrency"], ["concurrency", "wall_s", "aggregate_tok_s", "all_equal_sequential"]))
    print(f"launch to ready {served['launch_to_ready_s']:.1f}s; our loader {loads['ours_s']:.1f}s; "
          f"plain from_pretrained {loads['plain_from_pretrained_s']:.1f}s (fresh processes, float32, weights touched)")
    return result


def plot(result: Dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    rows = result["sections"]["serving"]["concurrency"]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot([r["concurrency"] for r in rows], [r["aggregate_tok_s"] for r in rows], marker="o")
    ax.set_xlabel("concurrent chat requests")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_title(f"Ovis2 ({result['model']}) on {result['machine']['device']}")
    ax.set_xticks([r["concurrency"] for r in rows])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"any of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--model", default="tiny", help="tiny, or a real size to build randomly (1b, 2b)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, fewest repetitions (CI)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ovis2-xinf-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    parser.add_argument("--plot", type=Path, help="write the throughput-vs-concurrency PNG here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = "tiny"
    sections = args.sections or list(SECTIONS)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    import torch

    result: Dict[str, Any] = {
        "model": args.model, "smoke": args.smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
                    "torch": torch.__version__},
        "sections": {},
    }
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = _checkpoints(args.model, args.workdir) if {"memory", "serving"} & set(sections) else {}
    for section in sections:
        print(f"\n== {section}", flush=True)
        if section == "preprocess":
            result["sections"][section] = run_preprocess(args)
        elif section == "detokenize":
            result["sections"][section] = run_detokenize(args)
        elif section == "memory":
            result["sections"][section] = run_memory(args, paths)
        else:
            result["sections"][section] = run_serving(args, paths, args.workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nresults: {args.out}")
    if args.plot and "serving" in result["sections"]:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
