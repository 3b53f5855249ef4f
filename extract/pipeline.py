"""``genrecal extract``: the teacher pass, from a pipeline to a committed teacher cache.

Per rank (:func:`run_extract`; one process, or one per GPU under torchrun):

1. rank 0 builds a tiny teacher / generates synthetic data if they are missing; every rank
   refuses a non-empty output cache unless ``resume`` (then a barrier);
2. the teacher is loaded, its fingerprint taken, the data read; the samples are cut into
   windows and the rank takes its own (:mod:`genrecal.extract.distributed`);
3. a :class:`~genrecal.store.writer.CacheWriter` for the rank is opened; samples it already
   holds (committed by any rank, or skipped) are known up front;
4. windows are encoded (chat template + processor + spans) in ``cache.encode_workers``
   worker processes (0: on a prefetch thread) while the previous one runs
   (:func:`encoded_windows`); each window is planned into length-bucketed batches
   (:func:`plan_batches`); a batch whose samples are all cached is skipped, any other runs
   whole (so that its numbers equal an uninterrupted run's), padded on the right, in one
   forward under ``torch.inference_mode``; the features of its new samples go to a
   :class:`BackgroundWriter` thread, which encodes and writes shards while the next batch runs;
5. a barrier; if no rank cached a single sample (all skipped, or no data) the run fails
   without committing anything (:func:`check_something_cached`); otherwise rank 0 writes the
   teacher artifacts and commits the manifest.

SIGKILL at any point loses at most the samples buffered since the rank's last committed shard;
a rerun with ``resume`` extracts exactly those. Bad samples (unreadable image, empty or
over-long answer, control tokens in the text, non-finite teacher values: a batch that has one is
rerun sample by sample) stop the job naming the sample and its file (``on_error: raise``) or
are recorded in the manifest with their reason (``skip``), like the rows the dataset reader
skipped.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

import torch

from genrecal.extract.background import BackgroundWriter, WriterStats
from genrecal.extract.batching import plan_batches
from genrecal.extract.distributed import owned, process_group
from genrecal.extract.errors import (CacheExistsError, ExtractSetupError, NothingExtractedError,
                                     SampleError)
from genrecal.extract.features import SampleFeatures, batch_features
from genrecal.extract.inputs import ensure_synthetic, ensure_teacher, read_inputs, sample_windows
from genrecal.extract.job import ExtractJob, feature_specs
from genrecal.extract.teacher import (Teacher, fingerprint, load_teacher, processor_files,
                                      resolve_device, write_artifacts)
from genrecal.data import Sample
from genrecal.common.distributed import RankInfo
from genrecal.store.errors import CacheWriteError, DatasetError, FeatureInputError, StoreError
from genrecal.store.schema import MANIFEST, RANKS_DIR, SHARDS_DIR, Manifest
from genrecal.store.storage import CacheStorage
from genrecal.model.encoding import Encoded, encode_sample
from genrecal.model.teacher_forward import teacher_forward
from genrecal.store.writer import CacheWriter, commit_cache, read_rank_logs

_NO_LIMIT = sys.maxsize
_SHOW_SKIPS = 3  # skipped samples named in the error of a run that cached none
# Per-sample failures that are the data's fault: span/format problems (StoreError), unreadable or
# vanished images (OSError, PIL's UnidentifiedImageError), images the processor rejects (ValueError).
SAMPLE_ERRORS = (StoreError, OSError, ValueError)


@dataclass(frozen=True)
class SkipItem:
    """A sample left out, for the manifest: id, dataset file, reason."""

    sample_id: str
    reason: str
    file: str = ""


@dataclass(frozen=True)
class WindowEncoding:
    """A window's samples encoded for the teacher, and the ones that failed (with the reason)."""

    ok: list[tuple[Sample, Encoded]]
    failed: list[tuple[Sample, str]]


