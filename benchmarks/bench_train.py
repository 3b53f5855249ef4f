"""Cache-fed vs online training: step time, data wait and peak memory, in one run.

On the same tiny kit models (teacher qwen2_vl with hidden 512 and 4 layers by default, student
llava_qwen2 at the kit's size: the teacher has >= 10x the student's parameters) and the same
synthetic VQA samples, the parent process builds both models and the data, extracts the
teacher cache with ``genrecal.extract`` (features: z over the answer windows and over the
questions, bf16), then trains the distill stage (Recalibrator + student body, L_ar + L_kl +
L_reg) once per mode, each in a subprocess of its own so that each mode's memory peak is its
own:

* **cache**: ``build_stage_job`` as ``genrecal train`` builds it: teacher features from the
  cache, the teacher head from the cache artifacts; the teacher model is never loaded;
* **online**: ``LoopOptions(teacher_source="online")``: the teacher is loaded next to the
  student and runs live on every batch (``genrecal.train.online``), unrounded.

Reported per mode, over the steps after the first (warm-up, worker start): median step time;
the fraction of step time the loop waited in ``next(loader)`` (which, online, includes the live
teacher forward), split into the wait for the loader's workers (``TrainLoader.wait``) and the
teacher forward (``OnlineLoader.teacher_wait``); peak memory: the training process's RSS
high-water mark (VmHWM), also above the RSS of the libraries both modes import, and that of its
worker processes (``ru_maxrss`` of the children: forked, they count the pages they share), and
``torch.cuda.max_memory_allocated`` on CUDA. Ratios are online / cache.

    python benchmarks/bench_train.py [--samples 16] [--steps 8] [--batch-size 2] [--workers 1]
                                     [--teacher-hidden 512] [--teacher-layers 4] [--threads 1]
                                     [--device cpu|cuda] [--smoke] [--json [PATH]]

``--smoke`` runs the same code paths (both modes, each in its subprocess) at the smallest sizes,
for CI; ``--json`` prints the results as JSON after the table, ``--json PATH`` writes them to
PATH instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchcli
import torch

MODES = ("cache", "online")


# ----------------------------------------------------------------------------- setup (parent)


def pipeline(root: Path, args):
    from genrecal.common.config import Pipeline

    teacher_dtype = "bfloat16" if args.device == "cuda" else "float32"
    return Pipeline.from_dict({
        "name": "bench-train",
        "teacher": {"tiny": {"kind": "qwen2_vl", "path": str(root / "teacher"),
                             "hidden_size": args.teacher_hidden, "num_layers": args.teacher_layers},
                    "dtype": teacher_dtype, "device": args.device},
        "student": {"tiny": {"kind": "llava_qwen2", "path": str(root / "student")}, "dtype": "float32",
                    "device": args.device},
        "data": {"synthetic": {"n_train": args.samples, "n_test": 0, "image_size": 32}},
        "cache": {"location": str(root / "cache"), "batch_size": 4, "max_length": 512,
                  "features": {"answer_hidden": True, "question_hidden": "all", "visual_gram": False,
                               "logit_stats": None, "input_embeddings": False}},
        "recalibrator": {"blocks": 1, "init": "copy"},
        "stages": [{"name": "distill", "steps": args.steps + 1, "batch_size": args.batch_size,
                    "precision": "bf16" if args.device == "cuda" else "fp32", "warmup": 0,
                    "lr_start": 1e-4, "lr_end": 1e-5}],
        "evaluation": None, "output": str(root / "out")})


def n_params(directory: Path) -> int:
    from genrecal.model.loading import load_vlm

    return sum(p.numel() for p in load_vlm(directory).model.parameters())


def prepare(root: Path, args) -> dict:
    """Build the models and data, extract the cache; the parameter counts."""
    from genrecal.extract.job import job_from_pipeline
    from genrecal.extract.pipeline import run_extract
    from genrecal.common.distributed import RankInfo
    from genrecal.train.loop import prepare_inputs

    pipe = pipeline(root, args)
    prepare_inputs(pipe, RankInfo(), ("student", "teacher"))
    started = time.perf_counter()
    run_extract(dataclasses.replace(job_from_pipeline(pipe), progress=False))
    return {"teacher_params": n_params(root / "teacher"), "student_params": n_params(root / "student"),
            "extract_s": time.perf_counter() - started}


# ----------------------------------------------------------------------------- one mode (child)


def _recording_wait():
    from genrecal.train.data import DataWait

    @dataclasses.dataclass
    class RecordingWait(DataWait):
        """A DataWait that also keeps every batch's wait."""

        each: list = dataclasses.field(default_factory=list)

        def add(self, seconds: float) -> None:
            super().add(seconds)
            self.each.append(seconds)

    return RecordingWait()


def _libraries_rss_mib() -> float:
    """RSS (MiB) once every library either mode uses is imported: the base both peaks share.

    Both modes import the same modules first (cache reader, online mode, both model classes),
    so that the peak above this base is the mode's own (models, activations, batches)."""
    import genrecal.store.reader  # noqa: F401  (zarr, pyarrow)
    import genrecal.train.loop  # noqa: F401
    import genrecal.train.online  # noqa: F401
    import transformers.models.llava.modeling_llava  # noqa: F401
    import transformers.models.qwen2_vl.modeling_qwen2_vl  # noqa: F401

    return _proc_status_mib("VmRSS") or 0.0


