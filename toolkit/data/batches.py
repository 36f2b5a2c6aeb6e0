"""What the readers hand over: `Batches` (the batches, a pass of a known length) and `Skips` (the
samples that could not be read, counted in the main process against data.max_skipped_fraction).
The reports that feed them travel down toolkit/data/stream.py's pipeline as `Skip` records.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

from toolkit.config import DataConfig
from toolkit.errors import UserError

DEFAULT_MAX_SKIPPED_FRACTION = DataConfig.max_skipped_fraction  # data.max_skipped_fraction
MAX_WARNINGS = 20  # distinct (shard, reason) warnings printed per counter; later ones are only counted


def to_unit_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [0, 1]: the one conversion, x.float() / 255 as the workers did it
    (on the CPU the same values as before; CUDA divides by a scalar as a multiplication by its
    reciprocal, within one ulp of that)."""
    return pixels.float().div_(255)


class Skip(NamedTuple):
    """A skip report, travelling down the pipeline in place of a sample: `lost` samples of the shard
    `url` could not be used, for `reason`; `undecodable`: read out of the shard, then not decodable
    (else lost in the shard: unreadable, cut off)."""

    url: str
    reason: str
    lost: int
    undecodable: bool = False


def _shard_name(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1].split()[0] or str(url)


class Skips:
    """The samples one reader (or one training run's readers) skipped, counted in the main process.

    The fraction is skipped / read: read = the samples met in the shards (read out of them, or lost
    in them: a cut-off tar's missing samples, counted from its manifest count), both counted when
    the reader meets them, ahead of the shuffle buffer. The denominator is taken as no less than the
    split's size (its manifest count): until a split has been read once, the bound trips only when
    the skips alone pass `max_fraction` of the whole split. So one bad sample among the first few
    never stops a run, a cut-off shard read early is weighed against the split, not against the
    handful of samples read before it, and a split with more unreadable samples than the bound
    allows stops during its first pass. Afterwards it is the fraction of everything read.
    `max_fraction` 0: the first unreadable sample stops; 1: never (unless nothing is readable).
    """

    def __init__(
        self,
        split: str,
        shards,
        split_count: int,
        max_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION,
        check: bool = True,
    ):
        self.split, self.shards, self.split_count = split, str(shards), int(split_count)
        self.max_fraction, self.check = max_fraction, check  # check=False: the caller checks (e.g. summed over ranks)
        self.delivered = 0  # samples handed over in batches
        self.samples_read = 0  # samples read out of the shards (some of which may not decode)
        self.lost_in_shards = self.undecodable = 0  # skipped: cut off or unreadable; read but not decodable
        self.skipped_since_batch = 0
        self.by_shard: dict[str, list] = {}  # shard url -> [samples skipped, first reason]
        self._warned: set = set()

    @property
    def skipped(self) -> int:
        return self.lost_in_shards + self.undecodable

    @property
    def read(self) -> int:
        """The samples met so far: read out of the shards or lost in them (the fraction's denominator)."""
        return self.samples_read + self.lost_in_shards

    def deliver(self, samples: int) -> None:
        self.delivered += int(samples)
        self.skipped_since_batch = 0

    def count_read(self, samples: int) -> None:
        self.samples_read += int(samples)

    def add(self, url: str, reason: str, lost: int, undecodable: bool = False) -> None:
        """Count a loss: `lost` samples of the shard `url`, for `reason` (undecodable: read, then lost)."""
        lost = int(lost)
        if undecodable:
            self.undecodable += lost
        else:
            self.lost_in_shards += lost
        self.skipped_since_batch += lost
        self.by_shard.setdefault(url, [0, reason])[0] += lost
        if (url, reason) not in self._warned and len(self._warned) < MAX_WARNINGS:
            self._warned.add((url, reason))
            more = "; further skips are counted, not shown" if len(self._warned) == MAX_WARNINGS else ""
            print(f"warning: skipped {lost} sample(s) of {url}: {reason}{more}", file=sys.stderr, flush=True)
        # A split's worth skipped without one batch in between: check here even when the caller
        # checks (it only can after a batch), and never read on forever.
        stuck = self.skipped_since_batch > max(self.split_count, 1)
        if (self.check or stuck) and (problem := self.problem()):
            raise UserError(problem)
        if self.skipped_since_batch > 10 * max(self.split_count, 1):
            raise UserError(
                f"nothing readable in the {self.split} split of {self.shards}: the last {self.skipped_since_batch} samples "
                f"read were all skipped ({self._worst()}); rebuild or replace those shards"
            )

    def _worst(self, n: int = 3) -> str:
        worst = sorted(self.by_shard.items(), key=lambda item: -item[1][0])[:n]
        return "; ".join(f"{_shard_name(url)} ({lost} skipped: {reason})" for url, (lost, reason) in worst)

    def fraction(self, skipped: int | None = None, read: int | None = None) -> float:
        skipped = self.skipped if skipped is None else skipped
        read = self.read if read is None else read
        return skipped / max(read, self.split_count, 1)

    def problem(self, skipped: int | None = None, read: int | None = None) -> str | None:
        """None while within the bound, else the message to stop with. `skipped` and `read` default
        to this counter's own; a multi-process trainer passes the sums over its ranks."""
        skipped = self.skipped if skipped is None else skipped
        read = self.read if read is None else read
        if skipped == 0 or self.fraction(skipped, read) <= self.max_fraction:
            return None
        of = (
            f"{read} samples read"
            if read >= self.split_count
            else f"the split's {self.split_count} samples ({read} read so far)"
        )
        return (
            f"too many unreadable samples in the {self.split} split of {self.shards}: {skipped} skipped = "
            f"{self.fraction(skipped, read):.2%} of {of}, more than data.max_skipped_fraction={self.max_fraction:g} allows; "
            f"{self._worst() or 'skipped on other ranks'}; rebuild or replace those shards, or raise data.max_skipped_fraction"
        )

    def summary(self) -> str:
        return f"{self.skipped} unreadable sample(s) of the {self.split} split skipped ({self._worst()})"


