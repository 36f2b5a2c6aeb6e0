"""A small CNN that predicts the attribute vector of an image: the judge of generated images.

    path = train_classifier("shards/digits", "runs/digits-classifier", steps=2000, batch_size=64, lr=1e-3, seed=0)
    classifier = load_classifier(path.parent)
    classifier_accuracy(classifier, "shards/digits", "test")   # on real images: the ceiling

Architecture (`AttributeClassifier`): `depth` blocks of conv3x3 -> GroupNorm -> ReLU -> 2x2 max-pool,
channels width, 2 width, 4 width... (capped at 8 width), then global average pooling and one linear
layer to A logits. Multi-label: trained with BCE-with-logits on the 0/1 attribute vectors (mean over
attributes and images), an attribute is predicted present when its logit > 0 (probability > 0.5).
Any image size works (global pooling); it is recorded so a mismatch is caught.

Saved as `classifier.safetensors` (fp32 weights, never pickle) + `classifier.json` (attributes,
image size, architecture, training settings and the accuracy on the real test images).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from toolkit.atomic import atomic_paths, write_state_dict
from toolkit.data.stream import EpochStream, eval_batches, read_manifest, worker_died
from toolkit.errors import UserError, one_line
from toolkit.formats import CLASSIFIER_CONFIG as CONFIG
from toolkit.formats import CLASSIFIER_WEIGHTS as WEIGHTS
from toolkit.formats import is_debris
from toolkit.ownership import FolderLock
from toolkit.safe_load import read_safetensors

FORMAT = "cvae-tk-classifier"
DEFAULTS = {"steps": 2000, "lr": 1e-3, "width": 32, "depth": 4}
THRESHOLD = 0.0  # on the logit: probability 0.5
# An attribute the classifier "recognises reliably" on real test images, so that its verdict on
# generated images means something: balanced accuracy at least this, from at least this many test
# images on each side (a handful of positives gives a balanced accuracy that is mostly luck).
RELIABLE_BALANCED = 0.75
RELIABLE_MIN_IMAGES = 5


class AttributeClassifier(nn.Module):
    """images [B, 3, H, W] in [0, 1] -> attribute logits [B, A]."""

    def __init__(self, attributes: list[str], image_size: tuple[int, int], width: int = 32, depth: int = 4):
        super().__init__()
        if width < 1 or depth < 1:
            raise UserError(f"classifier width and depth must be positive, got width={width}, depth={depth}")
        self.attributes = list(attributes)
        self.image_size = tuple(int(s) for s in image_size)
        self.width, self.depth = int(width), int(depth)
        layers, previous = [], 3
        for level in range(depth):
            channels = width * min(2**level, 8)
            layers += [
                nn.Conv2d(previous, channels, 3, padding=1),
                nn.GroupNorm(math.gcd(8, channels), channels),
                nn.ReLU(),
            ]
            if min(self.image_size) >> (level + 1) >= 1:  # never pool a side below one pixel
                layers.append(nn.MaxPool2d(2))
            previous = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(previous, len(self.attributes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images.to(self.head.weight.dtype) - 0.5)
        return self.head(x.mean(dim=(2, 3)))

    def config(self) -> dict:
        return {
            "attributes": self.attributes,
            "image_size": list(self.image_size),
            "arch": {"width": self.width, "depth": self.depth},
        }


# --- accuracy -------------------------------------------------------------------------------------


class AccuracyCounter:
    """Accumulates thresholded predictions against 0/1 targets, batch by batch.

    `result()`: {"mean": mean over attributes of the per-attribute accuracy (= over all entries),
    "per_attribute": {name: fraction of images whose prediction matches}, "top1": fraction of images
    whose arg-max logit is the target's 1, or None unless every target is one-hot, "count": images,
    "balanced": {name: (true-positive rate + true-negative rate) / 2, None when the targets hold only
    one value}, "positives": {name: images whose target is 1}}. Plain accuracy flatters rare
    attributes (CelebA's Eyeglasses is 1 in 15: "never" scores 0.93); balanced accuracy gives 0.5.
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.correct = torch.zeros(len(names), dtype=torch.float64)
        self.true_positive = torch.zeros(len(names), dtype=torch.float64)
        self.positive = torch.zeros(len(names), dtype=torch.float64)
        self.top1 = 0
        self.one_hot = True
        self.count = 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits, targets = logits.detach().float().cpu(), targets.detach().float().cpu()
        predicted = (logits > THRESHOLD).float()
        self.correct += (predicted == targets).sum(dim=0).double()
        self.true_positive += (predicted * targets).sum(dim=0).double()
        self.positive += targets.sum(dim=0).double()
        self.one_hot = self.one_hot and bool((targets.sum(dim=1) == 1).all())
        self.top1 += int((logits.argmax(dim=1) == targets.argmax(dim=1)).sum())
        self.count += len(targets)

    def result(self) -> dict:
        if self.count == 0:
            raise UserError("no images to measure the attribute accuracy on: the split is empty")
        per = (self.correct / self.count).tolist()
        negative = self.count - self.positive
        true_negative = self.correct - self.true_positive
        balanced = [
            float((tp / p + tn / n) / 2) if p > 0 and n > 0 else None
            for tp, p, tn, n in zip(
                self.true_positive.tolist(), self.positive.tolist(), true_negative.tolist(), negative.tolist()
            )
        ]
        return {
            "mean": float(sum(per) / len(per)),
            "top1": self.top1 / self.count if self.one_hot else None,
            "per_attribute": dict(zip(self.names, per)),
            "balanced": dict(zip(self.names, balanced)),
            "positives": dict(zip(self.names, [int(p) for p in self.positive.tolist()])),
            "count": self.count,
        }


def reliable_attributes(accuracy: dict) -> list[str]:
    """The attributes an AccuracyCounter result (on real images) says the classifier recognises reliably."""
    balanced, positives, count = accuracy.get("balanced") or {}, accuracy.get("positives") or {}, accuracy["count"]
    return [
        name
        for name, value in balanced.items()
        if value is not None
        and value >= RELIABLE_BALANCED
        and min(positives[name], count - positives[name]) >= RELIABLE_MIN_IMAGES
    ]


def columns_for(classifier: AttributeClassifier, names: list[str], where: str = "the data") -> torch.Tensor:
    """Indices of `names` among the classifier's attributes (matched by name, any order)."""
    index = {name: i for i, name in enumerate(classifier.attributes)}
    missing = [name for name in names if name not in index]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(
            f"the classifier does not know attribute(s) {shown} of {where} (it was trained on {len(index)} attributes: "
            f"{', '.join(classifier.attributes[:5])}{'...' if len(index) > 5 else ''}); train one on the same shards"
        )
    return torch.tensor([index[name] for name in names], dtype=torch.long)


def check_image_size(classifier: AttributeClassifier, image_size, where: str) -> None:
    if tuple(image_size) != classifier.image_size:
        raise UserError(
            f"the classifier was trained on {classifier.image_size[0]}x{classifier.image_size[1]} images but {where} "
            f"has {image_size[0]}x{image_size[1]}; train one on the same shards"
        )


@torch.no_grad()
def classifier_accuracy(
    classifier: AttributeClassifier,
    shards: str | Path,
    split: str = "test",
    device: str = "cpu",
    batch_size: int = 256,
) -> dict:
    """The classifier's accuracy on the real images of a split (the ceiling for generated images).

    Returns AccuracyCounter's dict: "mean" (over attributes), "per_attribute", "balanced" and
    "positives" (per attribute), "top1" (one-hot targets only, else None), "count".
    """
    manifest = read_manifest(shards, split)
    names = list(manifest["attributes"])
    columns = columns_for(classifier, names, f"{shards}")
    check_image_size(classifier, manifest["image_size"], f"{shards}")
    device = torch.device(device)
    was_training = classifier.training
    classifier.to(device).eval()
    counter = AccuracyCounter(names)
    for images, attributes in eval_batches(shards, split, batch_size):
        counter.update(classifier(images.to(device))[:, columns.to(device)], attributes)
    classifier.train(was_training)
    return counter.result()


# --- training, saving, loading --------------------------------------------------------------------


def train_classifier(
    shards: str | Path,
    out_dir: str | Path,
    steps: int = DEFAULTS["steps"],
    batch_size: int = 64,
    lr: float = DEFAULTS["lr"],
    seed: int = 0,
    device: str = "cpu",
    width: int = DEFAULTS["width"],
    depth: int = DEFAULTS["depth"],
    num_workers: int = 0,
    hflip: bool = False,
    balanced: bool = False,
    blur: float = 0.0,
    log=None,
) -> Path:
    """Train on the train split (`EpochStream`, epoch after epoch, until `steps` Adam steps), measure
    the accuracy on the real test images, write OUT/classifier.safetensors + classifier.json; returns
    the path of the weights. Deterministic on the CPU for a given seed. `log(str)` gets progress lines.

    `hflip`: mirror a random half of each batch (seeded): on faces and birds this doubles the
    training images for free (1,600 real faces overfit without it); never for digits or text.
    `balanced`: weigh each attribute's positives by negatives / positives of the train split (BCE's
    pos_weight), so that logit 0 is a balanced decision; unweighted, a rare attribute (CelebA's
    Eyeglasses, 1 in 15) is almost never called present, on real images or generated ones.
    `blur` > 0: Gaussian-blur a random half of each batch with a sigma drawn from [0.5, blur] pixels
    (seeded). A VAE's samples are blurry, and a judge trained on sharp faces only goes blind to
    thin or dark details there (measured on the real CelebA sample, sigma 1.5: Eyeglasses' balanced
    accuracy 0.83 -> 0.50, Black_Hair 0.85 -> 0.67), so it would miss attributes that are visibly drawn.
    """
    if steps < 1 or batch_size < 1 or not (math.isfinite(lr) and lr > 0):  # an infinite lr trains to NaN weights
        raise UserError(
            f"classifier training needs steps >= 1, batch_size >= 1 and a finite lr > 0 (got {steps}, {batch_size}, {lr})"
        )
    if not 0.0 <= blur <= 16.0:
        raise UserError(f"classifier blur must be a sigma in [0, 16] pixels (0: off), got {blur}")
    check_classifier_folder(Path(out_dir))
    manifest = read_manifest(shards, "train")
    read_manifest(shards, "test")  # the ceiling is measured there: fail before training, not after
    with FolderLock(Path(out_dir), "classifier training", "--out", f"{WEIGHTS} and {CONFIG}"):
        device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            classifier = AttributeClassifier(manifest["attributes"], manifest["image_size"], width, depth)
        classifier.to(device).train()
        optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
        flips = torch.Generator().manual_seed(seed + 1)
        pos_weight = positive_weights(shards).to(device) if balanced else None
        step, epoch, start, loss = 0, 0, time.perf_counter(), torch.tensor(float("nan"))
        # one loader for every epoch: its workers are started once
        epochs = EpochStream(shards, "train", batch_size, seed=seed, num_workers=num_workers, manifest=manifest)
        try:
            while step < steps:
                for images, attributes in epochs.epoch(epoch):
                    if hflip:
                        mirror = torch.rand(len(images), generator=flips) < 0.5
                        images = torch.where(mirror[:, None, None, None], images.flip(-1), images)
                    if blur > 0:
                        images = blur_some(images, blur, flips)
                    logits = classifier(images.to(device))
                    loss = F.binary_cross_entropy_with_logits(logits, attributes.to(device), pos_weight=pos_weight)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    if log is not None and (step % 200 == 0 or step == steps):
                        log(f"step {step}/{steps}: loss {loss.item():.4f}")
                    if step >= steps:
                        break
                epoch += 1
        except RuntimeError as error:
            if not worker_died(error):
                raise
            raise UserError(
                f"a data loader worker died at classifier step {step + 1} ({one_line(error).rstrip('. ')}; the kernel's out-of-memory "
                "killer does this when memory runs out: lower data.num_workers or batch_size); nothing was written"
            ) from None
        finally:
            epochs.close()  # the workers stop before the test pass and the save, not at exit
        classifier.eval()
        accuracy = classifier_accuracy(classifier, shards, "test", device=str(device))
        meta = {
            "format": FORMAT,
            **classifier.config(),
            "training": {
                "shards": str(shards),
                "split": "train",
                "steps": steps,
                "batch_size": batch_size,
                "lr": lr,
                "seed": seed,
                "hflip": hflip,
                "balanced": balanced,
                "blur": blur,
                "final_loss": float(loss.item()),
                "seconds": round(time.perf_counter() - start, 2),
            },
            "test_accuracy": {"split": "test", **accuracy},
        }
        return save_classifier(classifier, out_dir, meta)


def check_classifier_folder(out_dir: Path) -> None:
    """--out is a classifier's own: new, empty or holding a classifier. Another command's folder (a
    run's model and checkpoints, shards, a sweep's tables) or the user's files would get a classifier
    mixed in, and a classifier.json that is not ours would be replaced. Hidden files and a file manager's
    (Thumbs.db) are left alone."""
    if not out_dir.is_dir():
        return
    others = sorted(
        p.name
        for p in out_dir.iterdir()
        if not (p.name.startswith(".") or is_debris(p.name)) and p.name not in (WEIGHTS, CONFIG)
    )
    if others:
        shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        raise UserError(
            f"--out {out_dir} holds files that are not a classifier's ({shown}): a classifier's folder holds only "
            f"{WEIGHTS} and {CONFIG}; choose another --out, such as runs/<recipe>-classifier beside the runs"
        )
    try:
        written = json.loads((out_dir / CONFIG).read_text()).get("format") == FORMAT
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError):
        written = False
    if not written:
        raise UserError(
            f"--out {out_dir} holds a {CONFIG} that is not a cvae-tk classifier's: it would be replaced; "
            "move it away or choose another --out"
        )


