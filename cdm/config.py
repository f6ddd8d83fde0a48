"""Typed workspace parameters (`params.yaml`, grouped by stage) and consumer policy (`consumers.yaml`).

Only entry points (the CLI, flows) read these files; library functions receive the values as arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file is missing or malformed (exit 2)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataParams(_Strict):
    # What a sample is conditioned on: a class `label` (the folder it sits in), or a caption (`text`: an imagefolder
    # of PNGs beside metadata.jsonl; RGB; a text-to-image base, docs/design.md §2b).
    conditioning: Literal["class", "text"] = "class"
    image_size: int = Field(8, ge=4, le=512)
    channels: Literal[1, 3] = 1
    labels: list[int] = Field(default_factory=lambda: list(range(10)))
    max_file_bytes: int = Field(1_000_000, ge=100)  # per file
    min_dimension: int = Field(4, ge=1)
    max_dimension: int = Field(1024, ge=4)  # decompression bombs are refused before decoding
    max_files: int = Field(100_000, ge=1)  # per ingestion batch
    # Seconds to wait before each retry of `dvc push` (S3 hiccups); then the ingestion fails and rolls back.
    push_retry_delays: list[float] = Field(default_factory=lambda: [1.0, 4.0], max_length=10)
    # A caption's length limit (characters; text workspaces). The small base's character-level tokenizer reads
    # 62 characters (64 tokens with start and end): a longer caption is refused rather than cut.
    max_caption_chars: int = Field(62, ge=1, le=10_000)

    @model_validator(mode="after")
    def _text_is_rgb(self) -> "DataParams":
        if self.conditioning == "text" and self.channels != 3:
            raise ValueError("data.conditioning 'text' holds RGB images: set data.channels: 3")
        return self


class TrainParams(_Strict):
    preset: Literal["tiny", "small", "base"] = "tiny"
    steps: int = Field(600, ge=1)  # per shard
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    ema_decay: float | None = 0.995
    label_dropout: float = Field(0.15, ge=0, lt=1)
    num_slices: int = Field(4, ge=1)
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    min_shard_samples: int = Field(0, ge=0)  # owners under it are grouped into shared shards
    # Where shard tasks run: threads of this process, worker processes of a Dask cluster, or one after another.
    task_runner: Literal["threads", "dask", "sequential"] = "threads"
    max_workers: int = Field(2, ge=1)  # threads, or worker processes of the local Dask cluster (CPU)
    # An existing Dask scheduler (tcp://host:8786) for `dask`; None starts a local cluster of worker processes
    # (one per GPU on a CUDA machine, else `max_workers`, each with its share of the cores).
    dask_address: str | None = None
    # Each shard task asks the cluster for one `GPU` worker resource; None: when this machine has CUDA.
    dask_gpu_per_task: bool | None = None
    # Where shards and the paragon start: `random` weights, or `public`, the shared initialization registered by
    # `cdm pretrain` (public data that belongs to no owner; see bench/RESULTS.md for what it buys).
    init: Literal["random", "public"] = "random"
    init_steps: int = Field(2000, ge=1)  # optimizer steps of `cdm pretrain`
    # What a shard is when it starts from the shared initialization: a `full` fine-tune of every weight, or a `lora`
    # adapter on the frozen base (peft): registered and revoked alone, the base never touched. The paragon is
    # always a full fine-tune.
    compartment: Literal["full", "lora"] = "full"
    lora_rank: int = Field(8, ge=1)  # the adapter's rank (alpha = rank: the update's scale is 1)

    @model_validator(mode="after")
    def _lora_needs_a_base(self) -> "TrainParams":
        if self.compartment == "lora" and self.init != "public":
            raise ValueError("train.compartment 'lora' adapts the shared initialization: set train.init: public")
        return self


class ComposeParams(_Strict):
    estimator: Literal["path", "router", "prior", "average"] = "prior"  # chosen by bench/RESULTS.md
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    num_inference_steps: int = Field(100, ge=2)
    eta: float = Field(1.0, ge=0)
    threshold: float = Field(1e-3, ge=0, lt=1)  # sparse composition
    router_steps: int = Field(1500, ge=1)
    guidance_scale: float = Field(3.0, ge=0)  # text composites: classifier-free guidance of the composite

    @model_validator(mode="after")
    def _path_needs_noise(self) -> "ComposeParams":
        if self.estimator == "path" and self.sampler == "ddim" and self.eta == 0:
            raise ValueError("compose.estimator 'path' needs a stochastic sampler: use ddpm, or ddim with eta > 0")
        return self


class EvaluateParams(_Strict):
    n_samples: int = Field(500, ge=10)  # images per sample set (capped at the owners' control half)
    sets: int = Field(5, ge=2)  # independent sample sets (seeds seed, seed+1, ...): the interval's backbone
    seed: int = 0
    nll_steps: int = Field(100, ge=2)  # steps of the chain the likelihood bound is computed on
    feature_steps: int = Field(800, ge=1)
    # Thresholds checked by --fail-on-regression; a figure fails when its whole 95% interval is past the threshold.
    fid_ratio_max: float = 1.5
    nll_gap_max: float = 1.0  # bits/dim of the composite's bound over the paragon's
    fid_max: float | None = None
    membership_auc_max: float = 0.6
    memorization_max: float = 0.2


class Params(_Strict):
    data: DataParams = Field(default_factory=DataParams)
    train: TrainParams = Field(default_factory=TrainParams)
    compose: ComposeParams = Field(default_factory=ComposeParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)

    @classmethod
    def text(cls) -> "Params":
        """The defaults of a text workspace (`cdm init --conditioning text`): 32x32 RGB captioned images, LoRA
        compartments on a shared text-to-image base (`cdm pretrain`), prompts composed by the prompt prior."""
        return cls(data=DataParams(conditioning="text", image_size=32, channels=3, labels=[]),
                   train=TrainParams(init="public", compartment="lora", lr=1e-3, batch_size=32, steps=300),
                   compose=ComposeParams(num_inference_steps=50))

    @classmethod
    def load(cls, path: str | Path) -> "Params":
        return _load_yaml_model(cls, Path(path))

    def dump(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.model_dump(), sort_keys=False))


class Consumer(_Strict):
    owners: list[str] | None = None
    licenses: list[str] | None = None


class Consumers(_Strict):
    consumers: dict[str, Consumer] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Consumers":
        path = Path(path)
        if not path.exists():
            return cls()
        c = _load_yaml_model(cls, path)
        for name, rule in c.consumers.items():
            if (rule.owners is None) == (rule.licenses is None):
                raise ConfigError(f"{path}: consumer {name!r} needs exactly one of 'owners' or 'licenses'")
        return c

    def allowed_owners(self, name: str, owner_licenses: dict[str, str | None]) -> list[str]:
        """Owners consumer `name` may use, among `owner_licenses` ({owner: license})."""
        if name not in self.consumers:
            raise KeyError(f"unknown consumer {name!r}; known: {sorted(self.consumers) or 'none'}")
        rule = self.consumers[name]
        if rule.owners is not None:
            return sorted(o for o in owner_licenses if o in rule.owners)
        return sorted(o for o, lic in owner_licenses.items() if lic in (rule.licenses or []))


def model_config(params: Params):
    """The UNet architecture the params ask for (`cdm.model.ModelConfig`)."""
    from cdm.model import ModelConfig

    d = params.data
    return ModelConfig.preset(params.train.preset, image_size=d.image_size, channels=d.channels,
                              num_classes=max(d.labels) + 1)


def train_config(params: Params, steps: int | None = None, num_slices: int | None = None,
                 init_sha256: str | None = None, compartment: bool = False):
    """The optimisation settings of one training run (`cdm.train.TrainConfig`); `compartment`: a shard (a LoRA
    adapter when `train.compartment` says so), not the paragon or the shared initialization."""
    from cdm.adapters import AdapterConfig
    from cdm.train import TrainConfig

    t = params.train
    adapter = AdapterConfig(rank=t.lora_rank, alpha=t.lora_rank) if compartment and t.compartment == "lora" else None
    return TrainConfig(steps=steps or t.steps, batch_size=t.batch_size, lr=t.lr, ema_decay=t.ema_decay,
                       label_dropout=t.label_dropout, num_slices=num_slices or t.num_slices, seed=t.seed,
                       mixed_precision=t.mixed_precision, init_sha256=init_sha256, adapter=adapter)


def _load_yaml_model(cls, path: Path):
    import yaml

    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{path}: {problems}") from None
