import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_MODEL
from omegaconf import OmegaConf
from PIL import Image

from benchmark.config import load_config
from benchmark.core import synthetic
from benchmark.core.errors import DataError
from methods import build_method
from tasks.ade20k import ADE20kSegmentation
from tasks.base import TaskContext
from tasks.segmentation import mmseg_backend
from tasks.segmentation.backbone import level_blocks
from tasks.segmentation.data import ADE20k, Pipeline, reduce_zero_label, slide_inference, train_sample, window_starts
from tasks.segmentation.metrics import IGNORE_INDEX, ConfusionIoU, confusion, scores
from tasks.segmentation.model import Segmenter

# The shared tiny settings without the linear probe's (task=ade20k alone has no tasks.linear).
TINY_SEG_RUN = [o for o in TINY if not o.startswith("tasks.")]
TINY_SEG_MODEL = [o for o in TINY_MODEL if not o.startswith("tasks.")]
MMSEG_MISSING = mmseg_backend.missing_reason()
needs_mmseg = pytest.mark.skipif(MMSEG_MISSING is not None, reason=f"mmseg backend absent: {MMSEG_MISSING}")
# A few iterations on a handful of images: enough to move every trained weight.
SEG_TINY = [
    "tasks.ade20k.iters=3",
    "tasks.ade20k.batch_size=4",
    "tasks.ade20k.channels=16",
    "tasks.ade20k.aux_channels=8",
    "tasks.ade20k.vis_images=2",
    "tasks.ade20k.warmup_iters=1",
]


def test_miou_by_hand_with_ignored_pixels_and_absent_classes():
    label = torch.tensor([[0, 0, 1, 255], [1, 1, 0, 255]])
    pred = torch.tensor([[0, 1, 1, 2], [1, 2, 0, 0]])
    s = scores(confusion(pred, label, num_classes=4))
    # class 0: 2 right of 3 labelled, predicted twice on valid pixels -> 2 / 3
    # class 1: 2 right of 3 labelled, predicted 3 times -> 2 / 4
    # class 2: never labelled, predicted once -> 0; class 3: neither -> undefined, left out
    assert s["per_class_iou"][:3] == pytest.approx([100 * 2 / 3, 50.0, 0.0])
    assert s["per_class_iou"][3] is None
    assert s["miou"] == pytest.approx(100 * (2 / 3 + 0.5 + 0.0) / 3)
    assert s["pixel_acc"] == pytest.approx(100 * 4 / 6)
    assert s["macc"] == pytest.approx(100 * 2 / 3)


def test_confusion_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="label value 5 outside 0..3"):
        confusion(torch.tensor([0, 1]), torch.tensor([0, 5]), num_classes=4)


def test_reduce_zero_label_and_the_reader_on_the_generated_folder(tmp_path):
    assert reduce_zero_label(np.array([0, 1, 2, 150])).tolist() == [255, 0, 1, 149]
    root = synthetic.generate(tmp_path / "shapes", 6, 3, 64, seed=0)
    train, val = ADE20k(root, "train"), ADE20k(root, "val")
    assert (len(train), len(val)) == (6, 3)
    image, label = train[0]
    assert image.size == (64, 64) and label.shape == (64, 64)
    raw = np.array(synthetic.render(0, "train", 0, 64)[1])
    assert np.array_equal(label, np.where(raw == 0, 255, raw.astype(np.int64) - 1))
    values = set(np.unique(np.concatenate([train[i][1].ravel() for i in range(6)])).tolist())
    assert 0 in values and values <= set(range(13)) | {255} and len(values - {0, 255}) >= 1
    with pytest.raises(DataError, match="segmentation folder not found"):
        ADE20k(tmp_path / "nowhere", "train")
    # The figure's legend names: the generator's classes, with or without reduce_zero_label.
    assert val.class_names(13)[:3] == ["background", "red", "orange"]
    assert ADE20k(root, "val", reduce_zero=False).class_names(3) == ["class 0", "background", "red"]


