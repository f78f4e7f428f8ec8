"""The end of a build (stages/shards/consolidate.py): the on-disk key index finds exactly the
repeats a dict over every key would, across buckets and shards."""

from __future__ import annotations

import numpy as np

from stages.shards.consolidate import KeyIndex


def test_key_index_finds_every_repeat_and_its_first_copy(tmp_path):
    rng = np.random.default_rng(0)
    shards = [[rng.bytes(8).hex() for _ in range(50)] for _ in range(30)]  # 64-bit keys, all buckets
    planted = [(3, 7, 0, 5), (12, 0, 3, 7), (29, 49, 12, 0), (20, 1, 4, 40)]  # (shard, pos) repeats (first shard, pos)
    for shard, pos, first_shard, first_pos in planted:
        shards[shard][pos] = shards[first_shard][first_pos]
    index = KeyIndex(tmp_path, buckets=8)
    for number, keys in enumerate(shards):
        index.add(number, keys)
    first: dict[str, tuple[int, int]] = {}
    expected = []
    for number, keys in enumerate(shards):
        for pos, key in enumerate(keys):
            if key in first:
                expected.append((number, pos, *first[key]))
            else:
                first[key] = (number, pos)
    assert len(expected) == 4
    assert sorted(index.repeats()) == sorted(expected)
    assert len(list(tmp_path.glob("keys-*.bin"))) == 8
