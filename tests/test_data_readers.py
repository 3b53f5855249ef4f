"""Tests for genrecal.data.readers: formats, ids, hashes and every bad input."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from genrecal.data.readers import DatasetRead, Skip, iter_dataset, read_dataset
from genrecal.data.sample import Turn, content_hash
from genrecal.store.errors import DatasetError


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' arrow cache inside the test's tmp folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def png_bytes(colour: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def root(tmp_path) -> Path:
    """A dataset root with three small images."""
    (tmp_path / "img").mkdir()
    for name, colour in [("red", (255, 0, 0)), ("green", (0, 255, 0)), ("blue", (0, 0, 255))]:
        (tmp_path / "img" / f"{name}.png").write_bytes(png_bytes(colour))
    return tmp_path


# ------------------------------------------------------------------ the same rows in every format

LLAVA_ROWS = [
    {"id": "a", "image": "img/red.png", "kind": "single",
     "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                       {"from": "gpt", "value": "red"}]},
    {"id": "b", "image": ["img/green.png", "img/blue.png"],
     "conversations": [{"from": "system", "value": "Be brief."},
                       {"from": "human", "value": "First: <image>"},
                       {"from": "gpt", "value": "green"},
                       {"from": "user", "value": "And now <image> this one?"},
                       {"from": "assistant", "value": "blue"}]},
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
]

MESSAGES_ROWS = [
    {"id": "a", "kind": "single", "images": ["img/red.png"],
     "messages": [{"role": "user", "content": [{"type": "image"},
                                               {"type": "text", "text": "What colour is it?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]},
    {"id": "b", "kind": None, "images": ["img/green.png", "img/blue.png"],
     "messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "text", "text": "First:"},
                                               {"type": "image"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "green"}]},
                  {"role": "user", "content": [{"type": "text", "text": "And now"},
                                               {"type": "image"},
                                               {"type": "text", "text": "this one?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "blue"}]}]},
    {"id": None, "kind": None, "images": [],
     "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_json(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def messages_dataset(rows: list, embed_from: Path | None = None):
    """A `datasets.Dataset` of messages rows; with ``embed_from``, images become embedded bytes."""
    import datasets

    if embed_from is None:
        return datasets.Dataset.from_list(rows)
    embedded = [{**r, "images": [{"bytes": (embed_from / p).read_bytes(), "path": None}
                                 for p in r["images"]]} for r in rows]
    features = datasets.Dataset.from_list(rows).features.copy()
    features["images"] = datasets.List(datasets.Image())
    return datasets.Dataset.from_list(embedded, features=features)


def write_messages(root: Path, kind: str, embed: bool = False) -> Path:
    """Write MESSAGES_ROWS as ``kind`` (json/jsonl/parquet/arrow-file/arrow-dir) under root/m."""
    folder = root / "m" / kind
    if kind == "json":
        return write_json(folder / "data.json", MESSAGES_ROWS)
    if kind == "jsonl":
        return write_jsonl(folder / "data.jsonl", MESSAGES_ROWS)
    dataset = messages_dataset(MESSAGES_ROWS, root if embed else None)
    if kind == "parquet":
        folder.mkdir(parents=True)
        dataset.to_parquet(str(folder / "data.parquet"))
        return folder / "data.parquet"
    dataset.save_to_disk(str(folder / "saved"))
    if kind == "arrow-dir":
        return folder / "saved"
    arrow_file = next((folder / "saved").glob("*.arrow"))
    return Path(shutil.copy(arrow_file, folder / "data.arrow"))


def view(sample) -> tuple:
    """What must agree across formats: id, turns, hash and the image bytes."""
    return (sample.id, sample.turns, sample.content_hash,
            tuple(p.read_bytes() for p in sample.images))


def test_llava_json_reads_expected_samples(root):
    read = read_dataset(write_json(root / "data.json", LLAVA_ROWS))
    assert isinstance(read, DatasetRead) and read.skips == []
    a, b, c = read.samples
    assert a.id == "a" and a.turns == (Turn("user", (0, "What colour is it?")),
                                       Turn("assistant", ("red",)))
    assert a.images == ((root / "img/red.png").resolve(),)
    assert a.meta == {"kind": "single"}
    assert a.content_hash == content_hash(a.turns, [png_bytes((255, 0, 0))])
    assert [t.role for t in b.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert b.turns[1].parts == ("First:", 0)
    assert b.turns[3].parts == ("And now", 1, "this one?")
    assert b.answers == ["green", "blue"]
    assert [p.name for p in b.images] == ["green.png", "blue.png"]
    assert c.id == "data:2" and c.images == ()
    assert all(s.source == str(root / "data.json") for s in read.samples)


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "arrow-file", "arrow-dir"])
def test_messages_formats_match_llava(root, kind, tmp_path):
    expected = [view(s) for s in read_dataset(write_jsonl(root / "data.jsonl", LLAVA_ROWS)).samples]
    path = write_messages(root, kind)
    got = read_dataset(path, image_root=root, image_cache=tmp_path / "cache").samples
    if kind == "arrow-dir":  # a save_to_disk folder has no file stem: derived ids use its name
        expected[2] = ("saved:2", *expected[2][1:])
    assert [view(s) for s in got] == expected
    assert got[0].meta == {"kind": "single"}


def test_llava_json_and_jsonl_give_equal_samples(root):
    from_json = read_dataset(write_json(root / "data.json", LLAVA_ROWS)).samples
    from_jsonl = read_dataset(write_jsonl(root / "data.jsonl", LLAVA_ROWS)).samples
    assert [view(s) for s in from_json] == [view(s) for s in from_jsonl]


def test_embedded_image_bytes_go_to_content_addressed_cache(root, tmp_path):
    cache = tmp_path / "cache"
    path = write_messages(root, "parquet", embed=True)
    got = read_dataset(path, image_root=root, image_cache=cache).samples
    expected = read_dataset(write_jsonl(root / "data.jsonl", LLAVA_ROWS)).samples
    assert [view(s) for s in got] == [view(s) for s in expected]
    for image in got[1].images:
        assert image.parent == cache and image.suffix == ".png"
        assert image.stem == hashlib.sha256(image.read_bytes()).hexdigest()
    again = read_dataset(path, image_root=root, image_cache=cache).samples
    assert [s.images for s in again] == [s.images for s in got]
    assert sorted(p.name for p in cache.iterdir()) == sorted(p.name for s in got for p in s.images)


def test_images_without_placeholder_go_to_first_human_turn(root):
    row = {"id": "x", "image": ["img/red.png", "img/blue.png"],
           "conversations": [{"from": "system", "value": "Hi."},
                             {"from": "human", "value": "Compare."},
                             {"from": "gpt", "value": "ok"}]}
    (sample,) = read_dataset(write_jsonl(root / "d.jsonl", [row])).samples
    assert sample.turns[1] == Turn("user", (0, 1, "Compare."))
    assert sample.to_messages()[1]["content"][:2] == [{"type": "image"}, {"type": "image"}]


def test_messages_plain_string_content(root):
    rows = [{"messages": [{"role": "user", "content": "Hi?"},
                          {"role": "assistant", "content": "yes"}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "no"}]}]}]
    samples = read_dataset(write_jsonl(root / "m.jsonl", rows), format="messages").samples
    assert [s.answers for s in samples] == [["yes"], ["no"]]
    assert [s.id for s in samples] == ["m:0", "m:1"]


# ------------------------------------------------------------------ ids and hashes


def test_ids_and_hashes_are_stable(root):
    path = write_jsonl(root / "data.jsonl", LLAVA_ROWS)
    first, second = read_dataset(path).samples, read_dataset(path).samples
    assert [(s.id, s.content_hash) for s in first] == [(s.id, s.content_hash) for s in second]
    assert len({s.content_hash for s in first}) == 3


def test_hash_changes_with_one_word(root):
    path = write_jsonl(root / "data.jsonl", LLAVA_ROWS)
    before = read_dataset(path).samples[0].content_hash
    rows = json.loads(json.dumps(LLAVA_ROWS))
    rows[0]["conversations"][1]["value"] = "blue"
    assert read_dataset(write_jsonl(path, rows)).samples[0].content_hash != before


def test_hash_changes_with_one_image_byte(root):
    path = write_jsonl(root / "data.jsonl", LLAVA_ROWS)
    before = read_dataset(path).samples[0].content_hash
    image_path = root / "img/red.png"
    image = Image.open(image_path).convert("RGB")
    image.putpixel((3, 3), (254, 0, 0))
    image.save(image_path)
    after = read_dataset(path).samples[0].content_hash
    assert after != before
    # Same pixels, same bytes: back to the original hash.
    image_path.write_bytes(png_bytes((255, 0, 0)))
    assert read_dataset(path).samples[0].content_hash == before


# ------------------------------------------------------------------ bad inputs


def row(sample_id, image="img/red.png", question="<image>\nQ?", answer="red", role="gpt"):
    return {"id": sample_id, "image": image,
            "conversations": [{"from": "human", "value": question},
                              {"from": role, "value": answer}]}


def _outside_file(root: Path) -> Path:
    outside = root.parent / f"{root.name}-outside.png"
    outside.write_bytes(png_bytes((1, 2, 3)))
    return outside


def _symlink(root: Path) -> str:
    (root / "img" / "link.png").symlink_to(_outside_file(root))
    return "img/link.png"


def _corrupt(root: Path) -> str:
    (root / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return "img/bad.png"


def _truncated(root: Path) -> str:
    big = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(big, format="PNG")
    (root / "img" / "cut.png").write_bytes(big.getvalue()[: len(big.getvalue()) // 2])
    return "img/cut.png"


# name -> (function of root giving the bad row, text expected in the reason)
BAD_ROWS = {
    "missing image": (lambda r: row("bad", image="img/nope.png"), "not found"),
    "corrupt image": (lambda r: row("bad", image=_corrupt(r)), "cannot be decoded"),
    "truncated image": (lambda r: row("bad", image=_truncated(r)), "cannot be decoded"),
    "no assistant turn": (lambda r: {"id": "bad", "image": "img/red.png", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}]}, "no assistant turn"),
    "empty answer": (lambda r: row("bad", answer=" \n\t"), "empty or whitespace-only answer"),
    "missing answer value": (lambda r: {"id": "bad", "conversations": [
        {"from": "human", "value": "Q?"}, {"from": "gpt"}]}, "not text"),
    "unknown role": (lambda r: row("bad", role="robot"), "unknown role 'robot'"),
    "absolute path outside": (lambda r: row("bad", image=str(_outside_file(r))),
                              "outside the image root"),
    "dotdot traversal": (lambda r: row("bad", image=f"img/../../{_outside_file(r).name}"),
                         "outside the image root"),
    "symlink outside": (lambda r: row("bad", image=_symlink(r)), "outside the image root"),
    "duplicate id": (lambda r: row("good-1"), "duplicate id"),
    "too many placeholders": (lambda r: row("bad", question="<image> <image> Q?"),
                              "2 image placeholder(s) for 1 image(s)"),
    "placeholder without image": (lambda r: row("bad", image=None),
                                  "1 image placeholder(s) for 0 image(s)"),
    "image in answer": (lambda r: row("bad", question="Q?", answer="<image> red"),
                        "assistant turn contains an image"),
    "no conversations": (lambda r: {"id": "bad", "image": "img/red.png"}, "conversations"),
}


def _bad_file(root: Path, name: str) -> tuple[Path, str, str]:
    make, reason = BAD_ROWS[name]
    bad = make(root)
    path = write_jsonl(root / "data.jsonl", [row("good-1"), bad, row("good-2")])
    return path, bad["id"], reason


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_bad_row_raises_with_id_and_file(root, name):
    path, bad_id, reason = _bad_file(root, name)
    with pytest.raises(DatasetError) as info:
        read_dataset(path)
    err = info.value
    assert (err.sample_id, err.file) == (bad_id, str(path))
    assert reason in err.reason
    message = str(err)
    assert repr(bad_id) in message and str(path) in message and "Fix:" in message


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_bad_row_is_recorded_as_skip(root, name):
    path, bad_id, reason = _bad_file(root, name)
    read = read_dataset(path, on_error="skip")
    assert [s.id for s in read.samples] == ["good-1", "good-2"]
    (skip,) = read.skips
    # the later row of a duplicated id is recorded under its own name, never the sample's id
    skip_id = "good-1#row1" if name == "duplicate id" else bad_id
    assert isinstance(skip, Skip) and (skip.sample_id, skip.file) == (skip_id, str(path))
    assert reason in skip.reason


def test_skipped_rows_never_take_the_id_of_another_row(root):
    rows = [row("x"), row("x", image="img/blue.png"), row("x", image="img/nope.png"),
            row("x#row1"), row(1.5), row("d:4"), row("y", image="img/nope.png"), row("y")]
    read = read_dataset(write_jsonl(root / "d.jsonl", rows), on_error="skip")
    assert [s.id for s in read.samples] == ["x"]
    assert read.samples[0].images == ((root / "img" / "red.png").resolve(),)
    skips = {s.sample_id: s.reason for s in read.skips}
    assert list(skips) == ["x#row1", "x#row2", "x#row1#row3", "d:4", "d:4#row5", "y", "y#row7"]
    assert "duplicate id 'x' (row 1; row 0 has the same id)" in skips["x#row1"]
    # a skip's name is taken: a later row using it is a duplicate too (recorded, not lost)
    assert "duplicate id 'x#row1' (row 3; row 1 has the same id)" in skips["x#row1#row3"]
    assert "id 1.5" in skips["d:4"] and "duplicate id 'd:4' (row 5" in skips["d:4#row5"]
    assert "not found" in skips["y"] and "duplicate id 'y'" in skips["y#row7"]
    ids = [s.id for s in read.samples] + list(skips)
    assert len(set(ids)) == len(ids)


def test_a_skipped_row_cannot_reuse_an_id_of_another_source(root):
    from genrecal.data.pipeline_data import SourceRef, read_sources
    from genrecal.store.errors import DuplicateSampleError

    first = write_jsonl(root / "one.jsonl", [row("x")])
    second = write_jsonl(root / "two.jsonl", [row("x", image="img/nope.png")])
    with pytest.raises(DuplicateSampleError, match=f"'x' occurs in {first} and in {second}"):
        read_sources([SourceRef(str(first)), SourceRef(str(second))], on_error="skip")


def test_undecodable_image_error_names_the_file(root):
    path = write_jsonl(root / "d.jsonl", [row("bad", image=_corrupt(root))])
    with pytest.raises(DatasetError) as info:
        read_dataset(path)
    message = str(info.value)
    assert "BytesIO" not in message and "'bad'" in message and str(path) in message
    assert "'img/bad.png'" in message and str((root / "img" / "bad.png").resolve()) in message
    assert "cannot be decoded" in message and "Fix:" in message


def test_symlink_inside_root_is_fine(root):
    (root / "img" / "alias.png").symlink_to(root / "img" / "red.png")
    path = write_jsonl(root / "d.jsonl", [row("x", image="img/alias.png")])
    (sample,) = read_dataset(path).samples
    assert sample.images == ((root / "img" / "red.png").resolve(),)


def test_symlinked_image_root_and_dataset_folder_are_fine(root, tmp_path_factory):
    path = write_jsonl(root / "d.jsonl", [row("x"), row("y", image=str(root / "img" / "blue.png"))])
    links = tmp_path_factory.mktemp("links")
    (links / "data").symlink_to(root, target_is_directory=True)
    (links / "images").symlink_to(root / "img", target_is_directory=True)
    red = (root / "img" / "red.png").resolve()
    for dataset, image_root in [(links / "data" / "d.jsonl", None), (path, links / "data"),
                                (links / "data" / "d.jsonl", links / "data")]:
        assert read_dataset(dataset, image_root=image_root).samples[0].images == (red,)
    flat = write_jsonl(root / "flat.jsonl", [row("x", image="red.png"),
                                             row("y", image=str(links / "images" / "blue.png"))])
    got = read_dataset(flat, image_root=links / "images").samples
    assert [s.images for s in got] == [(red,), ((root / "img" / "blue.png").resolve(),)]


def test_images_folder_linked_from_elsewhere_is_fine(root, tmp_path_factory):
    dataset = tmp_path_factory.mktemp("dataset")
    (dataset / "images").symlink_to(root / "img", target_is_directory=True)
    path = write_jsonl(dataset / "d.jsonl", [
        row("x", image="images/red.png"), row("y", image=str(dataset / "images" / "green.png")),
        row("up", image="images/../../escape.png"), row("z", image="images/../images/blue.png")])
    read = read_dataset(path, on_error="skip")
    assert [s.images for s in read.samples] == [
        ((root / "img" / "red.png").resolve(),), ((root / "img" / "green.png").resolve(),),
        ((root / "img" / "blue.png").resolve(),)]
    (skip,) = read.skips
    assert skip.sample_id == "up" and "outside the image root" in skip.reason


def test_symlinked_image_file_escaping_a_linked_root_is_refused(root, tmp_path_factory):
    links = tmp_path_factory.mktemp("links")
    (links / "data").symlink_to(root, target_is_directory=True)
    path = write_jsonl(root / "d.jsonl", [row("x", image=_symlink(root))])
    for image_root in (None, links / "data"):
        with pytest.raises(DatasetError, match="symbolic link to .*outside the image root"):
            read_dataset(path, image_root=image_root)


def test_absolute_path_inside_root_is_fine(root):
    path = write_jsonl(root / "d.jsonl", [row("x", image=str(root / "img" / "red.png"))])
    assert len(read_dataset(path).samples) == 1


def test_invalid_jsonl_line_is_a_bad_row_with_derived_id(root):
    path = root / "data.jsonl"
    path.write_text(json.dumps(row("a")) + "\n{not json\n" + json.dumps(row("c")) + "\n")
    with pytest.raises(DatasetError, match="data:1"):
        read_dataset(path)
    read = read_dataset(path, on_error="skip")
    assert [s.id for s in read.samples] == ["a", "c"]
    assert read.skips[0].sample_id == "data:1" and "not valid JSON" in read.skips[0].reason


@pytest.mark.parametrize("bad_id", [1.5, ["x"], True])
def test_bad_id_type(root, bad_id):
    path = write_jsonl(root / "data.jsonl", [row(bad_id)])
    with pytest.raises(DatasetError, match="id"):
        read_dataset(path)


def test_integer_ids_become_strings(root):
    (sample,) = read_dataset(write_jsonl(root / "d.jsonl", [row(7)])).samples
    assert sample.id == "7"


MESSAGES_BAD = {
    "unknown role": ({"role": "robot", "content": "x"}, ["img/red.png"], "unknown role"),
    "missing image": ({"role": "assistant", "content": "red"}, ["img/nope.png"], "not found"),
    "placeholder mismatch": ({"role": "assistant", "content": "red"},
                             ["img/red.png", "img/red.png"], "1 image placeholder(s) for 2"),
    "empty answer": ({"role": "assistant", "content": "  "}, ["img/red.png"], "empty"),
}


@pytest.mark.parametrize("name", sorted(MESSAGES_BAD))
def test_messages_bad_rows(root, name):
    answer, images, reason = MESSAGES_BAD[name]
    good = {"id": "good", "images": ["img/red.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
        {"role": "assistant", "content": "red"}]}
    bad = {"id": "bad", "images": images, "messages": [good["messages"][0], answer]}
    path = write_jsonl(root / "m.jsonl", [good, bad])
    with pytest.raises(DatasetError) as info:
        read_dataset(path)
    assert info.value.sample_id == "bad" and str(path) in str(info.value)
    read = read_dataset(path, on_error="skip")
    assert [s.id for s in read.samples] == ["good"]
    assert read.skips[0].sample_id == "bad" and reason in read.skips[0].reason


def test_messages_corrupt_embedded_bytes(root, tmp_path):
    import datasets

    rows = [{"id": "bad", "images": [{"bytes": b"garbage", "path": None}],
             "messages": [{"role": "user", "content": [{"type": "image"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]}]
    features = datasets.Features({"id": datasets.Value("string"),
                                  "images": datasets.List(datasets.Image()),
                                  "messages": messages_dataset(MESSAGES_ROWS).features["messages"]})
    path = root / "bad.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    read = read_dataset(path, on_error="skip", image_cache=tmp_path / "cache")
    assert read.samples == [] and read.skips[0].sample_id == "bad"
    assert "cannot be decoded" in read.skips[0].reason
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ sources, formats, options


def test_format_detection_error(root):
    path = write_jsonl(root / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DatasetError, match="format="):
        read_dataset(path)


def test_forced_format_mismatch_is_a_row_error(root):
    path = write_jsonl(root / "x.jsonl", LLAVA_ROWS)
    with pytest.raises(DatasetError, match="messages"):
        read_dataset(path, format="messages")


def test_missing_path_and_bad_image_root(root):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(root / "nope.jsonl")
    path = write_jsonl(root / "d.jsonl", LLAVA_ROWS)
    with pytest.raises(DatasetError, match="image root"):
        read_dataset(path, image_root=root / "nowhere")


def test_invalid_json_file(root):
    path = root / "d.json"
    path.write_text("[{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_dataset(path, format="llava")
    path.write_text('{"id": 1}')
    with pytest.raises(DatasetError, match="not a list"):
        read_dataset(path, format="llava")


def test_splits_in_a_folder(root):
    write_jsonl(root / "train.jsonl", LLAVA_ROWS)
    write_jsonl(root / "test.jsonl", LLAVA_ROWS[:1])
    with pytest.raises(DatasetError, match="test, train"):
        read_dataset(root)
    assert len(read_dataset(root, split="test").samples) == 1
    assert read_dataset(root, split="train").samples[2].id == "train:2"
    with pytest.raises(DatasetError, match="no split 'val'"):
        read_dataset(root, split="val")
    with pytest.raises(DatasetError, match="single file"):
        read_dataset(root / "train.jsonl", split="train")


def test_sharded_parquet_split(root, tmp_path):
    folder = root / "shards"
    folder.mkdir()
    dataset = messages_dataset(MESSAGES_ROWS)
    dataset.select([0, 1]).to_parquet(str(folder / "train-00000-of-00002.parquet"))
    dataset.select([2]).to_parquet(str(folder / "train-00001-of-00002.parquet"))
    got = read_dataset(folder, image_root=root, image_cache=tmp_path / "c").samples
    assert [s.id for s in got] == ["a", "b", "train:2"]


def test_saved_dataset_dict_split(root, tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": messages_dataset(MESSAGES_ROWS),
                               "test": messages_dataset(MESSAGES_ROWS[:1])})
    dd.save_to_disk(str(root / "dd"))
    assert len(read_dataset(root / "dd", split="test", image_root=root).samples) == 1
    with pytest.raises(DatasetError, match="several splits"):
        read_dataset(root / "dd", image_root=root)


def test_limit_counts_samples_not_skips(root):
    rows = [row("a"), row("bad", image="img/nope.png"), row("b"), row("c")]
    path = write_jsonl(root / "d.jsonl", rows)
    read = read_dataset(path, on_error="skip", limit=2)
    assert [s.id for s in read.samples] == ["a", "b"] and len(read.skips) == 1
    assert read_dataset(path, limit=0).samples == []
    with pytest.raises(ValueError, match="limit"):
        read_dataset(path, limit=-1)


def test_iter_dataset_streams_samples_and_skips_in_order(root):
    rows = [row("a"), row("bad", image="img/nope.png"), row("b")]
    items = list(iter_dataset(write_jsonl(root / "d.jsonl", rows), on_error="skip"))
    assert [type(i).__name__ for i in items] == ["Sample", "Skip", "Sample"]


def test_bad_arguments(root):
    path = write_jsonl(root / "d.jsonl", LLAVA_ROWS)
    with pytest.raises(ValueError, match="format"):
        read_dataset(path, format="csv")
    with pytest.raises(ValueError, match="on_error"):
        read_dataset(path, on_error="ignore")
