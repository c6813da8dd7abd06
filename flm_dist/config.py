"""Typed job configuration: one YAML file plus `--set key=value` overrides.

Each component owns a small dataclass (`DataConfig`, `ModelConfig`, ...); the job
file is their union. Loading checks every key and type against these dataclasses
and names the file and the dotted key in every error, with the fix where we know it.
Components receive only their own section, never the whole `JobConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DemoConfig",
    "FeatureConfig",
    "JobConfig",
    "ModelConfig",
    "RunConfig",
    "ScalingConfig",
    "ServeConfig",
    "SplitConfig",
    "StorageConfig",
    "TrainConfig",
    "TransitionsConfig",
    "load_job",
    "to_dict",
]

Task = Literal["pretrain", "ctr", "rating", "retrieval"]
FINETUNE_TASKS = ("ctr", "rating", "retrieval")


class ConfigError(ValueError):
    """A job file or override is wrong; the message names the file, the key and the fix."""


@dataclass
class StorageConfig:
    """How to reach object storage. Unset fields fall back to the standard AWS
    environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_REGION / AWS_DEFAULT_REGION), then to AWS's own defaults.
    `endpoint_url: embedded` starts a local S3-compatible endpoint (moto) for this command."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    # Attempts per request, the first included: transient errors (5xx, throttling, resets) are retried with backoff.
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("storage.max_attempts must be >= 1")


def _check_range(section: str, cfg: Any, keys: tuple[str, ...], low: float) -> None:
    """Each key >= low; NaN fails too."""
    for key in keys:
        v = getattr(cfg, key)
        if not v >= low:
            raise ConfigError(f"{section}.{key} must be >= {low:g}, got {v!r}")


@dataclass
class RunConfig:
    """Where a run lives: checkpoints, metrics and TensorBoard events go to `storage/name/`."""

    name: str = "flm"
    storage: str = "./runs"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"run.name must be a non-empty name without '/' (and not '.' or '..'), got {self.name!r}")


@dataclass
class FeatureConfig:
    """A categorical feature column. `side` says which tower it feeds."""

    name: str
    side: Literal["user", "item"]
    rows: int = 0  # 0: taken from model.feature_rows
    kind: Literal["categorical", "multi", "numeric"] = "categorical"
    max_len: int = 8  # for kind=multi (list<string>): values beyond this are dropped

    def __post_init__(self) -> None:
        _check_range(f"data.features[{self.name}]", self, ("rows",), 0)
        _check_range(f"data.features[{self.name}]", self, ("max_len",), 1)


@dataclass
class SplitConfig:
    """Derive an eval split from the training data when `data.eval` is empty.
    All modes are functions of the data alone, so the split is the same across runs and
    worker counts. `last` (per-user sequences only): leave-one-out, each user's last
    event is eval and, while data.valid_fraction > 0, the one before it is validation."""

    by: Literal["none", "time", "random", "user", "last"] = "none"
    time_cutoff: int | None = None  # by=time: rows with ts >= cutoff go to eval
    fraction: float = 0.1  # by=random / by=user: share of rows / users in eval

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"data.split.fraction must be in (0, 1), got {self.fraction}")
        if self.by == "time" and self.time_cutoff is None:
            raise ConfigError("data.split.by=time needs data.split.time_cutoff (a ts value)")


