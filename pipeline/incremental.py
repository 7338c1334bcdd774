"""Content-keyed incremental runs: which rows of a run already have a result, and what changed since the last run.

A rerun of a job skips whole every unit whose input file is unchanged (its key is the same: run.py). A unit
is new when its file is new, or changed, moved, was renamed or re-sharded; the units of the old version of
that file ("stale" units: committed, but no longer in the plan) are retracted at the end of the run. Before
that, their rows are what this module reuses: every row of the output carries its input hash
(inputs.row_hashes: its id, text, image, prompt fields, labels, keep columns), and a row of a new unit whose
hash a stale unit holds, with a result and no error, gets that result copied instead of computed. So a
renamed or re-sharded file computes nothing, and a file with two edited rows computes two rows. Error rows
are computed again (cheap, and an error may have been the machine's). Settings are not part of the hash:
an output directory belongs to one run config (commit.MANIFEST), and other settings write another output.

What it costs: nothing on a night whose input only grew (no stale units: no hashing, every new row is new).
Otherwise the new units are read once in the driver to hash them (their text and image columns, in
parallel), and the stale part files' small columns are read (hash, id, place, error); about 200 bytes of
driver memory per stale row. The reused results of a unit are held until its computed rows come back.

What changed is counted per row, against the output as the last complete run left it:
  unchanged  the row's hash is in that output (same content; whatever file or row it sits in now)
  changed    not so, but its identity is (the id, or file and row where the job has no id_column)
  new        neither
  removed    a row of that output whose identity and hash no current row has
The counts of each unit go into its done-marker with the run's generation (the number of complete runs
so far, plus one), so a run stopped half way and resumed still counts every unit once; a complete run
writes them to <output>/_changes.json and into its report.

Not here: reading a unit (inputs.read_unit), committing (commit.py), the order of a run (run.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from operators import columns as C

from .commit import OutputStore
from .inputs import Unit, derived_ids, read_unit

CHANGES = "_changes.json"
CHANGE_KINDS = ("new", "changed", "unchanged", "removed")
PRIOR_COLUMNS = (C.INPUT_HASH, C.ID, C.INPUT_FILE, C.INPUT_ROW, C.ERROR_KIND)  # read from stale part files
THREADS = 8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadSpec:
    """How to read a unit's rows for hashing: what run.make_plan gives the read stage."""

    columns: dict  # "id" / "text" / "image" -> input column name or None
    storage_options: dict  # fsspec options for the input files
    extra: tuple = ()  # the other input columns (inputs.ExtraColumn)

    @property
    def derived_id(self) -> bool:
        """No id_column: ids come from the row's place, so a row's identity is its (file, row)."""
        return not self.columns.get("id")


@dataclass
class Prior:
    """The rows of the stale units: what may be reused, and what the change counts compare against."""

    reusable: dict[str, tuple[str, int]] = field(default_factory=dict)  # hash -> (stale key, row in its part)
    hashes: set[str] = field(default_factory=set)  # every hash (error rows too)
    identities: set = field(default_factory=set)  # every identity (id, or (file, row))
    rows: list[tuple[object, str | None]] = field(default_factory=list)  # (identity, hash) per row, for "removed"
    unhashed_parts: int = 0  # stale part files written before input hashes: nothing in them is reusable


@dataclass
class ReusePlan:
    """What run.py does with a run's units: compute `units` (each with its reused rows), hand `pieces` to
    the committer first, and write `notes` into the done-markers."""

    generation: int  # this run's generation (complete runs so far + 1)
    units: list[Unit]  # the units to commit, with Unit.reused set
    pieces: list[tuple[str, pa.Table]] = field(default_factory=list)  # (unit key, reused rows) for add_reused
    notes: dict[str, dict] = field(default_factory=dict)  # unit key -> {"generation", "changes"}
    prior: Prior | None = None  # None when there were no stale units

    @property
    def rows_to_compute(self) -> int:
        return sum(u.rows - len(u.reused) for u in self.units)

    def changes(self) -> dict[str, int]:
        """The change counts of the units to commit (the dry run's preview; a run's record is changes_record)."""
        counts = Counter()
        for note in self.notes.values():
            counts.update(note["changes"])
        return {kind: counts[kind] for kind in CHANGE_KINDS if kind != "removed"}


