"""A DALI loader state saved before the pipeline's graph changed still restores (dali_state.fit): the
operators both graphs have keep their saved state, and a stateless operator may come or go; a random
operator that would lose its state is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

from dalipipe.config import AugmentSpec, LoaderSettings, Normalization
from dalipipe.data.index import PATH_COLUMNS, scan_images
from dalipipe.errors import DataError
from dalipipe.loading import dali_state

pytest.importorskip("nvidia.dali")

from dalipipe.loading.dali_loader import build_pipeline  # noqa: E402

RAW = Normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _pipe(folder, checkpoint=None):
    paths = scan_images(folder)[PATH_COLUMNS].values.tolist()
    return build_pipeline(paths, spec=AugmentSpec(image_size=24), norm=RAW, train=True, device_id=None,
                          settings=LoaderSettings(kind="dali", batch_size=8, workers=1, seed=4, checkpointing=True),
                          checkpoint=checkpoint)


def _without(blob: bytes, names) -> bytes:
    """The state as a graph without these operators would have saved it."""
    ops, rest = dali_state._split(blob)
    return b"".join(dali_state._field(dali_state._OPERATOR, e) for n, e in ops.items() if n not in names) + rest


def _batch(pipe):
    images, *_ = pipe.run()
    return np.stack([np.asarray(images[i]) for i in range(len(images))])


def test_a_state_saved_without_the_shrink_operators_restores_and_continues_alike(small_synth):
    folder = small_synth / "images_train"
    pipe = _pipe(folder)
    _batch(pipe)
    saved = pipe.checkpoint()
    after = _batch(pipe)  # what the run would have loaded next
    added = [n for n in dali_state._split(saved)[0] if not n.startswith(("__", "reader_"))]
    assert "shrink" in added and "working_hw" in added  # the named, stateless operators of the shrink step
    older = _without(saved, added)
    assert np.array_equal(_batch(_pipe(folder, checkpoint=older)), after)


def test_the_same_graph_keeps_the_state_byte_for_byte_and_a_lost_random_state_is_refused(small_synth):
    pipe = _pipe(small_synth / "images_train")
    _batch(pipe)
    saved, fresh = pipe.checkpoint(), _pipe(small_synth / "images_train").checkpoint()
    assert dali_state.fit(saved, fresh) is saved
    coin = next(n for n in dali_state._split(saved)[0] if n.startswith("__CoinFlip_"))
    with pytest.raises(DataError, match=coin):
        dali_state.fit(_without(saved, [coin]), fresh)
    with pytest.raises(DataError, match=coin):  # a random operator the saving graph did not have
        dali_state.fit(saved, _without(fresh, [coin]))


def test_a_state_it_cannot_read_is_left_to_dali_and_long_entries_keep_their_length():
    """Lengths of 128 bytes or more take two bytes or more; a truncated or foreign state is returned as it is
    (DALI's own restore then says what it thinks of it) rather than failing in this module."""

    def entry(name: str, state: bytes) -> bytes:
        return dali_state._field(dali_state._OPERATOR, dali_state._field(1, name.encode()) + dali_state._field(2, state))

    context = dali_state._field(2, b'{"iter": 3}') + bytes([3 << 3 | 0, 0x96, 0x01])  # and a varint field
    saved = entry("reader_yellow", b"r" * 300) + entry("a" * 200, b"") + context
    fresh = entry("reader_yellow", b"x" * 5) + entry("shrink", b"") + context
    fitted = dali_state.fit(saved, fresh)
    ops, rest = dali_state._split(fitted)
    assert list(ops) == ["reader_yellow", "shrink"] and rest == context
    assert dali_state._state(ops["reader_yellow"]) == b"r" * 300  # the saved state, not the fresh one
    for broken in (saved[:-5], saved[:40], b"\x0f" + saved):
        assert dali_state.fit(broken, fresh) is broken