def test_class_names_come_from_ade20k_s_object_table(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        (base / kind / "validation").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(base / "images" / "validation" / "a.jpg")
    Image.new("L", (8, 8)).save(base / "annotations" / "validation" / "a.png")
    (base / "objectInfo150.txt").write_text(
        "Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n2\t0.1072\t6046\t612\tbuilding, edifice\n"
    )
    assert ADE20k(tmp_path, "val").class_names(3) == ["wall", "building", "class 2"]


def test_train_pipeline_crops_pads_with_ignore_and_keeps_labels_aligned(tmp_path):
    root = synthetic.generate(tmp_path / "shapes", 2, 1, 64, seed=0)
    image, label = ADE20k(root, "train")[0]
    import random

    small = Pipeline(scale=(256, 64), crop=64, ratio_range=(0.5, 0.5), photometric=False, flip=0.0)
    x, y = train_sample(image, label, small, random.Random(0))
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert (y[32:, :] == IGNORE_INDEX).all() and (y[:, 32:] == IGNORE_INDEX).all()
    assert (x[:, 32:, :] == 0).all()
    assert np.array_equal(y[:32, :32].numpy(), label[1::2, 1::2])  # nearest rescale by 1/2: odd pixels
    big = Pipeline(scale=(256, 64), crop=64, ratio_range=(2.0, 2.0))
    x, y = train_sample(image, label, big, random.Random(1))
    assert x.shape == (3, 64, 64) and (y != IGNORE_INDEX).all()


def test_sliding_windows_match_whole_image_inference():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 5, 3, padding=1))
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = net(image)
        # One window covers the image: identical to one pass on the whole image.
        assert torch.allclose(slide_inference(net, image, 5, crop=64, stride=43), whole, atol=1e-6)
        # A per-pixel model: overlapping windows average identical logits.
        pixelwise = torch.nn.Conv2d(3, 5, 1)
        wide = torch.randn(1, 3, 50, 100)
        assert torch.allclose(slide_inference(pixelwise, wide, 5, crop=32, stride=20), pixelwise(wide), atol=1e-6)
        # Smaller than a window: padded to the crop, cut back.
        assert slide_inference(net, image[:, :, :40, :50], 5, crop=64, stride=43).shape == (2, 5, 40, 50)
    assert window_starts(64, 64, 43) == [0]
    assert window_starts(100, 64, 43) == [0, 36]  # mmseg: last window flush with the border
    assert window_starts(512, 512, 341) == [0]


def test_level_blocks_and_lr_schedule():
    assert level_blocks(12) == [4, 6, 8, 12]
    assert level_blocks(24) == [8, 12, 16, 24]
    assert level_blocks(6) == [2, 3, 4, 6]
    with pytest.raises(ValueError, match="feature blocks"):
        level_blocks(6, [1, 2, 3, 7])
    from tasks.ade20k import lr_factor

    # mmengine's LinearLR over iterations 0..9 reaches 1 at the 10th; PolyLR reaches its floor at
    # the last iteration (99), halfway between at 10 + 89 / 2.
    c = {"warmup_iters": 10, "iters": 100, "warmup_ratio": 0.0, "poly_power": 1.0, "min_lr_ratio": 0.0}
    assert lr_factor(0, c) == 0.0 and lr_factor(9, c) == 1.0 and lr_factor(10, c) == 1.0
    assert lr_factor(99, c) == 0.0 and lr_factor(10 + 44.5, c) == pytest.approx(0.5)


def tiny_method(depth=4):
    cfg = load_config(["method=iwm", *TINY_SEG_MODEL, f"model.depth={depth}"])
    torch.manual_seed(0)
    return build_method("iwm", OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.method, resolve=True), 64)


def seg_cfg(**overrides):
    cfg = load_config(["task=ade20k", *SEG_TINY])
    return dict(OmegaConf.to_container(cfg.tasks.ade20k), **overrides)


BACKENDS = ["native", pytest.param("mmseg", marks=needs_mmseg)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["encoder", "predictor"])
def test_backbone_feature_shapes(backend, mode):
    method = tiny_method()
    model = Segmenter(method, "target_encoder", mode, "upernet", 9, seg_cfg(), backend).eval()
    with torch.no_grad():
        feats = model.features(torch.randn(2, 3, 64, 64))
        logits, aux = model(torch.randn(2, 3, 64, 64))
    # vit_micro: patch 8, width 192 -> strides 2, 4, 8, 16 on a 64 px crop
    assert [tuple(f.shape) for f in feats] == [(2, 192, 32, 32), (2, 192, 16, 16), (2, 192, 8, 8), (2, 192, 4, 4)]
    assert logits.shape == (2, 9, 64, 64) and aux is None
    if mode == "encoder":  # position embeddings interpolated for larger crops
        with torch.no_grad():
            assert model.features(torch.randn(1, 3, 128, 96))[2].shape == (1, 192, 16, 12)
    linear = Segmenter(method, "target_encoder", mode, "linear", 9, seg_cfg(), backend).eval()
    with torch.no_grad():
        assert linear.features(torch.randn(2, 3, 64, 64)).shape == (2, 192, 8, 8)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize(
    "mode, encoder_moves, predictor_moves",
    [("frozen", False, False), ("encoder", True, False), ("predictor", False, True), ("end_to_end", True, True)],
)
def test_only_the_parts_of_the_mode_train(tmp_path, mode, encoder_moves, predictor_moves):
    root = synthetic.generate(tmp_path / "shapes", 8, 2, 64, seed=0)
    method = tiny_method(depth=2)
    original = snapshot(method)
    task = ADE20kSegmentation(seg_cfg(mode=mode, root=str(root), bf16=False))
    model = Segmenter(method, "target_encoder", mode, "upernet", 13, task.cfg, "native")
    enc, pred = snapshot(model.encoder), snapshot(model.method.predictor)
    head = snapshot(model.head)
    ctx = TaskContext(
        source=None,
        device=torch.device("cpu"),
        encoder_key="target_encoder",
        seed=0,
        run_dir=tmp_path,
        show_progress=False,
    )
    losses = task._train(model, ADE20k(root, "train"), ctx)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert bool(changed(enc, model.encoder)) == encoder_moves
    assert bool(changed(pred, model.method.predictor)) == predictor_moves
    assert changed(head, model.head)
    assert not changed(original, method)  # the evaluated method itself is never touched


