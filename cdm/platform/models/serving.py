"""MLflow pyfunc models: one shard, and the composite served as `models:/cdm-composite@production`.

Both are logged as *models from code* (`cdm/mlflow_models/*.py`), so loading them unpickles nothing; weights are
safetensors whose sha256 is checked against the record before use.

The composite's `spec.json` lists its component shard versions (by registry URI and weights hash), the owners of
each shard (pseudonymous keys with sample counts), class counts, the estimator and the sampler settings.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from cdm.platform.models.weights import load_compartment


class LazyShard:
    """A shard denoiser whose UNet is loaded (fetched from the registry, hash-checked) on its first call, then
    kept: a served composite loads only the shards its requests use — a consumer's subset, or the shards `prior`
    draws — and loads each once."""

    guidance_scale = 0.0  # the composite checks it on every member: answering it must not load the weights

    def __init__(self, load, null_label: int):
        self._load, self.null_label, self._denoiser = load, null_label, None

    @property
    def loaded(self) -> bool:
        return self._denoiser is not None

    def denoiser(self):
        from cdm.model import UNetDenoiser

        if self._denoiser is None:
            self._denoiser = UNetDenoiser(self._load(), self.null_label)
        return self._denoiser

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.denoiser()(x_t, t, labels)


class ShardSet:
    """A served composite's members, each loaded on first use (`LazyShard`), usable both ways the composite
    evaluates them: one by one (`members[i]`, the loop) and several in one call (`members(x_t, t, labels, index)`,
    grouped). The grouped network of a selection of shards is built from those shards only — the others stay
    unloaded — and the last `keep` selections are kept, so a trajectory (whose selection rarely changes) and the
    next requests reuse it."""

    def __init__(self, shards: list[LazyShard], keep: int = 4):
        self.shards = shards
        self._grouped = lru_cache(maxsize=keep)(self._build)  # selection (shard indices) -> its grouped network

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> LazyShard:
        return self.shards[i]

    def __iter__(self):
        return iter(self.shards)

    def _build(self, selection: tuple[int, ...]):
        from cdm.grouped_unet import GroupedUNet

        return GroupedUNet([self.shards[i].denoiser().unet for i in selection])

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor:
        return self._grouped(tuple(index.tolist()))(x_t, t, labels)

    def drop(self, indices: set[int]) -> None:
        """Forget the weights of these shards (revoked): they are never loaded again in this process."""
        for i in indices:
            self.shards[i] = RevokedShard(self.shards[i].null_label)
        self._grouped.cache_clear()


class ShardRevoked(PermissionError):
    """A shard a trajectory uses was revoked (seen by the watch, or by a concurrent request that dropped it):
    `CompositeModel.predict` samples again without it."""


class RevokedShard(LazyShard):
    """The place of a shard a revocation took out of a running server: refuses to load."""

    def __init__(self, null_label: int):
        super().__init__(None, null_label)

    def denoiser(self):
        raise ShardRevoked("this shard was revoked; it is not served")


class RevocationWatch:
    """What a serving process knows of revocations (docs/design.md §5). `check()` reads the registry's revocation
    epoch (one registry call) and, only when it moved since the last look, the tags of this composite's component
    versions; it returns the indices of the components that may not be served (marked `cdm.revoked`, or deleted).
    Every request checks before it samples and again before it answers. With no registry to ask, nothing is
    served (the error propagates)."""

    def __init__(self, shards: list[dict]):
        self.shards, self.epoch, self.revoked = shards, None, None

    def check(self) -> set[int]:
        from mlflow import MlflowClient

        from cdm.platform.models import registry

        c = MlflowClient()
        epoch = registry.revocation_epoch(c)
        if self.revoked is None or epoch != self.epoch:
            self.revoked = {i for i, s in enumerate(self.shards) if registry.revoked_by(c, s["model"], s["version"])}
            self.epoch = epoch
        return set(self.revoked)


def build_composite(spec: dict, unets: list | ShardSet, router=None, allowed_owner_keys: list[str] | None = None,
                    estimator: str | None = None, seed: int = 0, evaluation: str = "loop",
                    revoked: set[int] = frozenset()):
    """A `(CompositeDenoiser, scheduler, shard indices used)` from a composite spec and its shard UNets, their
    `LazyShard`s, or a `ShardSet` (needed by `grouped` and `auto` evaluation; see `CompositeDenoiser`). Shards in
    `revoked` (indices) are never used."""
    from cdm.compose import CompositeDenoiser, class_priors
    from cdm.model import ModelConfig, UNetDenoiser
    from cdm.schedulers import NoiseSchedule, sampling_scheduler

    cfg = ModelConfig.from_json(json.dumps(spec["model_config"]))
    shards = spec["shards"]
    subset = list(range(len(shards)))
    if allowed_owner_keys is not None:
        allowed = set(allowed_owner_keys)
        # A shard is usable only if every owner in it is allowed: a sample must not be influenced by others.
        subset = [i for i, s in enumerate(shards) if set(s["owners"]) <= allowed]
        if not subset:
            raise PermissionError("no shard is composed solely of allowed owners")
    subset = [i for i in subset if i not in revoked]
    if not subset:
        raise PermissionError("every shard of this composite that the request may use was revoked")
    counts = torch.tensor([s["class_counts"] for s in shards], dtype=torch.float32)
    sampler = sampling_scheduler(NoiseSchedule(**spec.get("schedule", {})), spec["sampler"])
    estimator = estimator or spec["estimator"]
    if estimator == "router" and router is None:
        raise ValueError("this composite has no router; choose another estimator")
    if isinstance(unets, ShardSet):
        members = unets
    else:
        members = [u if isinstance(u, LazyShard) else UNetDenoiser(u, cfg.null_label) for u in unets]
    comp = CompositeDenoiser(members, class_priors(counts), estimator, scheduler=sampler, eta=spec["eta"],
                             subset=subset, threshold=spec.get("threshold", 0.0), evaluation=evaluation,
                             router=router, generator=torch.Generator().manual_seed(seed))
    return comp, sampler, subset


def sample_composite(comp, sampler, spec: dict, labels: torch.Tensor, seed: int, progress: bool = False,
                     callback_on_step_end=None) -> dict:
    """Run the pipeline; returns images [n, C, H, W] and per-sample attribution per owner key."""
    from cdm.attribution import attribute
    from cdm.pipeline import CDMPipeline

    cfg = spec["model_config"]
    pipe = CDMPipeline(comp, sampler, (cfg["channels"], cfg["image_size"], cfg["image_size"]))
    images = pipe(labels, spec["num_inference_steps"], eta=spec["eta"],
                  generator=torch.Generator().manual_seed(seed), progress=progress,
                  callback_on_step_end=callback_on_step_end)
    weights = comp.attribution()
    owners = [s["owners"] for s in spec["shards"]]
    return {"images": images, "attribution": attribute(weights["mean"], owners),
            "attribution_final": attribute(weights["final"], owners), "evaluations": comp.evaluations}


def _labels(n: int, label: int | None, null_label: int) -> torch.Tensor:
    if n < 1:
        raise ValueError("n must be at least 1")
    if label is None or label < 0:
        return torch.full((n,), null_label)
    if label >= null_label:
        raise ValueError(f"label {label} is out of range [0, {null_label - 1}]")
    return torch.full((n,), int(label))


def _first(model_input: Any, key: str, default=None):
    """One parameter from a one-row DataFrame or a dict."""
    if hasattr(model_input, "iloc"):
        if key not in model_input.columns:
            return default
        value = model_input[key].iloc[0]
    else:
        value = model_input.get(key, default)
    try:
        import pandas as pd

        if not isinstance(value, (list, tuple)) and pd.isna(value):
            return default
    except (TypeError, ValueError):
        pass
    return value


def _fetch_shard(shard: dict, tmp_root: Path | None):
    """A component shard's UNet from the registry, its weights checked against the composite's record."""
    from mlflow import MlflowClient

    from cdm.platform.models.registry import model_files

    # Into a temporary folder under `tmp_root` (beside the composite's own files: a workspace's `.cdm/tmp` when
    # cdm loaded it, where the purge and the scan see it), removed once the weights are in memory.
    c = MlflowClient()
    with model_files(c, shard["model"], shard["version"], tmp_root) as files:
        return load_compartment(c, files, shard["weights_sha256"], tmp_root)


class NotServed(MlflowException, PermissionError):
    """A request refused by the serving invariant (docs/design.md §5). An MlflowException with its own message
    and code, so that a client of MLflow's scoring server reads why (HTTP 403 with this message), and a
    PermissionError for cdm's own callers (exit 2)."""

    def __init__(self, message: str):
        from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

        MlflowException.__init__(self, message, error_code=PERMISSION_DENIED)


