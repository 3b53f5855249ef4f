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

Parallel modes (``--world N`` with N > 1, or ``--parallel``): instead of cache vs online, the cache-fed distill
stage runs under each of ``--parallel ddp,fsdp`` (the stage setting ``parallel``) on N processes
(gloo on the CPU, one subprocess per rank, a ``file://`` rendezvous), at the same per-rank batch
(global batch = batch size x N). Reported side by side per mode: median step time (rank 0's
records) and, per rank, the peak RSS (VmHWM; also above the libraries) and the exact bytes this
rank holds of the parameters (all of them; under FSDP its shards), of the trainable ones and of
their AdamW states (two float32 tensors per trainable parameter: 2 x the trainable fp32 bytes).
``--student-hidden`` / ``--student-layers`` grow the student so that its state, not the
libraries, dominates memory. The rank processes run with a fixed glibc mmap threshold
(:data:`MALLOC`), so that their RSS follows the tensors alive.

    python benchmarks/bench_train.py [--samples 16] [--steps 8] [--batch-size 2] [--workers 1]
                                     [--teacher-hidden 512] [--teacher-layers 4] [--threads 1]
                                     [--student-hidden H] [--student-layers L]
                                     [--world N] [--parallel ddp,fsdp]
                                     [--device cpu|cuda] [--smoke] [--json [PATH]]

``--smoke`` runs the same code paths (both modes, each in its subprocess; with ``--world 2``
both parallel modes on 2 ranks) at the smallest sizes, for CI; ``--json`` prints the results as
JSON after the table, ``--json PATH`` writes them to PATH instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
PARALLEL = ("ddp", "fsdp")
# Parallel modes: glibc serves multi-MiB allocations from its heap once such a block was freed
# (its mmap threshold rises dynamically) and keeps the freed memory, so the RSS of an FSDP rank,
# which allocates and frees an unsharded copy of every block twice per step, shows the
# allocator's retention instead of the tensors alive (measured: 1.12x DDP's RSS instead of
# 0.59x for the same run). A fixed threshold of 1 MiB returns freed large blocks to the system
# in both modes (an environment setting of yours wins); it costs step time in both.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "1048576")}


# ----------------------------------------------------------------------------- setup (parent)


def pipeline(root: Path, args, parallel: str = "ddp"):
    from genrecal.common.config import Pipeline

    teacher_dtype = "bfloat16" if args.device == "cuda" else "float32"
    student = {"kind": "llava_qwen2", "path": str(root / "student")}
    student.update({k: v for k, v in (("hidden_size", args.student_hidden),
                                      ("num_layers", args.student_layers)) if v is not None})
    return Pipeline.from_dict({
        "name": "bench-train",
        "teacher": {"tiny": {"kind": "qwen2_vl", "path": str(root / "teacher"),
                             "hidden_size": args.teacher_hidden, "num_layers": args.teacher_layers},
                    "dtype": teacher_dtype, "device": args.device},
        "student": {"tiny": student, "dtype": "float32", "device": args.device},
        "data": {"synthetic": {"n_train": args.samples, "n_test": 0, "image_size": 32}},
        "cache": {"location": str(root / "cache"), "batch_size": 4, "max_length": 512,
                  "features": {"answer_hidden": True, "question_hidden": "all", "visual_gram": False,
                               "logit_stats": None, "input_embeddings": False}},
        "recalibrator": {"blocks": 1, "init": "copy"},
        "stages": [{"name": "distill", "steps": args.steps + 1, "batch_size": args.batch_size,
                    "precision": "bf16" if args.device == "cuda" else "fp32", "warmup": 0,
                    "lr_start": 1e-4, "lr_end": 1e-5, "parallel": parallel}],
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


def _local_bytes(model) -> dict:
    """Bytes this rank holds: every parameter (its shard under FSDP), the trainable ones, and
    their AdamW states (exp_avg and exp_avg_sq, float32 like the master weights)."""
    from torch.distributed.tensor import DTensor

    def local(p):
        return p.to_local() if isinstance(p, DTensor) else p

    params = list(model.parameters())
    total = sum(local(p).numel() * p.element_size() for p in params)
    trainable = sum(local(p).numel() * p.element_size() for p in params if p.requires_grad)
    mib = 2 ** 20
    return {"params_mib": total / mib, "trainable_mib": trainable / mib, "adamw_mib": 2 * trainable / mib,
            "trainable_numel": sum(p.numel() for p in params if p.requires_grad)}


def run_rank(root: Path, parallel: str, rank: int, args) -> dict:
    """One rank of the distill stage under ``parallel`` on ``args.world`` processes."""
    base_mib = _libraries_rss_mib()
    import torch.distributed as dist

    import torch.distributed.fsdp  # noqa: F401  (both modes pay for the same imports)
    import genrecal.train.loop as loop
    from genrecal.common.distributed import RankInfo
    from genrecal.train.loop import LoopOptions, build_stage_job, train_stage

    # the training peak: VmHWM when the stage's final checkpoint starts (the checkpoint and the
    # export that follow hold transient copies: DCP's safetensors writer serialises the rank's
    # shards in memory, the FSDP export gathers the full model on rank 0)
    save, training = loop._save_checkpoint, {}

    def measured_save(*a, **k):
        training.setdefault("rss_mib", _peak_rss_mib())
        return save(*a, **k)

    loop._save_checkpoint = measured_save

    dist.init_process_group("gloo", init_method=f"file://{root / ('rdv-' + parallel)}", rank=rank,
                            world_size=args.world)
    try:
        options = LoopOptions(save_every=None, num_workers=args.workers, progress=False)
        job = build_stage_job(pipeline(root, args, parallel), "distill", RankInfo.current(), options)
        job = dataclasses.replace(job, out_dir=root / f"run-{parallel}")
        try:
            result = train_stage(job, options)
        finally:
            job.loader.close()
        steps = result.records[1:]
        out = {"parallel": parallel, "rank": rank, "world": args.world, **_local_bytes(job.model),
               **_peaks(args.device, base_mib), "train_rss_mib": training["rss_mib"],
               "train_own_mib": training["rss_mib"] - base_mib}
        if steps:  # rank 0 keeps the records
            out.update(steps=len(steps), step_ms=1e3 * statistics.median(r["step_time_s"] for r in steps),
                       samples_per_step=steps[0]["samples"])
        return out
    finally:
        dist.barrier()
        dist.destroy_process_group()


def measure_parallel(args, argv: list[str]) -> tuple[dict, dict]:
    """Each parallel mode on ``args.world`` rank subprocesses (started together, each its own
    peak); rows[mode] = rank 0's timings + every rank's memory."""
    with tempfile.TemporaryDirectory(prefix="genrecal-bench-train-") as tmp:
        root = Path(tmp)
        setup = prepare(root, args)
        rows = {}
        for parallel in args.parallel:
            procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv,
                                       "--child-parallel", parallel, "--child-rank", str(rank),
                                       "--root", str(root)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "LOCAL_RANK": str(rank), **MALLOC})
                     for rank in range(args.world)]
            outs = _wait_all(procs, parallel)
            ranks = [json.loads(out.strip().splitlines()[-1]) for out in outs]
            rows[parallel] = {**{k: ranks[0][k] for k in ("steps", "step_ms", "samples_per_step")},
                              "ranks": ranks,
                              **{f"max_{k}": max(r[k] for r in ranks)
                                 for k in ("rss_mib", "own_mib", "train_rss_mib", "train_own_mib",
                                           "params_mib", "trainable_mib", "adamw_mib")}}
        return setup, rows


