"""Overhead of the teacher pass over a bare teacher forward on the same batches.

In one run, on the same tiny teacher (the kit's Qwen2-VL, hidden 256 by default) and the same
synthetic VQA samples:

* **bare forward**: the samples are encoded and planned into exactly the batches extraction
  uses (same windows, same length bucketing), then only ``model(**batch)`` runs over them
  (last-position logits, as a plain forward would need at least), under inference_mode;
* **forward + features + writes**: the extraction's inner loop over the same pre-encoded
  batches (teacher forward with hidden states, features, background cache writes), to
  separate the cost of the features and the writes from that of the encoding;
* **extraction**: ``genrecal extract`` in process (:func:`run_extract`) with the demo pipeline's
  features: z over the answer windows, z over the questions (fp8), visual Grams, logit
  statistics (top-16); its loop time covers encoding (prefetch thread), the forward, the
  features and the cache writes until the last shard is on disk.

Reported: both times, the overhead ratio (extraction loop / bare forward; goal <= 1.05),
end-to-end time (loading, fingerprint, artifacts, commit included), the time the encoding alone
takes, and the share of the loop during which the forward waited on the background writer.
Repeats alternate bare and extraction runs; the median is reported.

``--backend vllm`` (issue 13) adds, on the same samples and batches in the same run, the teacher
through vLLM (its own environment, ``make venv-vllm``; a text teacher, ``qwen2_text``, on a CPU
machine, where vLLM runs no VLM): the engine's bare forward (``VllmEngine.hidden`` on the same
batches, states only; its first pass on a fresh engine, as an extraction meets it, and the warm
passes after it), and ``genrecal extract --backend vllm`` (loop: encoding, the engine's
forward, the same features and writes; end to end: engine start-up included). Tokens/s for each
row, and the overhead of the vLLM extraction loop over the vLLM bare forward and over the
transformers bare forward (the first pass of a fresh vLLM engine on CPU is several times
slower than its warm passes: the kernels warm up per batch shape).

    python benchmarks/bench_extract.py [--samples 96] [--batch-size 8] [--hidden 256] [--repeats 3]
                                       [--window 16] [--threads 1] [--encode-workers 0] [--device cpu|cuda]
                                       [--backend hf|vllm] [--kind KIND] [--vllm-python PATH]
                                       [--smoke] [--json [PATH]]

``--smoke`` runs the same code paths at the smallest sizes (seconds), for CI; ``--json`` prints
the results as JSON after the table, ``--json PATH`` writes them to PATH instead.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import benchcli
import torch

from genrecal.common.config import Pipeline
from genrecal.extract.background import BackgroundWriter
from genrecal.extract.inputs import ensure_synthetic, ensure_teacher, read_inputs, sample_windows
from genrecal.extract.job import feature_specs, job_from_pipeline
from genrecal.extract.pipeline import (BatchRunner, RunCounters, encode_window, run_extract,
                                       window_batches, write_item)
from genrecal.extract.teacher import (bare_forward, fingerprint, load_teacher, processor_files,
                                      to_device)
from genrecal.model.padding import pad_batch
from genrecal.store.writer import CacheWriter


def _pipeline(root: Path, args) -> Pipeline:
    """The bench's pipeline: a VLM teacher (the kit's ``args.kind``) on synthetic VQA, or a
    text teacher (head_dim 64, which vLLM's CPU attention needs) on the text set."""
    text = args.kind.endswith("_text")
    tiny = {"kind": args.kind, "hidden_size": args.hidden, "path": str(root / "teacher")}
    student = {"kind": "llava_qwen2", "path": str(root / "student")}
    features = {"answer_hidden": True, "question_hidden": "all", "visual_gram": True,
                "logit_stats": {"top_k": 16, "temperature": 2.0}}
    synthetic = {"n_train": args.samples, "n_test": 0, "image_size": 32}
    extra = {}
    if text:
        heads = max(1, args.hidden // 64)
        tiny.update(num_heads=heads, num_kv_heads=heads)
        student = {"kind": "llama_text", "num_heads": 1, "num_kv_heads": 1, "hidden_size": 64,
                   "path": str(root / "student")}
        features = {**features, "question_hidden": "text", "visual_gram": False}
        synthetic = {"n_train": args.samples, "n_test": 0, "modality": "text"}
        extra["teacher_engine"] = {"enforce_eager": True,
                                   **({"python": args.vllm_python} if args.vllm_python else {})}
    return Pipeline.from_dict({
        "name": "bench",
        "teacher": {"tiny": tiny, "dtype": args.dtype, "device": args.device},
        "student": {"tiny": student},
        "data": {"synthetic": synthetic},
        "cache": {"location": str(root / "cache"), "batch_size": args.batch_size, "max_length": 512,
                  "features": features, "codecs": {"question_hidden": "fp8_e4m3"},
                  "encode_workers": args.encode_workers},
        "stages": [{"name": "align", "steps": 1, "lr_start": 1e-3, "lr_end": 1e-4}],
        "evaluation": None, "output": str(root / "out"), **extra})


def _same_batches(teacher, job) -> tuple[list[list], int, float]:
    """The batches extraction runs (same windows and plan) as (sample, encoded) lists, their
    tokens, and the seconds the encoding took."""
    samples = read_inputs(job.settings, job.limit).samples
    t0 = time.perf_counter()
    encoded = [encode_window(teacher, w, job.settings.max_length)
               for w in sample_windows(samples, job.plan_window)]
    seconds = time.perf_counter() - t0
    batches = [batch for window in encoded for batch in window_batches(window.ok, job.batch_size)]
    tokens = sum(len(enc.input_ids) for window in encoded for _, enc in window.ok)
    return batches, tokens, seconds


def _sync(teacher) -> None:
    if teacher.device.type == "cuda":
        torch.cuda.synchronize(teacher.device)


def _time_bare(teacher, batches: list[list]) -> float:
    padded = [pad_batch([enc.inputs for _, enc in batch], teacher.pad_id, "right") for batch in batches]
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in padded:
            bare_forward(teacher, to_device(teacher, batch))
    _sync(teacher)
    return time.perf_counter() - t0


def _time_features_and_writes(teacher, job, batches: list[list], out: str) -> tuple[float, float]:
    """Seconds of the extraction's inner loop on pre-encoded batches; the writer wait share."""
    specs = feature_specs(job.features, job.codecs, hidden_size=teacher.hidden_size,
                          vocab_size=teacher.vocab_size)
    writer = CacheWriter(out, teacher=fingerprint(teacher, processor_files(teacher)),
                         features=specs, settings=job.settings.to_dict(), commit=False,
                         shard_tokens=job.shard_tokens, shard_bytes=job.shard_bytes)
    t0 = time.perf_counter()
    with writer, BackgroundWriter(partial(write_item, writer, "raise")) as background:
        runner = BatchRunner("raise", teacher, writer.header.features, background, set(),
                             RunCounters())
        for batch in batches:
            runner.run_batch(batch)
    _sync(teacher)
    return time.perf_counter() - t0, background.stats().wait_fraction


def measure(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="genrecal-bench-extract-") as tmp:
        job = job_from_pipeline(_pipeline(Path(tmp), args), window=args.window)
        job = job.with_overrides(progress=False)
        ensure_teacher(job)
        ensure_synthetic(job)
        teacher = load_teacher(job.settings.teacher, device=job.device)
        batches, tokens, encode_s = _same_batches(teacher, job)
        _time_bare(teacher, batches[:1])  # warm-up
        bare, inner, runs = [], [], []
        for r in range(args.repeats):
            bare.append(_time_bare(teacher, batches))
            inner.append(_time_features_and_writes(teacher, job, batches, f"{tmp}/inner-{r}")[0])
            runs.append(run_extract(replace(job, out=f"{tmp}/cache-{r}")))
        loop = statistics.median(run.loop_seconds for run in runs)
        vllm = _measure_vllm(job, batches, tmp, args.repeats) if args.backend == "vllm" else {}
        return {**vllm, "backend": args.backend, "kind": args.kind, "samples": runs[0].written, "batches": len(batches), "tokens": tokens,
                "hidden": teacher.hidden_size, "vocab": teacher.vocab_size,
                "device": str(teacher.device), "threads": torch.get_num_threads(),
                "encode_workers": args.encode_workers,
                "bare_s": statistics.median(bare), "inner_s": statistics.median(inner), "loop_s": loop,
                "end_to_end_s": statistics.median(run.seconds for run in runs),
                "encode_s": encode_s, "ratio": loop / statistics.median(bare),
                "writer_wait": statistics.median(run.writer.wait_fraction for run in runs),
                "writer_busy": statistics.median(run.writer.busy_fraction for run in runs)}


def _measure_vllm(job, batches: list[list], tmp: str, repeats: int) -> dict:
    """The same batches through vLLM: its bare forward and ``extract --backend vllm``."""
    from genrecal.extract.vllm_engine import VllmEngine, token_prompt

    job = job.with_backend("vllm")
    engine, source = job.engine, job.settings.teacher
    prompts = [[token_prompt(enc.input_ids) for _, enc in batch] for batch in batches]
    bare = []
    with VllmEngine(engine, model=source.location, mode="hidden", dtype=source.dtype,
                    max_model_len=job.settings.max_length, vlm=False) as vllm:
        # the first pass of a fresh engine is slower (vLLM's CPU kernels warm up per batch
        # shape) and is what an extraction meets: timed apart from the warm passes after it
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for batch in prompts:
                vllm.hidden(batch)
            bare.append(time.perf_counter() - t0)
        version, start = vllm.version, vllm.start_seconds
    runs = [run_extract(replace(job, out=f"{tmp}/vllm-cache-{r}"))
            for r in range(repeats)]
    return {"vllm": version, "vllm_start_s": start, "vllm_bare_cold_s": bare[0],
            "vllm_bare_s": statistics.median(bare[1:]),
            "vllm_loop_s": statistics.median(run.loop_seconds for run in runs),
            "vllm_end_to_end_s": statistics.median(run.seconds for run in runs)}


def format_table(r: dict) -> str:
    rows = [("bare teacher forward", r["bare_s"], "1.00"),
            ("forward+features+writes", r["inner_s"], f"{r['inner_s'] / r['bare_s']:.2f}"),
            ("extraction loop", r["loop_s"], f"{r['ratio']:.2f}"),
            ("extraction end to end", r["end_to_end_s"], f"{r['end_to_end_s'] / r['bare_s']:.2f}"),
            ("encoding alone", r["encode_s"], "")]
    if "vllm_bare_s" in r:
        rows += [("vllm bare, 1st pass", r["vllm_bare_cold_s"],
                  f"{r['vllm_bare_cold_s'] / r['bare_s']:.2f}"),
                 ("vllm bare, warm", r["vllm_bare_s"], f"{r['vllm_bare_s'] / r['bare_s']:.2f}"),
                 ("vllm extraction loop", r["vllm_loop_s"], f"{r['vllm_loop_s'] / r['bare_s']:.2f}"),
                 ("vllm extraction e2e", r["vllm_end_to_end_s"],
                  f"{r['vllm_end_to_end_s'] / r['bare_s']:.2f}")]
    lines = [f"tiny {r['kind']} teacher d={r['hidden']} V={r['vocab']}, {r['samples']} samples, "
             f"{r['batches']} batches, {r['tokens']} tokens, {r['device']}, {r['threads']} threads",
             f"{'':<24}{'seconds':>9}{'samples/s':>11}{'tokens/s':>10}{'x bare':>8}"]
    for name, seconds, ratio in rows:
        lines.append(f"{name:<24}{seconds:>9.2f}{r['samples'] / seconds:>11.1f}"
                     f"{r['tokens'] / seconds:>10.0f}{ratio:>8}")
    lines.append(f"overhead ratio (loop / bare): {r['ratio']:.3f} (goal <= 1.05); the forward "
                 f"waited on the writer {r['writer_wait']:.1%} of the loop, the writer was busy "
                 f"{r['writer_busy']:.1%}")
    if "vllm_bare_s" in r:
        lines.append(f"vllm {r['vllm']}: extraction loop (a fresh engine) / vllm bare 1st pass "
                     f"{r['vllm_loop_s'] / r['vllm_bare_cold_s']:.3f}, "
                     f"transformers loop / vllm loop {r['loop_s'] / r['vllm_loop_s']:.2f}, "
                     f"engine start {r['vllm_start_s']:.1f} s (in e2e)")
    return "\n".join(lines)


# --smoke: the same code paths (several windows and batches, bare / inner / extraction runs) at
# the smallest sizes
SMOKE = {"samples": 8, "batch_size": 2, "hidden": 64, "window": 4, "repeats": 1}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=96, help="synthetic samples (default 96)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--hidden", type=int, default=256, help="teacher hidden size (default 256)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--window", type=int, default=16,
                        help="samples per plan window (default 16: several windows, so that "
                             "encoding the next one overlaps the current one)")
    parser.add_argument("--encode-workers", type=int, default=0,
                        help="cache.encode_workers: processes encoding samples ahead of the forward "
                             "(default 0: a thread of the extraction process)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm"),
                        help="vllm: also run the same batches through vLLM (make venv-vllm)")
    parser.add_argument("--kind", default=None,
                        help="teacher kind of the kit (default qwen2_vl; qwen2_text with --backend "
                             "vllm: vLLM runs no VLM on a CPU)")
    parser.add_argument("--vllm-python", default=None,
                        help="interpreter of the vLLM environment (default: .venv-vllm)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: leaves a core to the encoding and "
                             "writer threads; on small shared machines more threads made the "
                             "tiny forward erratically 20x slower)")
    benchcli.add_smoke_and_json(parser, SMOKE)
    args = benchcli.parse(parser, SMOKE, argv)
    if args.kind is None:
        args.kind = "qwen2_text" if args.backend == "vllm" else "qwen2_vl"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    result = measure(args)
    print(format_table(result))
    benchcli.write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
