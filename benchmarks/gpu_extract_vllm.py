"""The teacher pass of a tiny Qwen2-VL teacher through transformers and through vLLM (CUDA).

Run through ``benchmarks/gpu_extract_vllm.sh``, which checks for CUDA and vLLM first. In one
process with genrecal installed (vLLM itself runs in its own interpreter, ``--vllm-python``, as
``genrecal extract --backend vllm`` always does):

1. builds a tiny Qwen2-VL teacher with the kit (hidden 256, 4 layers, head_dim 64 by default:
   GPU attention kernels want head_dim >= 32) and synthetic VQA data (images);
2. extracts the same samples with ``--backend hf`` (teacher on cuda) and ``--backend vllm``,
   with every feature: z over the answer windows and the questions, logit statistics, and the
   visual Grams (the penultimate-layer stream: the worker's pre-hook on the last block);
3. compares the caches sample by sample and feature by feature, and reports tokens/s of each
   extraction loop (engine start-up excluded; end to end beside it).

Pass/fail: input ids and spans identical (vLLM's processor expanded the images exactly as
genrecal's), hidden states within (10 L + 1) bf16 half-ulps of each row's largest |z|
(tests/test_vllm_backend.py derives the bound), Gram entries within 0.05 (entries of a Gram
of unit rows lie in [-1, 1]); the logit statistics are reported. Writes ``table.txt`` and
``result.json`` to the results folder; exit status 0 agree, 1 disagree or failed.

    python benchmarks/gpu_extract_vllm.py RESULTS --vllm-python PATH [--samples 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

BF16_HALF_ULP = 2.0 ** -9


def _pipeline(root: Path, args):
    from genrecal.common.config import Pipeline

    tiny = {"kind": "qwen2_vl", "hidden_size": args.hidden, "num_layers": args.layers,
            "num_heads": args.hidden // 64, "num_kv_heads": args.hidden // 64,
            "path": str(root / "teacher")}
    return Pipeline.from_dict({
        "name": "gpu-extract-vllm",
        "teacher": {"tiny": tiny, "dtype": "bfloat16", "device": "cuda"},
        "student": {"tiny": {"kind": "llava_qwen2", "path": str(root / "student")}},
        "data": {"synthetic": {"n_train": args.samples, "n_test": 0, "image_size": 32}},
        "cache": {"location": str(root / "cache"), "batch_size": args.batch_size,
                  "max_length": 512,
                  "features": {"answer_hidden": True, "question_hidden": "all",
                               "visual_gram": True, "logit_stats": {"top_k": 16, "temperature": 2.0}},
                  "codecs": {"answer_hidden": "bf16", "question_hidden": "bf16", "visual_gram": "bf16"}},
        "stages": [{"name": "align", "steps": 1, "lr_start": 1e-3, "lr_end": 1e-4}],
        "evaluation": None, "output": str(root / "out"),
        "teacher_engine": {"python": args.vllm_python, "gpu_memory_utilization": 0.3,
                           "enforce_eager": True}})


def _compare(hf_dir: str, vllm_dir: str, layers: int) -> dict:
    from genrecal.store.reader import CacheReader

    hf, vl = CacheReader(hf_dir), CacheReader(vllm_dir)
    out = {"samples": len(hf), "mismatched_records": [], "hidden_rel": 0.0, "gram_abs": 0.0,
           "topk_rows_differ": 0.0, "target_logit_abs": 0.0, "lse_abs": 0.0}
    rows = differ = 0
    for sid in hf.sample_ids():
        a, b = hf.get(sid, dtype=torch.float32), vl.get(sid, dtype=torch.float32)
        if not torch.equal(a.input_ids, b.input_ids) or a.spans != b.spans:
            out["mismatched_records"].append(sid)
            continue
        for name in ("answer_hidden", "question_hidden"):
            x, y = getattr(a, name), getattr(b, name)
            scale = float(x.abs().max()) or 1.0
            out["hidden_rel"] = max(out["hidden_rel"], float((x - y).abs().max()) / scale)
        for ga, gb in zip(a.visual_gram, b.visual_gram):
            out["gram_abs"] = max(out["gram_abs"], float((ga - gb).abs().max()))
        sa, sb = a.logit_stats, b.logit_stats
        out["target_logit_abs"] = max(out["target_logit_abs"],
                                      float((sa.target_logit - sb.target_logit).abs().max()))
        out["lse_abs"] = max(out["lse_abs"], float((sa.lse - sb.lse).abs().max()))
        sets = (sa.topk_ids.long().sort(dim=1).values != sb.topk_ids.long().sort(dim=1).values)
        rows, differ = rows + sa.n, differ + int(sets.any(dim=1).sum())
    out["topk_rows_differ"] = differ / rows if rows else 0.0
    out["hidden_bound"] = (10 * layers + 1) * BF16_HALF_ULP
    out["gram_bound"] = 0.05
    out["agree"] = (not out["mismatched_records"] and out["hidden_rel"] <= out["hidden_bound"]
                    and out["gram_abs"] <= out["gram_bound"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results")
    parser.add_argument("--vllm-python", required=True)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)

    from genrecal.extract.inputs import ensure_synthetic, ensure_teacher
    from genrecal.extract.job import job_from_pipeline
    from genrecal.extract.pipeline import run_extract

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-extract-vllm-") as tmp:
        job = job_from_pipeline(_pipeline(Path(tmp), args)).with_overrides(progress=False)
        ensure_teacher(job)
        ensure_synthetic(job)
        runs = {}
        for backend in ("hf", "vllm"):
            began = time.perf_counter()
            run = run_extract(replace(job.with_backend(backend), out=f"{tmp}/{backend}"))
            runs[backend] = {"samples": run.written, "tokens": run.tokens,
                             "loop_s": run.loop_seconds, "end_to_end_s": run.seconds,
                             "tokens_per_s": run.tokens / run.loop_seconds,
                             "wall_s": time.perf_counter() - began}
        comparison = _compare(f"{tmp}/hf", f"{tmp}/vllm", args.layers)
    lines = [f"tiny qwen2_vl teacher d={args.hidden} L={args.layers}, {args.samples} samples, "
             f"{torch.cuda.get_device_name(0)}",
             f"{'backend':<8}{'loop s':>9}{'tokens/s':>11}{'e2e s':>9}"]
    for name, r in runs.items():
        lines.append(f"{name:<8}{r['loop_s']:>9.2f}{r['tokens_per_s']:>11.0f}{r['end_to_end_s']:>9.2f}")
    lines.append(f"vllm / hf tokens/s: {runs['vllm']['tokens_per_s'] / runs['hf']['tokens_per_s']:.2f}")
    lines.append(f"hidden max rel dev {comparison['hidden_rel']:.4f} (bound "
                 f"{comparison['hidden_bound']:.4f}); Gram max abs dev {comparison['gram_abs']:.4f} "
                 f"(bound {comparison['gram_bound']}); target_logit max abs dev "
                 f"{comparison['target_logit_abs']:.4f}; lse {comparison['lse_abs']:.4f}; "
                 f"top-k sets differ in {comparison['topk_rows_differ']:.1%} of rows; "
                 f"records that differ: {comparison['mismatched_records'][:5]}")
    lines.append("AGREE" if comparison["agree"] else "DISAGREE")
    table = "\n".join(lines)
    print(table)
    (results / "table.txt").write_text(table + "\n")
    (results / "result.json").write_text(json.dumps({"runs": runs, "comparison": comparison},
                                                    indent=2) + "\n")
    return 0 if comparison["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
