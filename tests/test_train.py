import json
import os
import re
import shutil
import subprocess
import sys
from itertools import islice

import pytest
import torch
from conftest import ROOT
from PIL import Image
from safetensors.torch import load_file

from toolkit.config import load_config
from toolkit.errors import UserError
from toolkit.model import CVAE, load_model, read_spec
from toolkit.train import TrainingStopped, find_checkpoint, heldout_metrics, train


def test_run_folder_holds_everything_export_needs(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"model.safetensors", "config.json", "recipe.yaml", "samples.png", "samples", "logs"} <= names
    config = json.loads((trained_run / "config.json").read_text())
    assert config["attributes"] == [f"digit_{i}" for i in range(10)]
    assert config["image_size"] == [32, 32] and config["arch"] == "paper" and config["latent_dim"] == 16
    assert config["extra"]["step"] == 60 and config["extra"]["recipe"] == "digits"
    assert "max_steps: 60" in (trained_run / "recipe.yaml").read_text()
    # the grid: one row per attribute, 8 samples per row, 32x32 cells with 2-pixel padding
    with Image.open(trained_run / "samples.png") as grid:
        assert grid.size == (8 * 34 + 2, 10 * 34 + 2)
    assert sorted(p.name for p in (trained_run / "samples").iterdir()) == [
        "reconstructions-000030.png",
        "reconstructions-000060.png",
        "step-000030.png",
        "step-000060.png",
    ]
    assert list((trained_run / "logs").rglob("events.out.tfevents*"))  # TensorBoard scalars


def test_short_training_lowers_the_test_loss(trained_run, digits_shards):
    trained = load_model(trained_run)
    torch.manual_seed(0)
    untrained = CVAE(read_spec(trained_run)).eval()
    before = heldout_metrics(untrained, str(digits_shards), torch.device("cpu"))
    after = heldout_metrics(trained, str(digits_shards), torch.device("cpu"))
    assert after["test/mse_per_image"] < 0.5 * before["test/mse_per_image"], (before, after)


def run(args, cwd):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_runs_as_a_script_and_under_accelerate_launch(digits_shards, tmp_path):
    common = [f"data.shards={digits_shards}", "max_steps=3", "batch_size=8", "log_every=1", "sample_every=2"]
    # from another folder: `python toolkit/train.py` must not let toolkit/ shadow libraries
    script = run([sys.executable, str(ROOT / "toolkit" / "train.py"), "recipe=digits", "run_dir=a", *common], tmp_path)
    assert script.returncode == 0, script.stderr[-3000:]
    launched = run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--cpu",
            "--num_processes",
            "1",
            "--mixed_precision",
            "no",
            str(ROOT / "toolkit" / "train.py"),
            "recipe=digits",
            "run_dir=b",
            *common,
        ],
        tmp_path,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    for run_dir in ("a", "b"):
        assert load_model(tmp_path / run_dir).spec.extra["step"] == 3
    assert (tmp_path / "a" / "samples" / "step-000002.png").is_file()


# --- checkpoints, resume, failures -----------------------------------------------------------


def quick(shards, run_dir, *extra):
    return load_config(
        [
            "recipe=digits",
            f"run_dir={run_dir}",
            f"data.shards={shards}",
            "batch_size=16",
            "log_every=2",
            "sample_every=1000",
            "data.num_workers=0",
            *extra,
        ]
    )


@pytest.mark.parametrize("sampling, accum", [("epochs", 1), ("resampled", 2)])
def test_resume_continues_exactly(digits_shards, tmp_path, sampling, accum):
    # (a cosine schedule depends on max_steps, so it would differ between a 4- and an 8-step run)
    common = [
        f"data.sampling={sampling}",
        f"grad_accum={accum}",
        "checkpoint_every=4",
        "warmup_steps=3",
        "grad_clip=1.0",
    ]
    straight = train(quick(digits_shards, tmp_path / "straight", "max_steps=8", *common))
    train(quick(digits_shards, tmp_path / "resumed", "max_steps=4", *common))
    resumed = train(quick(digits_shards, tmp_path / "resumed", "max_steps=8", "resume=latest", *common))
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_checkpoints_are_limited_and_only_complete_ones_are_resumed(digits_shards, tmp_path):
    run = train(
        quick(digits_shards, tmp_path / "run", "max_steps=6", "checkpoint_every=2", "checkpoints_total_limit=2")
    )
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    # what an interrupted save leaves: a .tmp folder, or a folder without its trainer_state.json
    (folder / "checkpoint-8.tmp").mkdir()
    (folder / "checkpoint-10").mkdir()
    assert find_checkpoint(run, "latest") == folder / "checkpoint-6"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        find_checkpoint(run, str(folder / "checkpoint-10"))


