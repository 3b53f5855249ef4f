"""INT4 vs BF16 GRACE exports served by vLLM: generation throughput and GPU memory (CUDA only).

Run through ``benchmarks/gpu_grace_vllm.sh``, which checks for CUDA and vLLM first. Three
subcommands, so that the genrecal side and the vLLM side may live in different interpreters
(vLLM pins its own transformers / compressed-tensors):

* ``prepare WORK``  (genrecal): build a tiny Qwen2-VL student with the kit (hidden 1024, 8
  layers, 16 heads by default: large enough that its weights show in GPU memory), run a QAT
  finetune of a few steps on synthetic VQA (``quantize: {bits: 4, group_size: 128}``), export
  the QAT student with ``export_checkpoint`` as ``int4`` (compressed-tensors pack-quantized,
  W4A16) and as ``bf16``; writes ``WORK/prepare.json`` (paths, safetensors bytes).
* ``serve DIR --label L --out JSON``  (vLLM only, no genrecal import): load DIR with
  ``vllm.LLM`` (text-only: ``limit_mm_per_prompt`` 0 for images and videos), warm up, then time greedy
  generation of a fixed number of tokens (``ignore_eos``) for a batch of prompts and for one
  prompt alone; GPU memory: the device's used memory (``torch.cuda.mem_get_info``, every
  process) above the serving process's own CUDA context after loading and after generating,
  and vLLM's own "Model loading took X GiB" figure (parsed from its log by ``report``). The
  KV cache is fixed (``kv_cache_memory_bytes``, where this vLLM has it) so that both exports
  reserve the same; otherwise ``gpu_memory_utilization`` bounds it.
* ``report WORK``: the table, from ``prepare.json`` and the ``serve-*.json`` / ``.log`` files.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

FORMATS = ("bf16", "int4")


# ----------------------------------------------------------------------------- prepare (genrecal)


def prepare(args) -> None:
    import torch

    from genrecal.common.config import Pipeline
    from genrecal.train.export import export_checkpoint
    from genrecal.train.loop import LoopOptions, run_stages

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_grace import safetensors_bytes

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = {"kind": "qwen2_vl", "hidden_size": args.hidden, "num_layers": args.layers,
            "num_heads": args.heads, "num_kv_heads": args.kv_heads}
    pipe = Pipeline.from_dict({
        "name": "gpu-grace-vllm",
        "teacher": {"tiny": {**tiny, "path": str(work / "teacher")}, "dtype": "float32", "device": device},
        "student": {"tiny": {**tiny, "seed": 1, "path": str(work / "student")}, "dtype": "float32",
                    "device": device},
        "data": {"synthetic": {"n_train": 16, "n_test": 0, "image_size": 32}},
        "cache": {"location": str(work / "cache"), "max_length": 512},
        "stages": [{"name": "finetune", "steps": args.steps, "batch_size": 4,
                    "precision": "bf16" if device == "cuda" else "fp32", "lr_start": 1e-4, "lr_end": 1e-5,
                    "quantize": {"bits": 4, "group_size": args.group_size}}],
        "evaluation": None, "output": str(work / "out")})
    started = time.perf_counter()
    (result,) = run_stages(pipe, options=LoopOptions(save_every=None, num_workers=0, progress=False))
    train_s = time.perf_counter() - started
    out = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "group_size": args.group_size,
           "qat_steps": result.step, "train_s": train_s, "train_device": device, "exports": {}}
    for fmt in FORMATS:
        report = export_checkpoint(result.out_dir / "student", work / fmt, fmt)
        tensors = safetensors_bytes(report.path)
        out["exports"][fmt] = {"path": str(report.path), "tensor_bytes": sum(b for _, _, b in tensors.values()),
                               "linears": report.quantized}
    (work / "prepare.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"prepared: {result.step} QAT steps on {device} in {train_s:.1f} s; exports "
          + ", ".join(f"{f} {e['tensor_bytes'] / 2 ** 20:.1f} MiB" for f, e in out["exports"].items()))


# ----------------------------------------------------------------------------- serve (vLLM only)


def _used_mib(torch) -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2 ** 20


def serve(args) -> None:
    import dataclasses

    import torch
    from vllm import LLM, SamplingParams

    try:
        from vllm.engine.arg_utils import EngineArgs
        fields = {f.name for f in dataclasses.fields(EngineArgs)}
    except (ImportError, TypeError):
        fields = set()

    torch.cuda.init()
    torch.zeros(1, device="cuda")  # this process's CUDA context, before the baseline
    base = _used_mib(torch)
    kwargs = dict(model=args.model, dtype="bfloat16", max_model_len=args.max_model_len, seed=0,
                  enforce_eager=not args.compile, limit_mm_per_prompt={"image": 0, "video": 0})
    if "kv_cache_memory_bytes" in fields:
        kwargs["kv_cache_memory_bytes"] = args.kv_cache_mib * 2 ** 20
    else:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    started = time.perf_counter()
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - started
    loaded = _used_mib(torch)
    prompts = [f"Question {i}: what colour is the shape in the picture, and where is it?"
               for i in range(args.prompts)]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)

    def timed(batch):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outputs = llm.generate(batch, greedy, use_tqdm=False)
        seconds = time.perf_counter() - t0
        return sum(len(o.outputs[0].token_ids) for o in outputs), seconds

    tokens, seconds = timed(prompts)
    single_tokens, single_s = timed(prompts[:1])
    result = {"label": args.label, "model": args.model, "load_s": load_s,
              "batch": len(prompts), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
              "single_tok_s": single_tokens / single_s, "used_after_load_mib": loaded - base,
              "used_after_generate_mib": _used_mib(torch) - base,
              "kv_cache": (f"{args.kv_cache_mib} MiB" if "kv_cache_memory_bytes" in kwargs
                           else f"gpu_memory_utilization {args.gpu_memory_utilization}"),
              "sample": outputs_text(llm, prompts[0])}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def outputs_text(llm, prompt: str) -> str:
    from vllm import SamplingParams

    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    return out[0].outputs[0].text


# ----------------------------------------------------------------------------- report


_LOADING = re.compile(r"Model loading took ([0-9.]+) ?GiB")


def report(args) -> int:
    work = Path(args.work)
    prep = json.loads((work / "prepare.json").read_text())
    lines = [f"tiny qwen2_vl student: hidden {prep['hidden']}, {prep['layers']} layers, {prep['heads']} heads; "
             f"{prep['qat_steps']} QAT steps (int4, group {prep['group_size']}) on {prep['train_device']}",
             f"{'export':<7}{'weights MiB':>13}{'vLLM weights':>14}{'GPU used MiB':>14}{'after gen':>11}"
             f"{'batch tok/s':>13}{'1-stream tok/s':>16}{'load s':>8}",
             f"{'':<7}{'(safetensors)':>13}{'MiB (log)':>14}{'after load':>14}{'MiB':>11}"]
    failed = 0
    for fmt in FORMATS:
        size = prep["exports"][fmt]["tensor_bytes"] / 2 ** 20
        served, log = work / f"serve-{fmt}.json", work / f"serve-{fmt}.log"
        if not served.is_file():
            failed += 1
            lines.append(f"{fmt:<7}{size:>13.1f}  vLLM failed: see {log}")
            continue
        r = json.loads(served.read_text())
        found = _LOADING.findall(log.read_text(errors="replace")) if log.is_file() else []
        weights = f"{float(found[-1]) * 1024:.1f}" if found else "n/a"
        lines.append(f"{fmt:<7}{size:>13.1f}{weights:>14}{r['used_after_load_mib']:>14.0f}"
                     f"{r['used_after_generate_mib']:>11.0f}{r['tok_s']:>13.0f}{r['single_tok_s']:>16.0f}"
                     f"{r['load_s']:>8.1f}")
    rows = {fmt: json.loads((work / f"serve-{fmt}.json").read_text())
            for fmt in FORMATS if (work / f"serve-{fmt}.json").is_file()}
    if len(rows) == 2:
        r4, r16 = rows["int4"], rows["bf16"]
        lines.append(f"int4 / bf16: batch tok/s {r4['tok_s'] / r16['tok_s']:.2f}x, 1-stream "
                     f"{r4['single_tok_s'] / r16['single_tok_s']:.2f}x, GPU used after load "
                     f"{r4['used_after_load_mib'] / r16['used_after_load_mib']:.2f}x, weights "
                     f"{prep['exports']['int4']['tensor_bytes'] / prep['exports']['bf16']['tensor_bytes']:.2f}x")
        r = rows["bf16"]
        lines.append(f"({r['batch']} prompts x {r['tokens'] // r['batch']} generated tokens, greedy, ignore_eos; "
                     f"KV cache {r['kv_cache']}; GPU used = device memory above the serving process's CUDA "
                     "context, every process)")
    text = "\n".join(lines)
    print(text)
    (work / "table.txt").write_text(text + "\n")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build, QAT-train and export the student (genrecal)")
    p.add_argument("work")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    s = sub.add_parser("serve", help="serve one export with vLLM and time generation")
    s.add_argument("model")
    s.add_argument("--label", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--prompts", type=int, default=64)
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--max-model-len", type=int, default=1024)
    s.add_argument("--kv-cache-mib", type=int, default=2048)
    s.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    s.add_argument("--compile", action="store_true", help="let vLLM compile and capture CUDA graphs (slower start)")
    r = sub.add_parser("report", help="print the table")
    r.add_argument("work")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args)
    elif args.command == "serve":
        serve(args)
    else:
        return report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