class Batches:
    """What the readers return: iterating gives the batches ([images, attributes] or with keys
    [images, attributes, keys]; images float32 in [0, 1], on `device`, None: the CPU); a loader
    bound for another device than the CPU gives uint8 images, converted here, after the copy to
    the device (`to_unit_float`).
    `skips` counts what could not be read. With `length`, every pass
    gives exactly that many batches: a pass left short by skipped samples reads the same shards
    again for the rest (webdataset's with_epoch did the same), so an epoch's length stays what
    the manifest says and exact resume holds. Only the first pass's losses are counted: it read
    the shards to the end, so a pass that reads them again meets the same ones."""

    def __init__(self, loader, skips: Skips, length: int | None = None, device: torch.device | str | None = None):
        self.loader, self.skips, self.length, self.device = loader, skips, length, device

    def _landed(self, batch: list) -> list:
        images, attributes, *keys = batch
        if self.device is not None:  # pinned on a GPU's way (the loader): both copies are asynchronous
            images, attributes = (
                images.to(self.device, non_blocking=True),
                attributes.to(self.device, non_blocking=True),
            )
        return [to_unit_float(images) if images.dtype == torch.uint8 else images, attributes, *keys]

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this stream has no length")
        return self.length

    def __iter__(self):
        delivered, first = 0, True
        while True:
            before = delivered
            for batch, report, read in self.loader:
                if first:  # a pass that reads the shards again meets what the first pass counted
                    self.skips.count_read(read)
                    if report is not None:
                        self.skips.add(*report)  # a Skip: (url, reason, lost, undecodable)
                if report is not None:
                    continue
                self.skips.deliver(len(batch[1]))
                yield self._landed(batch)
                delivered += 1
                if delivered == self.length:
                    return
            if self.length is None:
                return
            if delivered == before:
                raise UserError(
                    f"nothing readable in the shards of the {self.skips.split} split of {self.skips.shards} dealt to this process "
                    f"({self.skips._worst() or 'no batch could be filled'}); rebuild or replace those shards"
                )
            first = False
