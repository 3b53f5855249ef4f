"""GRACE's deployment costs and its cache approximation, measured side by side in one run.

1. **QAT step cost.** One finetune stage (CE_s, every student part but the vision tower) of a
   tiny Qwen2-VL student (hidden 256, 4 layers by default) on synthetic VQA, with identical
   settings and data order, trained three times, each in a subprocess of its own so that each
   memory peak is its own: without QAT, with ``quantize: {bits: 4, group_size: 64}`` and with
   ``{bits: 8, group_size: 64}`` (docs/method.md §2.3). Reported over the steps after the first:
   median step time (and the same without the loader wait), the RSS high-water mark of the
   training process (VmHWM) and that mark above the RSS of the libraries every mode imports;
   ``torch.cuda.max_memory_allocated`` on CUDA. Ratios are QAT / no QAT.
2. **Export size.** The int4 QAT student exported with ``export_checkpoint`` as ``int4``
   (compressed-tensors pack-quantized) and as ``bf16``; the int8 QAT student as ``int8``.
   Bytes are the sums of the safetensors tensors' byte sizes (read from the file headers, by
   tensor name): for the quantised decoder linears alone (int4/int8: ``weight_packed`` +
   ``weight_scale`` + ``weight_shape``; bf16: the same linears' ``weight``; their biases are
   bf16 in every format and count in the total only), and for all tensors. Ratios are against
   bf16.
3. **NCKD of the top-k cache route against the exact route** (docs/method.md §2.4), through
   ``nckd_topk_error`` for k = 16 / 64 / 256, on a teacher/student pair of heads over a
   realistic vocabulary (V = 32768, d = 256, both heads with a Zipf unigram bias). The teacher
   states are SYNTHETIC, not from a model forward (a random-weight model's logits are nearly
   uniform, nothing like a trained LM's): per row a background ``N(0, 2.5^2)`` logit for every
   token plus a few (1 + geometric, mean 4) candidate tokens raised by up to ~16 (lognormal
   row scale), which gives a trained-LM-like mean entropy of about 2.5 nats at T = 1 (top-1
   0.59), most of the T = 2 mass outside the top 256. Labels are drawn from the teacher (T = 1). Two students:
   *peaks*: the teacher's candidates re-weighted (lognormal jitter 0.25) over a background
   that is the teacher's plus noise 0.25 (the student disagrees on the plausible tokens);
   *isotropic*: ``0.9 z + N(0, 1)`` through a perturbed head (the student disagrees
   everywhere, the tail included). The top-k route never overestimates (log-sum inequality);
   its error is what the tail bucket hides.

    python benchmarks/bench_grace.py [--samples 32] [--steps 16] [--batch-size 2] [--hidden 256]
                                     [--layers 4] [--group-size 64] [--vocab 32768] [--dim 256]
                                     [--rows 512] [--temperature 2.0] [--threads 1]
                                     [--device cpu|cuda] [--smoke] [--json [PATH]]

``--smoke`` runs the same code paths (three subprocesses, three exports, both students) at
the smallest sizes, for CI; ``--json`` prints the results as JSON after the table, ``--json
PATH`` writes them to PATH instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchcli
import torch

MODES = ("none", "int4", "int8")
LABELS = {"none": "no QAT", "int4": "QAT int4", "int8": "QAT int8"}
EXPORTS = ("bf16", "int8", "int4")
NCKD_KS = (16, 64, 256)
STUDENTS = ("peaks", "isotropic")
_PACKED = ("weight_packed", "weight_scale", "weight_shape")


# ----------------------------------------------------------------------------- 1. QAT step cost


def pipeline(root: Path, args, mode: str):
    """The finetune pipeline of ``mode`` (quantize none / 4 / 8 bits); identical otherwise."""
    from genrecal.common.config import Pipeline

    tiny = {"kind": "qwen2_vl", "hidden_size": args.hidden, "num_layers": args.layers}
    quantize = None if mode == "none" else {"bits": int(mode[3:]), "group_size": args.group_size}
    return Pipeline.from_dict({
        "name": "bench-grace",
        # finetune reads no teacher: this one is never built
        "teacher": {"tiny": {**tiny, "path": str(root / "teacher")}, "dtype": "float32", "device": args.device},
        "student": {"tiny": {**tiny, "seed": 1, "path": str(root / "student")}, "dtype": "float32",
                    "device": args.device},
        "data": {"synthetic": {"n_train": args.samples, "n_test": 0, "image_size": 32}},
        "cache": {"location": str(root / "cache"), "max_length": 512},
        "stages": [{"name": "finetune", "steps": args.steps + 1, "batch_size": args.batch_size,
                    "precision": "bf16" if args.device == "cuda" else "fp32", "warmup": 0,
                    "lr_start": 1e-4, "lr_end": 1e-5, "quantize": quantize}],
        "evaluation": None, "output": str(root / "out")})


def prepare(root: Path, args) -> dict:
    """Build the student and the synthetic data once (every mode reads them)."""
    from genrecal.common.distributed import RankInfo
    from genrecal.model.loading import load_vlm
    from genrecal.train.loop import prepare_inputs

    prepare_inputs(pipeline(root, args, "none"), RankInfo(), ("student",))
    model = load_vlm(root / "student").model
    decoder = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and "visual" not in n)
    return {"student_params": sum(p.numel() for p in model.parameters()), "decoder_params": decoder}


def _proc_status_mib(key: str) -> float | None:
    """A memory line of /proc/self/status in MiB (None off Linux)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    line = next(x for x in status.read_text().splitlines() if x.startswith(f"{key}:"))
    return int(line.split()[1]) / 1024


