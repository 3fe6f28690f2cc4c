"""A preemption signal mid-step: the loop checkpoints at that step and resumes to the same result."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from benchmark.config import load_config
from benchmark.core import checkpoint as ckpt
from benchmark.core import interrupt, synthetic
from benchmark.core.data import DataSource
from benchmark.pretrain import pretrain
from methods import build_method


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("gen") / "shapes", 48, 16, 32, seed=5)
    return DataSource("shapes", root, "train", "val", 32)


@pytest.fixture(scope="module")
def cfg():
    cfg = load_config(
        [
            "model.depth=2",
            "model.patch_size=4",
            "method.predictor.depth=1",
            "method.predictor.width=48",
            "data.image_size=32",
            "pretrain.batch_size=8",
            "pretrain.epochs=2",
            "pretrain.warmup_epochs=1",
            "pretrain.bf16=false",
            "pretrain.log_every=1",
            "pretrain.checkpoint_every=0",
        ]
    )
    return OmegaConf.to_container(cfg, resolve=True)


def fresh(cfg):
    torch.manual_seed(0)
    return build_method("ijepa", cfg["model"], cfg["method"], 32)


class SignalledAt:
    """Wraps a method so that a request arrives in the middle of training step `at` (0-based),
    between the forward pass and the optimizer, as a signal handler would."""

    def __init__(self, method, at: int, kind: str):
        self.method, self.at, self.kind, self.calls = method, at, kind, 0

    def __getattr__(self, name):
        return getattr(self.method, name)

    def training_step(self, batch):
        out = self.method.training_step(batch)
        if self.calls == self.at:
            interrupt.request(self.kind)
        self.calls += 1
        return out


def run(method, source, cfg, folder, **kw):
    return pretrain(
        method,
        source,
        OmegaConf.create(cfg["pretrain"]),
        0,
        torch.device("cpu"),
        folder / "ckpt",
        cfg,
        show_progress=False,
        **kw,
    )


def test_stop_checkpoints_at_the_current_step_and_resumes_exactly(source, cfg, tmp_path):
    straight = fresh(cfg)
    expected = run(straight, source, cfg, tmp_path / "a")

    with pytest.raises(interrupt.Interrupted) as stopped:
        run(SignalledAt(fresh(cfg), at=4, kind=interrupt.STOP), source, cfg, tmp_path / "b")
    assert stopped.value.step == 5  # step 4 (0-based) finished, then the checkpoint
    state = ckpt.load(tmp_path / "b" / "ckpt" / "last.pt")
    assert state["step"] == 5 and len(state["recent_losses"]) == 5
    assert not interrupt.listening() and interrupt.take() is None

    resumed = fresh(cfg)
    got = run(resumed, source, cfg, tmp_path / "b")
    for key in ("steps", "final_loss", "first_loss"):
        assert got[key] == expected[key], key
    for p, q in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)
    log = [json.loads(line) for line in open(tmp_path / "b" / "train_log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 13))  # every step once, across both processes


def test_checkpoint_request_saves_and_keeps_training(source, cfg, tmp_path):
    method = SignalledAt(fresh(cfg), at=2, kind=interrupt.CHECKPOINT)
    saved = []
    real_save = ckpt.save
    try:
        ckpt.save = lambda path, payload: (saved.append(payload["step"]), real_save(path, payload))
        out = run(method, source, cfg, tmp_path, max_steps=7)
    finally:
        ckpt.save = real_save
    assert saved == [3, 7] and out["steps"] == 7  # at the signalled step, then the end


def test_requests_outside_the_loop_are_dropped_and_stop_outranks_checkpoint():
    interrupt.request(interrupt.CHECKPOINT)
    interrupt.request(interrupt.STOP)
    interrupt.request(interrupt.CHECKPOINT)
    assert interrupt.take() == interrupt.STOP and interrupt.take() is None
    interrupt.request(interrupt.STOP)
    with interrupt.served_by_loop():  # a new loop does not inherit a stale request
        assert interrupt.listening() and interrupt.take() is None


def _slow_view(_image):
    import time

    time.sleep(60)  # a worker in the middle of a long batch
    return torch.zeros(1)


def test_a_stopped_loop_does_not_wait_for_workers_mid_batch():
    """torch's own shutdown lets a busy worker finish its batch (up to 5 s each, then kills it);
    a run that stops or fails drops the batch and ends its workers at once, leaving no process."""
    import threading
    import time

    from benchmark.core.loading import SeededBatches, Transformed, make_loader, stack_views, stop_workers

    data = [(torch.zeros(1), 0)] * 8
    loader = make_loader(Transformed(data, _slow_view), SeededBatches(8, 2, 0, 0), stack_views, workers=2)
    batches = iter(loader)
    # The first batch is asked for on another thread: it waits there on the sleeping workers.
    threading.Thread(target=lambda: next(batches, None), daemon=True).start()
    asked = time.perf_counter()
    while getattr(loader, "current", None) is None and time.perf_counter() - asked < 30:
        time.sleep(0.05)
    workers = list(loader.current._workers)
    time.sleep(1.0)  # both workers are inside _slow_view now
    started = time.perf_counter()
    stop_workers(loader)
    assert time.perf_counter() - started < 3.0  # not 2 x 5 s of joins, not 60 s of batches
    assert not any(w.is_alive() for w in workers) and loader.current._shutdown
    stop_workers(loader)  # twice is harmless