def generation_of(store: OutputStore) -> tuple[int, set[str]]:
    """(this run's generation, the stale keys the last complete run had counted and began to retract)."""
    previous = store.read_json(CHANGES) or {}
    return int(previous.get("generation", 0)) + 1, set(previous.get("retracting", []))


def identity(row_id, uri: str, row: int, derived_id: bool):
    return (uri, row) if derived_id else row_id


def read_prior(store: OutputStore, stale: Iterable[str], counted: set[str], derived_id: bool) -> Prior:
    """The small columns of the stale units' part files. `counted`: stale keys whose rows the change counts
    leave out (the last complete run counted them already: it stopped while retracting them)."""
    stale = sorted(stale)

    def one(key: str) -> tuple[str, pa.Table | None]:
        try:
            with store.fs.open(store.part_path(key), "rb") as handle:
                parquet = pq.ParquetFile(handle)
                names = [c for c in PRIOR_COLUMNS if c in parquet.schema_arrow.names]
                return key, parquet.read(columns=names)
        except FileNotFoundError:  # a marker whose part file a stopped retraction deleted already
            return key, None

    prior = Prior()
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        for key, table in pool.map(one, stale):
            if table is None:
                continue
            hashes = table.column(C.INPUT_HASH).to_pylist() if C.INPUT_HASH in table.column_names else None
            prior.unhashed_parts += hashes is None
            hashes = hashes or [None] * table.num_rows
            ids, files, rows = (table.column(c).to_pylist() for c in (C.ID, C.INPUT_FILE, C.INPUT_ROW))
            errors = table.column(C.ERROR_KIND).to_pylist()
            for i, (h, row_id, uri, row, error) in enumerate(zip(hashes, ids, files, rows, errors)):
                if h is not None and error is None:
                    prior.reusable.setdefault(h, (key, i))
                if key in counted:
                    continue
                who = identity(row_id, uri, row, derived_id)
                prior.identities.add(who)
                if h is not None:
                    prior.hashes.add(h)
                prior.rows.append((who, h))
    return prior


def plan_reuse(store: OutputStore, todo: list[Unit], stale: set[str], read: ReadSpec, generation: int,
               counted: set[str], load: bool = True) -> ReusePlan:
    """Which rows of `todo` an earlier output holds (see the module docstring), and each unit's change counts.
    With `load` false (the dry run) the reused results are not read: `pieces` stays empty."""
    if not stale or not todo:
        notes = {u.key: {"generation": generation, "changes": {"new": u.rows}} for u in todo}
        return ReusePlan(generation=generation, units=list(todo), notes=notes)
    prior = read_prior(store, stale, counted, read.derived_id)
    if prior.unhashed_parts:
        log.warning(f"{prior.unhashed_parts} stale part file(s) were written before outputs kept input hashes: "
                    f"their rows are computed again")

    def hashed(unit: Unit) -> list[tuple[int, object, str]]:
        """(row, id, input hash) of each row of the unit, read from its input."""
        out = []
        for block in read_unit(unit, read.columns, read.storage_options, 4096, read.extra):
            out += zip(block.column(C.ROW).to_pylist(), block.column(C.ID).to_pylist(),
                       block.column(C.INPUT_HASH).to_pylist())
        return out

    log.info(f"  {len(stale)} unit(s) of changed, moved or removed input: hashing the rows of {len(todo)} new "
             f"unit(s) to reuse what is unchanged")
    units, notes, wanted = [], {}, {}  # wanted: stale key -> [(part row, unit, row)]
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        for unit, rows in zip(todo, pool.map(hashed, todo)):
            counts, reused = Counter(), []
            for row, row_id, h in rows:
                if h in prior.hashes:
                    counts["unchanged"] += 1
                elif identity(row_id, unit.uri, row, read.derived_id) in prior.identities:
                    counts["changed"] += 1
                else:
                    counts["new"] += 1
                if h in prior.reusable:  # a duplicate-id row never is: its mark is in its hash
                    key, part_row = prior.reusable[h]
                    wanted.setdefault(key, []).append((part_row, unit, row))
                    reused.append(row)
            units.append(replace(unit, reused=tuple(reused)))
            notes[unit.key] = {"generation": generation, "changes": dict(counts)}
    by_key = {u.key: u for u in units}
    pieces = [(key, piece) for stale_key, rows in sorted(wanted.items()) if load
              for key, piece in _reused_rows(store, stale_key, rows, by_key, read.derived_id)]
    plan = ReusePlan(generation=generation, units=units, pieces=pieces, notes=notes, prior=prior)
    log.info(f"  {sum(len(u.reused) for u in units)} row(s) reused from earlier output, "
             f"{sum(u.rows - len(u.reused) for u in units)} to compute")
    return plan


