"""Unreadable shard members and samples, counted instead of warned about.

Inside each loader worker, `BadSamples` is webdataset's error handler and the decoder's:
it counts each unreadable member or sample per shard, and rides the counts to the main
process on the next batch (`batch[KEY]`), since workers are other processes. There,
`BadSampleTally` names each shard once in the log, keeps the totals (saved with every
checkpoint, reported at the end) and applies `--max-bad-fraction`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

KEY = "__bad_samples__"


class BadDataError(RuntimeError):
    """Raised in a loader worker that reads nothing but bad samples (then no batch ever
    comes to carry the counts to the main process)."""


#: samples read before the share of bad ones is judged (the first shard visits say little)
MIN_JUDGED = 100


def judged_after(max_fraction: float) -> int:
    """Samples to read before a share is judged: at least MIN_JUDGED, and 1/F (below it, a
    single bad sample would already be more than F)."""
    return max(MIN_JUDGED, math.ceil(1 / max_fraction)) if max_fraction > 0 else MIN_JUDGED


def too_many(bad: int, read: int, max_fraction: float) -> bool:
    return read >= judged_after(max_fraction) and bad > max_fraction * read


class BadSamples:
    """The worker side: a webdataset handler and pipeline stages that count, per shard."""

    def __init__(self, urls: list[str], max_fraction: float):
        self.urls, self.max_fraction = list(urls), max_fraction
        self.pending: dict[str, list] = {}  # url -> [count, first reason] since the last batch
        self.bad = self.good = 0
        self.read = 0  # samples (and unreadable members) read since the last batch
        self._visit_faulted = False

    def _shard_of(self, exn: BaseException) -> str:
        text = " ".join(str(a) for a in getattr(exn, "args", ()))
        return next((url for url in self.urls if url in text), "an unknown shard")

    def add(self, url: str | None, reason: str) -> None:
        entry = self.pending.setdefault(url or "an unknown shard", [0, reason])
        entry[0] += 1
        self.bad += 1
        if self.good == 0 and self.bad >= judged_after(self.max_fraction):
            raise BadDataError(f"the first {self.bad} samples read were all bad (the first: {reason} in "
                               f"{url}); check the shards (`controlforge verify`) and --condition")

    def visits(self, source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Between the shard list and the tar reader: marks where each shard visit starts."""
        for shard in source:
            self._visit_faulted = False
            yield shard

    def handler(self, exn: BaseException) -> bool:
        """webdataset's handler for the tar reader: one fault per shard visit is counted (a
        shard cut short raises twice, in the member and in the next header: the same fault)."""
        if not self._visit_faulted:
            self._visit_faulted = True
            first = str(exn.args[0]) if getattr(exn, "args", None) else ""
            self.read += 1
            self.add(self._shard_of(exn), f"{type(exn).__name__}: {first[:200]}")
        return True

    def decode(self, source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """webdataset's "pil" decoding, with each failure counted against its sample's shard."""
        import webdataset as wds

        decoder = wds.autodecode.Decoder([wds.autodecode.imagehandler("pil")])
        for sample in source:
            self.read += 1
            try:
                decoded = decoder(sample)
            except Exception as exn:  # a corrupt member: count it, skip the sample
                self.add(sample.get("__url__"), f"{sample.get('__key__')}: {type(exn).__name__}: {str(exn)[:200]}")
                continue
            yield decoded

    def attach(self, source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Give each batch the counts since the one before (placed before SkipBatches, so
        batches skipped on a resume take theirs with them: the checkpoint has those)."""
        for batch in source:
            self.good += len(batch["text"])
            batch[KEY] = {"shards": self.pending, "read": self.read}
            self.pending, self.read = {}, 0
            yield batch


class BadSampleTally:
    """The main-process side: totals over every rank (`commit` takes the summed deltas)."""

    def __init__(self, max_fraction: float, log: Callable[[str], None] = print):
        self.max_fraction, self.log = max_fraction, log
        self.per_shard: dict[str, int] = {}  # this rank's
        self.bad = self.read = 0  # all ranks'
        self.new_bad = self.new_read = 0  # this rank's, since the last commit

    def take(self, batch: dict[str, Any]) -> None:
        counts = batch.pop(KEY, None)
        if counts is None:  # batches that did not come from make_dataset
            self.new_read += len(batch["text"])
            return
        for url, (count, reason) in counts["shards"].items():
            if url not in self.per_shard:
                self.log(f"shard {url}: skipping unreadable samples ({reason}); counted, see the end of the run")
                self.per_shard[url] = 0
            self.per_shard[url] += count
            self.new_bad += count
        self.new_read += counts["read"]

    def commit(self, bad: int, read: int) -> None:
        self.bad, self.read = self.bad + bad, self.read + read
        self.new_bad = self.new_read = 0

    def exceeded(self) -> bool:
        return too_many(self.bad, self.read, self.max_fraction)

    def summary(self) -> str:
        share = self.bad / self.read if self.read else 0.0
        return f"{self.bad} bad of {self.read} samples read ({share:.2%})"

    def state_dict(self) -> dict[str, Any]:
        return {"bad": self.bad, "read": self.read}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bad, self.read = int(state.get("bad", 0)), int(state.get("read", 0))
