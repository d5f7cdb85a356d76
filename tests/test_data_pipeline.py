"""Data pipelines: token windows, grain train iterators (seeds, processes, workers), their
resumable state, orbax round trips, and the fixed evaluation batches.

The corpus is real text (standard-library modules), never zeros: a pipeline that mixes up
offsets shows up as a mismatch against the token stream.
"""
import json
from collections import Counter
from pathlib import Path

import grain
import numpy as np
import pytest

from spjax.data import (
    TokenWindows,
    eval_batches,
    prepare_dataset,
    train_iterator,
)
from spjax.errors import CheckpointError, ConfigError, DataError

from test_data import _one_line, _stream, _texts  # the corpus and checks both files use


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pipe")
    for m, text in _texts().items():
        (d / f"{m}.py").write_text(text)
    prepare_dataset([str(d / "*.py")], d / "ds", val_fraction=0.2, progress=False)
    return d / "ds"


SEQ = 64


def _all_rows(path: Path) -> list[bytes]:
    """Every train window's inputs, by window index."""
    src = TokenWindows(path, "train", SEQ)
    return [src[i]["inputs"].tobytes() for i in range(len(src))]


def _rows(batches) -> list[bytes]:
    return [row.tobytes() for b in batches for row in b["inputs"]]


def test_windows_are_the_token_stream_shifted_by_one(dataset):
    it = train_iterator(dataset, SEQ, 8, seed=0, process_index=0, process_count=1)
    stream, rows = _stream(dataset, "train"), _all_rows(dataset)
    assert len(rows) == (len(stream) - 1) // SEQ
    batch = next(it)
    assert batch["inputs"].shape == batch["targets"].shape == (8, SEQ)
    assert batch["inputs"].dtype == np.int32
    for x, y in zip(batch["inputs"], batch["targets"]):
        i = rows.index(x.tobytes())  # the window this row is (real text: repeats are rare)
        assert np.array_equal(x, stream[i * SEQ:i * SEQ + SEQ])
        assert np.array_equal(y, stream[i * SEQ + 1:i * SEQ + SEQ + 1])


def test_same_seed_same_batches_other_seed_different(dataset):
    def draw(seed):
        it = train_iterator(dataset, SEQ, 8, seed=seed, process_index=0, process_count=1)
        return [next(it) for _ in range(5)]

    a, b, c = draw(0), draw(0), draw(1)
    assert _rows(a) == _rows(b)
    assert _rows(a) != _rows(c)
    assert all(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_processes_get_disjoint_windows_covering_each_epoch(dataset):
    # Compared as multisets of window contents: real text can repeat a window verbatim.
    every = Counter(_all_rows(dataset))
    n = every.total() - every.total() % 2
    per_process, local = n // 2, 4
    epochs = {}
    for p in range(2):
        it = train_iterator(dataset, SEQ, 2 * local, seed=5, process_index=p, process_count=2)
        rows = _rows(next(it) for _ in range(-(-2 * per_process // local)))
        epochs[p] = (rows[:per_process], rows[per_process:2 * per_process])
    for e in range(2):
        union = Counter(epochs[0][e]) + Counter(epochs[1][e])
        assert union.total() == n and union <= every  # each window once, but the odd one out
        assert (every - union).total() == every.total() - n
    assert epochs[0][0] != epochs[0][1]  # epoch 2 is reshuffled
    assert Counter(epochs[0][0]) != Counter(epochs[0][1])  # and dealt differently


@pytest.mark.parametrize("cross_epoch", [False, True])
def test_get_state_set_state_resumes_exactly(dataset, cross_epoch):
    steps_per_epoch = len(_all_rows(dataset)) // 8
    k, m = (steps_per_epoch - 5, 12) if cross_epoch else (3, 4)
    it = train_iterator(dataset, SEQ, 8, seed=2, process_index=0, process_count=1)
    for _ in range(k):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(m)]
    fresh = train_iterator(dataset, SEQ, 8, seed=2, process_index=0, process_count=1)
    next(fresh)  # a used iterator must jump, not continue
    fresh.set_state(json.loads(json.dumps(state)))
    assert _rows(fresh.__next__() for _ in range(m)) == _rows(expected)


def test_state_from_another_configuration_is_rejected(dataset):
    it = train_iterator(dataset, SEQ, 8, seed=2, process_index=0, process_count=1)
    other = train_iterator(dataset, SEQ, 8, seed=3, process_index=0, process_count=1)
    with pytest.raises(CheckpointError) as e:
        other.set_state(it.get_state())
    _one_line(e, "seed")


def test_orbax_checkpoint_round_trip(dataset, tmp_path):
    import orbax.checkpoint as ocp

    it = train_iterator(dataset, SEQ, 8, seed=9, process_index=0, process_count=1)
    for _ in range(7):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = [next(it) for _ in range(5)]
    fresh = train_iterator(dataset, SEQ, 8, seed=9, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert restored["data"] is fresh and fresh.get_state()["next_index"] == 7
    assert _rows(next(fresh) for _ in range(5)) == _rows(expected)


def test_worker_processes_give_the_same_batches_and_state(dataset):
    ref = train_iterator(dataset, SEQ, 8, seed=4, process_index=0, process_count=1)
    expected = _rows(next(ref) for _ in range(10))
    it = train_iterator(dataset, SEQ, 8, seed=4, process_index=0, process_count=1, num_workers=2)
    try:
        first = _rows(next(it) for _ in range(4))
        state = it.get_state()
        rest = _rows(next(it) for _ in range(6))
        assert first + rest == expected
        it.set_state(state)  # back to step 4 in the same iterator, workers restart
        assert _rows(next(it) for _ in range(6)) == expected[len(first):]
        ref.set_state(state)  # and a worker state restores into num_workers=0
        assert _rows(next(ref) for _ in range(6)) == expected[len(first):]
    finally:
        it.close()


def test_batch_and_size_errors(dataset):
    with pytest.raises(ConfigError) as e:
        train_iterator(dataset, SEQ, 9, seed=0, process_index=0, process_count=2)
    _one_line(e, "global_batch=9", "2")
    with pytest.raises(DataError) as e:
        train_iterator(dataset, 4096, 64, seed=0, process_index=0, process_count=1)
    _one_line(e, str(dataset), "fewer than one batch")
    with pytest.raises(DataError) as e:
        eval_batches(dataset, 10**6, 2, 1, 0, 1)
    _one_line(e, str(dataset), "val split", "--val-fraction", "seq_len")


def test_eval_batches_are_fixed_and_sharded(dataset):
    val = TokenWindows(dataset, "val", SEQ)
    whole = eval_batches(dataset, SEQ, 8, 3, 0, 1)
    assert len(whole) == 3 and _rows(whole) == _rows(eval_batches(dataset, SEQ, 8, 3, 0, 1))
    assert [val[i]["inputs"].tobytes() for i in range(24)] == _rows(whole)  # unshuffled
    halves = [eval_batches(dataset, SEQ, 8, 3, p, 2) for p in range(2)]
    for b in range(3):
        assert np.array_equal(np.concatenate([halves[0][b]["targets"], halves[1][b]["targets"]]), whole[b]["targets"])
    few = eval_batches(dataset, SEQ, 8, 10**6, 0, 1)  # asks for more than there is
    assert len(few) == -(-len(val) // 8)
    assert set(_rows(few)) == {val[i]["inputs"].tobytes() for i in range(len(val))}


# ---------------------------------------------------------------- default corpus