def test_a_run_keeps_its_identity_through_resumes_and_another_run_gets_its_own(digits_shards, tmp_path):
    # (what tells an export of this run from one of another run of the same folder name: toolkit.export)
    def identity(run_dir, step=None):
        state = run_dir / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json"
        return json.loads(state.read_text())["run_id"] if step else read_spec(run_dir).extra["run_id"]

    run = train(quick(digits_shards, tmp_path / "run", "max_steps=2", "checkpoint_every=2"))
    first = identity(run)
    assert re.fullmatch(r"[0-9a-f]{32}", first) and identity(run, 2) == first
    train(quick(digits_shards, run, "max_steps=4", "checkpoint_every=2", "resume=latest"))
    assert identity(run) == identity(run, 4) == first  # more training: the same run
    # resume=PATH of one of this folder's checkpoints (through `..`: compared resolved) is this run too
    checkpoint_4 = run / "checkpoints" / ".." / "checkpoints" / "checkpoint-4"
    train(quick(digits_shards, run, "max_steps=6", "checkpoint_every=2", f"resume={checkpoint_4}"))
    assert identity(run) == identity(run, 6) == first
    forked = train(
        quick(digits_shards, tmp_path / "fork", "max_steps=6", f"resume={run / 'checkpoints' / 'checkpoint-4'}")
    )
    assert identity(forked) not in (first, None)  # fine-tuned in another folder: another run
    train(quick(digits_shards, run, "max_steps=2", "checkpoint_every=2", "overwrite=true"))
    assert identity(run) not in (first, identity(forked))  # replaced: another run


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(digits_shards, tmp_path, monkeypatch):
    import toolkit.train as trainer

    real_loss, calls = trainer.cvae_loss, []

    def poisoned(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        calls.append(1)
        return terms._replace(total=terms.total * float("nan")) if len(calls) > 5 else terms

    monkeypatch.setattr(trainer, "cvae_loss", poisoned)
    with pytest.raises(TrainingStopped, match="not finite for 3 consecutive") as caught:
        train(quick(digits_shards, tmp_path / "run", "max_steps=20", "checkpoint_every=4", "max_bad_steps=3"))
    assert "checkpoint-4" in str(caught.value)
    assert find_checkpoint(tmp_path / "run", "latest").name == "checkpoint-4"
    assert not (tmp_path / "run" / "model.safetensors").exists()
    monkeypatch.setattr(trainer, "cvae_loss", real_loss)
    resumed = train(quick(digits_shards, tmp_path / "run", "max_steps=6", "checkpoint_every=4", "resume=latest"))
    assert json.loads((resumed / "config.json").read_text())["extra"]["step"] == 6


@pytest.mark.parametrize(
    "extra, words",
    [
        (["resume=/nowhere/checkpoint-3"], ["resume", "not a complete checkpoint"]),
        # a typo of latest, and a checkpoint named without its run: said to be missing, the forms offered
        (["resume=lastest"], ["(no such folder): expected latest, or the path of a checkpoint-<step> folder"]),
        (["resume=checkpoint-2"], ["(no such folder)", "such as", "checkpoints/checkpoint-<step>"]),
        (["batch_size=5000"], ["cannot fill one batch", "5000", "lower batch_size"]),
    ],
)
def test_bad_input_is_refused_before_any_step(digits_shards, tmp_path, extra, words):
    with pytest.raises(UserError) as caught:
        train(quick(digits_shards, tmp_path / "run", "max_steps=2", *extra))
    for word in words:
        assert word in str(caught.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resuming_with_other_shards_is_refused(digits_shards, tmp_path):
    from toolkit.data.digits import digit_samples
    from toolkit.data.shards import write_split

    train(quick(digits_shards, tmp_path / "run", "max_steps=2", "checkpoint_every=2"))
    other = tmp_path / "other"
    for split in ("train", "test"):  # the same images, 9 attribute names instead of 10
        samples = [s for s in digit_samples(split) if s.attributes[9] == 0]
        for s in samples:
            s.attributes = s.attributes[:9]
        write_split(samples, other, split, [f"digit_{i}" for i in range(9)], (32, 32), "digits minus nines")
    with pytest.raises(UserError, match="attributes"):
        train(quick(other, tmp_path / "run", "max_steps=4", "resume=latest"))


@pytest.fixture(scope="module")
def checkpointed(digits_shards, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("checkpointed") / "run"
    return train(quick(digits_shards, run_dir, "max_steps=4", "checkpoint_every=2"))


def _edit_state(folder, change):
    path = folder / "trainer_state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


EDITED_CHECKPOINTS = {  # checkpoint-2's trainer_state.json changed by hand -> what the one line says
    "step negative": (lambda s: s.update(step=-5), "records step -5, but the folder is named checkpoint-2"),
    "step text": (lambda s: s.update(step="2"), "records step '2'"),
    "step a float": (lambda s: s.update(step=2.0), "records step 2.0"),
    "step true": (lambda s: s.update(step=True), "records step True"),
    "step of another folder": (lambda s: s.update(step=4), "records step 4, but the folder is named checkpoint-2"),
    "model a string": (lambda s: s.update(model="x"), "its 'model' record is a str"),
    "data_order a list": (lambda s: s.update(data_order=[1]), "its 'data_order' record is a list"),
    "shards a string": (lambda s: s.update(shards="x"), "its 'shards' record is a str"),
    "a split a string": (lambda s: s["shards"].update(train="x"), "its record of the 'train' split is not one"),
    # an older checkpoint recorded no model: its weights of latent_dim 16 were loaded into one of 8 (a traceback)
    "no model record, other latent_dim": (lambda s: s.pop("model"), "its weights are of another model"),
}


@pytest.mark.parametrize("case", EDITED_CHECKPOINTS, ids=str)
def test_a_checkpoint_edited_by_hand_is_refused_before_any_step(checkpointed, digits_shards, tmp_path, case):
    # each was resumed at the wrong step (negative: a longer run; "2": int("2")), silently, or a traceback
    change, words = EDITED_CHECKPOINTS[case]
    checkpoint = tmp_path / "kept" / "checkpoint-2"
    shutil.copytree(checkpointed / "checkpoints" / "checkpoint-2", checkpoint)
    _edit_state(checkpoint, change)
    latent = ["model.latent_dim=8"] if "latent_dim" in case else []
    with pytest.raises(UserError, match=re.escape(words)) as caught:
        train(quick(digits_shards, tmp_path / "run", "max_steps=6", f"resume={checkpoint}", *latent))
    assert str(checkpoint) in str(caught.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "damage",
    [
        "optimizer.bin cut short",
        "trainer_state.json edited",
        # copied in part: the weights' loss was said as a missing pytorch_model.bin (a name no save writes),
        # the RNG states' was not said at all (Accelerate resumed without them: no longer exact)
        "model.safetensors missing",
        "random_states_0.pkl missing",
        "custom_checkpoint_0.pkl missing",
    ],
)
def test_resume_latest_of_a_damaged_checkpoint_names_the_previous_one_that_passes(
    checkpointed, digits_shards, tmp_path, damage
):
    run_dir = tmp_path / "run"
    shutil.copytree(checkpointed, run_dir)
    newest, previous = run_dir / "checkpoints" / "checkpoint-4", run_dir / "checkpoints" / "checkpoint-2"
    if damage.startswith("optimizer"):
        with open(newest / "optimizer.bin", "r+b") as stream:
            stream.truncate(1000)
    elif damage.endswith("missing"):
        (newest / damage.split()[0]).unlink()
    else:
        _edit_state(newest, lambda s: s.update(step="4"))
    with pytest.raises(UserError) as caught:
        train(quick(digits_shards, run_dir, "max_steps=6", "resume=latest"))
    assert str(newest) in str(caught.value)
    if damage.endswith("missing"):
        assert f"it lacks {damage.split()[0]}, which every save writes" in str(caught.value)
    assert f"the previous checkpoint {previous} passes these checks: continue from it with resume={previous}" in str(
        caught.value
    )
    with pytest.raises(UserError) as caught:  # a checkpoint named by the user: only its own fault is said
        train(quick(digits_shards, run_dir, "max_steps=6", f"resume={newest}"))
    assert "previous checkpoint" not in str(caught.value)
    resumed = train(quick(digits_shards, run_dir, "max_steps=6", f"resume={previous}"))  # the way out works
    assert load_model(resumed).spec.extra["step"] == 6
    assert find_checkpoint(run_dir, "latest").name == "checkpoint-6"


def test_a_resume_never_silently_does_another_thing(checkpointed, digits_shards, tmp_path, capfd):
    run_dir = tmp_path / "run"
    shutil.copytree(checkpointed, run_dir)
    weights = (run_dir / "model.safetensors").read_bytes()
    # a checkpoint beyond max_steps: the loop ran no step and the 4-step model was saved as the result
    with pytest.raises(UserError, match=r"checkpoint-4: it is at step 4, beyond max_steps=3; raise max_steps"):
        train(quick(digits_shards, run_dir, "max_steps=3", "resume=latest"))
    assert (run_dir / "model.safetensors").read_bytes() == weights
    # nothing to resume (a mistyped run_dir): it starts at step 0, and says so
    capfd.readouterr()
    train(quick(digits_shards, tmp_path / "new", "max_steps=1", "resume=latest"))
    assert f"resume=latest: no checkpoint in {tmp_path / 'new' / 'checkpoints'} yet, starting at step 0" in (
        capfd.readouterr().out
    )


@pytest.mark.parametrize(
    "extra, words",
    [
        (["max_steps=1000000000000000000000000000000"], "'max_steps': expected an integer below 2**63"),
        (["data.shuffle_buffer=9223372036854775808"], "'data.shuffle_buffer': expected an integer below 2**63"),
        (["model.latent_dim=4611686018427387904"], "beyond what a tensor can hold"),  # a traceback
        (["model.arch=resnet", "model.width=4611686018427387904"], "beyond what a tensor can hold"),
        (["model.arch=resnet", "model.levels=4611686018427387904"], "multiples of 2**4611686018427387904"),  # hung
    ],
)
def test_numbers_beyond_what_the_machine_takes_are_one_line_before_any_work(digits_shards, tmp_path, extra, words):
    with pytest.raises(UserError) as caught:
        train(quick(digits_shards, tmp_path / "run", *extra))
    assert words in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_two_gloo_processes_step_together_on_disjoint_samples(tmp_path):
    from toolkit.data.digits import ATTRIBUTES, digit_samples
    from toolkit.data.shards import write_split

    shards = tmp_path / "shards"
    for split in ("train", "test"):  # 1618 train samples in shards of 300: the last one is smaller
        write_split(digit_samples(split), shards, split, ATTRIBUTES, (32, 32), "digits", shard_size=300)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(ROOT / "toolkit" / "train.py"),
            "recipe=digits",
            f"run_dir={tmp_path / 'run'}",
            f"data.shards={shards}",
            "max_steps=30",
            "batch_size=16",
            "data.num_workers=1",
            "data.record_keys=true",
            "checkpoint_every=1000",
            "sample_every=1000",
            "log_every=10",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    seen = [(tmp_path / "run" / "seen" / f"rank-{r}.txt").read_text().split() for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 30 * 16  # the same number of steps on both ranks
    assert not set(seen[0]) & set(seen[1])  # an epoch deals disjoint shards to the ranks


def test_bf16_mixed_precision_trains_and_saves_fp32_weights(digits_shards, tmp_path):
    # its own process: Accelerate fixes the precision once per process
    done = run(
        [
            sys.executable,
            str(ROOT / "toolkit" / "train.py"),
            "recipe=digits",
            "run_dir=run",
            f"data.shards={digits_shards}",
            "max_steps=3",
            "batch_size=16",
            "mixed_precision=bf16",
            "model.arch=resnet",
            "model.width=8",
            "model.levels=2",
            "model.prior=learned",
            "checkpoint_every=3",
            "data.num_workers=0",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "precision bf16" in done.stdout
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert load_model(tmp_path / "run").spec.prior == "learned"


def test_too_few_shards_for_the_ranks_names_the_cause(digits_shards, tmp_path):
    from toolkit.train import BatchStream

    config = quick(digits_shards, tmp_path / "run", "max_steps=2")
    # the fixture's train split is 2 shards (1000 + 618 samples)
    with pytest.raises(UserError, match=r"2 train shard\(s\) for 3 rank\(s\).*data.sampling=resampled"):
        BatchStream(config, rank=0, world=3)
    config.data.sampling = "resampled"
    assert BatchStream(config, rank=2, world=3).length(0) == BatchStream.SEGMENT


@pytest.mark.parametrize("sampling", ["epochs", "resampled"])
def test_the_trainers_batches_land_on_its_device(digits_shards, tmp_path, monkeypatch, sampling):
    from toolkit import train as train_module

    config = quick(digits_shards, tmp_path / "run", "max_steps=1", f"data.sampling={sampling}")
    # the stream converts where it is told: "meta" stands for a GPU (uint8 crosses, float lands there)
    _, _, (images, attributes) = next(train_module.BatchStream(config, 0, 1, device="meta").batches(0))
    assert images.device.type == attributes.device.type == "meta" and images.dtype == torch.float32
    # and the trainer tells it its accelerator's device
    devices = []
    real = train_module.BatchStream
    monkeypatch.setattr(
        train_module, "BatchStream", lambda *args: devices.append(args[4]) or real(*args)
    )  # fmt: skip
    train(config)
    assert devices == [torch.device("cpu")]


@pytest.mark.parametrize("sampling", ["epochs", "resampled"])
def test_the_trainers_batches_from_any_index_are_an_uninterrupted_runs_across_segments(
    digits_shards, tmp_path, monkeypatch, sampling
):
    from toolkit.train import BatchStream

    # epochs: 2 train shards (1000 + 618), 2 workers, batch 16: epochs of 62 + 38 = 100 batches;
    # resampled: segments of 100 batches here (1,000 in a run). Either is read by one loader whose
    # workers live through every segment; a resumed run opens it at its index
    monkeypatch.setattr(BatchStream, "SEGMENT", 100)
    config = quick(
        digits_shards, tmp_path / "run", "data.num_workers=2", "data.record_keys=true", f"data.sampling={sampling}"
    )

    def keys(start: int, count: int) -> list[tuple[int, bool, list[str]]]:
        stream = BatchStream(config, 0, 1)
        return [(segment, last, batch[2]) for segment, last, batch in islice(stream.batches(start), count)]

    straight = keys(0, 210)
    assert [segment for segment, _, _ in straight] == [0] * 100 + [1] * 100 + [2] * 10
    assert [index for index, (_, last, _) in enumerate(straight) if last] == [99, 199]
    assert keys(95, 10) == straight[95:105] and keys(150, 60) == straight[150:]
    assert [k for _, _, k in straight[:100]] != [k for _, _, k in straight[100:200]]  # each segment its own order


def test_resuming_with_another_data_order_warns_once_and_goes_on(digits_shards, tmp_path, capfd):
    common = ["checkpoint_every=4"]
    train(quick(digits_shards, tmp_path / "run", "max_steps=4", *common))
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["data_order"] == {
        "seed": 0,
        "batch_size": 16,
        "grad_accum": 1,
        "processes": 1,
        "sampling": "epochs",
        "num_workers": 0,
    }
    capfd.readouterr()
    train(quick(digits_shards, tmp_path / "run", "max_steps=6", "resume=latest", *common))
    assert "warning: resuming" not in capfd.readouterr().err  # the same settings: silent
    run = train(
        quick(digits_shards, tmp_path / "run", "max_steps=8", "resume=latest", "batch_size=8", "seed=3", *common)
    )
    err = capfd.readouterr().err
    assert err.count("warning: resuming from") == 1
    assert "seed=3 (was 0), batch_size=8 (was 16)" in err and "will not match an uninterrupted run" in err
    assert load_model(run).spec.extra["step"] == 8


def test_the_hybrid_loss_trains_and_logs_the_prior_samples_error(digits_shards, tmp_path):
    from toolkit.figures import read_scalars

    def trained(name, *extra):
        config = load_config(
            [
                "recipe=digits",
                f"run_dir={tmp_path / name}",
                f"data.shards={digits_shards}",
                "max_steps=4",
                "batch_size=16",
                "log_every=2",
                "sample_every=100",
                "data.num_workers=0",
                *extra,
            ]
        )
        return train(config)

    paper, hybrid = trained("paper"), trained("hybrid", "gsnn_weight=0.5")
    assert (
        set(read_scalars(hybrid, ("train/mse_prior",))["train/mse_prior"])
        and not read_scalars(paper, ("train/mse_prior",))["train/mse_prior"]
    )
    with pytest.raises(UserError, match="gsnn_weight"):
        load_config(["recipe=digits", "gsnn_weight=1"])


# --- settings the machine cannot hold, or that would do nothing --------------------------------


@pytest.mark.parametrize(
    "extra, words",
    [
        (["model.latent_dim=1000000000"], ["need about", "TB", "decoder", "model.latent_dim"]),
        (["model.arch=resnet", "model.width=100000", "model.levels=2"], ["need about", "model.width"]),
        (["model.arch=resnet", "model.embed_dim=1000000000", "model.levels=2"], ["need about", "model.embed_dim"]),
    ],
)
def test_a_model_beyond_the_machines_memory_is_refused_before_anything_is_allocated(
    digits_shards, tmp_path, extra, words
):
    with pytest.raises(UserError) as caught:
        train(quick(digits_shards, tmp_path / "run", "max_steps=2", *extra))
    for word in words:
        assert word in str(caught.value)
    assert "available on cpu" in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_fp16_on_a_cpu_is_refused_and_said_when_it_comes_from_accelerate(digits_shards, tmp_path):
    # Accelerate runs fp32 on a CPU when asked for fp16 (it has no fp16 autocast there): the setting would do
    # nothing. Its precision is fixed once per process, hence a process per case.
    common = ["recipe=digits", f"data.shards={digits_shards}", "max_steps=1", "batch_size=8", "data.num_workers=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    refused = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "train", *common, "run_dir=a", "mixed_precision=fp16"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: mixed_precision=fp16 does nothing on cpu: Accelerate runs fp32 there (fp16 needs a GPU); "
        "use mixed_precision=no, or bf16, which the CPU runs"
    )
    assert not (tmp_path / "a").exists()
    # `accelerate launch --mixed_precision fp16` with the recipe's auto: said once, and training goes on
    launched = subprocess.run(
        [sys.executable, "-m", "toolkit.cli", "train", *common, "run_dir=b"],
        cwd=tmp_path,
        env={**env, "ACCELERATE_MIXED_PRECISION": "fp16"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stderr.count("warning: fp16 (from accelerate launch or its config) does nothing on cpu") == 1
    assert "precision no," in launched.stdout, launched.stdout  # the banner said fp16 right after the warning


def test_a_test_split_of_another_size_or_attributes_is_refused_before_step_one(digits_shards, tmp_path):
    from toolkit.data.digits import ATTRIBUTES, digit_samples
    from toolkit.data.shards import write_split

    for name, size, attributes in (("size", 16, ATTRIBUTES), ("names", 32, [f"class_{i}" for i in range(10)])):
        shards = tmp_path / name
        shutil.copytree(digits_shards / "train", shards / "train")
        write_split(digit_samples("test", size), shards, "test", attributes, (size, size), "digits")
        with pytest.raises(
            UserError, match="the test split's (image size \\(16x16\\)|attributes).* differ from the train split's"
        ):
            train(quick(shards, tmp_path / f"run-{name}", "max_steps=1"))
        assert not (tmp_path / f"run-{name}").exists()


def test_more_loader_workers_than_shards_is_refused(digits_shards, tmp_path):
    # the fixture's train split has 2 shards: a third worker would start, read nothing and hold memory
    with pytest.raises(
        UserError, match="data.num_workers=3, but .* has 2 train shard\\(s\\) for 1 rank\\(s\\): at most 2"
    ):
        train(quick(digits_shards, tmp_path / "run", "max_steps=1", "data.num_workers=3"))


@pytest.mark.parametrize("sampling", ["epochs", "resampled"])
def test_each_manifest_is_read_once_before_step_one(digits_shards, tmp_path, monkeypatch, sampling):
    # Set-up (split checks, fingerprint, batch stream, first segment, grids) shares one read of each
    # split's manifest: a `pipe:` or http URL costs a command or a request per read.
    import toolkit.data.stream as stream
    import toolkit.train as train_module

    reads, steps = [], []
    real_check, real_step = stream.check_manifest, train_module.Trainer.step

    def counting(manifest, location, split, *args, **kwargs):
        reads.append((split, len(steps)))
        return real_check(manifest, location, split, *args, **kwargs)

    def stepping(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(stream, "check_manifest", counting)
    monkeypatch.setattr(train_module.Trainer, "step", stepping)
    train(quick(digits_shards, tmp_path / "run", "max_steps=2", f"data.sampling={sampling}"))
    assert steps
    assert sorted(split for split, before in reads if before == 0) == ["test", "train"]


@pytest.mark.parametrize("sampling", ["epochs", "resampled"])
def test_the_loader_workers_live_through_the_loop_and_stop_before_the_final_steps(
    digits_shards, tmp_path, monkeypatch, sampling
):
    import multiprocessing

    from toolkit import train as train_module

    during, after = [], []
    real_step, real_finish = train_module.Trainer.step, train_module.Trainer.finish

    def stepping(self, *args, **kwargs):
        during.append(len(multiprocessing.active_children()))
        return real_step(self, *args, **kwargs)

    def finishing(self):  # final metrics, weights, grid: a worker killed now would stop them unguarded
        after.append(len(multiprocessing.active_children()))
        return real_finish(self)

    monkeypatch.setattr(train_module.Trainer, "step", stepping)
    monkeypatch.setattr(train_module.Trainer, "finish", finishing)
    train(quick(digits_shards, tmp_path / "run", "max_steps=3", "data.num_workers=2", f"data.sampling={sampling}"))
    assert during == [2, 2, 2] and after == [0]


def test_the_batch_order_is_the_released_one(digits_shards):
    # What a checkpoint resumed by a newer cvae-tk reads must be what its run would have read: the
    # first keys of each sampling with 2 workers, as the release before the persistent workers read
    # them (the demo's weights pin the order with no workers)
    from toolkit.data.stream import EpochStream, ResampledStream

    def keys(batches) -> list[str]:
        return [key for _, _, batch_keys in islice(batches, 2) for key in batch_keys]

    resampled = ResampledStream(digits_shards, 3, num_workers=2, with_keys=True)
    assert keys(resampled.batches(7)) == [
        "digits_001132", "digits_001212", "digits_001225", "digits_000024", "digits_000098", "digits_000031",
    ]  # fmt: skip
    epochs = EpochStream(digits_shards, "train", 3, seed=3, num_workers=2, with_keys=True)
    assert keys(epochs.epoch(1)) == [
        "digits_000081", "digits_000038", "digits_000026", "digits_001152", "digits_001222", "digits_001154",
    ]  # fmt: skip


def test_derived_seeds_are_the_released_formulas():
    # Resuming a checkpoint reads the batches an uninterrupted run would have read only while these
    # stay as runs have always computed them (the demo's weights pin them too).
    from toolkit.data.stream import derive_seed, worker_part

    assert derive_seed(3, 5) == 3 * 1_000_003 + 5
    assert derive_seed(3, 5, radix=7919) == 3 * 7919 + 5
    assert derive_seed(2, worker_part(1, 4)) == 2 * 1_000_003 + 1 * 1_009 + 4
    seeds = {
        derive_seed(seed, worker_part(rank, worker)) for seed in range(3) for rank in range(8) for worker in range(16)
    }
    assert len(seeds) == 3 * 8 * 16


def test_a_single_process_runs_own_timeout_is_not_called_another_process_stopping(
    digits_shards, tmp_path, monkeypatch
):
    """`peer_lost` reads words a RuntimeError of this process can hold too ('Timed out', 'Broken pipe'):
    with no other process, such an error is not said to be another process's, it keeps its traceback."""
    from toolkit import train as train_module

    def timing_out(self, *args, **kwargs):
        raise RuntimeError("Timed out waiting for the camera")  # words peer_lost looks for

    monkeypatch.setattr(train_module.Trainer, "step", timing_out)
    with pytest.raises(RuntimeError, match="Timed out waiting for the camera"):
        train(quick(digits_shards, tmp_path / "run", "max_steps=2"))
