"""``genrecal inspect CACHE [--json] [--plots DIR]``: what a cache holds and what it costs.

:func:`inspect_cache` returns a JSON-serialisable summary (samples, tokens, shards, bytes per
feature, bytes per token, ratio to raw, teacher, settings, skipped samples and why) and, when
``scan`` is set, distributions read from the shards: sequence / question / answer lengths and
the probability mass the cached top-k covers (``sum(exp(topk_logprobs))`` per position).
:func:`format_inspect` renders it for humans, :func:`write_inspect_plots` as PNG files.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import zarr

from genrecal.store.codecs import decode_values
from genrecal.store.manifest import load_manifest
from genrecal.store.schema import RECORDS_FILE, TENSORS_DIR, Manifest, ShardEntry
from genrecal.store.storage import CacheStorage

_MAX_BINS = 40
_MASS_BINS = 20
_SHOW_SKIPPED = 20


def inspect_cache(url, storage_options: dict | None = None, scan: bool = True) -> dict:
    """A summary of the cache at ``url``; ``scan`` also reads records / top-k for distributions."""
    storage = CacheStorage(url, storage_options)
    manifest = load_manifest(storage)
    out = _summary(storage, manifest)
    if scan:
        out["distributions"] = _distributions(storage, manifest)
    return out


def _summary(storage: CacheStorage, m: Manifest) -> dict:
    tokens = m.counts.tokens
    features = {name: _feature_summary(m, name) for name in m.features}
    tensor_bytes = sum(f["bytes"] for f in features.values())
    records = sum(f.size for s in m.shards for f in s.files if f.path.endswith(RECORDS_FILE))
    reasons = Counter(s.reason for s in m.skipped)
    return {
        "url": storage.url, "format_version": m.format_version, "created": m.created,
        "teacher": {**m.teacher.model_dump(), "digest": m.teacher.digest},
        "settings": m.header.settings, "samples": m.counts.samples, "tokens": tokens, "shards": len(m.shards),
        "features": features,
        "bytes": {"tensors": tensor_bytes, "records": records, "artifacts": sum(a.size for a in m.artifacts),
                  "index": m.index.size if m.index else 0,
                  "raw_tensors": sum(f["raw_bytes"] for f in features.values())},
        "bytes_per_input_token": (tensor_bytes + records) / tokens if tokens else None,
        "skipped": {"count": len(m.skipped), "by_reason": dict(reasons.most_common()),
                    "samples": [s.model_dump() for s in m.skipped[:_SHOW_SKIPPED]]},
    }


def _feature_summary(m: Manifest, name: str) -> dict:
    spec = m.features[name]
    rows = m.counts.feature_rows.get(name, 0)
    nbytes = sum(s.feature_bytes.get(name, 0) for s in m.shards)
    raw = sum(s.raw_bytes.get(name, 0) for s in m.shards)
    return {**spec.model_dump(exclude_none=True), "rows": rows, "bytes": nbytes, "raw_bytes": raw,
            "ratio_to_raw": nbytes / raw if raw else None, "bytes_per_row": nbytes / rows if rows else None}


# ----------------------------------------------------------------------------- distributions


def _histogram(counts: np.ndarray) -> dict:
    """Counts per integer value -> at most ``_MAX_BINS`` equal-width bins over the used range."""
    used = np.nonzero(counts)[0]
    if not len(used):
        return {"edges": [], "counts": [], "mean": None, "max": None}
    lo, hi = int(used[0]), int(used[-1]) + 1
    edges = np.unique(np.linspace(lo, hi, min(_MAX_BINS, hi - lo) + 1).round().astype(int))
    binned = [int(counts[a:b].sum()) for a, b in zip(edges[:-1], edges[1:])]
    values = np.arange(len(counts))
    return {"edges": edges.tolist(), "counts": binned, "mean": float((values * counts).sum() / counts.sum()),
            "max": hi - 1}


def _add_lengths(acc: dict[str, np.ndarray], key: str, lengths: np.ndarray) -> None:
    counts = np.bincount(lengths.astype(np.int64), minlength=1)
    prev = acc.get(key, np.zeros(0, dtype=np.int64))
    size = max(len(prev), len(counts))
    acc[key] = np.pad(prev, (0, size - len(prev))) + np.pad(counts, (0, size - len(counts)))


def _span_lengths(table: pa.Table, column: str) -> np.ndarray:
    """Total tokens covered by each record's spans in ``column``."""
    out = []
    for spans in table.column(column).to_pylist():
        out.append(sum(e - s for s, e in spans))
    return np.array(out, dtype=np.int64)


def _distributions(storage: CacheStorage, m: Manifest) -> dict:
    lengths: dict[str, np.ndarray] = {}
    mass = np.zeros(_MASS_BINS, dtype=np.int64)
    mass_sum, mass_n = 0.0, 0
    for entry in m.shards:
        table = pa.ipc.open_file(storage.open_arrow(f"{entry.dir}/{RECORDS_FILE}")).read_all()
        _add_lengths(lengths, "sequence_length", pc.list_value_length(table.column("input_ids")).to_numpy())
        _add_lengths(lengths, "question_length", _span_lengths(table, "question_spans"))
        _add_lengths(lengths, "answer_length", _span_lengths(table, "answer_spans"))
        if "logit_stats" in m.features:
            covered = _topk_mass(storage, m, entry)
            mass += np.histogram(covered, bins=_MASS_BINS, range=(0.0, 1.0))[0]
            mass_sum, mass_n = mass_sum + float(covered.sum()), mass_n + len(covered)
    out = {k: _histogram(v) for k, v in lengths.items()}
    if "logit_stats" in m.features:
        out["topk_mass"] = {"edges": np.linspace(0, 1, _MASS_BINS + 1).round(3).tolist(), "counts": mass.tolist(),
                            "mean": mass_sum / mass_n if mass_n else None, "k": m.features["logit_stats"].width}
    return out