@dataclass
class DataConfig:
    pretrain: str = ""  # interaction log for self-supervised pretraining
    train: str = ""  # labelled log for fine-tuning
    eval: str = ""  # held-out log for evaluation
    split: SplitConfig = field(default_factory=SplitConfig)
    # Fine-tuning: the validation data that early stopping follows, or else the share of
    # the training rows (by (user, item) pair) held out for it; 0 turns validation off.
    valid: str = ""
    valid_fraction: float = 0.1
    # Each rank keeps its validation batches in host memory after the first validation
    # when they fit in this many MiB, and replays them every later epoch instead of
    # reading them again (0: read every epoch).
    valid_cache_mb: int = 256
    features: list[FeatureConfig] = field(default_factory=list)
    rating_range: list[float] = field(default_factory=lambda: [1.0, 5.0])
    batch_size: int = 4096  # per worker
    max_bad_fraction: float = 0.001
    on_bad_file: Literal["fail", "skip"] = "fail"
    max_bad_files: int = 10  # with on_bad_file=skip: more than this many bad files fails the job
    shuffle: bool = True
    shuffle_window: int = 8  # batches mixed together in the worker's shuffle buffer
    prefetch_batches: int = 4
    # Keep Ray Data's block order: runs repeat bit for bit, at some ingest throughput.
    deterministic: bool = False
    read_block_rows: int = 65536  # rows per Ray Data read task: row groups are merged up to this (never split)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("data.batch_size must be >= 1")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError("data.max_bad_fraction must be in [0, 1]")
        if len(self.rating_range) != 2 or self.rating_range[0] >= self.rating_range[1]:
            raise ConfigError("data.rating_range must be [low, high] with low < high")
        if self.shuffle_window < 1:
            raise ConfigError("data.shuffle_window must be >= 1")
        _check_range("data", self, ("valid_cache_mb", "max_bad_files"), 0)
        _check_range("data", self, ("prefetch_batches", "read_block_rows"), 1)
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"data.valid_fraction must be in [0, 1), got {self.valid_fraction}")
        names = [f.name for f in self.features]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"data.features declares {sorted(dup)} more than once")
        reserved = {"user_id", "item_id", "ts", "label", "rating", "history"}
        if reserved & set(names):
            raise ConfigError(f"data.features cannot use reserved columns {sorted(reserved & set(names))}")


