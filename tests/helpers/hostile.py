"""Hostile input corpora for the pipeline, and a peak-memory watch over Ray's worker processes.

`hostile_corpus(directory, ...)` writes several Parquet shards that drift in schema (a missing
image or text column, an int64 text column, a string image column, large_string / large_binary /
dictionary types, extra columns, string and large_string ids) and mix good rows with every kind
of bad row (tests/helpers/pipeline_data.mixed_rows' kinds, plus megabyte texts, more decompression
bombs and more corrupt images). It returns what each row must become: per task family ("text"
tasks, "image" tasks) the expected error kind, or None for a result. `clean_corpus` writes the
rows with a result again, in the plain layout, for the reference run.

`WorkerMemory` records the peak resident memory of every process under the raylet of this
process's local Ray (its workers and actors) while a job runs, from the kernel's own high-water
mark (VmHWM in /proc/PID/status), reset at the start (clear_refs) and sampled every 0.1 s, so a
spike between samples is still counted. Linux only.

Not here: the job file or the assertions (tests/pipeline/test_hostile_inputs.py); the basic bad
rows and image makers (tests/helpers/pipeline_data.py, reused as they are).
"""

from __future__ import annotations

import io
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from helpers.pipeline_data import IMAGE_STRUCT, TEXTS, image_bytes, mixed_rows

# ---- rows --------------------------------------------------------------------------------------


@dataclass
class Row:
    """One input row: its id, text bytes (or None), encoded image bytes (or None), and what each
    task family must report for it (an error kind, or None for a result)."""

    id: str
    text: bytes | None
    image: bytes | None
    want: dict[str, str | None] = field(default_factory=lambda: {"text": None, "image": None})
    path_only: bool = False  # stored as a {bytes: null, path} struct where images are structs
    shard: str = ""  # name of the file it is written to, without .parquet


def megabyte_text(megabytes: float, seed: int) -> bytes:
    """Valid UTF-8 prose of about `megabytes` MB (far over any prompt limit)."""
    rng = random.Random(seed)
    words = " ".join(TEXTS).split()
    out, size, target = [], 0, int(megabytes * (1 << 20))
    while size < target:
        word = rng.choice(words)
        out.append(word)
        size += len(word.encode()) + 1
    return " ".join(out).encode()


_BOMBS: dict[str, bytes] = {}


def gif_bomb() -> bytes:
    """A tiny GIF whose header claims 30000 x 30000 pixels (900 MP): refused from the header."""
    if "gif" not in _BOMBS:
        from PIL import Image

        out = io.BytesIO()
        Image.new("P", (30000, 30000)).save(out, format="GIF")
        _BOMBS["gif"] = out.getvalue()
    return _BOMBS["gif"]


def near_limit_png() -> bytes:
    """A PNG of 9000 x 9000 = 81 MP, just under the default max_pixels (89.5 MP): a legitimate but
    huge image that is decoded (hundreds of MB in RGB) and must still caption like any other."""
    if "near" not in _BOMBS:
        from PIL import Image

        out = io.BytesIO()
        Image.new("1", (9000, 9000), 1).save(out, format="PNG")
        _BOMBS["near"] = out.getvalue()
    return _BOMBS["near"]


def noise_png(seed: int, side: int = 64) -> bytes:
    """A PNG of random pixels: its compressed data is as long as the image, so cutting it truncates pixels."""
    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(seed).randbytes(side * side * 3)).save(out, format="PNG")
    return out.getvalue()


def _good(prefix: str, i: int) -> Row:
    text = TEXTS[i % len(TEXTS)].encode() + f" [{prefix} {i}]".encode()
    image = image_bytes("PNG" if i % 2 else "JPEG", size=(20 + i % 17, 18 + (3 * i) % 23),
                        color=((37 * i) % 255, (11 * i) % 255, 120))
    return Row(f"{prefix}-good-{i:04d}", text, image)


def _base_bad_rows(prefix: str) -> list[Row]:
    """mixed_rows' bad rows (null/empty/whitespace/invalid UTF-8/long/marker texts; null, bytes-less,
    zero-byte, truncated, random, bomb and PPM images), under ids of this shard."""
    rows, expected = mixed_rows(good=0)
    out = []
    for r in rows:
        image = r["image"]["bytes"] if r["image"] is not None else None
        want = {"text": None, "image": None, **expected[r["id"]]}
        path_only = r["image"] is not None and r["image"]["bytes"] is None
        out.append(Row(f"{prefix}-{r['id']}", r["text"], image, want, path_only))
    return out


