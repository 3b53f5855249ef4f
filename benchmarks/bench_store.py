"""Bytes per token and write / read throughput of each hidden-state codec of the teacher cache.

Hidden states come from a real transformers forward pass of a small model with random weights
over real text (English docstrings of the Python standard library), tokenised by the model's
own tokenizer: the tiny Qwen2-VL of ``genrecal.model.tiny`` when available, else a
``Qwen2ForCausalLM`` over UTF-8 bytes. They are the post-norm last hidden states, in bfloat16,
as a teacher pass caches them. Random weights do not give a trained model's outlier channels,
so treat absolute ratios as indicative; the comparison between codecs is the point.

Side by side, in the same run: the baseline of speculative-decoding hidden-state caches, one
bfloat16 safetensors file per sample.

Then the cache path against the codec (docs/cache_speed.md), on the same bf16 states, at each of
``--io-threads`` (default 1,2) threads: the raw codec (blosc zstd-1 + byte shuffle on the cache's
chunks, numcodecs alone, chunks spread over the threads), the cache writer (``CacheWriter(threads=n)``,
records, checksums and fsyncs included), the sequential read (``CacheReader(threads=n)``, shard
checksums verified on first use, as the trainer reads; also without them, to show their
cost), random access by sample id over a
shuffled order (shards already open and verified), and the trainer's loader
(``genrecal.train.data.make_loader`` with n worker processes, the tiny student, float32 teacher
tensors: from cache to collated batches; a second, warm epoch is timed). Every MB/s counts raw
bf16 bytes of the hidden states; the ratios ``*_vs_codec`` divide by the codec's decode MB/s
(encode MB/s for the writer) at the same thread count. ``random_access_ms`` is per sample
of 4096 tokens (the same states regrouped, fetched in shuffled order); ``random_overhead_ms``
is that minus the codec's own decode time for those bytes. The loader epoch goes over the
states 4 times under other ids (at least 24 batches of 4). Each figure is the best of 3 runs
(the machine may be shared: the best run is the one least disturbed). Runs in about a minute with the defaults:

    python benchmarks/bench_store.py [--tokens 16384] [--hidden 1024] [--samples 24] [--threads N]
                                     [--io-threads 1,2] [--smoke] [--json [PATH]]

``--smoke`` runs the same code paths at the smallest sizes (a few seconds), for CI; ``--json``
prints the results as JSON after the table, ``--json PATH`` writes them to PATH instead.
"""

from __future__ import annotations

import argparse
import inspect
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchcli
import numpy as np
import torch
from numcodecs import Blosc
from safetensors.torch import load_file, save_file

from genrecal.store import schema
from genrecal.store.codecs import CHUNK_TARGET_BYTES, chunk_rows, encode_values
from genrecal.store.fingerprint import teacher_fingerprint, weights_identity_tensors
from genrecal.store.reader import CacheReader
from genrecal.store.writer import CacheWriter

CODECS = ("bf16", "fp8_e4m3", "int8")


# ----------------------------------------------------------------------------- hidden states


def _text() -> str:
    import argparse as a, collections, email, json as j, logging, pathlib, subprocess, threading, typing, unittest

    docs = [inspect.getdoc(m) or "" for m in (a, collections, email, j, logging, pathlib, subprocess, threading,
                                               typing, unittest)]
    docs += [inspect.getdoc(f) or "" for m in (a, logging, pathlib, subprocess) for _, f in inspect.getmembers(m)
             if callable(f)]
    return "\n\n".join(d for d in docs if d)


def _lengths(total: int, samples: int, max_len: int, gen: torch.Generator) -> list[int]:
    raw = torch.rand(samples, generator=gen) + 0.5
    lengths = (raw / raw.sum() * total).long().clamp(16, max_len)
    return lengths.tolist()


