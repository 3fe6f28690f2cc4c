"""Composing and checking the Hydra config, so that every mistake surfaces before any compute."""

from __future__ import annotations

import difflib
import numbers
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from benchmark.core.errors import ConfigError
from benchmark.core.layers import ATTENTION
from methods.base import ENCODER_KEYS

CONF_DIR = Path(__file__).parent / "conf"
# Config groups kept beside the code they configure: the launcher presets live in slurm/conf.
GROUP_DIRS = {"launcher": Path(__file__).parent.parent / "slurm" / "conf" / "launcher"}
GROUPS = ("method", "model", "data", "pretrain", "task", "launcher")
SEARCH_PATH = f"hydra.searchpath=[file://{GROUP_DIRS['launcher'].parent}]"

# MAE's linear scaling rule, lr = base_lr * batch / 256, so a preset's lr follows its batch size.
OmegaConf.register_new_resolver("linear_scaled_lr", lambda base, batch: base * batch / 256, replace=True)


def group_dir(group: str) -> Path:
    return GROUP_DIRS.get(group, CONF_DIR / group)


def is_task_set(option: str) -> bool:
    """Whether a task= option selects a set of tasks (all, paper, none) rather than naming one:
    a set skips the tasks that do not apply to the method, a named task that does not apply fails."""
    path = group_dir("task") / f"{option}.yaml"
    return path.is_file() and path.read_text().startswith("# @package _global_")


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in group_dir(group).glob("*.yaml"))


def check_command_line(overrides: list[str]) -> None:
    """`seed` given twice on one command line, which Hydra would settle silently (the last wins),
    where several seeds are `seeds=[...]`. Other keys keep Hydra's rule: a later override of a
    key refines an earlier one, as when a script adds to a base list of settings."""
    for key in ("seed", "seeds"):
        given = [o for o in overrides if o.partition("=")[0] == key]
        if len(given) > 1:
            raise ConfigError(
                f"{key} is set {len(given)} times ({' '.join(given)}): give it once (seeds=[1,2] runs several seeds)"
            )


def _check_overrides(overrides: list[str]) -> None:
    for override in overrides:
        key, sep, value = override.partition("=")
        if key.startswith(("+", "~")):
            raise ConfigError(
                f"override {override!r} adds or deletes a key: every setting already exists "
                "(`bench config` prints them), set it with key=value"
            )
        if sep and key in GROUPS and value not in group_options(key):
            raise ConfigError(f"unknown {key} {value!r} (known: {', '.join(group_options(key))})")


def _unknown_key_message(key: str, overrides: list[str]) -> str:
    """'unknown config key' with the closest existing key of the same parent, if any."""
    parent, _, leaf = key.rpartition(".")
    groups = [o for o in overrides if o.partition("=")[0] in GROUPS]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        base = compose("config", overrides=[*groups, SEARCH_PATH])
    node = OmegaConf.select(base, parent) if parent else base
    known = list(node.keys()) if OmegaConf.is_dict(node) else []
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    chosen = [o for o in groups if o.partition("=")[0] == key.split(".")[0]]
    where = f" with {chosen[-1]}" if chosen else ""
    return f"unknown config key {key!r}{where}{hint}"


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    # Hydra appends a long "full_key / object_type" trailer to OmegaConf errors.
    return text.split(" full_key:")[0]


# Settings that may differ when a run is resumed: they do not change its results.
RESUMABLE = {"resume", "progress", "workers", "threads", "device", "run_dir", "launcher"}
# Keys added after runs were stored, with the behaviour those runs had: a resumed run keeps it.
BEFORE_THE_KEY = {"attention": "fused", "threads": None}


def _stored_config(overrides: list[str]) -> Path | None:
    """The config.yaml of the run folder that `resume=true run_dir=X` names, if it has one."""
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    if given.get("resume", "false").lower() != "true" or not given.get("run_dir"):
        return None
    path = Path(given["run_dir"]).expanduser() / "config.yaml"
    return path if path.is_file() else None