@needs_mmseg
def test_native_miou_equals_mmseg_iou_metric():
    gen = torch.Generator().manual_seed(0)
    native, mm = ConfusionIoU(7), mmseg_backend.MMSegIoU(7)
    for _ in range(3):
        label = torch.randint(0, 6, (2, 20, 24), generator=gen)  # class 6 never labelled
        label[torch.rand(label.shape, generator=gen) < 0.2] = IGNORE_INDEX
        pred = torch.randint(0, 7, (2, 20, 24), generator=gen)
        native.add(pred, label)
        mm.add(pred, label)
    a, b = native.scores(), mm.scores()
    # mmseg counts pixels in float32: equal to ~1e-7 relative.
    for key in ("miou", "macc", "pixel_acc"):
        assert a[key] == pytest.approx(b[key], abs=1e-4)
    assert a["per_class_iou"][6] == 0.0 and b["per_class_iou"][6] == 0.0
    assert a["per_class_iou"] == pytest.approx(b["per_class_iou"], abs=1e-4)
    official = mm.metric.compute_metrics(mm.metric.results)  # mmseg's own summary, 2 decimals
    assert float(official["mIoU"]) == pytest.approx(a["miou"], abs=0.006)
    assert float(official["aAcc"]) == pytest.approx(a["pixel_acc"], abs=0.006)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_run_ade20k_writes_miou_and_a_picture(bench, tmp_path, backend):
    proc = bench(
        "run",
        *TINY_SEG_RUN,
        "method=iwm",
        "task=ade20k",
        f"tasks.ade20k.backend={backend}",
        "tasks.ade20k.mode=end_to_end",
        *SEG_TINY,
        "run_dir=run",
        check=0,
    )
    record = json.loads((tmp_path / "run" / "records" / "ade20k.json").read_text())
    m = record["metrics"]
    assert record["status"] == "ok" and m["backend"] == backend and m["mode"] == "end_to_end"
    assert 0 <= m["miou"] <= 100 and len(m["per_class_iou"]) == 13 and m["val_images"] == 48
    assert (tmp_path / "run" / "ade20k_end_to_end_upernet.png").is_file()
    assert "miou" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["tasks.ade20k.mode=decoder"], "tasks.ade20k.mode must be one of frozen, encoder, predictor, end_to_end"),
        (["tasks.ade20k.mode=predictor", "tasks.ade20k.crop_size=128"], "crop_size (128) must equal the pretraining"),
        (["tasks.ade20k.crop_size=60"], "crop_size=60 is not a multiple of the patch size 8"),
        (["tasks.ade20k.root=/no/such/ade"], "tasks.ade20k.root not found: /no/such/ade"),
        (["tasks.ade20k.stride=100"], "stride=100 is larger than crop_size=64"),
    ],
)
def test_bad_segmentation_settings_exit_2(bench, tmp_path, args, message):
    proc = bench("run", *TINY_SEG_MODEL, "method=iwm", "task=ade20k", *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(MMSEG_MISSING is None, reason="mmseg is installed here")
def test_mmseg_backend_asked_for_but_absent_exits_2(bench):
    proc = bench("run", *TINY_SEG_MODEL, "method=iwm", "task=ade20k", "tasks.ade20k.backend=mmseg")
    assert proc.returncode == 2 and "backend=mmseg but" in proc.stderr


def test_every_label_is_checked_before_training_naming_the_file_and_raw_value(tmp_path):
    import numpy as np
    from PIL import Image

    from tasks.segmentation.data import ADE20k

    root = synthetic.generate(tmp_path / "shapes", 6, 3, 64, seed=0)
    val = ADE20k(root, "val")
    val.check_labels(13)  # the generated labels are fine
    bad = val.samples[-1][1]
    values = np.array(Image.open(bad))
    values[0, 0] = 200
    Image.fromarray(values).save(bad)
    with pytest.raises(DataError, match=f"label {bad} holds values 200 outside 1..13"):
        val.check_labels(13)
    Image.fromarray(np.stack([values] * 3, -1)).save(bad)
    with pytest.raises(DataError, match=f"label {bad} has mode RGB"):
        ADE20k(root, "val").check_labels(13)