def _wait_all(procs: list[subprocess.Popen], parallel: str) -> list[str]:
    """The ranks' stdout; if one fails, the others (waiting in a collective) are stopped."""
    outs: list[str | None] = [None] * len(procs)
    while any(o is None for o in outs):
        for i, proc in enumerate(procs):
            if outs[i] is None and proc.poll() is not None:
                out, err = proc.communicate()
                if proc.returncode != 0:
                    for other in procs:
                        if other.poll() is None:
                            other.kill()
                            other.wait()
                    raise SystemExit(f"bench_train: rank {i} of the {parallel} run failed:\n{err[-4000:]}")
                outs[i] = out
        time.sleep(0.05)
    return outs  # type: ignore[return-value]


def format_parallel_table(setup: dict, rows: dict[str, dict], args) -> str:
    s = setup["student_params"]
    first = rows[args.parallel[0]]
    lines = [f"student llava_qwen2: {s / 1e6:.2f}M params (distill trains the Recalibrator + student body: "
             f"{first['ranks'][0]['trainable_numel'] / 1e6:.2f}M); {args.world} processes x batch "
             f"{args.batch_size} = {first['samples_per_step']} samples per step, {first['steps']} timed steps, "
             f"{args.device}, {args.threads} thread(s) per process",
             f"{'parallel':<9}{'step ms':>9}{'train RSS':>11}{'above libs':>12}{'end RSS':>9}"
             f"{'params':>9}{'trainable':>11}{'AdamW':>9}",
             f"{'':<9}{'':>9}{'MiB':>11}{'MiB':>12}{'MiB':>9}{'MiB':>9}{'MiB':>11}{'MiB':>9}"
             "   (per rank, the largest; end: with the final checkpoint and export)"]
    for parallel in args.parallel:
        r = rows[parallel]
        lines.append(f"{parallel:<9}{r['step_ms']:>9.1f}{r['max_train_rss_mib']:>11.0f}"
                     f"{r['max_train_own_mib']:>12.0f}{r['max_rss_mib']:>9.0f}"
                     f"{r['max_params_mib']:>9.2f}{r['max_trainable_mib']:>11.2f}{r['max_adamw_mib']:>9.2f}")
    if set(PARALLEL) <= set(rows):
        d, f = rows["ddp"], rows["fsdp"]
        lines.append(f"fsdp / ddp: step time {f['step_ms'] / d['step_ms']:.2f}x, params per rank "
                     f"{f['max_params_mib'] / d['max_params_mib']:.2f}x, trainable + AdamW per rank "
                     f"{f['max_trainable_mib'] / d['max_trainable_mib']:.2f}x, training RSS above libs "
                     f"{f['max_train_own_mib'] / max(d['max_train_own_mib'], 1e-9):.2f}x")
    return "\n".join(lines)


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
    parser.add_argument("--student-hidden", type=int, default=None, help="student hidden size (default: the kit's)")
    parser.add_argument("--student-layers", type=int, default=None, help="student decoder layers (default: the kit's)")
    parser.add_argument("--world", type=int, default=1,
                        help="processes; > 1 compares the --parallel modes instead of cache vs online")
    parser.add_argument("--parallel", type=_parallel_modes, default=None,
                        help="ddp, fsdp or ddp,fsdp (the default with --world > 1): compare the stage's "
                             "`parallel` settings on --world processes (also at --world 1)")
    benchcli.add_smoke_and_json(parser, SMOKE)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--child-parallel", choices=PARALLEL, help=argparse.SUPPRESS)
    parser.add_argument("--child-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = benchcli.parse(parser, SMOKE, argv)
    if args.world < 1:
        parser.error("--world must be >= 1")
    if args.parallel is None and args.world > 1:
        args.parallel = PARALLEL
    return args


def _parallel_modes(value: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not modes or any(m not in PARALLEL for m in modes):
        raise argparse.ArgumentTypeError(f"{value!r}: use ddp, fsdp or ddp,fsdp")
    return modes


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_mode(args.root, args.child, args)))
        return {}
    if args.child_parallel:
        print(json.dumps(run_rank(args.root, args.child_parallel, args.child_rank, args)))
        return {}
    started = time.perf_counter()
    if args.parallel:
        setup, rows = measure_parallel(args, argv)
        print(format_parallel_table(setup, rows, args))
    else:
        setup, rows = measure(args, argv)
        print(format_table(setup, rows, args))
    print(f"(total {time.perf_counter() - started:.0f} s, extraction {setup['extract_s']:.1f} s)")
    result = {"setup": setup, **rows}
    benchcli.write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