def model_dir_of(context) -> Path:
    """The folder of a loaded pyfunc model (its `MLmodel` file): every artifact lies in `<dir>/artifacts/`."""
    return Path(next(iter(context.artifacts.values()))).parent.parent


def tmp_root_of(context) -> Path:
    """Where a served model downloads what it loads later (shards, a LoRA base): beside its own files, so a
    workspace's load (`.cdm/tmp/<pid>-*`) keeps every copy where the purge and the scan see it."""
    return model_dir_of(context).parent


class VersionWatch:
    """What a served shard, paragon or base knows of revocations: the registered versions of its own logged
    model (found by its run), whose `cdm.revoked` tags are read again whenever the registry's revocation epoch
    moves. `check()` returns why the model may not be served (marked by a revocation, or no registered version
    left: a purge deleted it), or None. With no registry to ask, the error propagates: nothing is served."""

    def __init__(self, run_id: str | None, model_id: str | None):
        self.run_id, self.model_id = run_id, model_id
        self.epoch, self.why, self.checked = None, None, False

    def check(self) -> str | None:
        from mlflow import MlflowClient

        from cdm.platform.models import registry

        c = MlflowClient()
        epoch = registry.revocation_epoch(c)
        if self.checked and epoch == self.epoch and self.why is None:
            return None
        if self.run_id is None:
            self.why = "this model names no training run; only registered cdm versions are served"
        else:
            mine = [mv for mv in registry.pages(lambda token: c.search_model_versions(
                        f"run_id = '{self.run_id}'", page_token=token))
                    if self.model_id is None or getattr(mv, "model_id", None) in (None, self.model_id)]
            marked = [mv for mv in mine if mv.tags.get(registry.REVOKED)]
            if marked:
                self.why = (f"{marked[0].name} v{marked[0].version} was trained on an owner whose revocation was "
                            f"accepted ({marked[0].tags[registry.REVOKED]}); it is not served")
            elif not mine:
                self.why = "this model has no registered version any more (deleted by a revocation's purge)"
            else:
                self.why = None
        self.epoch, self.checked = epoch, True
        return self.why