def resume_config(stored_path: Path, overrides: list[str]) -> DictConfig:
    """A run's stored config for `resume=true`: overrides may change only what does not change
    results (RESUMABLE); any other override must repeat the stored value."""
    stored = OmegaConf.load(stored_path)
    differ = []
    given = dict(o.partition("=")[::2] for o in overrides)  # the last value of a key wins, as in Hydra
    for key, text in given.items():
        if key.split(".")[0] in RESUMABLE:
            continue
        value = OmegaConf.from_dotlist([f"v={text}"]).v
        current = stored.choices.get(key) if key in GROUPS else OmegaConf.select(stored, key, default="<unset>")
        if value != current:
            differ.append(f"{key}={text} (stored: {current})")
    if differ:
        raise ConfigError(
            f"resume=true continues the run as it was started ({stored_path}); these overrides would change "
            f"its results: {', '.join(differ[:5])}"
        )
    resumable = [f"{k}={v}" for k, v in given.items() if k.split(".")[0] in RESUMABLE]
    cfg = OmegaConf.merge(stored, OmegaConf.from_dotlist(resumable))
    for key, value in BEFORE_THE_KEY.items():
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, value, force_add=True)
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def load_config(overrides: list[str]) -> DictConfig:
    """The composed, resolved config; the chosen group options are kept under `choices`.

    With `resume=true run_dir=X` and X holding a run, the run's stored config (see resume_config).
    """
    stored = _stored_config(overrides)
    if stored is not None:
        return resume_config(stored, overrides)
    _check_overrides(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, SEARCH_PATH], return_hydra_config=True)
    except Exception as exc:  # Hydra raises several unrelated types for bad overrides
        missing = re.match(r"Could not override '([^']+)'", _one_line(exc))
        if missing:
            raise ConfigError(_unknown_key_message(missing.group(1), overrides)) from None
        hint = ""
        if "LexerNoViableAltException" in _one_line(exc) or "token recognition error" in _one_line(exc):
            hint = " (a value with spaces or other special characters needs quotes: key='my value')"
        raise ConfigError(f"bad override: {_one_line(exc)}{hint}") from None
    choices = {g: cfg.hydra.runtime.choices.get(g) for g in GROUPS}
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.choices = choices
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:
        raise ConfigError(f"config does not resolve: {_one_line(exc)}") from None
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _number(
    cfg: DictConfig, key: str, minimum: float | None = None, integer: bool = False, strictly: bool = False
) -> None:
    value = OmegaConf.select(cfg, key)
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    _require(ok, f"{key} must be {kind}, got {value!r}")
    if minimum is not None:
        bad = value <= minimum if strictly else value < minimum
        _require(not bad, f"{key} must be {'>' if strictly else '>='} {minimum}, got {value}")


# Settings that are on or off: a value other than true / false (`pretrain.bf16=maybe`) is refused.
FLAGS = (
    "pretrain.bf16",
    "pretrain.fused_adamw",
    "pretrain.compile",
    "pretrain.warmup_reaches_peak",
    "data.check_headers",
    "data.skip_unreadable",
    "progress",
    "resume",
)


def _flags(cfg: DictConfig) -> None:
    for key in FLAGS:
        value = OmegaConf.select(cfg, key, default=None)
        _require(value is None or isinstance(value, bool), f"{key} must be true or false, got {value!r}")


def seed_list(cfg: DictConfig) -> list[int] | None:
    """The seeds of a multi-seed job (`seeds=N` or `seeds=[...]`), None for a single run."""
    seeds = cfg.seeds
    if seeds is None:
        return None
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        _require(seeds >= 1, f"seeds must be a count >= 1 or a list of seeds, got {seeds}")
        return list(range(cfg.seed, cfg.seed + seeds))
    values = list(seeds) if OmegaConf.is_list(seeds) else None
    ok = values and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    _require(
        bool(ok) and len(set(values)) == len(values),
        f"seeds must be a count >= 1 or a list of distinct seeds >= 0, got {seeds!r}",
    )
    return values


def seed_overrides(cfg: DictConfig, overrides: list[str]) -> list[list[str]]:
    """The overrides of each seed's run, or [overrides] for a single run."""
    seeds = seed_list(cfg)
    if seeds is None:
        return [overrides]
    runs = []
    for seed in seeds:
        own = [*overrides, f"seed={seed}", "seeds=null"]
        if cfg.run_dir:
            own.append(f"run_dir={Path(str(cfg.run_dir)).expanduser() / f'seed{seed}'}")
        runs.append(own)
    return runs


