"""Bad configuration, bad data and bad checkpoints: each is refused before any compute with one
line naming the problem and exit code 2, and nothing is written; odd but valid images work.

The runs go through `benchmark.cli.main` in this process (the code `bench` runs, without paying
for a fresh interpreter per case); tests/test_cli.py covers the same path through a subprocess.
"""

import builtins
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_crash_safety import FAST

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.core import checkpoint as ckpt
from benchmark.core.data import ImageFolder, check_label_png
from benchmark.core.errors import DataError
from benchmark.core.transforms import crop_transform, eval_transform
from benchmark.records import non_finite_metrics
from methods import build_method

MODEL = [o for o in FAST if not o.startswith(("data.num_", "pretrain.checkpoint_every"))]


@pytest.fixture
def here(tmp_path, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    return tmp_path


def refused(capsys, here, args, message):
    code = main(["run", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (here / "results").exists() and not (here / "run").exists(), "nothing may be written"


# --- configuration ------------------------------------------------------------------------------
CONFIG = {
    "negative lr": (["pretrain.lr=-0.1"], "pretrain.lr must be > 0, got -0.1"),
    "negative epochs": (["pretrain.epochs=-1"], "pretrain.epochs must be >= 0"),
    "number as text": (["pretrain.clip_grad=abc"], "pretrain.clip_grad must be a number, got 'abc'"),
    "float batch": (["pretrain.batch_size=8.5"], "pretrain.batch_size must be an integer"),
    "batch above the data": (
        ["pretrain.batch_size=64"],
        "pretrain.batch_size=64 is larger than the training set (32 images)",
    ),
    "context scale reversed": (["method.mask.context_scale=[0.9,0.5]"], "method.mask.context_scale must satisfy"),
    "no target blocks": (["method.mask.num_targets=0"], "method.mask.num_targets must be > 0"),
    "predictor width 0": (["method.predictor.width=0"], "method.predictor.width must be > 0"),
    "unknown model preset": (["model=vit_giant"], "unknown model 'vit_giant'"),
    "unknown schedule preset": (["pretrain=fast"], "unknown pretrain 'fast'"),
    "unknown launcher": (["launcher=k8s"], "unknown launcher 'k8s'"),
    "added key": (["+pretrain.foo=1"], "adds or deletes a key"),
    "typo in nested key": (["tasks.linear.epoch=2"], "unknown config key 'tasks.linear.epoch'"),
    "size not a patch multiple": (["data.image_size=30"], "data.image_size=30 is not a multiple of model.patch_size=4"),
    "heads do not divide width": (["model.num_heads=5"], "model.embed_dim=48 is not divisible by model.num_heads=5"),
    "unknown encoder key": (["checkpoint_key=decoder"], "checkpoint_key must be target_encoder, encoder or null"),
    "unknown device": (["device=tpu"], "device must be auto, cpu or cuda[:N], got 'tpu'"),
    "task epochs 0": (["tasks.linear.epochs=0"], "tasks.linear.epochs must be > 0"),
    "negative seed": (["seed=-1"], "seed must be >= 0"),
    "unknown label set": (["data.label=texture"], "data.label must be one of"),
    "resume of nothing": (["run_dir=run", "resume=true"], "resume=true but the run folder does not exist"),
    "beta above 1": (["pretrain.betas=[2,0.9]"], "pretrain.betas must be two numbers in [0, 1), got [2, 0.9]"),
    "negative eps": (["pretrain.eps=-1"], "pretrain.eps must be > 0, got -1"),
    "negative image count": (["data.num_train=-5"], "data.num_train must be > 0, got -5"),
    "crop scale reversed": (
        ["method=iwm", "method.views.crop_scale=[0.9,0.2]"],
        "view crop_scale must satisfy 0 < min <= max <= 1",
    ),
    "solarize threshold": (
        ["method=iwm", "method.views.solarize_threshold=3"],
        "view solarize_threshold must be in [0, 1], got 3",
    ),
    "ema above 1": (["method.ema=[1.5,1.0]"], "method.ema must be [start, end] with 0 <= start <= end <= 1"),
    "unknown loss": (["method.loss=l3"], "method.loss must be smooth_l1, l2, l1, got 'l3'"),
    "attention kernel": (["attention=flash"], "attention must be auto, fused, math, got 'flash'"),
    "flag not a boolean": (["pretrain.bf16=maybe"], "pretrain.bf16 must be true or false, got 'maybe'"),
    "data flag not a boolean": (["data.check_headers=perhaps"], "data.check_headers must be true or false"),
    "negative data seed": (["data.seed=-3"], "data.seed must be >= 0, got -3"),
    "predictor heads": (
        ["method.predictor.num_heads=5"],
        "method.predictor.width=24 is not divisible by method.predictor.num_heads=5",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG))
def test_bad_configuration(capsys, here, case):
    args, message = CONFIG[case]
    refused(capsys, here, [*FAST, *args], message)


# DINO validates its own section (DINO.check_config); FAST without the JEPA predictor keys (and
# the linear probe's, so that another task can be named).
DINO_FAST = ["method=dino", *(o for o in FAST if not o.startswith(("method.", "tasks.")))]
DINO_CONFIG = {
    "local crop not a patch multiple": (
        ["method.local_crops.size=10"],
        "method.local_crops.size=10 is not a multiple of model.patch_size=4",
    ),
    "norm_last_layer not a boolean": (["method.head.norm_last_layer=2"], "method.head.norm_last_layer must be true"),
    "no prototypes": (["method.head.out_dim=0"], "method.head.out_dim must be >= 1, got 0"),
    "teacher temperature 0": (["method.teacher_temp=0"], "method.teacher_temp must be > 0, got 0"),
    "momentum above 1": (["method.momentum_teacher=1.5"], "method.momentum_teacher must be in [0, 1], got 1.5"),
    "global scale reversed": (["method.global_crops.scale=[0.9,0.4]"], "method.global_crops.scale must be [low, high]"),
    "predictor key on dino": (["method.predictor.depth=1"], "unknown config key 'method.predictor.depth'"),
    "predictor task named": (
        ["task=predictor_ft"],
        "task predictor_ft does not apply: method dino: it has no predictor",
    ),
    "mrr named": (["task=mrr"], "task mrr does not apply: method dino: it has no predictor and no masks"),
}


@pytest.mark.parametrize("case", list(DINO_CONFIG))
def test_bad_dino_configuration(capsys, here, case):
    args, message = DINO_CONFIG[case]
    refused(capsys, here, [*DINO_FAST, *args], message)


# --- data folders -----------------------------------------------------------------------------
def image(path, mode="RGB", size=(40, 36), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


def folder(root, per_class=4):
    """A valid ImageFolder dataset: two classes, train and val."""
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            for i in range(per_class):
                image(root / split / name / f"{i}.png", seed=100 * c + i)
    return root


def _empty(root):
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()


def _no_images(root):
    folder(root)
    for p in (root / "val").rglob("*.png"):
        p.rename(p.with_suffix(".txt"))


def _plus(rel, write):
    """A valid dataset plus one bad file at `rel`."""

    def make(root):
        folder(root)
        write(root / rel)

    return make


def _cut_to_20_bytes(path):
    image(path)
    path.write_bytes(path.read_bytes()[:20])


DATA = {
    "missing folder": (lambda root: None, "data folder not found: {root}/train"),
    "no class subfolders": (_empty, "data folder has no class subfolders: {root}/train"),
    "no images": (_no_images, "data folder holds no images"),
    "text file named .jpg": (
        _plus("val/dog/x.jpg", lambda p: p.write_text("hello")),
        "unreadable image {root}/val/dog/x.jpg: UnidentifiedImageError",
    ),
    "empty file": (_plus("train/dog/e.png", lambda p: p.write_bytes(b"")), "unreadable image {root}/train/dog/e.png"),
    "truncated header": (
        _plus("train/cat/t.png", _cut_to_20_bytes),
        "unreadable image {root}/train/cat/t.png: OSError",
    ),
    "LAB TIFF": (
        _plus("train/cat/lab.tif", lambda p: image(p, "LAB")),
        "unreadable image {root}/train/cat/lab.tif: unsupported image mode 'LAB'",
    ),
    "missing labels file": (folder, "labels file not found: {root}/labels.csv"),
}


@pytest.mark.parametrize("case", list(DATA))
def test_bad_data_folder(capsys, here, case):
    make, message = DATA[case]
    root = here / "data"
    make(root)
    extra = ["data.labels_csv=labels.csv", "data.label_column=kind"] if case == "missing labels file" else []
    refused(capsys, here, [*MODEL, "data=folder", f"data.root={root}", *extra], message.format(root=root))


def test_odd_images_are_converted_to_rgb_and_small_ones_upsampled(tmp_path):
    root = tmp_path / "odd"
    image(root / "a" / "gray.png", "L")
    image(root / "a" / "gray_alpha.png", "LA")
    image(root / "a" / "palette.png", "P")
    image(root / "a" / "bilevel.png", "1")
    image(root / "a" / "cmyk.jpg", "CMYK")
    image(root / "a" / "alpha.png", "RGBA")
    image(root / "a" / "tiny.png", size=(3, 2))  # smaller than any crop
    deep = np.full((12, 10), 65535, dtype=np.uint16)
    deep[:, :5] = 0
    Image.fromarray(deep).save(root / "a" / "deep16.png")
    Image.fromarray(np.linspace(-3, 5, 120, dtype=np.float32).reshape(12, 10)).save(root / "a" / "float.tif")
    ds = ImageFolder(root)
    assert len(ds) == 9 and ds.skipped == []
    names = [p.name for p, _ in ds.samples]
    crop, center = crop_transform(32, (0.3, 1.0)), eval_transform(32)
    for i in range(len(ds)):
        img, _ = ds[i]
        assert img.mode == "RGB", names[i]
        for view in (crop(img), center(img)):
            assert view.shape == (3, 32, 32) and torch.isfinite(view).all(), names[i]
    deep_rgb = np.asarray(ds[names.index("deep16.png")][0])
    assert deep_rgb[0, 0].tolist() == [0, 0, 0] and deep_rgb[0, -1].tolist() == [255, 255, 255]  # rescaled, not clipped
    cmyk = np.asarray(ds[names.index("cmyk.jpg")][0])
    assert cmyk.shape == (36, 40, 3)


def _truncate_body(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])  # header intact, pixels cut off


def test_a_file_that_fails_to_decode_is_named_or_skipped_and_logged(tmp_path):
    root = folder(tmp_path / "d")
    _truncate_body(root / "train" / "dog" / "1.png")
    strict = ImageFolder(root / "train")  # the header is fine: found when decoded
    index = [p.name for p, _ in strict.samples].index("1.png", 4)
    with pytest.raises(
        DataError, match=f"cannot decode image {root}/train/dog/1.png: OSError: image file is truncated"
    ):
        strict[index]
    lenient = ImageFolder(root / "train", skip_unreadable=True)
    lenient.log_skipped(tmp_path / "unreadable.txt")
    img, label = lenient[index]
    assert label == lenient.samples[index + 1][1] and img.size == (40, 36)  # the next file stands in
    assert (tmp_path / "unreadable.txt").read_text() == f"{root}/train/dog/1.png\n"


def test_skip_unreadable_run_counts_the_skipped_files(capsys, here):
    root = folder(here / "data")
    (root / "train" / "cat" / "junk.jpg").write_text("not an image")
    _truncate_body(root / "train" / "dog" / "2.png")
    args = [*MODEL, "data=folder", f"data.root={root}", "pretrain.epochs=1", "run_dir=run"]
    refused(capsys, here, args, f"unreadable image {root}/train/cat/junk.jpg")
    assert main(["run", *args, "data.skip_unreadable=true"]) == 0, capsys.readouterr().err
    record = json.loads((here / "run" / "records" / "pretrain.json").read_text())
    assert record["status"] == "ok" and record["metrics"]["steps"] == 1
    assert record["metrics"]["unreadable_skipped"] == 2
    logged = set((here / "run" / "unreadable.txt").read_text().split())
    assert logged == {f"{root}/train/cat/junk.jpg", f"{root}/train/dog/2.png"}


def test_segmentation_label_values_are_checked_against_the_classes(tmp_path):
    def label(name, values, mode="L"):
        path = tmp_path / name
        Image.fromarray(np.array(values, dtype=np.uint8)).convert(mode).save(path)
        return path

    good = label("good.png", [[0, 1], [150, 7]])
    assert check_label_png(good, 150, size=(2, 2)).tolist() == [[0, 1], [150, 7]]
    with pytest.raises(DataError, match=r"label .*high.png holds values 151, 200 outside 1..150"):
        check_label_png(label("high.png", [[0, 151], [200, 3]]), 150)
    assert check_label_png(label("ignore.png", [[255, 1], [2, 3]]), 150, ignore_values=(0, 255)).max() == 255
    with pytest.raises(DataError, match="outside 1..150"):
        check_label_png(tmp_path / "ignore.png", 150)
    with pytest.raises(DataError, match="has mode RGB: a label must be one channel"):
        check_label_png(label("rgb.png", [[1, 2], [3, 4]], "RGB"), 150)
    with pytest.raises(DataError, match="is 2x2 but its image is 4x4"):
        check_label_png(good, 150, size=(4, 4))
    (tmp_path / "junk.png").write_text("no")
    with pytest.raises(DataError, match="unreadable label .*junk.png"):
        check_label_png(tmp_path / "junk.png", 150)


# --- checkpoints --------------------------------------------------------------------------------
def bench_checkpoint(path, extra=()):
    """A checkpoint in the layout `bench run` writes, of an untrained method."""
    cfg = OmegaConf.to_container(load_config([*FAST, *extra]), resolve=True)
    method = build_method(cfg["method"]["name"], cfg["model"], cfg["method"], cfg["data"]["image_size"])
    ckpt.save(path, {"method": method.checkpoint_state(), "step": 0})
    return path


class Exploit:
    """Unpickling this runs code: the attack a weights-only load must stop."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _truncated(path):
    bench_checkpoint(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bit_flip(path):
    bench_checkpoint(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside the tensor data: torch.load alone would not notice
    path.write_bytes(bytes(data))


def _nan(path):
    bench_checkpoint(path)
    state = torch.load(path, weights_only=True)
    state["method"]["weights"]["encoder.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(state, path)


CHECKPOINTS = {
    "truncated": (_truncated, "is truncated: its zip directory"),
    "one flipped bit": (_bit_flip, "is corrupt"),
    "NaN weight": (_nan, "holds NaN or inf in 1 tensors: encoder.blocks.0.attn.qkv.weight"),
    "unknown layout": (lambda p: torch.save({"net": {"w": torch.zeros(2)}}, p), "unknown checkpoint layout"),
    "another method": (lambda p: bench_checkpoint(p, ["method=iwm"]), "holds method 'iwm' but method=ijepa"),
    "another architecture": (
        lambda p: bench_checkpoint(p, ["model.depth=2"]),
        "does not match model=vit_micro: depth=2",
    ),
    "not a file": (lambda p: p.mkdir(), "is a folder, not a file"),
}


@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_bad_checkpoint(capsys, here, case):
    make, message = CHECKPOINTS[case]
    path = here / "in.pt"
    make(path)
    refused(capsys, here, [*FAST, f"checkpoint={path}", "checkpoint_key=encoder"], message)


def test_a_crafted_pickle_is_refused_without_running_its_code(capsys, here):
    marker = here / "pwned"
    path = here / "evil.pt"
    torch.save({"method": Exploit(marker)}, path)
    torch.load(path, weights_only=False)  # the file is a real exploit: a plain load runs it
    assert marker.read_text() == "code ran"
    marker.unlink()
    message = f"cannot read checkpoint {path}: it holds objects that run code when loaded (builtins.exec)"
    refused(capsys, here, [*FAST, f"checkpoint={path}"], message)
    # The same payload in a bare pickle (no zip, no torch.save): named, and torch's advice to
    # load it with weights_only=False is not passed on.
    import pickle

    bare = here / "bare.pt"
    bare.write_bytes(pickle.dumps({"method": Exploit(marker)}))
    refused(capsys, here, [*FAST, f"checkpoint={bare}"], f"cannot read checkpoint {bare}: it holds objects that run")
    assert not marker.exists()
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(path)
    assert not marker.exists()


def test_non_finite_metrics_are_found_at_any_depth():
    metrics = {"top1": 91.0, "loss": float("nan"), "grid": [{"lr": 0.1, "val": float("inf")}], "n": 3, "name": "x"}
    assert non_finite_metrics(metrics) == ["loss", "grid.0.val"]
    assert non_finite_metrics({"top1": 50.0, "grid": [{"lr": 0.1}]}) == []


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("workers", [1, 0])
def test_a_data_error_in_a_loader_worker_exits_at_once_with_one_line(tmp_path, workers):
    """A truncated image whose header is fine, met by a loader worker: exit 1 in seconds, one clean
    line (no worker traceback) on stderr and in the record, and no process left behind."""
    import subprocess
    import sys

    root = folder(tmp_path / "data", per_class=8)
    _truncate_body(root / "train" / "dog" / "2.png")
    run_dir = tmp_path / f"run-{workers}-{os.getpid()}"
    args = [*MODEL, "data=folder", f"data.root={root}", "pretrain.epochs=1", f"workers={workers}", f"run_dir={run_dir}"]
    env = dict(os.environ, BENCH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark.cli", "run", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 1, proc.stderr
    message = f"cannot decode image {root}/train/dog/2.png: OSError: image file is truncated"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    record = json.loads((run_dir / "records" / "pretrain.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith(f"DataError: {message}")
    assert "Traceback" not in record["error"]
    assert _processes_mentioning(str(run_dir)) == []


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda root: shutil.rmtree(root / "val" / "cat"), "classes present only in the train split, not in"),
        (lambda root: image(root / "val" / "bird" / "0.png"), "classes present only in"),
    ],
)
def test_train_and_val_class_sets_must_agree(capsys, here, change, message):
    root = folder(here / "data")
    change(root)
    refused(capsys, here, [*MODEL, "data=folder", f"data.root={root}", "run_dir=run"], message)


def test_val_labels_follow_the_train_classes(tmp_path):
    # With a labels file a val split may lack a class; its labels keep the train split's indices.
    root = folder(tmp_path / "data")
    val = ImageFolder(root / "val", classes=["ant", "cat", "dog"], check_headers=False)
    assert val.classes == ["ant", "cat", "dog"] and {label for _, label in val.samples} == {1, 2}
    assert ImageFolder(root / "val", check_headers=False).classes == ["cat", "dog"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("tasks.linear.heldout_fraction=1.5", "tasks.linear.heldout_fraction must be in (0, 1), got 1.5"),
        ("tasks.linear.heldout_fraction=0", "tasks.linear.heldout_fraction must be in (0, 1), got 0"),
        ("tasks.linear.lrs=[]", "tasks.linear.lrs must be a non-empty list of numbers"),
        ("tasks.linear.standardize=maybe", "tasks.linear.standardize must be true or false"),
    ],
)
def test_task_settings_are_checked_before_compute(capsys, here, override, message):
    refused(capsys, here, [*MODEL, "task=linear", override, "run_dir=run"], message)


def test_every_task_declares_and_checks_all_its_settings():
    # The presets load, and a wrong type in any declared setting of any task is refused by name.
    from tasks import TASKS, build_task

    cfg = OmegaConf.to_container(load_config(["task=all"]), resolve=True)
    for name, task_cfg in cfg["tasks"].items():
        task = build_task(name, task_cfg)
        assert task.settings, name
        for key in task.settings:
            with pytest.raises(ValueError, match=f"tasks.{name}.{key} "):
                build_task(name, dict(task_cfg, **{key: "wrong"}))
    assert set(cfg["tasks"]) == set(TASKS)


def test_folders_that_cannot_be_used_are_refused_before_compute(capsys, here, monkeypatch):
    blocker = here / "a-file"
    blocker.write_text("not a folder")
    refused(capsys, here, [*FAST, f"results_dir={blocker}"], f"{blocker} is a file, not a folder")
    refused(capsys, here, [*FAST, f"run_dir={blocker}/run"], f"run folder {blocker}/run cannot be created")
    monkeypatch.setenv("BENCH_CACHE", str(blocker / "cache"))
    refused(capsys, here, [*FAST, "run_dir=run"], "data cache (cache_dir, or $BENCH_CACHE)")
    assert blocker.read_text() == "not a folder"


def test_generated_data_follows_the_umask(tmp_path):
    from benchmark.core import synthetic

    old = os.umask(0o002)
    try:
        root = synthetic.generate(tmp_path / "shared", 4, 2, 32, seed=0)
    finally:
        os.umask(old)
    assert root.stat().st_mode & 0o777 == 0o775


def test_a_write_past_the_file_size_limit_says_so(tmp_path):
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from benchmark.core.checkpoint import save\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))\n"
        f"save({str(tmp_path / 'big.pt')!r}, {{'w': torch.zeros(200_000)}})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"OSError: cannot write {tmp_path / 'big.pt'}: the file size limit was reached" in proc.stderr
    assert not list(tmp_path.iterdir())  # no temporary file left


def test_messages_that_say_what_to_do(capsys, here):
    root = folder(here / "data")
    (root / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # a macOS resource fork
    assert all(not p.name.startswith(".") for p, _ in ImageFolder(root / "train").samples)
    refused(capsys, here, [*MODEL, "checkpoint=data"], f"checkpoint {here / 'data'} is a folder, not a file")
    refused(capsys, here, [*MODEL, "data.root=/a b/ü"], "needs quotes: key='my value'")


def test_a_damaged_builtin_cache_says_how_to_regenerate_it(tmp_path):
    from benchmark.core.data import resolve_data

    cfg = load_config([*MODEL, "data.num_train=8", "data.num_val=4"])
    source = resolve_data(cfg.data, tmp_path / "cache")
    first = next((source.root / "train").rglob("*.png"))
    first.write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"the built-in data cache is damaged: delete {source.root} and run again"):
        source.split("train")


def test_a_loader_worker_that_cannot_send_its_batch_fails_the_run_instead_of_hanging(tmp_path):
    """A worker's batch goes to the training process through a shared-memory file; past the file
    size limit Python's queue would drop it and the training process would wait forever."""
    import subprocess
    import sys

    code = (
        "import resource, signal, torch\n"
        "from benchmark.core.loading import make_loader\n"
        "from benchmark.core.errors import DataError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))\n"
        "data = [torch.zeros(50_000) for _ in range(4)]\n"  # 200 KB per item: past the limit
        "try:\n"
        "    next(iter(make_loader(data, [[0], [1]], lambda items: items[0], workers=1)))\n"
        "except DataError as exc:\n"
        "    print('DataError:', exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "DataError: a data loader worker could not hand its batch to the training process" in proc.stdout
    assert "(the file size limit, ulimit -f)" in proc.stdout and "workers=0" in proc.stdout


# --- folders seen by another user ---------------------------------------------------------------
# Root writes through mode bits, so read-only folders are tried as an unprivileged user: when the
# tests run as root, a forked child drops to `nobody` and runs `bench` in-process there (the
# interpreter may live where that user cannot reach, but everything is already imported).
NOBODY = 65534


def _as_another_user(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Exit code and stderr of `bench run ARGS`, run by a user who owns none of the test's folders."""
    import contextlib
    import io

    if os.geteuid() != 0:  # already unprivileged: mode bits apply
        pid = None
    else:
        read, write = os.pipe()
        pid = os.fork()
    if pid:  # parent: wait for the child's verdict
        os.close(write)
        with os.fdopen(read) as pipe:
            result = json.loads(pipe.read() or '{"code": -1, "err": "child died"}')
        os.waitpid(pid, 0)
        return result["code"], result["err"]
    code, err = -1, ""
    try:
        if pid == 0:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        old_cwd, old_env = os.getcwd(), dict(os.environ)
        os.chdir(cwd)
        os.environ.update(env)
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stderr(buffer):
                code = main(["run", *args])
        finally:
            err = buffer.getvalue()
            if pid is None:
                os.chdir(old_cwd)
                os.environ.clear()
                os.environ.update(old_env)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
        err += f"{type(e).__name__}: {e}"
    if pid is None:
        return code, err
    with os.fdopen(write, "w") as pipe:
        pipe.write(json.dumps(dict(code=code, err=err)))
    os._exit(0)


@pytest.fixture
def shared_tmp():
    """A folder every user can enter (pytest's own are private to their owner), removed after."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _public(path: Path) -> Path:
    """A folder the other user can write."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    return path


def test_read_only_folders_are_refused_before_compute_for_a_user_who_cannot_write_them(shared_tmp):
    work = _public(shared_tmp / "work")
    locked = shared_tmp / "locked"  # this process's, 755: read-only for the other user
    locked.mkdir()
    own_cache = {"BENCH_CACHE": str(_public(shared_tmp / "cache"))}
    cases = [
        ([f"results_dir={locked}/results"], own_cache, f"{locked} is read-only for this user", "run folder"),
        ([f"run_dir={locked}/run"], own_cache, f"{locked} is read-only for this user", "run folder"),
        ([f"results_dir={work}/results"], {"BENCH_CACHE": str(locked / "cache")}, "is read-only", "data cache"),
        ([f"results_dir={work}/results"], {"BENCH_CACHE": str(locked)}, "is read-only", "data cache"),
    ]
    for args, env, message, what in cases:
        code, err = _as_another_user([*FAST, *args], work, env)
        assert code == 2, err
        assert message in err and what in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not any(locked.iterdir()) and not any(work.iterdir()), "nothing may be left behind"


def test_a_data_cache_written_by_another_user_is_read_by_the_next(shared_tmp):
    """One user generates the built-in data in a shared cache (under the usual umask 022); a
    second user, who can read it but not write it, runs on it without regenerating anything."""
    cache = shared_tmp / "cache"
    first = _public(shared_tmp / "first")
    assert main(["run", *FAST, f"results_dir={first}", f"cache_dir={cache}"]) == 0
    (dataset,) = cache.iterdir()
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    second = _public(shared_tmp / "second")
    code, err = _as_another_user(
        [*FAST, "threads=1", f"results_dir={second}", f"cache_dir={cache}"], second, {"BENCH_CACHE": str(cache)}
    )
    assert code == 0, err
    (record,) = second.rglob("records/linear.json")
    assert json.loads(record.read_text())["status"] == "ok"
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before, "the cache must be read, not rewritten"


def test_data_this_user_cannot_read_is_refused_before_compute(shared_tmp):
    cache = shared_tmp / "cache"
    first = _public(shared_tmp / "first")
    code = main(["run", *FAST, "pretrain.epochs=0", "task=linear", f"results_dir={first}", f"cache_dir={cache}"])
    assert code == 0
    (dataset,) = cache.iterdir()
    dataset.chmod(0o700)  # as an older version left it
    second = _public(shared_tmp / "second")
    args = [*FAST, "pretrain.epochs=0", "task=linear", f"results_dir={second}", f"cache_dir={cache}"]
    code, err = _as_another_user(args, second, {})
    assert code == 2 and "cannot be read by this user" in err and "chmod -R a+rX" in err, err
    assert len(err.strip().splitlines()) == 1 and not any(second.iterdir()), err

    folder = shared_tmp / "folder"
    shutil.copytree(dataset / "train", folder / "train")
    shutil.copytree(dataset / "val", folder / "val")
    (folder / "val").chmod(0o700)
    args = [*MODEL, "pretrain.epochs=0", "data=folder", f"data.root={folder}", f"results_dir={second}"]
    code, err = _as_another_user(args, second, {})
    assert code == 2 and f"data folder {folder / 'val'} cannot be read by this user" in err, err
    assert not any(second.iterdir()), err


# --- task settings that a run would accept and then get wrong, and task files -------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task=ade20k", "tasks.ade20k.ratio_range=[2.0,0.5]"], "ratio_range must be [low, high] with low <= high"),
        (["task=ade20k", "tasks.ade20k.feature_blocks=[]"], "feature_blocks must be 4 block numbers in 1.."),
        (["task=mrr", "tasks.mrr.bank_size=100000000"], "tasks.mrr.bank_size=100000000 needs about"),
        (["task=mrr", "tasks.mrr.views.crop_scale=[]"], "tasks.mrr.views: view crop_scale must be two numbers"),
        (["task=mrr", "tasks.mrr.num_images=1000"], "tasks.mrr.num_images=1000 is more than the 8 val images"),
        (["task=mrr", "tasks.mrr.grid_top_k=1000"], "grid_top_k=1000 is more than the bank_size=256 entries"),
    ],
)
def test_task_settings_a_run_would_get_wrong_are_refused_before_compute(capsys, here, overrides, message):
    model = [o for o in MODEL if not o.startswith("tasks.")]
    args = [*model, "method=iwm", "data.num_train=16", "data.num_val=8", "pretrain.epochs=0", "run_dir=run"]
    refused(capsys, here, [*args, *overrides], message)


def _ade_folder(root: Path, annotation) -> Path:
    """An ADE20k-layout folder of 2 + 2 images, the last val annotation replaced by `annotation`."""
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for kind in ("images", "annotations"):
            (base / kind / split).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (i * 90, 40, 200)).save(base / "images" / split / f"{i}.jpg")
            Image.fromarray(np.full((32, 32), 1 + i, np.uint8)).save(base / "annotations" / split / f"{i}.png")
    annotation(base / "annotations" / "validation" / "1.png")
    return root


@pytest.mark.parametrize(
    "annotation, message",
    [
        (lambda p: Image.new("RGB", (32, 32)).save(p), "has mode RGB"),
        (lambda p: Image.fromarray(np.full((32, 32), 99, np.uint8)).save(p), "holds values 99 outside 1..13"),
        (lambda p: Image.new("L", (16, 32), 1).save(p), "is 16x32 but its image is 32x32"),
    ],
)
def test_bad_ade20k_annotations_are_refused_before_compute(capsys, here, annotation, message):
    root = _ade_folder(here / "seg", annotation)
    model = [o for o in MODEL if not o.startswith("tasks.")]
    args = [*model, "method=iwm", "task=ade20k", f"tasks.ade20k.root={root}", "run_dir=run"]
    refused(capsys, here, args, message)


def test_a_truncated_annotation_in_the_builtin_cache_says_how_to_regenerate_it(capsys, here):
    from benchmark.core.data import resolve_data

    model = [o for o in MODEL if not o.startswith("tasks.")]
    args = [*model, "method=iwm", "task=ade20k", "data.num_train=8", "data.num_val=4", "pretrain.epochs=0"]
    source = resolve_data(load_config(args).data, here / "cache")
    label = next((source.root / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png"))
    label.write_bytes(label.read_bytes()[:40])
    refused(capsys, here, [*args, f"cache_dir={here / 'cache'}", "run_dir=run"], f"delete {source.root} and run again")


def test_a_checkpoint_that_cannot_be_written_is_refused_before_training(here, monkeypatch):
    """ulimit -f below the checkpoint's size, or too little free space: exit 2 at once, not at the
    first checkpoint write after minutes of training."""
    import resource
    import subprocess
    import sys
    from collections import namedtuple

    from benchmark.core.errors import ConfigError

    limit = 300_000
    proc = subprocess.run(
        [sys.executable, "-m", "benchmark.cli", "run", *(o for o in FAST if not o.startswith("task")), "run_dir=run"],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)),
        cwd=here,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert proc.returncode == 2, proc.stderr
    assert f"over this shell's file size limit (ulimit -f: {limit} bytes)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (here / "run").exists()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5 * 2**20, 5 * 2**20))
    with pytest.raises(ConfigError, match=r"run folder .*: 5.0 MiB free on its file system, the checkpoints need"):
        ckpt.check_room(here / "run", 4 * 2**20, "run folder")
    ckpt.check_room(here / "run", 2 * 2**20, "run folder")  # room for two: accepted


def test_a_checkpoint_of_another_method_in_a_run_folder_is_refused_before_compute(capsys, here):
    """An I-JEPA last.pt copied into an IWM run folder, then resume=true: exit 2 naming both."""
    base = [o for o in FAST if not o.startswith("task")] + ["task=none", "pretrain.epochs=1"]
    assert main(["run", *base, "method=ijepa", "run_dir=a"]) == 0
    assert main(["run", *base, "method=iwm", "run_dir=b"]) == 0
    shutil.copy(here / "a" / "checkpoints" / "last.pt", here / "b" / "checkpoints" / "last.pt")
    log = (here / "b" / "train_log.jsonl").read_text()
    capsys.readouterr()
    code = main(["run", "run_dir=b", "resume=true"])
    err = capsys.readouterr().err
    assert code == 2 and "was written by a method=ijepa run, not this method=iwm run" in err, err
    assert len(err.strip().splitlines()) == 1 and (here / "b" / "train_log.jsonl").read_text() == log
