"""``python -m benchmarks``: prints a table per section and writes one JSON file.

Sections: ``preprocess``, ``detokenize``, ``memory``, ``serving`` (overhead, load time),
``concurrency`` (continuous batching: served streams against the batched forward),
``scheduler`` (the batching scheduler in this process, no server, against the batched forward;
and what one OpenMP team kept by another thread costs the batched forward),
``multiturn`` (reuse across turns: a 4-turn chat about one image, cold against warm TTFT),
``grammar`` (structured output: llguidance compile time and mask cost per token against a decode step),
``hostile`` (a plain text request's latency while 8 requests ask for the most work the limits allow),
``dtype`` (float32 against bfloat16 on this CPU, direct and served, and what ``auto`` chooses).
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
SECTIONS = ("preprocess", "detokenize", "memory", "serving", "concurrency", "scheduler", "multiturn", "grammar",
            "hostile", "dtype")


def _table(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    def fmt(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _checkpoints(model: str, workdir: Path, gptq: bool = True) -> Dict[str, Path]:
    if model == "tiny":
        return {"pytorch": TINY, "gptq": TINY_GPTQ}
    from . import realshape

    size = model.rstrip("bB")
    print(f"building random Ovis2-{size}B-shaped checkpoints under {workdir} ...", flush=True)
    paths = {"pytorch": realshape.build_pytorch(size, workdir / f"ovis2-{size}b-bf16-v2")}
    if gptq:
        paths["gptq"] = realshape.build_gptq(size, workdir / f"ovis2-{size}b-gptq-int4-v2")
    return paths


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
    direct = serving.direct(paths["pytorch"], tokens, runs)
    served = serving.served(paths["pytorch"], tokens, runs)
    loads = serving.load_times(paths["pytorch"], workdir / f"native-{args.model}-bf16")
    result = {
        "direct": direct, "served": served, "load": loads,
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
    print(f"launch to ready {served['launch_to_ready_s']:.1f}s; our loader {loads['ours_s']:.1f}s; "
          f"plain from_pretrained {loads['plain_from_pretrained_s']:.1f}s (fresh processes, float32, weights touched)")
    return result


def run_concurrency(args, paths) -> Dict[str, Any]:
    from . import concurrency

    result = concurrency.run(paths["pytorch"], args.smoke, args.device)
    for name, work in result["workloads"].items():
        print(f"{name}: {work['prompt_tokens']} prompt tokens, {work['max_tokens']} new tokens each")
        print(_table(work["rows"], ["concurrency", "served_e2e_tok_s", "direct_e2e_tok_s", "e2e_over_direct",
                                    "served_tok_s", "steady_tok_s", "direct_tok_s", "steady_over_direct",
                                    "ttft_p50_s", "ttft_p95_s", "itl_p95_s", "wall_s", "served_cpu_share",
                                    "direct_cpu_share", "foreign_cpu", "tries"]))
    load = result["ttft_under_load"]
    print(f"TTFT p95 of one {load['workload']} request: alone {load['solo_p95_s']:.3f}s, while {load['background']} "
          f"decode {load['loaded_p95_s']:.3f}s ({load['ratio']:.2f}x; background decoding throughout: "
          f"{load['background_decoding_throughout']})")
    targets = result["targets"]
    rows = []
    for name in result["workloads"]:
        v = result["verdict"][name]
        rows.append({"target": f"{name}: served/direct whole workload, every N",
                     "want": f">= {targets['served_over_direct']}", "measured": v["e2e_over_direct_min"],
                     "met": v["e2e_over_direct_met"]})
        rows.append({"target": f"{name}: served/direct decode, N in {v['decode_levels']}",
                     "want": f">= {targets['served_over_direct']}", "measured": v["decode_over_direct_min"],
                     "met": v["decode_over_direct_met"]})
        rows.append({"target": f"{name}: served decode N=8 / N=1 (direct: {_num(v['direct_decode_scaling_8_over_1'])})",
                     "want": f">= {targets['scaling_8_over_1']}", "measured": v["decode_scaling_8_over_1"],
                     "met": v["scaling_met"]})
        rows.append({"target": f"{name}: whole workload N=8 / N=1, reported (direct: "
                               f"{_num(v['direct_e2e_scaling_8_over_1'])})",
                     "want": "-", "measured": v["e2e_scaling_8_over_1"], "met": "-"})
    for name in result["workloads"] if "gpu" in targets else ():
        v = result["verdict"][name]
        for n in (4, 8):
            key = f"scaling_{n}_over_1"
            rows.append({"target": f"{name}: GPU served decode N={n} / N=1 (direct: {_num(v[f'gpu_direct_decode_{key}'])})",
                         "want": f">= {targets['gpu'][key]}", "measured": v[f"gpu_decode_{key}"],
                         "met": v[f"gpu_{key}_met"]})
    rows.append({"target": f"TTFT p95 while {load['background']} decode / alone", "want": f"<= {targets['ttft_under_load_ratio']}",
                 "measured": result["verdict"]["ttft_under_load"]["ratio"],
                 "met": result["verdict"]["ttft_under_load"]["met"]})
    print(_table(rows, ["target", "want", "measured", "met"]))
    return result


def run_scheduler(args, paths) -> Dict[str, Any]:
    from . import concurrency

    result = concurrency.scheduler_alone(paths["pytorch"], args.smoke)
    print(f"chat: {result['prompt_tokens']} prompt tokens, {result['max_tokens']} new tokens each, no server")
    print(_table(result["rows"], ["concurrency", "scheduler_tok_s", "direct_tok_s", "scheduler_over_direct"]))
    team = result["openmp_team"]
    print(f"direct steps at {team['batch']} rows: {team['alone_tok_s']:.2f} tok/s ({_num(team['alone_cores'])} cores); "
          f"while another thread keeps an OpenMP team {team['beside_team_tok_s']:.2f} tok/s "
          f"({_num(team['beside_team_cores'])} cores, {team['beside_over_alone']:.2f}x); "
          f"after it ended {team['after_thread_ended_tok_s']:.2f} tok/s")
    pad = result["padding"]
    print(f"direct steps at {pad['batch']} rows: aligned {pad['aligned_tok_s']:.2f} tok/s, left-padded as in a running "
          f"batch {pad['padded_tok_s']:.2f} tok/s ({pad['padded_over_aligned']:.2f}x)")
    pauses = result["prefill_pauses"]
    print(f"a vision request arriving while {pauses['batch']} chat rows decode:")
    print(_table([{"prefill pauses": name, **row} for name, row in pauses["settings"].items()],
                 ["prefill pauses", "step_s", "longest_gap_s", "ttft_s", "solo_ttft_s", "pauses"]))
    print("linear kernels: direct decode steps with F.linear, then with each linear's kernel chosen per row count:")
    print(_table(result["linear_kernels"], ["concurrency", "plain_tok_s", "chosen_tok_s", "chosen_over_plain",
                                            "transposed", "linears"]))
    return result


def run_multiturn(args, paths) -> Dict[str, Any]:
    from . import multiturn

    result = multiturn.run(paths["pytorch"], args.smoke)
    print(f"{result['turns']} turns about one {result['image']} image, {result['max_tokens']} new tokens a turn, "
          f"greedy; {result['mode']}")
    columns = ["turn", "prompt_tokens", "cold_ttft_s", "warm_ttft_s", "warm_over_cold", "cold_turn_s", "warm_turn_s",
               "answers_equal"]
    print(_table(result["rows"], columns))
    result["table"] = _table(result["rows"], columns)
    v = result["verdict"]
    later = "n/a" if v["later_turns_max_ratio"] is None else f"{v['later_turns_max_ratio']:.3f}"
    print(f"turns 2+: warm/cold TTFT at most {later} (target <= {result['target_ratio']}: "
          f"{'met' if v['target_met'] else 'not met'}); warm answers equal cold: {v['answers_equal']}")
    return result


def run_grammar(args) -> Dict[str, Any]:
    from . import grammar

    result = grammar.run(args.model, args.smoke, args.workdir, args.tokenizer)
    print(f"tokenizer {result['tokenizer']} ({result['tokenizer_tokens']} tokens, vocab {result['vocab_size']}); "
          f"setup {result['setup_ms']:.0f} ms; first mask in the process {result['first_mask_in_process_ms']:.0f} ms")
    print(_table(result["rows"], ["case", "compile_ms", "first_mask_ms", "mask_ms", "accept_ms", "per_token_ms",
                                  "per_token_p95_ms", "decode_ms", "ratio", "answers_parsed", "answers_failed"]))
    v = result["verdict"]
    print(f"mask + accept per token / decode step: at most {v['worst_ratio']:.4f} "
          f"(target <= {result['target_ratio']}: {'met' if v['target_met'] else 'not met'})")
    print(json.dumps({k: result[k] for k in ("setup_ms", "first_mask_in_process_ms", "rows", "verdict")}))
    return result


def plot(result: Dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    section = result["sections"]["concurrency"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=120)
    for (name, work), color in zip(section["workloads"].items(), ("tab:blue", "tab:orange")):
        rows = work["rows"]
        levels = [r["concurrency"] for r in rows]
        ax.plot(levels, [r["served_e2e_tok_s"] for r in rows], marker="o", color=color,
                label=f"{name}: served ({work['max_tokens']} tokens)")
        ax.plot(levels, [r["direct_e2e_tok_s"] for r in rows], linestyle="--", marker=".", color=color,
                label=f"{name}: direct (prefills + batched decode)")
    ax.set_xlabel("concurrent streaming requests")
    ax.set_ylabel("aggregate tokens/s, prefills included")
    ax.set_title(f"Ovis2 ({result['model']}, float32) on {result['machine']['device']}, "
                 f"{result['machine']['cpus']} cores", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xticks(section["levels"], [str(n) for n in section["levels"]])
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return True


def run_hostile(args, paths) -> Dict[str, Any]:
    from . import hostile

    result = hostile.run(paths["pytorch"], concurrent=2 if args.smoke else 8, repeats=1 if args.smoke else 3,
                         scale=0.01 if args.smoke else 1.0, max_tokens=8 if args.smoke else 256)
    shape = result["heavy_request"]
    print(f"{result['concurrent']} requests of {shape['images']} images of {shape['side']}x{shape['side']} at "
          f"max_partition {shape['max_partition']}, {shape['max_tokens']} tokens each; took "
          f"{_num(min(result['heavy_s'], default=None))}-{_num(max(result['heavy_s'], default=None))} s")
    loaded = result["loaded_s"]
    print(f"plain text request alone: {', '.join(_num(t) for t in result['alone_s'])} s; under that load "
          f"({len(loaded)} sent): median {_num(sorted(loaded)[len(loaded) // 2])} s, worst {_num(max(loaded))} s; "
          f"bound 2 x alone + 1 s = {_num(result['bound_s'])} s; met: {result['verdict']['met']}")
    return result


def run_dtype(args, paths) -> Dict[str, Any]:
    from . import dtype, serving

    result = dtype.run_direct(paths["pytorch"], args.smoke)
    print(f"CPU bf16 flags: {', '.join(result['cpu']['bf16_flags'] or ()) or 'none'}; auto: "
          f"{result['cpu']['auto']['describe']}")
    print(_table(result["image_ttft"], ["image", "max_partition", "prompt_tokens", "float32_s", "bfloat16_s",
                                        "speedup"]))
    print(_table(result["decode"], ["rows", "float32_tok_s", "bfloat16_tok_s", "speedup"]))
    loads = result["load"]
    print(f"load: resident after load {loads['float32']['resident_after_load_bytes'] / 2**30:.2f} GiB float32, "
          f"{loads['bfloat16']['resident_after_load_bytes'] / 2**30:.2f} GiB bfloat16 "
          f"({_num(loads.get('resident_ratio'))}x); load {_num(loads['float32']['load_s'])} s / "
          f"{_num(loads['bfloat16']['load_s'])} s")
    tokens, runs = (4, 1) if args.smoke else (args.max_tokens, 3)
    # Reuse off: each run's TTFT is then a whole image prefill, not a cache hit.
    result["served"] = {name: serving.served(paths["pytorch"], tokens, runs, torch_dtype=name,
                                             extra_launch=("--reuse_cache_mib", "0"))
                        for name in ("float32", "bfloat16")}
    print(_table([{"dtype": name, "ttft_s": row["ttft_s"], "decode_tok_s": row["decode_tok_s"]}
                  for name, row in result["served"].items()], ["dtype", "ttft_s", "decode_tok_s"]))
    print(f"verdict: {result['verdict']}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"any of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--model", default="tiny", help="tiny, or a real size to build randomly (1b, 2b)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, fewest repetitions (CI)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ovis2-xinf-bench"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="concurrency section: where the served model and the direct baseline run")
    parser.add_argument("--plot", type=Path, help="write the throughput-vs-concurrency PNG here (concurrency section)")
    parser.add_argument("--tokenizer", type=Path, help="grammar section: a tokenizer directory (default: the tiny "
                        "one; for 1b/2b a Qwen2.5-sized BPE trained once under --workdir)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = "tiny"
    sections = args.sections or list(SECTIONS)
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")

    result: Dict[str, Any] = {
        "model": args.model, "smoke": args.smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
                    "torch": torch.__version__},
        "sections": {},
    }
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = (_checkpoints(args.model, args.workdir, gptq="memory" in sections)
             if {"memory", "serving", "concurrency", "scheduler", "multiturn", "hostile", "dtype"} & set(sections)
             else {})
    for section in sections:
        print(f"\n== {section}", flush=True)
        if section == "preprocess":
            result["sections"][section] = run_preprocess(args)
        elif section == "detokenize":
            result["sections"][section] = run_detokenize(args)
        elif section == "memory":
            result["sections"][section] = run_memory(args, paths)
        elif section == "multiturn":
            result["sections"][section] = run_multiturn(args, paths)
        elif section == "grammar":
            result["sections"][section] = run_grammar(args)
        elif section == "concurrency":
            result["sections"][section] = run_concurrency(args, paths)
        elif section == "scheduler":
            result["sections"][section] = run_scheduler(args, paths)
        elif section == "hostile":
            result["sections"][section] = run_hostile(args, paths)
        elif section == "dtype":
            result["sections"][section] = run_dtype(args, paths)
        else:
            result["sections"][section] = run_serving(args, paths, args.workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nresults: {args.out}")
    if args.plot and "concurrency" in result["sections"]:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