def _method_section(cfg: DictConfig) -> None:
    """The `method:` section, checked by the method's own class (an unknown method name is the
    runner's to refuse)."""
    from methods import METHODS

    method = METHODS.get(cfg.method.get("name"))
    if method is None:
        return
    try:
        method.check_config(OmegaConf.to_container(cfg.method), OmegaConf.to_container(cfg.model), cfg.data.image_size)
    except KeyError as exc:
        raise ConfigError(f"method.{exc.args[0]} is missing (method={cfg.method.name})") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None


def validate(cfg: DictConfig) -> None:
    """Types and ranges of the values a run depends on; registries are checked by the runner."""
    for key in ("pretrain.lr", "pretrain.batch_size"):
        _number(cfg, key, 0, integer=key.endswith("batch_size"), strictly=True)
    # 0 epochs evaluates the initialisation: the random-encoder control of every task.
    _number(cfg, "pretrain.epochs", 0)
    for key in (
        "pretrain.start_lr",
        "pretrain.final_lr",
        "pretrain.weight_decay",
        "pretrain.final_weight_decay",
        "pretrain.warmup_epochs",
        "pretrain.clip_grad",
    ):
        _number(cfg, key, 0)
    _number(cfg, "pretrain.ipe_scale", 0, strictly=True)
    _number(cfg, "pretrain.eps", 0, strictly=True)
    betas = cfg.pretrain.betas
    _require(
        OmegaConf.is_list(betas)
        and len(betas) == 2
        and all(isinstance(b, numbers.Real) and not isinstance(b, bool) and 0 <= b < 1 for b in betas),
        f"pretrain.betas must be two numbers in [0, 1), got {betas!r}",
    )
    _require(
        cfg.pretrain.schedule_offset in (0, 1),
        f"pretrain.schedule_offset must be 0 or 1, got {cfg.pretrain.schedule_offset!r}",
    )
    _number(cfg, "pretrain.checkpoint_every", 0, integer=True)
    _number(cfg, "pretrain.log_every", 0, integer=True, strictly=True)
    _number(cfg, "seed", 0, integer=True)
    seed_list(cfg)
    _number(cfg, "workers", 0, integer=True)
    if cfg.threads is not None:
        _number(cfg, "threads", 0, integer=True, strictly=True)
    _number(cfg, "token_cache_gb", 0)
    _number(cfg, "data.image_size", 0, integer=True, strictly=True)
    if cfg.data.get("kind") == "builtin":
        for key in ("num_train", "num_val"):
            _number(cfg, f"data.{key}", 0, integer=True, strictly=True)
        _number(cfg, "data.seed", 0, integer=True)
    _flags(cfg)
    for key in ("patch_size", "embed_dim", "depth", "num_heads"):
        _number(cfg, f"model.{key}", 0, integer=True, strictly=True)
    _require(
        cfg.data.image_size % cfg.model.patch_size == 0,
        f"data.image_size={cfg.data.image_size} is not a multiple of model.patch_size={cfg.model.patch_size}",
    )
    _require(
        cfg.model.embed_dim % cfg.model.num_heads == 0,
        f"model.embed_dim={cfg.model.embed_dim} is not divisible by model.num_heads={cfg.model.num_heads}",
    )
    _method_section(cfg)
    for key, kind in (("pretrain.attention", cfg.pretrain.attention), ("attention", cfg.attention)):
        _require(kind in ATTENTION, f"{key} must be {', '.join(ATTENTION)}, got {kind!r}")
    _require(
        cfg.checkpoint_key is None or cfg.checkpoint_key in ENCODER_KEYS,
        f"checkpoint_key must be {', '.join(ENCODER_KEYS)} or null, got {cfg.checkpoint_key!r}",
    )
    _require(
        cfg.device in ("auto", "cpu", "cuda") or str(cfg.device).startswith("cuda:"),
        f"device must be auto, cpu or cuda[:N], got {cfg.device!r}",
    )
    _require(
        len(cfg.tasks) > 0 or cfg.choices.task == "none",
        "no task selected: use task=<name>, task=all, or task=none to pretrain only",
    )
    for name, task_cfg in cfg.tasks.items():
        for key in ("epochs", "batch_size"):
            if key in task_cfg:
                _number(cfg, f"tasks.{name}.{key}", 0, integer=True, strictly=True)