@dataclass
class RunCounters:
    """What this rank did in this run."""

    written: int = 0
    skipped: int = 0
    already: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class ExtractResult:
    """Outcome of one rank's run; ``manifest`` is set on rank 0 (after the commit)."""

    out: str
    rank: int
    world: int
    written: int
    skipped: int
    already: int
    tokens: int
    seconds: float  # the whole run: loading, reading, extraction, artifacts, commit
    loop_seconds: float = 0.0  # the extraction loop alone: encode, forward, features, writes
    writer: WriterStats | None = None
    manifest: Manifest | None = field(default=None, repr=False)

    def summary(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        tok = self.tokens / self.seconds if self.seconds > 0 else 0.0
        wait = f", forward waited on the writer {self.writer.wait_fraction:.1%} of the time" \
            if self.writer else ""
        total = f"; cache holds {self.manifest.counts.samples} samples, " \
                f"{self.manifest.counts.skipped} skipped" if self.manifest else ""
        return (f"rank {self.rank}/{self.world}: extracted {self.written} samples ({self.skipped} "
                f"skipped, {self.already} already cached) in {self.seconds:.1f} s ({rate:.2f} "
                f"samples/s, {tok:.0f} tokens/s){wait} -> {self.out}{total}")


# ----------------------------------------------------------------------------- entry point


def run_extract(job: ExtractJob, *, info: RankInfo | None = None) -> ExtractResult:
    """Run this rank's share of ``job`` (see the module docstring)."""
    info = info or RankInfo.from_env()
    engine = _vllm_engine(job, info)  # --backend vllm: its early errors before anything runs
    with process_group(info):
        check_output(job)
        if info.is_main:
            ensure_teacher(job)
            ensure_synthetic(job)
        info.barrier()
        return _run_rank(job, info, engine)


def _vllm_engine(job: ExtractJob, info: RankInfo):
    """The (not yet started) vLLM engine of a ``--backend vllm`` job, else None."""
    if job.engine.backend != "vllm":
        return None
    from genrecal.extract.vllm_engine import engine_for_teacher

    return engine_for_teacher(job.engine, job.settings.teacher, mode="hidden",
                              max_model_len=job.settings.max_length,
                              penultimate=job.features.visual_gram,
                              local_rank=info.local_rank, world=info.world)


def check_output(job: ExtractJob) -> None:
    """Refuse an output location that cannot be a cache directory (a file, or under one), and
    one that already holds data unless ``job.resume``."""
    storage = CacheStorage(job.out)
    _check_directory(storage, job.out)
    if job.resume:
        _check_resumed_backend(storage, job)
        return
    if storage.exists(MANIFEST) or storage.list_dir(RANKS_DIR) or storage.list_dir(SHARDS_DIR):
        raise CacheExistsError(
            f"{job.out} already holds a teacher cache (or part of one); pass --resume to extract "
            "only the samples it is missing (same teacher and settings), or choose another --out")


def _check_resumed_backend(storage: CacheStorage, job: ExtractJob) -> None:
    """Refuse, before any model loads, to resume a cache with another engine than wrote it (the
    writer would refuse the different settings too, but only after the engine started)."""
    for rank, log in sorted(read_rank_logs(storage).items()):
        wrote = log.header.settings.get("backend", "hf")
        if wrote != job.settings.backend:
            raise ExtractSetupError(
                f"cache {job.out} (rank {rank}) was extracted with --backend {wrote}, this run "
                f"uses --backend {job.settings.backend}; the two agree within a bf16 bound, not "
                f"bit for bit, so one cache does not mix them. Fix: resume with --backend {wrote} "
                "(or teacher_engine.backend), or extract into a new --out")


def _settings_record(job: ExtractJob) -> dict:
    """The settings the cache records: ``job.settings``, except that a cache an older genrecal
    began without the ``backend`` key (written by transformers, then) is resumed under its own
    record, so that the writer's header check sees the same settings."""
    record = job.settings.to_dict()
    if job.resume and job.settings.backend == "hf":
        logs = read_rank_logs(CacheStorage(job.out))
        if logs and all("backend" not in log.header.settings for log in logs.values()):
            del record["backend"]
    return record


def _check_directory(storage: CacheStorage, out: str) -> None:
    """ExtractSetupError if the cache root, or (locally) a folder above it, is not a folder."""
    if storage.local:
        path = Path(storage.root)
        blocker = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
        bad = blocker is not None and not blocker.is_dir()
    else:
        blocker, bad = storage.root, storage.fs.isfile(storage.root)
    if bad:
        where = "is a file" if str(blocker) == str(storage.root) else f"is under {blocker}, a file"
        raise ExtractSetupError(
            f"output cache {out} {where}; a teacher cache is a directory. Fix: pass --out (or "
            "set cache.location to) a new or existing directory, not a file")


def _run_rank(job: ExtractJob, info: RankInfo, engine=None) -> ExtractResult:
    start = time.perf_counter()
    if engine is None:
        device = resolve_device(job.device, job.device_map, info.local_rank, info.world)
        teacher = load_teacher(job.settings.teacher, device=device, device_map=job.device_map)
    else:  # vLLM runs the forward; this process needs the processor, head and identity only
        teacher = load_teacher(job.settings.teacher, device="cpu")
    files = processor_files(teacher)
    specs = feature_specs(job.features, job.codecs, hidden_size=teacher.hidden_size,
                          vocab_size=teacher.vocab_size)
    inputs = read_inputs(job.settings, job.limit)
    windows = owned(sample_windows(inputs.samples, job.plan_window), info)
    writer = CacheWriter(job.out, teacher=fingerprint(teacher, files), features=specs,
                         settings=_settings_record(job), rank=info.rank,
                         shard_tokens=job.shard_tokens or _NO_LIMIT,
                         shard_bytes=job.shard_bytes or _NO_LIMIT, commit=False)
    with engine if engine is not None else nullcontext():  # vLLM starts before the loop's clock
        loop_start = time.perf_counter()
        with writer:
            done = {s.id for w in windows for s in w if writer.has(s.id)}
            read_skips = inputs.skips if info.is_main else []
            counters, stats = _extract(job, teacher, writer, windows, done, read_skips, info,
                                       engine)
        loop_seconds = time.perf_counter() - loop_start
    info.barrier()
    check_something_cached(job, info)
    manifest = finalise(job, teacher, files) if info.is_main else None
    info.barrier()
    return ExtractResult(out=job.out, rank=info.rank, world=info.world, written=counters.written,
                         skipped=counters.skipped, already=counters.already,
                         tokens=counters.tokens, seconds=time.perf_counter() - start,
                         loop_seconds=loop_seconds, writer=stats, manifest=manifest)


def check_something_cached(job: ExtractJob, info: RankInfo) -> None:
    """Raise NothingExtractedError, committing nothing, when no rank cached a single sample.

    Called by every rank once all are done (they read the same rank shard lists, so they agree).
    A cache of 0 samples is of no use, and its skip records would mark every sample done for a
    ``--resume`` after the data is fixed: the rank shard lists are removed (the skips are in the
    error) and the output is left as if never extracted.
    """
    storage = CacheStorage(job.out)
    logs = read_rank_logs(storage)
    if any(log.shards for log in logs.values()):
        return
    skipped = [s for rank in sorted(logs) for s in logs[rank].skipped]
    info.barrier()  # every rank has read the lists before rank 0 removes them
    if info.is_main:
        storage.remove(RANKS_DIR)
    raise NothingExtractedError(_nothing_message(job.out, skipped), skipped=skipped)


def _nothing_message(out: str, skipped: list) -> str:
    if not skipped:
        return (f"no sample was extracted into {out}: the data gave no sample (check the pipeline's "
                "data sources, their split and limit, and --limit); nothing was committed")
    reasons = Counter(s.reason for s in skipped)
    shown = "; ".join(f"{s.sample_id!r} ({s.file or 'unknown file'}): {s.reason}"
                      for s in skipped[:_SHOW_SKIPS])
    common = ", ".join(f"{n} x {reason!r}" for reason, n in reasons.most_common(3))
    return (f"no sample was extracted into {out}: all {len(skipped)} sample(s) were skipped "
            f"(most common reasons: {common}; first: {shown}). Nothing was committed. Fix: "
            "correct or replace the data (see the reasons), or the settings they name "
            "(max_length...), then run the extraction again")


def finalise(job: ExtractJob, teacher: Teacher, files: dict[str, bytes]) -> Manifest:
    """Write the teacher artifacts (embedding rows of every cached answer id) and commit."""
    storage = CacheStorage(job.out)
    answer_ids = cached_answer_ids(storage) if job.features.input_embeddings else None
    write_artifacts(storage, teacher, files, answer_ids)
    return commit_cache(job.out)


def cached_answer_ids(storage: CacheStorage) -> torch.Tensor:
    """int64 [m]: the sorted unique token ids of every answer span committed by any rank."""
    from genrecal.store.shard import ShardReader

    ids: set[int] = set()
    for log in read_rank_logs(storage).values():
        for entry in log.shards:
            records = ShardReader(storage, entry, log.header.features, verify=False).records
            for input_ids, spans in zip(records.column("input_ids").to_pylist(),
                                        records.column("answer_spans").to_pylist()):
                ids.update(t for s, e in spans for t in input_ids[s:e])
    return torch.tensor(sorted(ids), dtype=torch.long)


# ----------------------------------------------------------------------------- the loop


def _extract(job, teacher, writer, windows, done, read_skips, info, engine=None):
    """Encode (prefetched), run and write this rank's windows; returns counters, writer stats."""
    counters = RunCounters(already=sum(s.id in done for w in windows for s in w))
    todo = [w for w in windows if any(s.id not in done for s in w)]
    encoded = encoded_windows(teacher, todo, job.settings.max_length, job.encode_workers)  # before any thread
    try:
        bar = _progress(job, info, total=sum(map(len, windows)), initial=counters.already)
        with BackgroundWriter(partial(write_item, writer, job.on_error), max_queue=4) as background:
            run = BatchRunner(job.on_error, teacher, writer.header.features, background, done, counters,
                              engine)
            for skip in read_skips:
                background.submit(SkipItem(skip.sample_id, f"dataset: {skip.reason}", skip.file))
            for window in encoded:
                for sample, reason in window.failed:
                    run.fail(sample, reason)
                for batch in window_batches(window.ok, job.batch_size):
                    run.run_batch(batch)
                    _advance(bar, counters)
        bar.close()
    finally:  # the encoders (a thread, or worker processes) stop now, also on an error
        encoded.close()
    return counters, background.stats()


@dataclass
class BatchRunner:
    """Runs batches and hands their new samples (or failures) to the background writer.

    ``done``: ids the cache already holds (committed or skipped); they are never resubmitted.
    """

    on_error: str
    teacher: Teacher
    specs: dict
    background: BackgroundWriter
    done: set[str]
    counters: RunCounters
    engine: object = None  # a started VllmEngine (--backend vllm), else None: transformers

    def run_batch(self, batch: list[tuple[Sample, Encoded]]) -> None:
        """Run the batch whole unless every sample in it is cached; submit its new samples."""
        if all(sample.id in self.done for sample, _ in batch):
            return
        features, failures = features_or_failures(self.teacher, self.specs, batch, self.engine)
        for sample, reason in failures:
            self.fail(sample, reason)
        for item in features:
            if item.sample_id not in self.done:
                self.background.submit(item)
                self.counters.written += 1
                self.counters.tokens += len(item.input_ids)

    def fail(self, sample: Sample, reason: str) -> None:
        """Stop (on_error raise) or record the sample as skipped (skip)."""
        if sample.id in self.done:
            return
        if self.on_error == "raise":
            raise SampleError(f"sample {sample.id!r} (from {sample.source or 'unknown file'}) "
                              f"cannot be extracted: {reason}. Fix or drop the sample, or set "
                              "cache.on_error: skip to record it in the manifest and go on",
                              sample_id=sample.id, file=sample.source, reason=reason)
        self.background.submit(SkipItem(sample.id, reason, sample.source))
        self.counters.skipped += 1


def window_batches(items: list[tuple[Sample, Encoded]], batch_size: int) -> Iterator[list]:
    """A window's encoded samples cut into length-bucketed batches (longest first)."""
    lengths = [len(enc.input_ids) for _, enc in items]
    for batch in plan_batches(lengths, batch_size=batch_size, bucket_size=None):
        yield [items[i] for i in batch]


def features_or_failures(teacher: Teacher, specs, batch: list[tuple[Sample, Encoded]],
                         engine=None):
    """``(features, failures)`` of a batch. If the teacher gives non-finite values, each sample
    is run alone so that only the bad ones fail (with the reason)."""
    try:
        return batch_sample_features(teacher, specs, batch, engine), []
    except FeatureInputError as exc:
        if len(batch) == 1:
            return [], [(batch[0][0], f"non-finite teacher values: {exc}")]
    results = [features_or_failures(teacher, specs, [item], engine) for item in batch]
    return [f for r in results for f in r[0]], [x for r in results for x in r[1]]


def batch_sample_features(teacher: Teacher, specs, batch: list[tuple[Sample, Encoded]],
                          engine=None) -> list[SampleFeatures]:
    """Pad ``batch`` (right), run the teacher once and compute every sample's features.

    engine: a started :class:`~genrecal.extract.vllm_engine.VllmEngine` runs the forward
    instead of transformers; the features come from the same code either way."""
    encoded = [enc for _, enc in batch]
    if engine is not None:
        from genrecal.extract.vllm_engine import engine_states

        states = engine_states(engine, teacher, batch)
    else:
        states = teacher_forward(teacher.model, teacher.family, [enc.inputs for enc in encoded],
                                 teacher.pad_id, penultimate="visual_gram" in specs)
    with torch.inference_mode():
        values = batch_features(teacher, encoded, states, specs)
    return [SampleFeatures(sample_id=sample.id, content_hash=sample.content_hash,
                           input_ids=enc.input_ids, spans=enc.spans,
                           status="truncated" if enc.dropped_turns else "ok", values=v,
                           source=sample.source)
            for (sample, enc), v in zip(batch, values)]


def write_item(writer: CacheWriter, on_error: str, item) -> None:
    """The background writer's work: one sample (or skip record) into the cache writer.

    A sample the writer refuses (NaN/Inf in its hidden states...) is recorded as skipped under
    ``on_error="skip"``; under ``raise`` the job stops with the writer's message naming it.
    """
    if isinstance(item, SkipItem):
        writer.skip(item.sample_id, item.reason, item.file)
        return
    try:
        writer.add(item.sample_id, content_hash=item.content_hash, input_ids=item.input_ids,
                   spans=item.spans, status=item.status, **item.values)
    except CacheWriteError as exc:
        if on_error != "skip" or writer.has(item.sample_id):
            raise
        writer.skip(item.sample_id, f"invalid teacher features: {exc}", item.source)


# ----------------------------------------------------------------------------- encoding


def encode_window(teacher: Teacher, window: list[Sample], max_length: int) -> WindowEncoding:
    """Encode every sample of a window with the teacher's chat template and processor."""
    return _encode_all((teacher.vlm.processor, teacher.vlm.family), window, max_length)


def _encode_all(pair: tuple, window: list[Sample], max_length: int) -> WindowEncoding:
    ok, failed = [], []
    for sample in window:
        try:
            ok.append((sample, encode_sample(pair, sample, max_length=max_length)))
        except SAMPLE_ERRORS as exc:
            failed.append((sample, _reason(exc)))
    return WindowEncoding(ok=ok, failed=failed)


def _reason(exc: BaseException) -> str:
    """The skip reason of a failed encoding: genrecal's own message, else the exception's."""
    if isinstance(exc, DatasetError):
        return exc.reason
    if isinstance(exc, StoreError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def encoded_windows(teacher: Teacher, windows: list[list[Sample]], max_length: int,
                    workers: int) -> Iterator[WindowEncoding] | _WorkerWindows:
    """Every window encoded (:func:`encode_window`), in order, ahead of the forward; an
    iterable with ``close()``, which the caller calls when it stops (the encoders stop).

    ``workers == 0``: on one thread of this process, one window ahead (the chat template, the
    tokenizer and the image processor then share the interpreter with the forward). ``workers
    >= 1``: in that many worker processes holding the teacher's processor and family,
    ``workers`` windows ahead. They are started here, before the caller starts any thread of
    its own, with the platform's default start method (fork on Linux, as the trainer's loader
    workers: they start in milliseconds; they never touch the model or a GPU). The first
    window is encoded here. A single window is always encoded here.
    """
    if workers == 0 or len(windows) < 2:
        return prefetched(partial(encode_window, teacher, max_length=max_length), windows)
    from concurrent.futures import ProcessPoolExecutor

    pair = (teacher.vlm.processor, teacher.vlm.family)
    pool = ProcessPoolExecutor(workers, initializer=_init_encoder, initargs=(pair, max_length))
    try:
        source = iter(windows[1:])
        pending = deque(pool.submit(_encode_in_worker, w) for w in islice(source, workers))  # starts them
        first = encode_window(teacher, windows[0], max_length)
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise
    return _WorkerWindows(pool, pending, source, first)


class _WorkerWindows:
    """The windows encoded by a worker pool, in order (the first one encoded by the caller).
    :meth:`close` stops the workers, whether or not iteration started."""

    def __init__(self, pool, pending: deque, source: Iterator, first: WindowEncoding):
        self.pool = pool
        self._windows = self._run(pending, source, first)

    def _run(self, pending: deque, source: Iterator, first: WindowEncoding) -> Iterator[WindowEncoding]:
        yield first
        yield from _in_order(self.pool, _encode_in_worker, source, pending)  # cancels what it left

    def __iter__(self) -> Iterator[WindowEncoding]:
        return self._windows

    def close(self) -> None:
        self._windows.close()
        self.pool.shutdown(cancel_futures=True)


_WORKER_ENCODER: tuple | None = None  # (processor, family), max_length: set in each encoding worker


def _init_encoder(pair: tuple, max_length: int) -> None:
    global _WORKER_ENCODER
    torch.set_num_threads(1)  # the workers run beside the forward's threads
    _WORKER_ENCODER = (pair, max_length)


def _encode_in_worker(window: list[Sample]) -> WindowEncoding:
    pair, max_length = _WORKER_ENCODER
    return _encode_all(pair, window, max_length)


def prefetched(fn: Callable, items: Iterable, depth: int = 1) -> Iterator:
    """``fn(item)`` for each item, in order, computed ``depth`` items ahead on one thread."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="genrecal-encode") as pool:
        source = iter(items)
        yield from _in_order(pool, fn, source, deque(pool.submit(fn, item) for item in islice(source, depth + 1)))


def _in_order(pool, fn: Callable, source: Iterator, pending: deque) -> Iterator:
    """The results of the ``pending`` futures, in order; each result taken submits ``fn`` on
    the next item of ``source``. Futures not yet taken are cancelled if the caller stops."""
    try:
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(fn, item) for item in islice(source, 1))
            yield result
    finally:
        for future in pending:
            future.cancel()


# ----------------------------------------------------------------------------- progress


def _progress(job: ExtractJob, info: RankInfo, *, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="sample", desc=f"extract r{info.rank}",
                disable=not (job.progress and info.is_main), dynamic_ncols=True)


def _advance(bar, counters: RunCounters) -> None:
    """Move the bar to the samples handled so far; show tokens/s beside samples/s and ETA."""
    bar.update(counters.already + counters.written + counters.skipped - bar.n)
    elapsed = bar.format_dict.get("elapsed") or 0.0
    if elapsed > 0:
        bar.set_postfix_str(f"{counters.tokens / elapsed:.0f} tok/s", refresh=False)