class ShardModel(PythonModel):
    """One shard, the paragon or the shared base served alone: `predict({"n", "label", "seed"})` -> images.

    Served under the invariant like the composite: before sampling, every CHECK_EVERY_SECONDS while sampling and
    again before answering, it asks the registry whether its own version was marked by a revocation (or deleted),
    and refuses (`NotServed`) from then on; its weights are dropped at the first refusal."""

    def load_context(self, context):
        from mlflow import MlflowClient
        from mlflow.models import Model

        meta_path = Path(context.artifacts["meta"])
        meta = json.loads(meta_path.read_text())
        logged = Model.load(str(model_dir_of(context)))
        self.watch, self.unet = VersionWatch(logged.run_id, getattr(logged, "model_id", None)), None
        self._refuse_if_revoked()  # before its weights are even read
        self.unet = load_compartment(MlflowClient(), meta_path.parent, meta.get("weights_sha256"),
                                     tmp_root_of(context)).eval()
        self.meta = meta

    def _refuse_if_revoked(self) -> None:
        why = self.watch.check()
        if why:
            self.unet = None  # never used again in this process
            raise NotServed(why)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> dict:
        from cdm.model import UNetDenoiser, model_config_of
        from cdm.pipeline import CDMPipeline
        from cdm.schedulers import NoiseSchedule, sampling_scheduler

        self._refuse_if_revoked()
        unet = self.unet
        cfg = model_config_of(unet)
        labels = _labels(int(_first(model_input, "n", 1)), _first(model_input, "label"), cfg.null_label)
        sched = sampling_scheduler(NoiseSchedule(), "ddpm")
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        pipe = CDMPipeline(UNetDenoiser(unet, cfg.null_label), sched, shape)
        seed = int(_first(model_input, "seed", 0))
        images = pipe(labels, 100, generator=torch.Generator().manual_seed(seed),
                      callback_on_step_end=self._watch_during())
        self._refuse_if_revoked()  # a revocation accepted while it sampled: these images are not returned
        return {"images": images.numpy()}

    def _watch_during(self):
        import time

        last = [time.monotonic()]

        def check(step: int, t: int) -> None:
            if time.monotonic() - last[0] >= CHECK_EVERY_SECONDS:
                last[0] = time.monotonic()
                self._refuse_if_revoked()

        return check


REQUEST_ATTEMPTS = 3
# How often a request that is sampling asks the registry whether a revocation arrived (one call, ~10 ms): a
# trajectory that uses a shard revoked meanwhile is abandoned at once rather than finished and thrown away.
CHECK_EVERY_SECONDS = 0.25



