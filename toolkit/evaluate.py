"""Held-out metrics of a trained CVAE: reconstruction, KL, sample diversity, attribute accuracy.

    metrics = evaluate_run("runs/digits")            # also writes runs/digits/metrics.json
    metrics["metrics"]["mse_per_pixel"], metrics["metrics"]["attr_acc"]

Reductions (the same as the training loss, `toolkit/loss.py`):
- MSE per image: squared error summed over the 3 x H x W values of an image; per pixel: that
  divided by 3 * H * W (so per value, in [0, 1]^2 units). Both averaged over the split's images.
- KL per image: KL(q(z | x, y) || p(z | x)) in closed form, summed over latent units, averaged over
  images; p is the model's own prior (N(0, I), or the learned p(z | x)). It does not depend on z,
  so there is one KL figure; the MSE is given twice: decoded from the posterior mean (`mse_*`,
  Table 1 and the training logs) and from one posterior sample z = mu + exp(logvar / 2) * eps
  (`mse_*_sampled`, what the loss optimises), eps from a CPU generator seeded with `seed`.
- Diversity: for each condition, n images from the prior with different noise; the distance of two
  images is their per-pixel RMS difference sqrt(mean((a - b)^2)) over the 3 x H x W values
  (= L2 / sqrt(3 H W), in [0, 1]); averaged over the n (n - 1) / 2 pairs, then over the conditions.
  A decoder that ignores z gives 0.
- Attribute accuracy: one prior sample per test attribute vector, judged by an attribute classifier
  (`toolkit/classifier.py`, logit > 0 = present); per attribute the fraction of images whose
  prediction equals the requested value, "mean" over attributes; "top1" (arg-max logit = the
  requested 1) only when every vector is one-hot (e.g. the digits). The floor compares the same
  images with the vectors shuffled across images (a seeded permutation): what a generator that
  ignores its condition would score. The ceiling is the classifier on the real test images.
- Attribute control (what the paper's Figure 5 shows by eye): for each attribute a, the first
  CONTROL_CONDITIONS test vectors are generated twice with the same noise, once with a set to 1
  and once with a set to 0; the score is the classifier's balanced accuracy at telling the two sets
  apart ((fraction of the a=1 images it calls a + fraction of the a=0 images it does not) / 2):
  0.5 = the attribute does not reach the image, 1.0 = it always does. A class label (one-hot data,
  or CUB's species before its attributes): the a=1 image is of class a instead of the vector's own,
  the a=0 image of its own, vectors of class a left out.
  "control" averages over the attributes the classifier recognises reliably on the real test
  images (`classifier.reliable_attributes`: balanced accuracy >= 0.75, >= 5 images each side),
  since an attribute it cannot see in real faces says nothing about generated ones; "control_all"
  over every attribute scored: all up to CONTROL_ALL_LIMIT (CelebA's 40, the digits), else the
  reliable ones only (CUB: 2 x 256 images per attribute would be 262k images).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from toolkit.atomic import write_text
from toolkit.classifier import (
    THRESHOLD,
    AccuracyCounter,
    AttributeClassifier,
    check_image_size,
    classifier_accuracy,
    columns_for,
    load_classifier,
    reliable_attributes,
)
from toolkit.config import DataConfig
from toolkit.data.stream import eval_batches, is_url, read_manifest
from toolkit.devices import resolve_device
from toolkit.errors import UserError, one_line
from toolkit.formats import CLASSIFIER_CONFIG, METRICS, RECIPE
from toolkit.loss import kl_gaussians, kl_standard_normal
from toolkit.model import load_model
from toolkit.run_folder import trained_shards_difference

METRICS_FILE = METRICS  # RUN/metrics.json (toolkit.formats)
DIVERSITY_CONDITIONS = 32  # test attribute vectors diversity is averaged over
DIVERSITY_SAMPLES = 8
# None without a classifier
CLASSIFIER_METRICS = (
    "attr_acc",
    "attr_acc_top1",
    "attr_acc_floor",
    "attr_acc_floor_top1",
    "attr_acc_real",
    "attr_acc_real_top1",
    "control",
    "control_all",
    "control_attributes",
)
CONTROL_CONDITIONS = 256  # test attribute vectors the control score uses (two images each per attribute)
CONTROL_ALL_LIMIT = 64  # with more attributes, control is scored for the reliable ones only (2 x 256 images each)


# --- reconstruction and KL ----------------------------------------------------------------------


@torch.no_grad()
def reconstruction_metrics(
    model,
    shards: str | Path,
    split: str = "test",
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    seed: int = 0,
    sampled: bool = True,
    max_skipped_fraction: float = DataConfig.max_skipped_fraction,
) -> dict[str, float]:
    """Reconstruction error and KL over one ordered pass of `split` (streamed: per-batch sums only).

    Returns {"mse_per_image", "mse_per_pixel"} (decoded from the posterior mean), with `sampled`
    also {"mse_per_image_sampled", "mse_per_pixel_sampled"} (decoded from one posterior sample,
    eps for each batch the next [B, Z] standard-normal draw of a CPU generator seeded with `seed`,
    so deterministic for a given batch_size), "kl_per_image" (against the model's prior) and
    "count" (images). Reductions: module docstring. The model is used as it is (put it in eval mode).
    Unreadable samples are skipped and counted (`eval_batches`; a UserError past `max_skipped_fraction`,
    default data.max_skipped_fraction's); "count" is of the images read.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    sums = {"mse": 0.0, "mse_sampled": 0.0, "kl": 0.0}
    count, values = 0, 1
    for images, attributes in eval_batches(shards, split, batch_size, max_skipped_fraction):
        images, attributes = images.to(device), attributes.to(device)
        mu, logvar = model.encoder(images, attributes)
        mu, logvar = mu.float(), logvar.float()
        target = images.float().flatten(1)
        sums["mse"] += _squared_error(model.decoder(mu, attributes), target)
        if sampled:
            eps = torch.randn(mu.shape, generator=generator).to(device)
            sums["mse_sampled"] += _squared_error(
                model.decoder(mu + torch.exp(0.5 * logvar) * eps, attributes), target
            )
        sums["kl"] += float(kl_per_image(model, mu, logvar, attributes).double().sum())
        count += len(images)
        values = target.shape[1]
    if count == 0:
        raise UserError(f"the {split} split of {shards} holds no images")
    result = {"mse_per_image": sums["mse"] / count, "mse_per_pixel": sums["mse"] / count / values}
    if sampled:
        result.update(
            mse_per_image_sampled=sums["mse_sampled"] / count,
            mse_per_pixel_sampled=sums["mse_sampled"] / count / values,
        )
    result.update(kl_per_image=sums["kl"] / count, count=count)
    return result


def _squared_error(recon: torch.Tensor, target: torch.Tensor) -> float:
    """Sum over the batch of the per-image summed squared error (fp32 per image, fp64 across images)."""
    return float((recon.float().flatten(1) - target).pow(2).sum(dim=1).double().sum())


def kl_per_image(model, mu: torch.Tensor, logvar: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
    """KL(q || the model's prior) per image [B], summed over latent units."""
    prior = model.prior(attributes)
    if prior is None:
        return kl_standard_normal(mu.float(), logvar.float())
    return kl_gaussians(mu.float(), logvar.float(), prior[0].float(), prior[1].float())


# --- diversity ------------------------------------------------------------------------------------


@torch.no_grad()
def diversity(
    model, attributes, n: int = DIVERSITY_SAMPLES, seed: int = 0, device: str | torch.device = "cpu", chunk: int = 16
) -> float:
    """Mean pairwise per-pixel RMS distance between n prior samples per condition, averaged over conditions.

    `attributes`: [K, A] (or [A]) condition vectors. Noise: one [K, n, Z] standard-normal draw of a
    CPU generator seeded with `seed` (so independent of `chunk`, the conditions decoded at once).
    d(a, b) = sqrt(mean over the 3 H W values of (a - b)^2); the result is the mean of d over the
    n (n - 1) / 2 pairs of each condition, then over the K conditions. ~0 when the decoder ignores z.
    """
    if n < 2:
        raise UserError(f"diversity needs n >= 2 samples per condition, got {n}")
    conditions = torch.as_tensor(attributes, dtype=torch.float32)
    conditions = conditions[None] if conditions.dim() == 1 else conditions
    if conditions.dim() != 2 or len(conditions) == 0:
        raise UserError(f"diversity needs attribute vectors [K, A], got shape {tuple(conditions.shape)}")
    device = torch.device(device)
    noise = torch.randn(len(conditions), n, model.spec.latent_dim, generator=torch.Generator().manual_seed(seed))
    pairs = torch.triu_indices(n, n, offset=1)
    total = 0.0
    for start in range(0, len(conditions), chunk):
        cond = conditions[start : start + chunk].to(device)
        k = len(cond)
        images = model.generate(
            cond.repeat_interleave(n, dim=0), noise[start : start + k].reshape(k * n, -1).to(device)
        )
        flat = images.float().reshape(k, n, -1)
        diff = flat[:, pairs[0]] - flat[:, pairs[1]]  # [k, pairs, D]
        total += float(diff.pow(2).mean(dim=2).sqrt().mean(dim=1).double().sum())
    return total / len(conditions)


# --- attribute accuracy of generated images -------------------------------------------------------


def split_attributes(shards: str | Path, split: str = "test") -> torch.Tensor:
    """Every attribute vector of a split, in order [N, A] (small: the images are not kept)."""
    vectors = [attributes for _, attributes in eval_batches(shards, split)]
    if not vectors:
        raise UserError(f"the {split} split of {shards} holds no images")
    return torch.cat(vectors)


@torch.no_grad()
def attribute_accuracy(
    classifier,
    model,
    shards: str | Path,
    split: str = "test",
    seed: int = 0,
    shuffled: bool = False,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    attributes: torch.Tensor | None = None,
) -> dict:
    """How often the classifier finds the requested attributes in generated images.

    One prior sample per attribute vector of `split` (noise: one [N, Z] draw of a CPU generator
    seeded with `seed`), classified (logit > 0 = present). With shuffled=True, the same images are
    compared with the vectors permuted across images (torch.randperm seeded with seed + 1): the floor.
    Returns {"mean": mean over attributes, "per_attribute": {name: accuracy}, "top1": arg-max accuracy
    when every vector is one-hot else None, "count": images}. `attributes` [N, A] saves re-reading
    the split when already at hand. The classifier is matched to the model's attributes by name.
    """
    names = list(model.spec.attributes)
    columns = columns_for(classifier, names, "the model")
    check_image_size(classifier, model.spec.image_size, "the model")
    vectors = (
        split_attributes(shards, split) if attributes is None else torch.as_tensor(attributes, dtype=torch.float32)
    )
    if vectors.shape[1] != len(names):
        raise UserError(f"{shards} has {vectors.shape[1]} attributes per image, the model {len(names)}")
    targets = (
        vectors[torch.randperm(len(vectors), generator=torch.Generator().manual_seed(seed + 1))]
        if shuffled
        else vectors
    )
    noise = torch.randn(len(vectors), model.spec.latent_dim, generator=torch.Generator().manual_seed(seed))
    device = torch.device(device)
    classifier = classifier.to(device).eval()
    columns = columns.to(device)
    counter = AccuracyCounter(names)
    for start in range(0, len(vectors), batch_size):
        images = model.generate(
            vectors[start : start + batch_size].to(device), noise[start : start + batch_size].to(device)
        )
        counter.update(classifier(images.float().clamp(0, 1))[:, columns], targets[start : start + batch_size])
    return counter.result()


def class_block(vectors: torch.Tensor) -> int:
    """Width k of a leading class label in attribute vectors [N, A]: every row has exactly one 1 among
    its first k columns (CUB: the species one-hot before the 312 attributes; a one-hot label: all of
    them up to the last class present). 0 when there is none (CelebA's 40 independent attributes)."""
    binary = ((vectors == 0) | (vectors == 1)).all()
    if len(vectors) == 0 or not binary or not (vectors.sum(dim=1) >= 1).all():
        return 0
    k = int(vectors.argmax(dim=1).max()) + 1  # argmax: each row's first 1
    return k if bool((vectors[:, :k].sum(dim=1) == 1).all()) else 0


@torch.no_grad()
def attribute_control(
    classifier,
    model,
    attributes: torch.Tensor,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    names: list[str] | None = None,
) -> dict:
    """Per attribute, the classifier's balanced accuracy at telling images generated with it set to 1
    from images generated with it set to 0, the same noise and the rest of the vector the same.

    `attributes` [N, A]: the conditions to start from (the test split's vectors); noise: one [N, Z]
    draw of a CPU generator seeded with `seed`. `names`: the attributes to score (default all of the
    model's). Returns {name: {"control": balanced accuracy, "present": fraction of the a=1 images
    classified a, "absent": fraction of the a=0 images classified not a, "count": vectors}}. A class
    label (`class_block`: a one-hot, or CUB's species before its attributes) is switched, never
    doubled: for a class a, the a=1 vector has class a instead of its own, the a=0 vector keeps its
    own, and vectors of class a are left out.
    """
    model_names = list(model.spec.attributes)
    vectors = torch.as_tensor(attributes, dtype=torch.float32)
    if vectors.dim() != 2 or vectors.shape[1] != len(model_names) or len(vectors) == 0:
        raise UserError(
            f"attribute control needs attribute vectors [N, {len(model_names)}], got shape {tuple(vectors.shape)}"
        )
    names = model_names if names is None else list(names)
    columns = columns_for(classifier, names, "the model")
    check_image_size(classifier, model.spec.image_size, "the model")
    block = class_block(vectors)
    noise = torch.randn(len(vectors), model.spec.latent_dim, generator=torch.Generator().manual_seed(seed))
    device = torch.device(device)
    classifier = classifier.to(device).eval()

    def called_present(conditions: torch.Tensor, z: torch.Tensor, column: int) -> torch.Tensor:
        calls = []
        for start in range(0, len(conditions), batch_size):
            images = model.generate(
                conditions[start : start + batch_size].to(device), z[start : start + batch_size].to(device)
            )
            calls.append((classifier(images.float().clamp(0, 1))[:, column] > THRESHOLD).cpu())
        return torch.cat(calls).double()

    result = {}
    for name, column in zip(names, columns.tolist()):
        index = model_names.index(name)
        is_class = index < block
        keep = vectors[:, index] == 0 if is_class else torch.ones(len(vectors), dtype=torch.bool)
        if not keep.any():
            continue
        base, z = vectors[keep], noise[keep]
        with_a, without_a = base.clone(), base.clone()
        if is_class:
            with_a[:, :block] = 0.0  # the class switched to a; without_a keeps the vector's own
        with_a[:, index], without_a[:, index] = 1.0, 0.0
        present = float(called_present(with_a, z, column).mean())
        absent = 1.0 - float(called_present(without_a, z, column).mean())
        result[name] = {"control": (present + absent) / 2, "present": present, "absent": absent, "count": len(base)}
    return result


# --- one run ---------------------------------------------------------------------------------------


def run_shards(run_dir: str | Path, option: str | None = None) -> str:
    """The shards a run was trained on: data.shards of RUN/recipe.yaml. `option`: the command's own
    option naming other shards (eval's --shards), offered in the errors; export and edit have none."""
    offer = f"; pass {option}" if option else ""
    path = Path(run_dir) / RECIPE
    if not path.is_file():
        raise UserError(f"{run_dir} has no recipe.yaml to find its shards in{offer}")
    try:
        shards = OmegaConf.select(OmegaConf.load(path), "data.shards")
    except Exception as error:
        raise UserError(f"{path} is not readable: {one_line(error)}") from None
    if not shards:
        raise UserError(f"{path} names no data.shards{offer}")
    shards = str(shards)
    if not is_url(shards) and not Path(shards).is_dir():
        relative = not Path(shards).is_absolute()
        raise UserError(
            f"the shards {run_dir} was trained on (data.shards={shards} in {path}) are not there"
            f"{' (a relative path is taken from the current folder: run this from the folder training ran in)' if relative else ''}"
            f"{offer}"
        )
    return shards


def find_classifier(run_dir: str | Path, recipe: str | None = None) -> Path | None:
    """Where a classifier for this run sits, if anywhere: RUN/../classifier, then
    RUN/../<recipe>-classifier (where `cvae-tk classifier train recipe=<recipe>` writes)."""
    parent = Path(run_dir).resolve().parent
    candidates = [parent / "classifier"] + ([parent / f"{recipe}-classifier"] if recipe else [])
    return next((c for c in candidates if (c / CLASSIFIER_CONFIG).is_file()), None)


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    classifier=None,
    device: str | torch.device = "auto",
    shards: str | None = None,
    seed: int = 0,
    batch_size: int = 256,
    diversity_samples: int = DIVERSITY_SAMPLES,
    diversity_conditions: int = DIVERSITY_CONDITIONS,
    control_conditions: int = CONTROL_CONDITIONS,
    find: bool = True,
    write: bool = True,
) -> dict:
    """All metrics of a run on `split`, written to RUN/metrics.json (tmp + rename) and returned.

    `classifier`: a folder (or a loaded AttributeClassifier); None looks for one (`find_classifier`)
    unless find=False; without one the attribute accuracies are None. `shards`: default the run's
    data.shards (RUN/recipe.yaml). The file:
        {"run_dir", "split", "shards", "recipe", "step", "beta", "seed", "classifier": folder | null,
         "metrics": {mse_per_image, mse_per_pixel, mse_per_image_sampled, mse_per_pixel_sampled,
                     kl_per_image, count, diversity, attr_acc, attr_acc_top1, attr_acc_floor,
                     attr_acc_floor_top1, attr_acc_real, attr_acc_real_top1, control, control_all,
                     control_attributes},   (floats or null)
         "per_attribute": {"generated": {...}, "floor": {...}, "real": {...}, "real_balanced": {...}} | null,
         "control": {"reliable": [names], "per_attribute": {name: {control, present, absent, count,
                     real_balanced, reliable}}} | null,
         "settings": {"batch_size", "diversity_samples", "diversity_conditions", "control_conditions"}}
    (control_attributes is an int: how many attributes `control` averages.)
    Definitions and reductions: the module docstring.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    model = load_model(run_dir)
    device = resolve_device(device)
    model.to(device).eval()
    if shards:
        shards = str(shards)
    else:  # the run's own: measuring on shards rebuilt since would report on other data under its name
        shards = run_shards(run_dir, "--shards")
        differs = trained_shards_difference(run_dir, shards)
        if differs:
            raise UserError(
                f"data.shards={shards} no longer holds the shards {run_dir} was trained on ({differs}); "
                f"point --shards at those, or pass --shards {shards} to measure on these anyway"
            )
    manifest = read_manifest(shards, split)
    if list(manifest["attributes"]) != list(model.spec.attributes):
        raise UserError(
            f"{shards} ({split}) has other attributes than the model of {run_dir}; pass the shards it was trained on with --shards"
        )
    if tuple(manifest["image_size"]) != tuple(model.spec.image_size):
        raise UserError(
            f"{shards} ({split}) has {tuple(manifest['image_size'])} images, the model {tuple(model.spec.image_size)}"
        )
    extra = model.spec.extra or {}
    # the classifier is checked before the measuring, which takes minutes on large test splits
    classifier, classifier_dir = _judge(classifier, find, run_dir, model)

    metrics: dict = dict(reconstruction_metrics(model, shards, split, device, batch_size, seed=seed))
    vectors = split_attributes(shards, split)
    metrics["diversity"] = diversity(model, vectors[:diversity_conditions], diversity_samples, seed, device)

    per_attribute, control = None, None
    metrics.update({key: None for key in CLASSIFIER_METRICS})
    if classifier is not None:
        results = {
            "generated": attribute_accuracy(
                classifier, model, shards, split, seed, False, device, batch_size, vectors
            ),
            "floor": attribute_accuracy(classifier, model, shards, split, seed, True, device, batch_size, vectors),
            "real": classifier_accuracy(classifier, shards, split, str(device), batch_size),
        }
        for kind, key in (("generated", "attr_acc"), ("floor", "attr_acc_floor"), ("real", "attr_acc_real")):
            metrics[key], metrics[f"{key}_top1"] = results[kind]["mean"], results[kind]["top1"]
        per_attribute = {kind: result["per_attribute"] for kind, result in results.items()}
        per_attribute["real_balanced"] = results["real"]["balanced"]
        reliable = reliable_attributes(results["real"])
        # up to CONTROL_ALL_LIMIT attributes each is scored; beyond (CUB's 512) the reliable ones only
        scored = None if len(model.spec.attributes) <= CONTROL_ALL_LIMIT else reliable
        scores = attribute_control(classifier, model, vectors[:control_conditions], seed, device, batch_size, scored)
        control = {
            "reliable": reliable,
            "per_attribute": {
                name: {**score, "real_balanced": results["real"]["balanced"][name], "reliable": name in reliable}
                for name, score in scores.items()
            },
        }
        metrics["control_all"] = sum(s["control"] for s in scores.values()) / len(scores) if scores else None
        trusted = [scores[name]["control"] for name in reliable if name in scores]
        metrics["control"] = sum(trusted) / len(trusted) if trusted else None
        metrics["control_attributes"] = len(trusted)

    report = {
        "run_dir": str(run_dir),
        "split": split,
        "shards": shards,
        "recipe": extra.get("recipe"),
        "step": extra.get("step"),
        "beta": extra.get("beta"),
        "seed": seed,
        "classifier": str(classifier_dir) if classifier_dir else None,
        "metrics": metrics,
        "per_attribute": per_attribute,
        "control": control,
        "settings": {
            "batch_size": batch_size,
            "diversity_samples": diversity_samples,
            "diversity_conditions": min(diversity_conditions, len(vectors)),
            "control_conditions": min(control_conditions, len(vectors)),
        },
    }
    if write:
        write_json_atomic(run_dir / METRICS_FILE, report)
    return report


def _judge(classifier, find: bool, run_dir: Path, model) -> tuple[AttributeClassifier | None, Path | None]:
    """(the classifier, its folder) for evaluate_run. One given that does not fit the model is
    refused; one only found beside the run (another data set's, say) is left out with a warning."""
    found = classifier is None and find
    if found:
        classifier = find_classifier(run_dir, (model.spec.extra or {}).get("recipe"))
    if classifier is None:
        return None, None
    folder = None
    try:
        if not isinstance(classifier, AttributeClassifier):
            folder = Path(classifier)
            classifier = load_classifier(folder)
        columns_for(classifier, list(model.spec.attributes), f"the model of {run_dir}")
        check_image_size(classifier, model.spec.image_size, f"the model of {run_dir}")
    except UserError as error:
        if not found:
            raise UserError(f"classifier {folder or ''}: {error}") from None
        print(f"warning: not judging with {folder}, found beside the run: {one_line(error)}", file=sys.stderr)
        return None, None
    return classifier, folder


def write_json_atomic(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")
