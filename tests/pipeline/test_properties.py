"""Property tests (hypothesis) of the commit and of output names (issue #5, point 9).

  * Committer: the rows of some units, split into batches in any way, arriving in any order, with
    any duplicates (a retried task delivers rows again, before or after its unit is committed) and
    possibly some rows never arriving, give part files that hold each delivered unit's ids exactly
    once, in row order; every complete unit is committed exactly once and no incomplete unit is.
  * Output names: inputs.make_units keys, and the part and marker paths built from them, are
    distinct for distinct (run hash, input URI, start, stop), whatever characters the URIs hold,
    and are made of [0-9a-f] only.

Each property runs a moderate number of examples on a real OutputStore in a temporary directory.

Not here: faults of a real run (test_commit_faults.py), hostile names end to end (test_security.py).
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.committing import bench, finished_rows, part_ids, unit_ids
from helpers.committing import committer as make_committer
from pipeline.commit import DONE_DIR, OutputStore
from pipeline.inputs import InputFile, make_units

HEX_KEY = re.compile(r"[0-9a-f]{32}")
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def deliveries(draw):
    """(file sizes, rows_per_file, todo unit indices, the batches as lists of (unit index, row), withheld)."""
    sizes = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3))
    rows_per_file = draw(st.integers(1, 4))
    count = sum(-(-n // rows_per_file) for n in sizes)
    todo = sorted(draw(st.sets(st.integers(0, count - 1), min_size=1)))
    return sizes, rows_per_file, todo, draw(st.randoms(use_true_random=False))


def _plan(v, todo_indices, rng):
    """Deliveries of the todo units' rows: shuffled, some repeated, some withheld, cut into batches."""
    todo = [v.units[i] for i in todo_indices]
    rows = [(u, r) for u in todo for r in range(u.start, u.stop)]
    withheld = {x for x in rows if rng.random() < 0.08}
    repeats = [x for x in rows if x not in withheld and rng.random() < 0.3]
    stream = [x for x in rows if x not in withheld] + repeats
    rng.shuffle(stream)
    cuts = sorted(rng.sample(range(1, len(stream)), k=rng.randint(0, max(0, len(stream) - 1)))) if stream else []
    batches = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    return todo, withheld, batches


@PROPERTY_SETTINGS
@given(deliveries())
def test_any_split_order_and_duplicates_commit_each_row_exactly_once(case):
    sizes, rows_per_file, todo_indices, rng = case
    with tempfile.TemporaryDirectory() as tmp:
        v = bench(f"{tmp}/out", [(f"s3://corpus/f{n}.parquet", size) for n, size in enumerate(sizes)], rows_per_file)
        todo, withheld, batches = _plan(v, todo_indices, rng)
        everything = pa.concat_tables([finished_rows(v, u) for u in todo])
        position = {(u.key, r): i for i, (u, r) in enumerate((u, r) for u in todo for r in range(u.start, u.stop))}

        committer = make_committer(v, todo)
        for batch in batches:
            committer.add(everything.take(pa.array([position[(u.key, r)] for u, r in batch], pa.int64())))

        complete = [u for u in todo if not any(w.key == u.key for w, _ in withheld)]
        parts = part_ids(v.store)
        assert parts == {u.key: unit_ids(u) for u in complete}  # each id once, in row order, in its own file
        assert set(v.store.done()) == {u.key for u in complete}
        assert committer.stats.units == len(complete)  # each complete unit committed exactly once
        assert committer.stats.rows == sum(u.rows for u in complete)
        delivered = Counter((u.key, r) for batch in batches for u, r in batch)
        assert committer.duplicates == sum(delivered.values()) - len(delivered)
        all_ids = [i for ids in parts.values() for i in ids]
        assert len(all_ids) == len(set(all_ids))


# Characters that mean something to paths, URLs, shells or C strings, plus any other text.
HOSTILE = st.lists(st.sampled_from([*"/.\\%2e0:?#*[] \x00\n\t~$'\"é日", "..", "../", "%2e%2e", "/abs"]),
                   max_size=8).map("".join)
URIS = st.one_of(HOSTILE, st.text(max_size=12)).map(lambda tail: f"s3://bucket/{tail}")


@st.composite
def unit_inputs(draw):
    uris = draw(st.lists(URIS, min_size=1, max_size=6, unique=True))
    files = [InputFile(uri=u, num_rows=draw(st.integers(1, 30)), schema=pa.schema([])) for u in uris]
    # Run hashes are hex (spec.run_config_hash), which keeps the NUL-separated key text unambiguous.
    run_hashes = draw(st.lists(st.text("0123456789abcdef", min_size=1, max_size=32), min_size=1, max_size=3,
                               unique=True))
    rows_per_file = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3, unique=True))
    return files, run_hashes, rows_per_file


@PROPERTY_SETTINGS
@given(unit_inputs())
def test_output_names_are_distinct_hex_for_distinct_units(case):
    files, run_hashes, rows_per_file = case
    store = OutputStore("/never/written/out", None)
    names: dict[str, tuple] = {}
    for run_hash in run_hashes:
        for rows in rows_per_file:
            for unit in make_units(files, rows, run_hash):
                identity = (run_hash, unit.uri, unit.start, unit.stop)
                assert HEX_KEY.fullmatch(unit.key), unit.key
                part, marker = store.part_path(unit.key), store.marker_path(unit.key)
                assert part == f"/never/written/out/part-{unit.key}.parquet"
                assert marker == f"/never/written/out/{DONE_DIR}/{unit.key}.json"
                for name in (part, marker):
                    # The same unit may come from two rows_per_file values; a name is never shared otherwise.
                    assert names.setdefault(name, identity) == identity, (name, names[name], identity)
    assert len({n for n in names if n.endswith(".parquet")}) == len({i for i in names.values()})


def test_a_unit_delivered_again_after_its_commit_is_not_committed_again():
    """The retry case the property above draws only sometimes, always: a one-row unit, twice."""
    with tempfile.TemporaryDirectory() as tmp:
        v = bench(f"{tmp}/out", [("s3://corpus/one.parquet", 1)], rows_per_file=1)
        committer = make_committer(v)
        committer.add(finished_rows(v, v.units[0]))
        first = pq.read_metadata(v.store.part_path(v.units[0].key)).num_rows
        committer.add(finished_rows(v, v.units[0]))
        assert committer.stats.units == 1 and committer.duplicates == 1 and first == 1
