"""Benchmark: how fast training is fed. The same model, precision and optimiser, several ways of feeding it:

  memory       the same batches held in device memory (the ceiling: no data loading at all)
  shards       cvae-tk's pipeline as the trainer reads it: WebDataset shards -> one `EpochStream`
               whose loader workers live from epoch to epoch, bound for the device (on the way to a
               GPU the images cross from the workers as uint8, pinned, copied without waiting for
               the GPU, converted there)
  shards_fresh the same, but `epoch_batches` per epoch: new loader workers every epoch (what the
               trainer did until 2026-12-06)
  shards_cpu   `epoch_batches` per epoch read for the CPU, then copied (what the trainer did until
               2026-12-05: float32 batches in pageable memory; on a GPU only, where it differs)
  folder       the usual way: a folder of JPEGs through an ImageFolder-style Dataset (per-sample PIL
               decode, centre crop, resize, to-tensor) and one DataLoader with persistent workers

Reports images/s for each and the ratios shards/memory ("pipeline efficiency") and shards/folder;
writes bench/results/train.json. The data: a generated CelebA-format folder of 178x218 JPEGs,
made into 64x64 shards with the celeba64 crop (centre 148). With --loader-only, each feed's own
rate over --epochs epochs (no model), which includes each epoch's start.

    .venv/bin/python bench/train.py [--arch resnet|paper] [--steps 20] [--batch-size 64]
        [--precision no|bf16|fp16] [--workers N] [--images 4000] [--device cuda|cpu]
        [--loader-only [--epochs 3]]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shards import make_folder  # noqa: E402  (bench/shards.py)
from toolkit.data.build import ImageSpec, build_shards  # noqa: E402
from toolkit.data.celeba import read_celeba  # noqa: E402
from toolkit.data.stream import EpochStream, epoch_batches  # noqa: E402
from toolkit.loss import cvae_loss  # noqa: E402
from toolkit.model import CVAE, ModelSpec, arch_options  # noqa: E402


class JpegFolder(torch.utils.data.Dataset):
    """The usual way: one PIL decode of the full JPEG per sample, then crop, resize, to tensor."""

    def __init__(self, records, size: int, crop: int):
        self.records, self.size, self.crop = records, size, crop

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        image = Image.open(record.path).convert("RGB")
        left, top = (image.width - self.crop) // 2, (image.height - self.crop) // 2
        image = image.crop((left, top, left + self.crop, top + self.crop)).resize(
            (self.size, self.size), Image.BICUBIC
        )
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        return pixels.permute(2, 0, 1).float().div(255), torch.from_numpy(record.attributes.astype("float32"))


def images_per_second(model, optimizer, batches, steps: int, device, precision: str) -> float:
    """Train `steps` steps after 3 warm-up steps; `batches` is an iterator of (images, attributes)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    count, start = 0, None
    for index in range(steps + 3):
        if index == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, count = time.perf_counter(), 0
        images, attributes = next(batches)
        images, attributes = images.to(device, non_blocking=True), attributes.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(images, attributes)
            terms = cvae_loss(out.recon, images, out.mu, out.logvar, 0.5, out.prior_mu, out.prior_logvar)
        scaler.scale(terms.total).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        count += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def epoch_starts(epoch, epochs: int) -> float:
    """The median ms from asking for epoch k's batches to holding the first, k = 1..epochs (epoch 0,
    read first in full, starts the workers either way)."""
    waits = []
    for k in range(epochs + 1):
        start = time.perf_counter()
        batches = iter(epoch(k))
        next(batches)
        waits.append((time.perf_counter() - start) * 1e3)
        for _ in batches:
            pass
    return statistics.median(waits[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet", choices=["paper", "resnet"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, help="keep the generated folder and shards here")
    parser.add_argument("--loader-only", action="store_true", help="time each loader without a model")
    parser.add_argument("--epochs", type=int, default=3, help="--loader-only: epochs per feed and run")
    args = parser.parse_args()
    device = torch.device(args.device)

    work = args.work or Path(tempfile.mkdtemp(prefix="cvae-bench-train-"))
    root, shards = work / "celeba", work / "shards64"
    if not (root / "list_attr_celeba.txt").exists():
        make_folder(root, args.images)
    table = read_celeba(root)
    if not (shards / "train" / "manifest.json").exists():
        build_shards(table, shards, ImageSpec.parse("64", "center:148"), overwrite=True, progress=False)

    torch.manual_seed(0)
    options = arch_options(args.arch, {"width": 64, "levels": 4, "embed_dim": 128}) if args.arch == "resnet" else {}
    spec = ModelSpec(table.attributes, (64, 64), 128, args.arch, options=options)
    model = CVAE(spec).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def from_shards():
        # as the trainer reads them: one stream for every epoch, bound for the device
        epochs = EpochStream(shards, "train", args.batch_size, num_workers=args.workers, device=device)
        try:
            for epoch in itertools.count():
                yield from epochs.epoch(epoch)
        finally:  # closing this generator stops the workers, which outlive each epoch
            epochs.close()

    def each_epoch(**device_if_any):  # a loader, and so its workers, made anew for every epoch
        for epoch in itertools.count():
            yield from epoch_batches(
                shards, "train", args.batch_size, epoch=epoch, num_workers=args.workers, **device_if_any
            )

    def from_folder():
        dataset = JpegFolder(table.splits["train"], 64, 148)
        loader = torch.utils.data.DataLoader(
            dataset,
            args.batch_size,
            shuffle=True,
            num_workers=args.workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
            persistent_workers=args.workers > 0,
        )
        while True:
            yield from loader

    batches_per_epoch = EpochStream(shards, "train", args.batch_size, num_workers=args.workers).length
    feeds = {
        "shards": from_shards,
        "shards_fresh": lambda: each_epoch(device=device),
        "folder": from_folder,
    }
    if device.type == "cuda":
        feeds["shards_cpu"] = each_epoch
    if args.loader_only:  # the feeds' own rates over --epochs epochs each (their starts included), twice, interleaved
        # as many batches for every feed: --epochs epochs of the shard reader (each worker's partial
        # batch dropped, so an epoch is a little under train images / batch size)
        window = sum(batches_per_epoch(epoch) for epoch in range(args.epochs))
        rates = {}
        for _ in range(2):
            for name, make in feeds.items():
                batches, start, count = make(), time.perf_counter(), 0
                for images, _ in itertools.islice(batches, window):
                    count += len(images)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rates.setdefault(name, []).append(count / (time.perf_counter() - start))
                batches.close()  # its workers stop before the next feed's start
        rate = {name: sum(v) / len(v) for name, v in rates.items()}
        print(
            f"loader only, {args.workers} workers, batch {args.batch_size}, {args.epochs} epochs: "
            + ", ".join(f"{name} {value:.0f}" for name, value in rate.items())
            + f" images/s; shards / folder {rate['shards'] / rate['folder']:.2f}x, "
            f"shards / shards_fresh {rate['shards'] / rate['shards_fresh']:.2f}x"
        )
        # what a consumer waits for at each epoch's start: the first batch, workers kept or started anew
        epochs = EpochStream(shards, "train", args.batch_size, num_workers=args.workers, device=device)
        kept = epoch_starts(epochs.epoch, args.epochs)
        epochs.close()
        fresh = epoch_starts(
            lambda epoch: epoch_batches(
                shards, "train", args.batch_size, epoch=epoch, num_workers=args.workers, device=device
            ),
            args.epochs,
        )
        print(
            f"first batch of an epoch (median of epochs 1..{args.epochs}): workers kept {kept:.1f} ms, started anew {fresh:.1f} ms"
        )
        return

    first = from_shards()
    held = [tuple(t.to(device) for t in batch) for _, batch in zip(range(8), first)]
    first.close()
    feeds = {"memory": lambda: itertools.cycle(held), **feeds}
    rates = {}
    # interleaved twice, the median (of 2: the mean) counts, so a noisy moment hits every way alike
    for _ in range(2):
        for name, make in feeds.items():
            batches = make()
            rates.setdefault(name, []).append(
                images_per_second(model, optimizer, batches, args.steps, device, args.precision)
            )
            getattr(batches, "close", lambda: None)()  # its workers stop before the next feed's start
    rate = {name: sum(values) / len(values) for name, values in rates.items()}

    # shards and shards_fresh differ at epoch starts: how many the window crosses
    epochs = (args.steps + 3) / batches_per_epoch(0)
    label = (
        f"{args.arch} 64x64, batch {args.batch_size}, precision {args.precision}, {args.workers} loader workers, "
        f"{device}; windows of 3 warm-up + {args.steps} steps = {epochs:.1f} epochs"
    )
    print(f"\ntraining images/s ({label})")
    for name in rate:
        print(f"  {name:12} {rate[name]:10.1f}")
    print(
        f"pipeline efficiency (shards / memory): {rate['shards'] / rate['memory']:.2f}; "
        f"shards / JPEG folder: {rate['shards'] / rate['folder']:.2f}x"
        + (
            f"; shards / shards read for the CPU: {rate['shards'] / rate['shards_cpu']:.2f}x"
            if "shards_cpu" in rate
            else ""
        )
    )
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    (out / "train.json").write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "device": device_name,
                "arch": args.arch,
                "batch_size": args.batch_size,
                "precision": args.precision,
                "workers": args.workers,
                "images_per_s": rate,
                "runs": rates,
                "pipeline_efficiency": rate["shards"] / rate["memory"],
                "shards_over_folder": rate["shards"] / rate["folder"],
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