def _reused_rows(store: OutputStore, stale_key: str, rows: list[tuple[int, Unit, int]], units: dict[str, Unit],
                 derived_id: bool) -> list[tuple[str, pa.Table]]:
    """The committed rows of one stale part that `rows` ((part row, unit, row)) reuse, per unit, as the
    committer's add_reused takes them: placed at their new unit and row, with their new derived id."""
    with store.fs.open(store.part_path(stale_key), "rb") as handle:
        part = pq.read_table(handle)
    part = part.drop_columns([C.INPUT_FILE, C.INPUT_ROW])
    out = []
    by_unit: dict[str, list[tuple[int, int]]] = {}
    for part_row, unit, row in rows:
        by_unit.setdefault(unit.key, []).append((part_row, row))
    for key, pairs in by_unit.items():
        piece = part.take(pa.array([p for p, _ in pairs], pa.int64()))
        numbers = pa.array([r for _, r in pairs], pa.int64())
        if derived_id:
            unit = units[key]
            ids = [derived_ids(unit.uri, r, r + 1)[0].as_py() for _, r in pairs]
            piece = piece.set_column(piece.schema.get_field_index(C.ID), C.ID,
                                     pa.array(ids, piece.schema.field(C.ID).type))
        piece = piece.append_column(C.UNIT, pa.array([key] * len(pairs), pa.string())).append_column(C.ROW, numbers)
        out.append((key, piece))
    return out


def changes_record(store: OutputStore, plan_units: list[Unit], done_at_start: dict[str, dict], committed: set[str],
                   reuse: ReusePlan, derived_id: bool, stale: set[str], run_config_hash: str) -> dict:
    """What changed in the output since the last complete run (module docstring), for a run that committed
    every unit; `stale` are the keys about to be retracted, recorded so that a run stopped while retracting
    does not count their rows twice."""
    counts = Counter({kind: 0 for kind in CHANGE_KINDS})
    current = []  # units committed since the last complete run
    for unit in plan_units:
        marker = reuse.notes.get(unit.key) if unit.key in committed else done_at_start.get(unit.key, {})
        if (marker or {}).get("generation") == reuse.generation:
            counts.update(marker.get("changes", {}))
            current.append(unit.key)
        else:
            counts["unchanged"] += unit.rows
    if reuse.prior is not None and reuse.prior.rows:
        ids, hashes = _current_rows(store, current, derived_id)
        counts["removed"] = sum(1 for who, h in reuse.prior.rows if who not in ids and h not in hashes)
    return {"generation": reuse.generation, "run_config_hash": run_config_hash,
            "rows": {kind: counts[kind] for kind in CHANGE_KINDS}, "retracting": sorted(stale)}


def _current_rows(store: OutputStore, keys: list[str], derived_id: bool) -> tuple[set, set]:
    """Identities and hashes of the rows of these committed units, from their part files."""

    def one(key: str) -> pa.Table:
        with store.fs.open(store.part_path(key), "rb") as handle:
            return pq.read_table(handle, columns=[C.INPUT_HASH, C.ID, C.INPUT_FILE, C.INPUT_ROW])

    ids, hashes = set(), set()
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        for table in pool.map(one, keys):
            hashes.update(pc.unique(table.column(C.INPUT_HASH)).to_pylist())
            ids.update(identity(i, f, r, derived_id) for i, f, r in zip(
                *(table.column(c).to_pylist() for c in (C.ID, C.INPUT_FILE, C.INPUT_ROW))))
    return ids, hashes