def _tiny_vlm_model(hidden: int, workdir: Path):
    """(tokenize, forward) for the tiny Qwen2-VL; raises ImportError if the kit is absent."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from genrecal.model.tiny import build_tiny_vlm

    path = build_tiny_vlm("qwen2_vl", workdir / "tiny", hidden_size=hidden, num_heads=8, num_kv_heads=2)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return (lambda text: tok(text)["input_ids"]), (lambda ids: model.model(input_ids=ids).last_hidden_state), \
        "tiny Qwen2-VL (genrecal.model.tiny, random weights)"


def _qwen2_model(hidden: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    model = Qwen2ForCausalLM(config).eval()
    return (lambda text: list(text.encode())), (lambda ids: model.model(input_ids=ids).last_hidden_state), \
        "Qwen2ForCausalLM (random weights, byte tokens)"


def hidden_states(tokens: int, hidden: int, samples: int, workdir: Path) -> tuple[list[torch.Tensor], str]:
    """``samples`` bfloat16 [L_i, hidden] post-norm states summing to about ``tokens`` rows.

    The forward runs in float32 (bfloat16 matmuls are slow on CPU) and the states are rounded to
    bfloat16, the dtype a teacher pass caches.
    """
    try:
        tokenize, forward, source = _tiny_vlm_model(hidden, workdir)
    except (ImportError, ValueError, TypeError, KeyError, AttributeError) as exc:
        print(f"(tiny VLM unavailable: {type(exc).__name__}: {exc}; using Qwen2ForCausalLM)", file=sys.stderr)
        tokenize, forward, source = _qwen2_model(hidden)
    ids = torch.tensor(tokenize(_text()))
    gen = torch.Generator().manual_seed(0)
    out, cursor = [], 0
    with torch.inference_mode():
        for length in _lengths(tokens, samples, 1024, gen):
            window = ids[cursor:cursor + length]
            if len(window) < length:
                cursor, window = 0, ids[:length]
            cursor += length
            out.append(forward(window[None])[0].to(torch.bfloat16))
    return out, source


# ----------------------------------------------------------------------------- measurements


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_cache(states: list[torch.Tensor], codec: str, root: Path) -> dict:
    url = str(root / f"cache-{codec}")
    d = states[0].shape[1]
    features = [schema.answer_hidden(d, codec)]
    t0 = time.perf_counter()
    # the cached states stand for a teacher pass; their fingerprint names the benchmark, not a model
    teacher = teacher_fingerprint({"benchmark": "bench_store"}, weights_identity_tensors({}), {})
    with CacheWriter(url, teacher=teacher, features=features, settings={}) as writer:
        for i, x in enumerate(states):
            # the whole sequence is one turn: question [0, 1), answer [1, L), whose answer
            # window [0, L) covers all L rows
            writer.add(f"s{i:05d}", content_hash="x", input_ids=torch.zeros(len(x), dtype=torch.long),
                       spans={"questions": [[0, 1]], "answers": [[1, len(x)]]}, answer_hidden=x)
    write_s = time.perf_counter() - t0
    reader = CacheReader(url, verify=False)
    t0 = time.perf_counter()
    got = [s.answer_hidden for s in reader.iter_samples(dtype=torch.bfloat16)]
    read_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, len(states), max(1, len(states) // 8)):
        reader.get(f"s{i:05d}", dtype=torch.bfloat16)
    random_ms = (time.perf_counter() - t0) * 1000 / len(range(0, len(states), max(1, len(states) // 8)))
    nbytes = sum(s.feature_bytes["answer_hidden"] for s in reader.manifest.shards)
    return {"bytes": nbytes, "all_bytes": _dir_bytes(Path(url)), "write_s": write_s, "read_s": read_s,
            "random_ms": random_ms, "rel_err": _rel_err(states, got)}


def _rel_err(states: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Max over tokens of ||x_hat - x|| / ||x||."""
    worst = 0.0
    for x, y in zip(states, got):
        x, y = x.float(), y.float()
        worst = max(worst, ((y - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).max().item())
    return worst


def bench_baseline(states: list[torch.Tensor], root: Path) -> dict:
    """One bfloat16 safetensors file per sample (the speculative-decoding cache layout)."""
    out = root / "safetensors"
    out.mkdir()
    t0 = time.perf_counter()
    for i, x in enumerate(states):
        save_file({"hidden_states": x.contiguous()}, out / f"s{i:05d}.safetensors")
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(len(states)):
        load_file(out / f"s{i:05d}.safetensors")["hidden_states"]
    read_s = time.perf_counter() - t0
    nbytes = _dir_bytes(out)
    return {"bytes": nbytes, "all_bytes": nbytes, "write_s": write_s, "read_s": read_s,
            "random_ms": read_s * 1000 / len(states), "rel_err": 0.0}


def blosc_blocksize_check(states: list[torch.Tensor]) -> dict:
    """Compressed / raw bf16 bytes with blocksize = chunk size (ours) vs blosc's default blocksize."""
    x = torch.cat(states)
    bits = encode_values(x, "bf16")["data"]
    rows = chunk_rows(bits.shape[1] * 2, CHUNK_TARGET_BYTES)
    chunks = [np.ascontiguousarray(bits[i:i + rows]) for i in range(0, len(bits), rows)]
    out = {}
    for name, blocksize in (("chunk", rows * bits.shape[1] * 2), ("default", 0)):
        codec = Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE, blocksize=blocksize)
        out[name] = sum(len(codec.encode(c)) for c in chunks) / bits.nbytes
    return out