class CompositeModel(PythonModel):
    """The composite: `predict({"n", "label", "allowed_owners", "estimator", "seed"})`.

    Returns {"images": [n, C, H, W] in [-1, 1], "attribution": [{owner_key: weight}], "shards": [ids used]}.
    Component shards are fetched from the registry (the caller's MLflow tracking URI) and hash-checked when a
    request first uses them (`LazyShard`), then kept for the next requests. Each step evaluates the shards it needs
    in one grouped call when their groups are small, one call per shard otherwise (`auto`; see `CompositeDenoiser`).
    """

    def load_context(self, context):
        from functools import partial

        from cdm.compose import Router
        from cdm.safetensors_io import load_tree

        self.spec = json.loads(Path(context.artifacts["spec"]).read_text())
        null_label = self.spec["model_config"]["num_classes"]
        self.watch, self._dropped = RevocationWatch(self.spec["shards"]), set()
        self._lock = threading.Lock()  # requests run on several threads (MLflow's scoring server): one drops at a time
        tmp_root = tmp_root_of(context)
        self.shards = ShardSet([LazyShard(partial(_fetch_shard, shard, tmp_root), null_label)
                                for shard in self.spec["shards"]])
        self.router = None
        if "router" in context.artifacts and Path(context.artifacts["router"]).exists():
            state = load_tree(context.artifacts["router"])
            self.router = Router(**state["config"])
            self.router.load_state_dict(state["weights"])
            self.router.eval()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> dict:
        try:
            return self._predict(model_input)
        except NotServed:
            raise
        except PermissionError as e:  # a refusal a scoring server's client must be able to read
            raise NotServed(str(e)) from None

    def _predict(self, model_input) -> dict:
        n = int(_first(model_input, "n", 1))
        labels = _labels(n, _first(model_input, "label"), self.spec["model_config"]["num_classes"])
        allowed = _first(model_input, "allowed_owners")
        seed = int(_first(model_input, "seed", 0))
        # A revocation accepted while a request samples is honoured by that request too: it is sampled again
        # without the shards it took out (REQUEST_ATTEMPTS times at most, then refused).
        for _ in range(REQUEST_ATTEMPTS):
            revoked = self._revoked()
            router = self.router  # read once: a concurrent request may drop it
            estimator = _first(model_input, "estimator") or self.spec["estimator"]
            if estimator == "router" and router is None and revoked:
                estimator = "prior"  # the router saw the revoked shards' data: training-free until recomposed
            comp, sampler, subset = build_composite(self.spec, self.shards, router,
                                                    list(allowed) if allowed is not None else None,
                                                    estimator, seed, evaluation="auto", revoked=revoked)
            held = {y for i in subset for y, count in enumerate(self.spec["shards"][i]["class_counts"]) if count}
            if labels[0] < self.spec["model_config"]["num_classes"] and int(labels[0]) not in held:
                raise PermissionError(f"no shard this request may use holds label {int(labels[0])}")

            def stale(now: set[int], subset=subset, estimator=estimator, revoked=revoked) -> bool:
                """Whether a revocation reached this trajectory: one of its shards (a router weighs them all)."""
                return now != revoked if estimator == "router" else bool(now & set(subset))

            try:
                out = sample_composite(comp, sampler, self.spec, labels, seed,
                                       callback_on_step_end=self._watch_during(stale))
            except ShardRevoked:  # seen during sampling, here or by a concurrent request that dropped the shard
                continue
            if not stale(self._revoked()):  # nothing it used was revoked while it sampled
                return {"images": out["images"].numpy(), "attribution": out["attribution"],
                        "shards": [self.spec["shards"][i]["id"] for i in subset]}
        raise PermissionError("revocations kept arriving while this request sampled; ask again")

    def _watch_during(self, stale):
        """A step callback that asks the registry every CHECK_EVERY_SECONDS and abandons the trajectory once a
        revocation reaches it (`stale`)."""
        import time

        last = [time.monotonic()]

        def check(step: int, t: int) -> None:
            if time.monotonic() - last[0] < CHECK_EVERY_SECONDS:
                return
            last[0] = time.monotonic()
            if stale(self._revoked()):
                raise ShardRevoked("a shard this request used was revoked while it sampled")

        return check

    def _revoked(self) -> set[int]:
        with self._lock:
            revoked = self.watch.check()
            if revoked:
                self.router = None  # trained on every component's data, the revoked ones' too
            self.shards.drop(revoked - self._dropped)
            self._dropped = revoked | self._dropped
            return revoked

    @property
    def unets(self) -> list:
        """Every component UNet (loads those not loaded yet): for evaluation, which uses them all. Refused while a
        component is revoked: its weights are not used again, for samples or for figures."""
        self.require_unrevoked()
        return [s.denoiser().unet for s in self.shards]

    def require_unrevoked(self) -> None:
        """Refuse (ShardRevoked) while a component is revoked; an evaluation asks again before it reports."""
        revoked = self._revoked()
        if revoked:
            raise ShardRevoked(f"{len(revoked)} component(s) of this composite were revoked; production moves to a "
                               "composite without them once the revocation goes live (`cdm status`)")