def _extra_bad_rows(prefix: str, megabytes: float, seed: int) -> list[Row]:
    """Bad rows mixed_rows lacks: megabyte texts (valid and invalid UTF-8), a GIF bomb, more corrupt
    and truncated images."""
    png = noise_png(seed)
    ok_image, ok_text = image_bytes(), b"A fine sentence about a picture."
    rows = []
    if megabytes:
        big = megabyte_text(megabytes, seed)
        rows += [
            Row(f"{prefix}-text-megabytes", big, ok_image, {"text": "text_too_long", "image": None}),
            Row(f"{prefix}-text-megabytes-utf8", big[: len(big) // 2] + b"\xff\xfe" + big[len(big) // 2:], ok_image,
                {"text": "text_invalid_utf8", "image": None}),
        ]
    return rows + [
        Row(f"{prefix}-image-gif-bomb", ok_text, gif_bomb(), {"text": None, "image": "image_too_large"}),
        Row(f"{prefix}-image-png-truncated", ok_text, png[: len(png) // 2], {"text": None, "image": "image_decode"}),
        Row(f"{prefix}-image-header-only", ok_text, png[:33], {"text": None, "image": "image_decode"}),
        Row(f"{prefix}-image-random-1mb", ok_text, random.Random(seed).randbytes(1 << 20),
            {"text": None, "image": "image_decode"}),
        Row(f"{prefix}-both-bad", None, b"", {"text": "text_missing", "image": "image_decode"}),
    ]


# ---- shards ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """How one input file is laid out; each kind of drift is one shard."""

    name: str
    id_type: pa.DataType = pa.string()
    text_type: pa.DataType | None = pa.binary()  # None: no text column
    image_layout: str | None = "struct"  # struct | large_struct | binary | large_binary | string | None
    extra_columns: bool = False
    row_group_size: int = 7
    text_ok: bool = True  # False: the text column's type is unusable (int64): every text task fails
    valid_utf8_only: bool = False  # string-typed text columns cannot hold invalid UTF-8


SHARDS = (
    Shard("plain"),
    Shard("wide-types", id_type=pa.large_string(), text_type=pa.large_string(), image_layout="large_binary",
          extra_columns=True, valid_utf8_only=True),
    Shard("dictionary-text", text_type=pa.dictionary(pa.int32(), pa.string()), image_layout="large_struct",
          valid_utf8_only=True),
    Shard("no-image", image_layout=None, extra_columns=True),
    Shard("no-text", text_type=None),
    Shard("int-text", text_type=pa.int64(), text_ok=False),
    Shard("string-image", image_layout="string"),
    Shard("binary-image", image_layout="binary", row_group_size=3),
)


def _image_column(shard: Shard, rows: list[Row]) -> pa.Array | None:
    images = [r.image for r in rows]
    if shard.image_layout in ("struct", "large_struct"):
        bytes_type = pa.binary() if shard.image_layout == "struct" else pa.large_binary()
        struct = pa.struct([("bytes", bytes_type), ("path", pa.string())])
        return pa.array([{"bytes": None, "path": f"{r.id}.img"} if r.path_only else None if b is None
                         else {"bytes": b, "path": f"{r.id}.img"} for r, b in zip(rows, images)], type=struct)
    if shard.image_layout in ("binary", "large_binary"):
        return pa.array(images, type=pa.binary() if shard.image_layout == "binary" else pa.large_binary())
    if shard.image_layout == "string":  # e.g. a shard that stores paths instead of bytes
        return pa.array([f"images/{r.id}.png" for r in rows], type=pa.string())
    return None


def _text_column(shard: Shard, rows: list[Row]) -> pa.Array | None:
    if shard.text_type is None:
        return None
    if not shard.text_ok:  # an int64 "text" column, as a botched export writes it
        return pa.array(range(len(rows)), type=shard.text_type)
    texts = [r.text for r in rows]
    if pa.types.is_dictionary(shard.text_type):
        return pa.array([None if t is None else t.decode() for t in texts], type=pa.string()).dictionary_encode()
    if pa.types.is_string(shard.text_type) or pa.types.is_large_string(shard.text_type):
        return pa.array([None if t is None else t.decode() for t in texts], type=shard.text_type)
    return pa.array(texts, type=shard.text_type)


def shard_table(shard: Shard, rows: list[Row]) -> pa.Table:
    columns = {"id": pa.array([r.id for r in rows], type=shard.id_type)}
    if shard.extra_columns:
        columns["score"] = pa.array([float(i) for i in range(len(rows))])
        columns["source_url"] = pa.array([f"https://example.invalid/{r.id}" for r in rows])
    text = _text_column(shard, rows)
    if text is not None:
        columns["text"] = text
    image = _image_column(shard, rows)
    if image is not None:
        columns["image"] = image
    return pa.table(columns)


def _shard_rows(shard: Shard, good: int, megabytes: float, seed: int) -> list[Row]:
    rows = [_good(shard.name, i) for i in range(good)]
    rows += _base_bad_rows(shard.name) + _extra_bad_rows(shard.name, megabytes, seed)
    if shard.valid_utf8_only:
        rows = [r for r in rows if r.want["text"] != "text_invalid_utf8"]
    rng = random.Random(seed)
    rng.shuffle(rows)  # bad rows anywhere in the file, across row groups and units
    # The shard's drift overrides the row's own problems for the tasks reading the drifted column.
    for r in rows:
        if shard.text_type is None:
            r.want["text"], r.text = "column_missing", None
        elif not shard.text_ok:
            r.want["text"], r.text = "column_type", None
        if shard.image_layout is None:
            r.want["image"], r.image = "column_missing", None
        elif shard.image_layout == "string":
            r.want["image"], r.image = "column_type", None
    return rows


def hostile_corpus(directory: str | os.PathLike, good_per_shard: int = 4, megabytes: float = 2.0,
                   repeat: int = 1, near_limit_image: bool = False, megabyte_shards: int = 2) -> dict[str, Row]:
    """Write the shards of SHARDS (`repeat` times each) under `directory`; returns rows by id.

    The first `megabyte_shards` shards of each copy get two texts of `megabytes` MB each (one valid
    UTF-8, one not, where the column can hold it); `near_limit_image` adds one 81-megapixel good
    image to the first shard."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows_by_id: dict[str, Row] = {}
    for copy in range(repeat):
        for n, shard in enumerate(SHARDS):
            prefix = f"{shard.name}{copy}"
            rows = _shard_rows(Shard(prefix, **{k: v for k, v in vars(shard).items() if k != "name"}),
                               good_per_shard, megabytes if n < megabyte_shards else 0, seed=100 * copy + n)
            if near_limit_image and copy == 0 and n == 0:
                rows.append(Row(f"{prefix}-image-81-megapixels", b"A huge white image.", near_limit_png()))
            table = shard_table(shard, rows)
            pq.write_table(table, directory / f"{prefix}.parquet", row_group_size=shard.row_group_size)
            for r in rows:
                r.shard = prefix
                assert r.id not in rows_by_id
                rows_by_id[r.id] = r
    return rows_by_id


def clean_corpus(directory: str | os.PathLike, rows: dict[str, Row]) -> list[str]:
    """The rows that have a result in at least one task family, in the plain layout (string ids,
    binary text, {bytes, path} images), with only their usable parts; returns their ids."""
    keep = [r for r in rows.values() if r.want["text"] is None or r.want["image"] is None]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "id": pa.array([r.id for r in keep], type=pa.string()),
        "text": pa.array([r.text if r.want["text"] is None else None for r in keep], type=pa.binary()),
        "image": pa.array([{"bytes": r.image, "path": "x"} if r.want["image"] is None else None for r in keep],
                          type=IMAGE_STRUCT),
    })
    pq.write_table(table, directory / "clean.parquet", row_group_size=16)
    return [r.id for r in keep]


# ---- peak memory of Ray's worker processes -----------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        tree.setdefault(ppid, []).append(int(name))
    return tree


def _descendants(root: int, tree: dict[int, list[int]]) -> list[int]:
    out, todo = [], list(tree.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def _status(pid: int) -> tuple[str, int] | None:
    """(process title, peak resident bytes so far) of a live process, or None.

    The title is the command line, which Ray workers set to what they run (e.g.
    "ray::MapWorker(MapBatches(InferActor))"); /proc's Name field would cut it at 15 characters.
    """
    try:
        with open(f"/proc/{pid}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            title = handle.read(200).split(b"\0")[0].decode(errors="replace").strip()
        return title or fields["Name"].strip(), int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


class WorkerMemory:
    """Peak resident memory of every process under this process's raylet, while the block runs.

    The raylet starts Ray's workers and actors as its children, so its descendants are exactly
    the processes that run read, prepare, the model and finish (plus Ray's two small agents).
    At entry each live one's high-water mark is reset (writing 5 to /proc/PID/clear_refs), so
    earlier tests in the same Ray do not count; a process that cannot be reset keeps its older
    peak, which only makes the bound stricter. The kernel keeps each peak exactly; sampling every
    `interval` seconds only has to catch processes before they exit.
    """

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peaks: dict[int, tuple[str, int]] = {}  # pid -> (name seen, peak bytes)
        self.names: dict[int, set[str]] = {}
        self.reset: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.raylet: int | None = None

    def _find_raylet(self) -> int | None:
        for pid in _children().get(os.getpid(), []):  # ray.init starts the raylet as its own child
            status = _status(pid)
            if status and status[0].endswith("/raylet"):
                return pid
        return None

    def _sample(self) -> None:
        for pid in _descendants(self.raylet, _children()):
            status = _status(pid)
            if status is None:
                continue
            name, peak = status
            self.names.setdefault(pid, set()).add(name)
            if peak > self.peaks.get(pid, ("", 0))[1]:
                self.peaks[pid] = (name, peak)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> WorkerMemory:
        self.raylet = self._find_raylet()
        if self.raylet is None:
            raise RuntimeError("no raylet under this process: WorkerMemory needs the local Ray of ray_cluster")
        for pid in _descendants(self.raylet, _children()):
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as handle:
                    handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
                self.reset.add(pid)
            except OSError:
                pass
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def max(self) -> tuple[int, str, int]:
        """(pid, names, peak bytes) of the process with the highest peak."""
        pid, (_, peak) = max(self.peaks.items(), key=lambda item: item[1][1])
        return pid, "/".join(sorted(self.names[pid])), peak

    def summary(self) -> str:
        rows = sorted(self.peaks.items(), key=lambda item: -item[1][1])
        return ", ".join(f"{pid} {'/'.join(sorted(self.names[pid]))}: {peak / 2**20:.0f} MiB"
                         for pid, (_, peak) in rows)