# ----------------------------------------------------------------------------- cache path vs codec


def _chunks(states: list[torch.Tensor]) -> tuple[list[np.ndarray], int]:
    """The bf16 bits of all states cut into the cache's chunks (the cache's chunk rows), and
    the blosc block size."""
    bits = encode_values(torch.cat(states), "bf16")["data"]
    rows = chunk_rows(bits.shape[1] * 2, CHUNK_TARGET_BYTES)
    return [np.ascontiguousarray(bits[i:i + rows]) for i in range(0, len(bits), rows)], rows * bits.shape[1] * 2


def bench_codec(states: list[torch.Tensor], threads: int, repeats: int = 3) -> dict:
    """Raw codec MB/s (best of ``repeats``): numcodecs blosc with the cache's settings, chunks
    spread over ``threads`` threads (one thread: in this thread)."""
    chunks, blocksize = _chunks(states)
    codec = Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE, blocksize=blocksize, typesize=2)
    mb = sum(c.nbytes for c in chunks) / 2**20
    out = [np.empty_like(c) for c in chunks]
    with ThreadPoolExecutor(threads) as pool:
        run = (lambda fn, n: list(pool.map(fn, range(n)))) if threads > 1 else (lambda fn, n: [fn(i) for i in range(n)])
        enc_s, dec_s, encoded = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            encoded = run(lambda i: codec.encode(chunks[i]), len(chunks))
            enc_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run(lambda i: codec.decode(encoded[i], out=out[i]), len(chunks))
            dec_s.append(time.perf_counter() - t0)
    assert all(np.array_equal(a, b) for a, b in zip(chunks, out))
    return {"encode_mbs": mb / min(enc_s), "decode_mbs": mb / min(dec_s),
            "ratio": sum(len(e) for e in encoded) / (mb * 2**20)}


def _write_cache(url: str, states: list[torch.Tensor], threads: int, ids: list[str] | None = None,
                 hashes: list[str] | None = None) -> float:
    """Seconds to write ``states`` as answer_hidden (bf16) into a new cache at ``url``."""
    d = states[0].shape[1]
    teacher = teacher_fingerprint({"benchmark": "bench_store"}, weights_identity_tensors({}), {})
    t0 = time.perf_counter()
    with CacheWriter(url, teacher=teacher, features=[schema.answer_hidden(d, "bf16")], settings={},
                     threads=threads) as writer:
        for i, x in enumerate(states):
            # one turn: question [0, 1), answer [1, L): its answer window [0, L) covers all L rows
            writer.add(ids[i] if ids else f"s{i:05d}", content_hash=hashes[i] if hashes else "x",
                       input_ids=torch.zeros(len(x), dtype=torch.long),
                       spans={"questions": [[0, 1]], "answers": [[1, len(x)]]}, answer_hidden=x)
    return time.perf_counter() - t0


def _loader_samples(n: int, root: Path):
    """n text-only one-turn samples for the student (ids and content hashes the cache records)."""
    from genrecal.data.sample import Sample, Turn, content_hash

    out = []
    for i in range(n):
        turns = (Turn("user", (f"Describe item {i}.",)), Turn("assistant", (f"Item {i} is blue.",)))
        out.append(Sample(id=f"item-{i:05d}", turns=turns, images=(), content_hash=content_hash(turns, [])))
    return out


def bench_loader(states: list[torch.Tensor], workers: int, root: Path) -> float:
    """Seconds of one warm epoch of the trainer's loader over a cache of ``states`` (given
    ``LOADER_REPEAT`` times under other ids, so that the epoch is long next to the time its
    first batches take to come through the workers)."""
    states = states * LOADER_REPEAT
    from genrecal.model.loading import load_vlm
    from genrecal.model.tiny import build_tiny_vlm
    from genrecal.train.data import LoaderConfig, make_loader

    student_dir = root / "student"
    if not student_dir.exists():
        build_tiny_vlm("llava_qwen2", student_dir)
    student = load_vlm(student_dir)
    samples = _loader_samples(len(states), root)
    url = str(root / f"loader-cache-{workers}")
    _write_cache(url, states, 1, [s.id for s in samples], [s.content_hash for s in samples])
    config = LoaderConfig(batch_size=4, num_workers=workers, prefetch_factor=2, persistent_workers=True)
    loader = make_loader(samples, student, cache=url, config=config)
    try:
        for _ in loader:  # epoch 0: starts the workers, opens and verifies the shards
            pass
        times = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            rows = sum(sum(len(turns[0].window) for turns in batch.teacher) for batch in loader)
            times.append(time.perf_counter() - t0)
            assert rows == sum(len(x) for x in states), (rows, sum(len(x) for x in states))
    finally:
        loader.close()
    return min(times) / LOADER_REPEAT