def _libraries_rss_mib() -> float:
    """RSS (MiB) once every library any mode uses is imported: the base all peaks share."""
    import genrecal.train.loop  # noqa: F401
    import genrecal.train.quant  # noqa: F401
    import transformers.models.qwen2_vl.modeling_qwen2_vl  # noqa: F401

    return _proc_status_mib("VmRSS") or 0.0


def _peak_rss_mib() -> float:
    """This process's RSS high-water mark (VmHWM: this process image alone; see bench_train)."""
    hwm = _proc_status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_mode(root: Path, mode: str, args) -> dict:
    """Train the finetune stage in ``mode``; timings of the steps after the first, memory peaks."""
    base_mib = _libraries_rss_mib()
    from genrecal.common.distributed import RankInfo
    from genrecal.train.loop import LoopOptions, build_stage_job, train_stage
    from genrecal.train.quant import qat_modules

    options = LoopOptions(save_every=None, num_workers=args.workers, progress=False)
    started = time.perf_counter()
    job = build_stage_job(pipeline(root, args, mode), "finetune", RankInfo(), options)
    setup_s = time.perf_counter() - started  # loading, and the scales' MSE init under QAT
    job = dataclasses.replace(job, out_dir=root / f"run-{mode}")
    try:
        result = train_stage(job, options)
    finally:
        job.loader.close()
    steps = result.records[1:]
    peak = _peak_rss_mib()
    out = {"mode": mode, "steps": len(steps), "setup_s": setup_s,
           "step_ms": 1e3 * statistics.median(r["step_time_s"] for r in steps),
           "compute_ms": 1e3 * statistics.median(r["step_time_s"] - r["data_wait_s"] for r in steps),
           "quantized_linears": len(qat_modules(job.model.student)),
           "rss_mib": peak, "own_mib": peak - base_mib, "student": str(result.out_dir / "student")}
    if args.device == "cuda":
        out["cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def _child_command(root: Path, mode: str, argv: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *argv, "--child", mode, "--root", str(root)]


# ----------------------------------------------------------------------------- 2. export size


def safetensors_bytes(directory: Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype, shape, bytes) of every tensor of the directory's safetensors files, read
    from their headers (8-byte little-endian length, then the JSON header)."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, meta in header.items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                out[name] = (meta["dtype"], meta["shape"], end - start)
    return out


def export_sizes(students: dict[str, str], root: Path) -> dict:
    """Export the int4 student as int4 and bf16, the int8 one as int8; bytes per format."""
    from genrecal.train.export import export_checkpoint

    sources = {"bf16": students["int4"], "int4": students["int4"], "int8": students["int8"]}
    tensors, seconds = {}, {}
    for fmt in EXPORTS:
        started = time.perf_counter()
        report = export_checkpoint(sources[fmt], root / f"export-{fmt}", fmt)
        seconds[fmt] = time.perf_counter() - started
        tensors[fmt] = safetensors_bytes(report.path)
    # the quantised linears: the modules holding packed tensors in the int4 export
    linears = sorted({k.rsplit(".", 1)[0] for k in tensors["int4"] if k.endswith(".weight_packed")})
    missing = [m for m in linears if f"{m}.weight" not in tensors["bf16"]]
    if not linears or missing:
        raise SystemExit(f"bench_grace: the bf16 export lacks the weights of the packed linears "
                         f"{missing[:3]} (key names differ between the exports)")
    n_weights = sum(math.prod(tensors["bf16"][f"{m}.weight"][1]) for m in linears)
    out = {"linears": len(linears), "linear_weights": n_weights}
    for fmt in EXPORTS:
        t = tensors[fmt]
        leaves = ("weight",) if fmt == "bf16" else _PACKED
        linear = sum(t[f"{m}.{leaf}"][2] for m in linears for leaf in leaves)
        out[fmt] = {"linear_bytes": linear, "total_bytes": sum(v[2] for v in t.values()),
                    "bits_per_weight": 8 * linear / n_weights, "export_s": seconds[fmt]}
    for fmt in EXPORTS:
        out[fmt]["linear_ratio"] = out[fmt]["linear_bytes"] / out["bf16"]["linear_bytes"]
        out[fmt]["total_ratio"] = out[fmt]["total_bytes"] / out["bf16"]["total_bytes"]
    return out


# ----------------------------------------------------------------------------- 3. NCKD top-k error


def synthetic_heads(args, seed: int = 0):
    """Teacher/students of section 3 of the module docstring: (z_teacher, teacher head,
    {student: (z_student, student head)}, labels, teacher statistics)."""
    from genrecal.store.logit_transform import LogitTransform
    from genrecal.train.losses import LmHead

    g = torch.Generator().manual_seed(seed)
    v, d, n = args.vocab, args.dim, args.rows
    weight = torch.randn(v, d, generator=g) / math.sqrt(d)           # rows of norm ~1
    bias = -torch.log1p(torch.randperm(v, generator=g).float())      # Zipf unigram prior
    background = 2.5 * torch.randn(n, d, generator=g)                # N(0, 2.5^2) logit per token
    z_t, z_peaks = background.clone(), background + 0.25 * torch.randn(n, d, generator=g)
    height = torch.exp(math.log(args.peak) + 0.3 * torch.randn(n, generator=g))
    # 1 + Geometric(p = 0.25) candidates per row (mean 4), drawn from g: reproducible
    count = 1 + torch.floor(torch.log(torch.rand(n, generator=g)) / math.log(0.75)).long()
    for i in range(n):  # a few candidate tokens raised: z += sum_j w_j W[c_j] gives logit c_j ~ +w_j
        k = int(count[i])
        ids = torch.randint(0, v, (k,), generator=g)
        w = height[i] * torch.rand(k, generator=g).sort(descending=True).values
        w[0] = height[i]
        z_t[i] += (w[:, None] * weight[ids]).sum(0)
        z_peaks[i] += ((w * torch.exp(0.25 * torch.randn(k, generator=g)))[:, None] * weight[ids]).sum(0)
    transform = LogitTransform(has_bias=True)
    teacher = LmHead(weight, bias, transform)
    z_iso = 0.9 * z_t + torch.randn(n, d, generator=g)
    iso_head = LmHead(weight + 0.3 * torch.randn(v, d, generator=g) / math.sqrt(d), bias.clone(), transform)
    students = {"peaks": (z_peaks, LmHead(weight, bias.clone(), transform)), "isotropic": (z_iso, iso_head)}
    stats = {"entropy": 0.0, "top1": 0.0, **{f"mass_top{k}": 0.0 for k in NCKD_KS}}
    labels = torch.empty(n, dtype=torch.long)
    for rows in torch.arange(n).split(64):  # [64, V] logits at a time
        logits = z_t[rows] @ weight.T + bias
        p = logits.softmax(-1)
        labels[rows] = torch.multinomial(p, 1, generator=g).squeeze(1)
        stats["entropy"] += float(-(p * p.clamp_min(1e-30).log()).sum())
        stats["top1"] += float(p.max(-1).values.sum())
        top = (logits / args.temperature).softmax(-1).sort(-1, descending=True).values
        for k in NCKD_KS:
            stats[f"mass_top{k}"] += float(top[:, :min(k, v)].sum())
    return z_t, teacher, students, labels, {key: value / n for key, value in stats.items()}


def nckd_errors(args) -> dict:
    from genrecal.train.grace_losses import nckd_topk_error

    started = time.perf_counter()
    z_t, teacher, students, labels, stats = synthetic_heads(args)
    out = {"teacher": stats}
    for name in STUDENTS:
        z_s, head = students[name]
        errors = nckd_topk_error(z_t, teacher, z_s, head, labels, ks=NCKD_KS, temperature=args.temperature)
        out[name] = {str(k): {**dataclasses.asdict(e), "rel": e.mean_abs / e.mean_exact if e.mean_exact else 0.0}
                     for k, e in errors.items()}
    out["seconds"] = time.perf_counter() - started
    return out


# ----------------------------------------------------------------------------- report


def format_table(setup: dict, rows: dict[str, dict], sizes: dict, nckd: dict, args) -> str:
    cuda = "cuda_mib" in rows["none"]
    lines = [f"1. QAT step cost: finetune of a tiny qwen2_vl student (hidden {args.hidden}, {args.layers} layers, "
             f"{setup['student_params'] / 1e6:.2f}M params, {setup['decoder_params'] / 1e6:.2f}M in the decoder "
             f"blocks; {rows['int4']['quantized_linears']} linears quantised, group {args.group_size})",
             f"   {args.samples} samples, batch {args.batch_size}, {rows['none']['steps']} timed steps, "
             f"{args.workers} loader worker(s), {args.device}, {args.threads} thread(s)",
             f"{'mode':<10}{'step ms':>9}{'no-wait ms':>12}{'setup s':>9}{'peak RSS MiB':>14}"
             f"{'above libs MiB':>16}" + (f"{'CUDA peak MiB':>15}" if cuda else "")]
    for mode in MODES:
        r = rows[mode]
        lines.append(f"{LABELS[mode]:<10}{r['step_ms']:>9.1f}{r['compute_ms']:>12.1f}{r['setup_s']:>9.2f}"
                     f"{r['rss_mib']:>14.0f}{r['own_mib']:>16.0f}" + (f"{r['cuda_mib']:>15.0f}" if cuda else ""))
    for mode in ("int4", "int8"):
        ratios = [f"{label} {rows[mode][key] / rows['none'][key]:.2f}x"
                  for key, label in (("step_ms", "step"), ("compute_ms", "no-wait"), ("rss_mib", "peak RSS"),
                                     ("own_mib", "above libs"), ("cuda_mib", "CUDA peak"))
                  if key in rows["none"] and rows["none"][key] > 0]
        lines.append(f"{LABELS[mode]} / no QAT: " + ", ".join(ratios))
    lines += ["", f"2. Export size ({sizes['linears']} quantised linears, {sizes['linear_weights'] / 1e6:.2f}M weights;"
              " safetensors tensor bytes)",
              f"{'format':<8}{'linears B':>12}{'vs bf16':>9}{'bits/weight':>13}{'total B':>12}{'vs bf16':>9}"]
    for fmt in EXPORTS:
        s = sizes[fmt]
        lines.append(f"{fmt:<8}{s['linear_bytes']:>12,}{s['linear_ratio']:>9.3f}{s['bits_per_weight']:>13.2f}"
                     f"{s['total_bytes']:>12,}{s['total_ratio']:>9.3f}")
    t = nckd["teacher"]
    lines += ["", f"3. NCKD top-k vs exact: V {args.vocab}, d {args.dim}, {args.rows} rows, T {args.temperature:g}; "
              f"synthetic peaked teacher (mean entropy {t['entropy']:.2f} nats, top-1 {t['top1']:.2f} at T=1)",
              f"{'student':<11}{'k':>5}{'teacher mass':>14}{'mean |err|':>12}{'max |err|':>11}{'mean exact':>12}"
              f"{'mean top-k':>12}{'rel err':>9}",
              f"{'':<11}{'':>5}{'in top-k (T)':>14}"]
    for name in STUDENTS:
        for k in NCKD_KS:
            e = nckd[name][str(k)]
            lines.append(f"{name:<11}{k:>5}{t[f'mass_top{k}']:>14.3f}{e['mean_abs']:>12.4f}{e['max_abs']:>11.4f}"
                         f"{e['mean_exact']:>12.4f}{e['mean_topk']:>12.4f}{e['rel']:>9.1%}")
    return "\n".join(lines)


def measure(args, argv: list[str]) -> tuple[dict, dict, dict]:
    with tempfile.TemporaryDirectory(prefix="genrecal-bench-grace-") as tmp:
        root = Path(tmp)
        setup = prepare(root, args)
        rows = {}
        for mode in MODES:
            done = subprocess.run(_child_command(root, mode, argv), capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"bench_grace: the {mode} run failed:\n{done.stderr[-4000:]}")
            rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        sizes = export_sizes({m: rows[m].pop("student") for m in MODES}, root)
        return setup, rows, sizes


# --smoke: the same code paths at the smallest sizes
SMOKE = {"samples": 4, "steps": 2, "batch_size": 2, "hidden": 64, "layers": 2, "vocab": 1024, "dim": 32,
         "rows": 32}


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32, help="synthetic samples (default 32)")
    parser.add_argument("--steps", type=int, default=16, help="timed optimizer steps (default 16; +1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=2, help="samples per step (default 2)")
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes (default 0)")
    parser.add_argument("--hidden", type=int, default=256, help="student hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="student decoder layers (default 4)")
    parser.add_argument("--group-size", type=int, default=64, help="QAT group size (default 64)")
    parser.add_argument("--vocab", type=int, default=32768, help="NCKD: vocabulary (default 32768)")
    parser.add_argument("--dim", type=int, default=256, help="NCKD: head width (default 256)")
    parser.add_argument("--rows", type=int, default=512, help="NCKD: supervised positions (default 512)")
    parser.add_argument("--peak", type=float, default=16.0, help="NCKD: teacher peak height (default 16)")
    parser.add_argument("--temperature", type=float, default=2.0, help="NCKD: gdkd temperature (default 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    benchcli.add_smoke_and_json(parser, SMOKE)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    return benchcli.parse(parser, SMOKE, argv)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the model loads and saves would interleave their bars
    if args.child:
        print(json.dumps(run_mode(args.root, args.child, args)))
        return {}
    started = time.perf_counter()
    setup, rows, sizes = measure(args, argv)
    nckd = nckd_errors(args)
    print(format_table(setup, rows, sizes, nckd, args))
    print(f"(total {time.perf_counter() - started:.0f} s, NCKD {nckd['seconds']:.1f} s)")
    result = {"setup": setup, **rows, "export": sizes, "nckd": nckd, "threads": args.threads,
              "device": args.device}
    benchcli.write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
