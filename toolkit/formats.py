"""The names and choices every stage agrees on, in one place (standard library only, so reading a
recipe, a run folder or an export never imports torch). The ONNX files' own contract (inputs,
outputs, metadata) is toolkit/contract.py; the shards' on-disk format is shards/README.md.

Import the name, never retype the string: a renamed file then changes everywhere at once.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence

from toolkit.errors import UserError

# --- a run folder (runs/NAME/), written by toolkit/train.py --------------------------------------
WEIGHTS = "model.safetensors"  # the final fp32 weights
CONFIG = "config.json"  # the ModelSpec that rebuilds the network (toolkit.model.load_model)
RECIPE = "recipe.yaml"  # the complete, resolved recipe the run was started with
SAMPLES_GRID = "samples.png"  # the final sample grid
SAMPLES = "samples"  # grids during training: step-NNNNNN.png, reconstructions-NNNNNN.png
METRICS = "metrics.json"  # written by `cvae-tk eval`
CHECKPOINTS = "checkpoints"  # checkpoint-<step>/ folders (Accelerate's save_state)
LOGS = "logs"  # TensorBoard
SEEN = "seen"  # data.record_keys: rank-<r>.txt, the sample keys each rank trained on
LOCK = ".lock"  # {"pid", "host", "started"} of the training that writes the folder
# A run's random identity (hex), made when it first trains and kept by every resume of it: in each
# checkpoint's trainer_state.json, config.json's `extra` and its exports' metadata, so that an export
# tells which run it is of without a path (toolkit.export.check_default_outputs). Older runs have none.
RUN_ID = "run_id"
# What a training run (and `cvae-tk eval`) writes into its folder: overwrite=true removes these, nothing else.
RUN_FILES = (WEIGHTS, CONFIG, RECIPE, SAMPLES_GRID, METRICS, CHECKPOINTS, SAMPLES, LOGS, SEEN)

# --- an attribute classifier's folder (`cvae-tk classifier train`), the judge of evaluation ---------
CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_CONFIG = "classifier.json"

# --- shards (shards/NAME/<split>/), written by toolkit/data/shards.py ----------------------------
MANIFEST = "manifest.json"  # one per split, written last: a split is complete only once it exists
FIELDS = ("png", "jpg", "attr.npy")  # the tar members of a sample: <key>.png or <key>.jpg, <key>.attr.npy

# --- any output folder ---------------------------------------------------------------------------
# What a file manager, a notebook or an archive leaves in a folder someone looked at (Finder's
# .DS_Store and ._ files, Windows' Thumbs.db and desktop.ini, Jupyter's .ipynb_checkpoints, a Mac
# zip's __MACOSX): not the user's work, so a run or shard folder holding it is still the toolkit's
# (Finder writes .DS_Store again as soon as the folder is shown). Never deleted, but with a stale split
# folder a shard build removes (shards.prepare_output).
DEBRIS = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".ipynb_checkpoints", "__MACOSX"})


def is_debris(name: str) -> bool:
    return name in DEBRIS or name.startswith("._")  # ._name: macOS's AppleDouble copy of name's metadata


# --- model choices ---------------------------------------------------------------------------------
PRIORS = ("standard", "learned")  # N(0, I), the paper's | p(z | attributes), an MLP
# The hyper-parameters each arch takes, with their defaults (ModelConfig's are these). A model's
# spec always holds the complete set for its arch, so config.json rebuilds it exactly.
ARCH_OPTIONS: dict[str, dict[str, int]] = {
    "paper": {},
    "resnet": {"width": 64, "levels": 4, "embed_dim": 128},
}
ARCHS = tuple(ARCH_OPTIONS)


def check_choice(value: str, choices, key: str) -> None:
    """Refuse a value that is not one of `choices` (ARCHS, PRIORS), naming the recipe key."""
    if value not in choices:
        raise UserError(f"unknown {key} '{value}': expected {' | '.join(choices)}")


# --- attribute names (class folders, a table's columns): matched as the text they show -------------
def attribute_text(name: str) -> str:
    """An attribute name as the text it shows (NFC): 'é' typed as one code point or as 'e' + a combining
    accent (macOS keyboards and file names) is one name; every name a caller gives is matched so."""
    return unicodedata.normalize("NFC", name)


def attribute_index(names: Sequence[str]) -> dict[str, int]:
    """NFC name -> column, for `attribute_column`. A model holding two names of one NFC text (a table
    read before such columns were refused) keeps exact matching for those two."""
    texts = [attribute_text(name) for name in names]
    counts = Counter(texts)
    index = {text: i for i, text in enumerate(texts) if counts[text] == 1}
    index.update({name: i for i, name in enumerate(names) if counts[texts[i]] > 1})
    return index


def attribute_column(index: Mapping[str, int], name) -> int | None:
    """The column of `attribute_index(names)` that a name given by a caller selects, in either Unicode
    normalization (None: no attribute); report it as names[column], the model's own spelling."""
    if not isinstance(name, str):
        return None
    column = index.get(name)  # most names are given as spelled: normalize only those that miss
    return column if column is not None else index.get(attribute_text(name))


def attribute_columns(index: Mapping[str, int], mapping: Mapping, unknown, check) -> dict[int, object]:
    """{name as given: value} -> {column of `attribute_index`: value}, each name matched by
    `attribute_column` (`unknown(name)`: the error for one that selects none) and each value passed
    through `check(name, value)`; one attribute given twice (two spellings) with two values is a UserError."""
    columns: dict[int, object] = {}
    spelled: dict[int, str] = {}  # column -> the name as first given
    for name, value in mapping.items():
        column = attribute_column(index, name)
        if column is None:
            raise unknown(name)
        value = check(name, value)
        if columns.setdefault(column, value) != value:
            raise UserError(
                f"attribute '{name}' is given as {columns[column]!r} and as {value!r} (as '{spelled[column]}', the "
                "same name in another Unicode normalization): expected one value"
            )
        spelled.setdefault(column, name)
    return columns