@dataclass
class ModelConfig:
    """FLM architecture. Table sizes are the hash-space sizes (rows) of each table."""

    user_rows: int = 1 << 20
    item_rows: int = 1 << 20
    feature_rows: int = 1 << 12
    embedding_dim: int = 32
    hidden: list[int] = field(default_factory=lambda: [128])
    latent_dim: int = 64
    # The task head over [z_user, z_item, z_user * z_item]: linear by default. On real
    # data a hidden layer fitted the few labeled users' quirks and transferred worse to
    # users without labels (docs/RESULTS.md).
    head_hidden: list[int] = field(default_factory=list)
    corruption: float = 0.2  # probability of masking each input field in the corrupted view
    noise_std: float = 0.1  # Gaussian noise added to the corrupted view
    hash_seed: int = 0
    # The user's history (per-user sequence data, `flm-dist data sequences`): up to this
    # many previous items, through a causal Transformer, as one more user field; 0: off.
    history_len: int = 0
    # Feed the user ID's embedding to the user tower. With a history it mostly memorises
    # (measured: docs/RESULTS.md) and tells nothing about users new to the model.
    user_id: bool = True
    history_layers: int = 2
    history_heads: int = 2
    history_dropout: float = 0.2

    def __post_init__(self) -> None:
        for key in ("user_rows", "item_rows", "feature_rows", "embedding_dim", "latent_dim"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1")
        if not 0.0 <= self.corruption < 1.0:
            raise ConfigError("model.corruption must be in [0, 1)")
        _check_range("model", self, ("noise_std",), 0)
        for key in ("hidden", "head_hidden"):
            if any(not isinstance(w, int) or w < 1 for w in getattr(self, key)):
                raise ConfigError(f"model.{key} must list layer widths >= 1, got {getattr(self, key)}")
        if not self.user_id and not self.history_len:
            raise ConfigError("model.user_id: false needs model.history_len > 0 (else the user tower would have no user input but features)")
        if self.history_len < 0 or self.history_layers < 1 or self.history_heads < 1:
            raise ConfigError("model.history_len must be >= 0, model.history_layers and model.history_heads >= 1")
        if self.history_len and self.embedding_dim % self.history_heads:
            raise ConfigError(f"model.embedding_dim={self.embedding_dim} must be a multiple of model.history_heads={self.history_heads}")
        if not 0.0 <= self.history_dropout < 1.0:
            raise ConfigError("model.history_dropout must be in [0, 1)")


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int = 0  # 0: no limit; otherwise stop after this many steps
    lr: float = 1e-3  # dense parameters (AdamW)
    weight_decay: float = 0.0
    sparse_lr: float = 0.05  # embedding rows (row-wise Adagrad)
    sparse_optimizer: Literal["adagrad", "sgd"] = "adagrad"
    recon_weight: float = 1.0  # weight of the denoising reconstruction loss
    contrastive_weight: float = 1.0  # weight of the in-batch interaction loss (pretrain, retrieval)
    temperature: float = 0.1
    num_negatives: int = 512  # in-batch items each row's item is contrasted with
    # plus this many items drawn uniformly from the catalog seen so far (pretrain, retrieval)
    uniform_negatives: int = 0
    # Models with a history: predict each example's item from the history before it
    # ("last"), or also every history item from the history before that ("all", SASRec's
    # objective; on Toys it overfitted sooner at the same budget, docs/RESULTS.md).
    next_item_positions: Literal["last", "all"] = "last"
    freeze: list[Literal["embeddings", "encoder", "decoder"]] = field(default_factory=list)
    # Fine-tuning from a pretrained backbone (init_from): parts kept as pretraining left
    # them, on top of `freeze`; a run from scratch trains them. With labels for some users
    # only, a moving encoder re-maps every user, and those without labels (whose rows no
    # label moves) drift off the items it adapts to.
    freeze_pretrained: list[Literal["embeddings", "encoder", "decoder"]] = field(default_factory=list)
    log_every: int = 20
    grad_clip: float = 0.0  # 0: off
    amp: bool = True  # bf16 autocast of the dense layers on GPU (ignored on CPU)
    # Fine-tuning with validation: stop after this many epochs without a better
    # validation criterion (retrieval: NDCG@10 by full ranking; else the task loss; 0:
    # run every epoch); the best epoch's checkpoint is the result.
    patience: int = 2
    # Fine-tuning a pretrained backbone with a task head (ctr, rating): steps in which
    # only the new head trains. -1: about one epoch (at most 1000 steps); 0: off.
    head_warmup_steps: int = -1
    # A retrieval fine-tune from a backbone: true continues the pretraining, from its
    # best epoch by validation (the fine-tune's own criterion) and with its optimiser
    # state; false starts from its last state with a fresh optimiser, as ctr and rating
    # do. The sequence model's pretraining trains the fine-tune's objective on the same
    # clean view, so its job file continues it (LastFM sequences: test Recall@10 0.046
    # restarted against 0.058-0.066 continued). The FLM ID model's pretraining reads a
    # corrupted view: continued, the fine-tune could not move off pretraining's best
    # epoch, which ranked LastFM's test events at Recall@10 0.048-0.068; restarted from
    # its last, 0.062-0.079 in five runs (scratch 0.070-0.076), Toys unchanged
    # (docs/RESULTS.md).
    continue_pretraining: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError("train.epochs must be >= 1")
        if not self.temperature > 0:  # NaN too
            raise ConfigError(f"train.temperature must be > 0, got {self.temperature!r}")
        _check_range("train", self, ("lr", "sparse_lr", "max_steps", "weight_decay", "recon_weight", "contrastive_weight", "num_negatives", "uniform_negatives", "grad_clip"), 0)
        _check_range("train", self, ("log_every",), 1)
        if self.patience < 0:
            raise ConfigError("train.patience must be >= 0 (0: no early stopping)")
        if self.head_warmup_steps < -1:
            raise ConfigError("train.head_warmup_steps must be -1 (about one epoch), 0 (off) or a number of steps")


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end of each epoch
    keep_last: int = 3
    async_save: bool = True

    def __post_init__(self) -> None:
        if self.keep_last < 1:
            raise ConfigError("checkpoint.keep_last must be >= 1 (the latest is never deleted)")
        _check_range("checkpoint", self, ("every_steps",), 0)


@dataclass
class ScalingConfig:
    # An int, or [min, max] for elastic training.
    num_workers: int | list[int] = 2
    use_gpu: bool = False
    # CPUs reserved per train worker; "auto" leaves at least one CPU of the cluster to Ray Data.
    cpus_per_worker: float | Literal["auto"] = "auto"
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = 0
    # How long a run may wait, over all its worker-group starts (restarts after failures
    # and preemptions included), for the cluster to give it its workers before it fails
    # naming what it asked for; 0: no limit (Ray Train's own: forever).
    start_timeout_s: int = 3600
    # Tables larger than this many bytes are sharded row-wise across workers by default.
    shard_threshold_bytes: int = 64 << 20
    # Per-table overrides: {table: row_wise | replicated}.
    plan: dict[str, Literal["row_wise", "replicated"]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.num_workers
        if isinstance(n, list):
            if len(n) != 2 or not 1 <= n[0] <= n[1]:
                raise ConfigError("scaling.num_workers as a list must be [min, max] with 1 <= min <= max")
        elif n < 1:
            raise ConfigError("scaling.num_workers must be >= 1")
        if isinstance(self.cpus_per_worker, float) and self.cpus_per_worker <= 0:
            raise ConfigError("scaling.cpus_per_worker must be > 0 or 'auto'")
        _check_range("scaling", self, ("shard_threshold_bytes", "start_timeout_s"), 0)
        if self.max_failures < -1:
            raise ConfigError(f"scaling.max_failures must be >= 0, or -1 for no limit (Ray Train's), got {self.max_failures}")

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, list) else self.num_workers


@dataclass
class ServeConfig:
    max_items: int = 1000
    max_batch_size: int = 64
    batch_wait_timeout_s: float = 0.005


@dataclass
class TransitionsConfig:
    """The export's transition counts for a model with a history (`flm_dist.transitions`):
    which items followed which in the training sequences, blended into its ranking with a
    weight fitted on the validation events."""

    window: int = 5  # j follows i when it comes 1..window events after i; 0: no counts
    # j also counts for i, at this weight, when it came 1..window events before i
    # (co-visitation either way, forward first): the blend's validation NDCG@10 rose on
    # Toys, LastFM and MovieLens sequences, highest at 0.3 or within 0.0005 of it
    # (docs/RESULTS.md); 0: forward only
    backward: float = 0.3
    keep: int = 200  # followers kept per item, the most frequent
    recent: int = 50  # a user's most recent items whose followers are summed
    fit_users: int = 20000  # validation events the weight is fitted on, at most

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ConfigError("transitions.window must be >= 0 (0 turns the counts off)")
        if not 0.0 <= self.backward <= 1.0:
            raise ConfigError(f"transitions.backward must be in [0, 1] (the weight of a pair seen in the reverse order), got {self.backward}")
        for key in ("keep", "recent", "fit_users"):
            if getattr(self, key) < 1:
                raise ConfigError(f"transitions.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class DemoConfig:
    """Only for `flm-dist demo`: the synthetic data it generates before running the job."""

    rows: int = 1_000_000
    users: int = 50_000
    items: int = 10_000
    seed: int = 7
    data_root: str = "s3://flm-demo/data"
    finetune_task: Literal["ctr", "rating"] = "ctr"
    finetune_epochs: int = 2
    finetune_freeze: list[Literal["embeddings", "encoder", "decoder"]] = field(default_factory=list)


@dataclass
class JobConfig:
    task: Task = "pretrain"
    init_from: str = ""  # checkpoint URI to initialise the backbone from (fine-tuning)
    run: RunConfig = field(default_factory=RunConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    transitions: TransitionsConfig = field(default_factory=TransitionsConfig)
    demo: DemoConfig | None = None

    @property
    def train_data(self) -> str:
        """The URI this job trains on: the pretraining log or the labelled log."""
        return self.data.pretrain if self.task == "pretrain" else self.data.train

    def check_runnable(self, source: str = "<job>") -> None:
        """Cross-section checks that only apply when the job is about to run."""
        if not self.train_data:
            key = "data.pretrain" if self.task == "pretrain" else "data.train"
            raise ConfigError(f"{source}: {key} is empty; set it to a Parquet file or prefix URI")
        if self.task == "pretrain" and self.init_from:
            raise ConfigError(f"{source}: init_from is for fine-tuning; task=pretrain starts from scratch")
        split = self.data.split
        if self.data.eval and split.by != "none":
            raise ConfigError(f"{source}: data.split.by={split.by} carves the eval rows out of the training data, and data.eval is set: one of them would be ignored; set data.split.by: none to evaluate on data.eval, or leave data.eval empty")
        if split.time_cutoff is not None and split.by != "time":
            raise ConfigError(f"{source}: data.split.time_cutoff applies to data.split.by: time (it is {split.by}); set by: time or remove the cutoff")
        if self.task in ("pretrain", "retrieval") and self.train.contrastive_weight > 0 and not self.train.num_negatives + self.train.uniform_negatives:
            raise ConfigError(f"{source}: train.num_negatives and train.uniform_negatives are both 0: task={self.task}'s interaction loss would have no negatives and be 0 at every step")
        if self.train.continue_pretraining and self.task != "retrieval":
            raise ConfigError(f"{source}: train.continue_pretraining is for task=retrieval, which trains pretraining's objective; {self.task} has a new head")


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"dict[{_type_name(k)}, {_type_name(v)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(
        f"{source}: key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {value!r}"
    )
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as e:
                errors.append(e)
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (arg,) = typing.get_args(tp)
        return [_coerce(v, arg, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, key, source): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key, source)
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-3` (no dot) as a string; it is plainly meant as a number.
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            valid = ", ".join(names)
            raise ConfigError(f"{source}: unknown key '{key}'{hint}; valid keys here: {valid}")
        kwargs[k] = _coerce(v, hints[k], key, source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{source}: section '{prefix or '<top>'}': {e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the
    last copy silently, so a second `data:` section would drop the whole first one."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key] + 1}); merge the two", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_job(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), absolute: bool = True) -> JobConfig:
    """Load a job file and apply `key=value` overrides (values parsed as YAML); local
    paths made absolute from this working directory (`absolute_paths`) unless
    `absolute` is False (a job checked here to run elsewhere: `flm-dist submit`)."""
    source = str(path) if path else "<defaults>"
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"job file {source} does not exist")
        try:
            tree = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        try:
            parsed = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            parsed = v
        _set_dotted(tree, k.strip(), parsed)
    label = source if not overrides else f"{source} (with --set overrides)"
    job = _build(JobConfig, tree, "", label)
    return absolute_paths(job) if absolute else job


def absolute_path(uri: str) -> str:
    """A local path made absolute (from this process's working directory); URIs with a
    scheme as they are. Ray Train's workers and Ray Serve's replicas run in folders of
    their own, so a relative path read a different place in each process: a run's
    workers committed its checkpoints where its driver never looked."""
    return os.path.abspath(uri) if uri and "://" not in uri else uri


def absolute_paths(job: JobConfig) -> JobConfig:
    """The job with every local path it names made absolute (`absolute_path`)."""
    d = job.data
    data = replace(d, pretrain=absolute_path(d.pretrain), train=absolute_path(d.train), eval=absolute_path(d.eval), valid=absolute_path(d.valid))
    demo = replace(job.demo, data_root=absolute_path(job.demo.data_root)) if job.demo is not None else None
    return replace(job, init_from=absolute_path(job.init_from), run=replace(job.run, storage=absolute_path(job.run.storage)), data=data, demo=demo)


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-able dict of a config (for manifests and the Ray worker payload)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config from `to_dict` output (e.g. a checkpoint manifest)."""
    return _build(cls, data, "", f"<{cls.__name__}>")