def _topk_mass(storage: CacheStorage, m: Manifest, entry: ShardEntry) -> np.ndarray:
    """Per cached position of one shard: sum of exp(topk_logprobs), float64 [rows], clipped to [0, 1]."""
    group = zarr.open_group(storage.zarr_store(f"{entry.dir}/{TENSORS_DIR}"), mode="r", zarr_format=3)
    data = group["logit_stats/topk_logprobs"][...]
    logprobs = decode_values({"data": data}, m.features["logit_stats"].codec, torch.float64)
    return logprobs.exp().sum(dim=1).clamp(0.0, 1.0).numpy()


# ----------------------------------------------------------------------------- text


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


def format_inspect(d: dict) -> str:
    """A human-readable rendering of :func:`inspect_cache`'s result."""
    t = d["teacher"]
    lines = [f"cache      {d['url']} (format {d['format_version']})",
             f"created    {d['created'].get('created_at')} committed {d['created'].get('committed_at')} "
             f"by genrecal {d['created'].get('genrecal_version')}",
             f"teacher    {t['digest'][:16]} (config {t['config'][:12]}, weights {t['weights'][:12]}, "
             f"tokenizer {t['tokenizer'][:12]})",
             f"samples    {d['samples']} in {d['shards']} shard(s), {d['tokens']} input tokens, "
             f"{d['skipped']['count']} skipped",
             f"bytes      tensors {_size(d['bytes']['tensors'])} (raw {_size(d['bytes']['raw_tensors'])}), "
             f"records {_size(d['bytes']['records'])}, artifacts {_size(d['bytes']['artifacts'])}; "
             f"{_fmt(d['bytes_per_input_token'], '.1f')} B per input token", "", _feature_table(d["features"])]
    lines += ["", "settings   " + (", ".join(f"{k}={v}" for k, v in sorted(d["settings"].items())) or "-")]
    lines += _distribution_lines(d.get("distributions"))
    lines += _skipped_lines(d["skipped"])
    return "\n".join(lines)


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _feature_table(features: dict) -> str:
    rows = [("feature", "codec", "width", "rows", "bytes", "B/row", "ratio to raw")]
    for name, f in features.items():
        rows.append((name, f["codec"], str(f["width"]), str(f["rows"]), _size(f["bytes"]),
                     _fmt(f["bytes_per_row"], ".1f"), _fmt(f["ratio_to_raw"], ".3f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _distribution_lines(dist: dict | None) -> list[str]:
    if not dist:
        return []
    out = [""]
    for key in ("sequence_length", "question_length", "answer_length"):
        h = dist.get(key)
        if h and h["mean"] is not None:
            out.append(f"{key:<16} mean {h['mean']:.1f}, max {h['max']}")
    if "topk_mass" in dist and dist["topk_mass"]["mean"] is not None:
        out.append(f"top-{dist['topk_mass']['k']} mass   mean {dist['topk_mass']['mean']:.4f} of the probability")
    return out


def _skipped_lines(skipped: dict) -> list[str]:
    if not skipped["count"]:
        return []
    out = ["", f"skipped    {skipped['count']} sample(s):"]
    out += [f"  {n:>6}  {reason}" for reason, n in skipped["by_reason"].items()]
    out += [f"  e.g. {s['sample_id']} ({s['file'] or '-'}): {s['reason']}" for s in skipped["samples"][:5]]
    return out


# ----------------------------------------------------------------------------- plots


def write_inspect_plots(url_or_dict, out_dir) -> list[Path]:
    """PNG plots of a cache (or of an :func:`inspect_cache` result with distributions) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = url_or_dict if isinstance(url_or_dict, dict) else inspect_cache(url_or_dict)
    if "distributions" not in d:
        d = inspect_cache(d["url"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [_plot_lengths(plt, d["distributions"], out / "sequence_lengths.png"),
               _plot_bytes(plt, d["features"], out / "bytes_per_feature.png")]
    if "topk_mass" in d["distributions"]:
        written.append(_plot_mass(plt, d["distributions"]["topk_mass"], out / "topk_mass.png"))
    return written


def _bar_hist(ax, h: dict, title: str, xlabel: str) -> None:
    edges = h["edges"]
    if edges:
        ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", edgecolor="black", linewidth=0.3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")


def _plot_lengths(plt, dist: dict, path: Path) -> Path:
    keys = ("sequence_length", "question_length", "answer_length")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key in zip(axes, keys):
        _bar_hist(ax, dist[key], key.replace("_", " "), "tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_bytes(plt, features: dict, path: Path) -> Path:
    names = list(features)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(x - 0.2, [features[n]["raw_bytes"] / 2**20 for n in names], 0.4, label="raw")
    ax.bar(x + 0.2, [features[n]["bytes"] / 2**20 for n in names], 0.4, label="stored")
    ax.set_xticks(x, [f"{n}\n({features[n]['codec']})" for n in names])
    ax.set_ylabel("MiB")
    ax.set_title("bytes per feature")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_mass(plt, h: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    _bar_hist(ax, h, f"probability mass covered by the cached top-{h['k']}", "sum of exp(top-k logprobs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