def _proc_status_mib(key: str) -> float | None:
    """A memory line of /proc/self/status in MiB (None off Linux)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    line = next(x for x in status.read_text().splitlines() if x.startswith(f"{key}:"))
    return int(line.split()[1]) / 1024


def _peak_rss_mib() -> float:
    """This process's RSS high-water mark. /proc's VmHWM belongs to this process image alone;
    ``ru_maxrss`` would do off Linux, but on Linux it keeps the high-water mark of the parent's
    pages the process was forked with (the benchmark's parent holds both models and the data),
    across exec."""
    hwm = _proc_status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peaks(device: str, base_mib: float) -> dict:
    """Peak memory in MiB: this process (and above the libraries), its (finished) worker
    processes, CUDA allocations."""
    peak = _peak_rss_mib()
    out = {"rss_mib": peak, "own_mib": peak - base_mib,
           "workers_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    if device == "cuda":
        out["cuda_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def run_mode(root: Path, mode: str, args) -> dict:
    """Train the distill stage in ``mode``; timings of the steps after the first, memory peaks."""
    base_mib = _libraries_rss_mib()
    from genrecal.common.distributed import RankInfo
    from genrecal.train.loop import LoopOptions, build_stage_job, train_stage
    from genrecal.train.online import OnlineLoader

    options = LoopOptions(save_every=None, num_workers=args.workers, progress=False, teacher_source=mode)
    job = build_stage_job(pipeline(root, args), "distill", RankInfo(), options)
    job = dataclasses.replace(job, out_dir=root / f"run-{mode}")
    # the TrainLoader, whose worker waits are timed (online mode wraps it in an OnlineLoader)
    loader = job.loader.loader if isinstance(job.loader, OnlineLoader) else job.loader
    loader.wait = _recording_wait()
    if mode == "online":
        job.loader.teacher_wait = _recording_wait()
    try:
        result = train_stage(job, options)
    finally:
        loader.close()
    steps = result.records[1:]
    total = sum(r["step_time_s"] for r in steps)
    teacher = sum(job.loader.teacher_wait.each[1:]) if mode == "online" else 0.0
    return {"mode": mode, "steps": len(steps),
            "step_ms": 1e3 * statistics.median(r["step_time_s"] for r in steps),
            "data_wait": sum(r["data_wait_s"] for r in steps) / total,
            "worker_wait": sum(loader.wait.each[1:]) / total, "teacher_fwd": teacher / total,
            **_peaks(args.device, base_mib)}


# ----------------------------------------------------------------------------- report


def format_table(setup: dict, rows: dict[str, dict], args) -> str:
    t, s = setup["teacher_params"], setup["student_params"]
    cuda = "cuda_mib" in rows["cache"]
    lines = [f"teacher qwen2_vl (hidden {args.teacher_hidden}, {args.teacher_layers} layers): {t / 1e6:.2f}M params;"
             f" student llava_qwen2: {s / 1e6:.2f}M params; ratio {t / s:.1f}x",
             f"{args.samples} samples, batch {args.batch_size}, {rows['cache']['steps']} timed steps, "
             f"{args.workers} loader worker(s), {args.device}, {args.threads} thread(s)",
             f"{'mode':<8}{'step ms':>9}{'data wait':>11}{'workers':>9}{'teacher':>9}"
             f"{'peak RSS':>10}{'above libs':>12}{'worker RSS':>12}" + (f"{'CUDA peak':>11}" if cuda else ""),
             f"{'':<8}{'':>9}{'(of step)':>11}{'':>9}{'fwd':>9}{'MiB':>10}{'MiB':>12}{'MiB':>12}"
             + (f"{'MiB':>11}" if cuda else "")]
    for mode in MODES:
        r = rows[mode]
        lines.append(f"{mode:<8}{r['step_ms']:>9.1f}{r['data_wait']:>11.1%}{r['worker_wait']:>9.1%}"
                     f"{r['teacher_fwd']:>9.1%}{r['rss_mib']:>10.0f}{r['own_mib']:>12.0f}"
                     f"{r['workers_rss_mib']:>12.0f}" + (f"{r['cuda_mib']:>11.0f}" if cuda else ""))
    ratios = [f"{label} {rows['online'][key] / rows['cache'][key]:.2f}x"
              for key, label in (("step_ms", "step time"), ("rss_mib", "peak RSS"),
                                 ("own_mib", "RSS above libs"), ("cuda_mib", "CUDA peak"))
              if key in rows["cache"] and rows["cache"][key] > 0]
    lines.append("online / cache: " + ", ".join(ratios))
    return "\n".join(lines)


def _child_command(root: Path, mode: str, argv: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *argv, "--child", mode, "--root", str(root)]


def measure(args, argv: list[str]) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory(prefix="genrecal-bench-train-") as tmp:
        root = Path(tmp)
        setup = prepare(root, args)
        rows = {}
        for mode in MODES:
            done = subprocess.run(_child_command(root, mode, argv), capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"bench_train: the {mode} run failed:\n{done.stderr[-4000:]}")
            rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        return setup, rows


# --smoke: the same code paths at the smallest sizes (the teacher keeps 2 layers and is still
# larger than the student)
SMOKE = {"samples": 4, "steps": 2, "batch_size": 2, "teacher_hidden": 128, "teacher_layers": 2}


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="synthetic samples (default 16)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps (default 8; +1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=2, help="samples per step (default 2)")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes (default 1)")
    parser.add_argument("--teacher-hidden", type=int, default=512, help="teacher hidden size (default 512)")
    parser.add_argument("--teacher-layers", type=int, default=4, help="teacher decoder layers (default 4)")
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
    if args.child:
        print(json.dumps(run_mode(args.root, args.child, args)))
        return {}
    started = time.perf_counter()
    setup, rows = measure(args, argv)
    print(format_table(setup, rows, args))
    print(f"(total {time.perf_counter() - started:.0f} s, extraction {setup['extract_s']:.1f} s)")
    result = {"setup": setup, **rows}
    benchcli.write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