LOADER_REPEAT = 4
REPEATS = 3  # every measurement of the cache path: the best of 3 (the codec's too)
RANDOM_TOKENS = 4096  # random access is timed on samples of this many tokens
RANDOM_ROUNDS = 5


def bench_random_access(states: list[torch.Tensor], threads: int, url: str) -> tuple[float, int]:
    """(milliseconds per ``reader.get`` of a RANDOM_TOKENS-token sample in shuffled order, the
    tokens per sample: fewer only when all states hold fewer than 2 x RANDOM_TOKENS rows).

    The same states, regrouped into samples of that many rows; the shards are opened and
    verified by a first pass, then every sample is fetched RANDOM_ROUNDS times.
    """
    rows = torch.cat(states)
    size = min(RANDOM_TOKENS, len(rows) // 2)
    samples = [rows[i:i + size] for i in range(0, len(rows) - size + 1, size)]
    _write_cache(url, samples, 1)
    reader = CacheReader(url, threads=threads)
    for i in range(len(samples)):
        reader.get(f"s{i:05d}")
    order = [i for _ in range(RANDOM_ROUNDS) for i in range(len(samples))]
    random.Random(0).shuffle(order)
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for i in order:
            got = reader.get(f"s{i:05d}", dtype=torch.bfloat16)
        times.append((time.perf_counter() - t0) * 1000 / len(order))
        assert torch.equal(got.answer_hidden, samples[order[-1]])
    return min(times), size


def bench_speed(states: list[torch.Tensor], threads: int, root: Path) -> dict:
    """The cache path vs the raw codec at ``threads`` threads (see the module docstring)."""
    mb = sum(x.numel() * 2 for x in states) / 2**20
    codec = bench_codec(states, threads)
    write_s = min(_write_cache(str(root / f"speed-{threads}-{r}"), states, threads) for r in range(REPEATS))
    url = str(root / f"speed-{threads}-0")
    read_times = []
    for _ in range(REPEATS):
        reader = CacheReader(url, threads=threads)  # verify=True: checksums on first use, as the trainer
        t0 = time.perf_counter()
        got = [s.answer_hidden for s in reader.iter_samples(dtype=torch.bfloat16)]
        read_times.append(time.perf_counter() - t0)
        assert all(torch.equal(a, b) for a, b in zip(states, got))
    read_s = min(read_times)
    bare_times = []  # the same read without the checksums: what they cost
    for _ in range(REPEATS):
        reader = CacheReader(url, threads=threads, verify=False)
        t0 = time.perf_counter()
        for _ in reader.iter_samples(dtype=torch.bfloat16):
            pass
        bare_times.append(time.perf_counter() - t0)
    random_ms, random_tokens = bench_random_access(states, threads, str(root / f"random-{threads}"))
    loader_s = bench_loader(states, threads, root)
    decode_ms = random_tokens * states[0].shape[1] * 2 / 2**20 / codec["decode_mbs"] * 1000
    return {"codec_encode_mbs": codec["encode_mbs"], "codec_decode_mbs": codec["decode_mbs"],
            "write_mbs": mb / write_s, "read_mbs": mb / read_s, "loader_mbs": mb / loader_s,
            "read_unverified_mbs": mb / min(bare_times),
            "write_vs_codec": mb / write_s / codec["encode_mbs"], "read_vs_codec": mb / read_s / codec["decode_mbs"],
            "read_unverified_vs_codec": mb / min(bare_times) / codec["decode_mbs"],
            "loader_vs_codec": mb / loader_s / codec["decode_mbs"],
            "random_access_ms": random_ms, "random_overhead_ms": random_ms - decode_ms,
            "random_tokens": random_tokens}


def speed_table(speed: dict[int, dict]) -> str:
    head = (f"{'threads':>7} {'codec enc':>10} {'codec dec':>10} {'write':>8} {'read':>8} {'unverif.':>9} "
            f"{'loader':>8} {'write/codec':>12} {'read/codec':>11} {'unverif./codec':>15} {'loader/codec':>13} "
            f"{'get ms/4k':>10} {'overhead':>9}")
    lines = [head, "-" * len(head)]
    for n, r in speed.items():
        lines.append(f"{n:>7} {r['codec_encode_mbs']:>10.0f} {r['codec_decode_mbs']:>10.0f} {r['write_mbs']:>8.0f} "
                     f"{r['read_mbs']:>8.0f} {r['read_unverified_mbs']:>9.0f} {r['loader_mbs']:>8.0f} "
                     f"{r['write_vs_codec']:>12.2f} {r['read_vs_codec']:>11.2f} {r['read_unverified_vs_codec']:>15.2f} "
                     f"{r['loader_vs_codec']:>13.2f} {r['random_access_ms']:>10.2f} {r['random_overhead_ms']:>9.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report


def table(results: dict[str, dict], tokens: int, raw_mb: float) -> str:
    base = results["safetensors/sample"]
    head = (f"{'layout':<20} {'B/token':>9} {'vs base':>8} {'write MB/s':>11} {'read MB/s':>10} "
            f"{'get ms':>7} {'max rel err':>12}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        lines.append(f"{name:<20} {r['all_bytes'] / tokens:>9.1f} {r['all_bytes'] / base['all_bytes']:>8.3f} "
                     f"{raw_mb / r['write_s']:>11.1f} {raw_mb / r['read_s']:>10.1f} {r['random_ms']:>7.2f} "
                     f"{r['rel_err']:>12.2e}")
    return "\n".join(lines)


SMOKE = {"tokens": 256, "hidden": 64, "samples": 4}  # --smoke: same code paths, smallest sizes


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="total hidden-state rows (default 16384)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    parser.add_argument("--samples", type=int, default=24, help="number of sequences (default 24)")
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="torch CPU threads (default: the CPU count, at most 4)")
    parser.add_argument("--io-threads", default="1,2", type=lambda v: [int(x) for x in v.split(",")],
                        help="thread counts of the cache-path measurements (default 1,2)")
    benchcli.add_smoke_and_json(parser, SMOKE)
    return benchcli.parse(parser, SMOKE, argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        states, source = hidden_states(args.tokens, args.hidden, args.samples, root)
        forward_s = time.perf_counter() - t0
        tokens = sum(len(s) for s in states)
        raw_mb = tokens * args.hidden * 2 / 2**20
        bench_cache(states[:2], "bf16", root / "warm-up")  # imports and first-call costs
        results = {"safetensors/sample": bench_baseline(states, root)}
        for codec in CODECS:
            results[f"cache {codec}"] = bench_cache(states, codec, root)
        blocks = blosc_blocksize_check(states)
        speed = {n: bench_speed(states, n, root) for n in args.io_threads}
    print(f"hidden states: {source}, {len(states)} sequences, {tokens} tokens x {args.hidden} "
          f"({raw_mb:.1f} MiB raw bf16; forward {forward_s:.1f} s)")
    print(table(results, tokens, raw_mb))
    print(f"bf16 blosc zstd-1 + byte shuffle on {CHUNK_TARGET_BYTES >> 10} KiB chunks: {blocks['chunk']:.3f} of raw "
          f"with blocksize = chunk, {blocks['default']:.3f} with the default blocksize")
    print("B/token counts every file of the layout (cache: records, metadata, manifest, index). "
          "MB/s are raw bf16 MiB per second; 'get ms' is one random-access read.")
    print(f"\nCache path vs raw codec (MB/s of raw bf16; ratios to the codec's decode MB/s, encode for the "
          f"writer; get ms per 4096-token sample, overhead = beyond the codec's decode):")
    print(speed_table(speed))
    summary = {"source": source, "tokens": tokens, "hidden": args.hidden, "threads": args.threads,
               "forward_s": forward_s, "results": results, "blosc": blocks,
               "speed": {str(n): r for n, r in speed.items()}}
    # the headline keys: at the largest thread count measured
    summary.update({k: speed[max(speed)][k] for k in ("write_vs_codec", "read_vs_codec", "loader_vs_codec",
                                                        "read_unverified_vs_codec", "random_access_ms",
                                                        "random_overhead_ms")})
    benchcli.write_json(summary, args.json)
    return summary


if __name__ == "__main__":
    main()