def blur_some(images: torch.Tensor, max_sigma: float, generator: torch.Generator) -> torch.Tensor:
    """A random half of the batch blurred with one Gaussian of sigma in [0.5, max_sigma] (drawn from `generator`)."""
    chosen = torch.rand(len(images), generator=generator) < 0.5
    sigma = 0.5 + float(torch.rand(1, generator=generator)) * max(max_sigma - 0.5, 0.0)
    kernel = 2 * math.ceil(3 * sigma) + 1
    if not chosen.any():
        return images
    blurred = gaussian_blur(images, [kernel, kernel], [sigma, sigma])
    return torch.where(chosen[:, None, None, None], blurred, images)


def positive_weights(shards: str | Path) -> torch.Tensor:
    """negatives / positives per attribute over the train split (an attribute never or always present: 1)."""
    from toolkit.evaluate import split_attributes

    vectors = split_attributes(shards, "train").double()
    positives = vectors.sum(dim=0)
    negatives = len(vectors) - positives
    usable = (positives > 0) & (negatives > 0)
    return torch.where(usable, negatives / positives.clamp(min=1), torch.ones_like(positives)).float()


def save_classifier(classifier: AttributeClassifier, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write classifier.safetensors and classifier.json into `out_dir` as one set (see model.save_model):
    a failure (a full disk: OSError(ENOSPC), as atomic.os_errors makes it) leaves the folder as it was."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, **(meta or {}), **classifier.config()}
    with atomic_paths(out_dir / WEIGHTS, out_dir / CONFIG) as (weights, config):
        write_state_dict(classifier, weights)
        config.write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir / WEIGHTS


def load_classifier(folder: str | Path) -> AttributeClassifier:
    """Rebuild a classifier from its folder, on the CPU, in eval mode; `.meta` holds classifier.json."""
    folder = Path(folder)
    config, weights = folder / CONFIG, folder / WEIGHTS
    if not config.is_file() or not weights.is_file():
        raise UserError(
            f"{folder} is not an attribute classifier: expected {config} and {weights} (written by `cvae-tk classifier train`)"
        )
    try:
        meta = json.loads(config.read_text())
        arch = meta["arch"]
        classifier = AttributeClassifier(
            list(meta["attributes"]), tuple(meta["image_size"]), int(arch["width"]), int(arch["depth"])
        )
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{config} is not a cvae-tk classifier config: {one_line(error)}") from None
    try:
        state = read_safetensors(weights)
        classifier.load_state_dict(state)
    except Exception as error:
        raise UserError(f"{weights} does not hold the weights {config} describes: {one_line(error)}") from None
    classifier.meta = meta
    return classifier.eval()
