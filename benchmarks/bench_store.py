"""Bytes per token and write / read throughput of each hidden-state codec of the teacher cache.

Hidden states come from a real transformers forward pass of a small model with random weights
over real text (English docstrings of the Python standard library), tokenised by the model's
own tokenizer: the tiny Qwen2-VL of ``genrecal.model.tiny`` when available, else a
``Qwen2ForCausalLM`` over UTF-8 bytes. They are the post-norm last hidden states, in bfloat16,
as a teacher pass caches them. Random weights do not give a trained model's outlier channels,
so treat absolute ratios as indicative; the comparison between codecs is the point.

Side by side, in the same run: the baseline of speculative-decoding hidden-state caches, one
bfloat16 safetensors file per sample. Runs in well under a minute with the defaults:

    python benchmarks/bench_store.py [--tokens 16384] [--hidden 1024] [--samples 24] [--threads N]
                                     [--smoke] [--json [PATH]]

``--smoke`` runs the same code paths at the smallest sizes (a few seconds), for CI; ``--json``
prints the results as JSON after the table, ``--json PATH`` writes them to PATH instead.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time
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
    print(f"hidden states: {source}, {len(states)} sequences, {tokens} tokens x {args.hidden} "
          f"({raw_mb:.1f} MiB raw bf16; forward {forward_s:.1f} s)")
    print(table(results, tokens, raw_mb))
    print(f"bf16 blosc zstd-1 + byte shuffle on {CHUNK_TARGET_BYTES >> 10} KiB chunks: {blocks['chunk']:.3f} of raw "
          f"with blocksize = chunk, {blocks['default']:.3f} with the default blocksize")
    print("B/token counts every file of the layout (cache: records, metadata, manifest, index). "
          "MB/s are raw bf16 MiB per second; 'get ms' is one random-access read.")
    summary = {"source": source, "tokens": tokens, "hidden": args.hidden, "threads": args.threads,
               "forward_s": forward_s, "results": results, "blosc": blocks}
    benchcli.write_json(summary, args.json)
    return summary


if __name__ == "__main__":
    main()
