"""MLflow pyfunc models of a text workspace, served by prompt under the same invariant as the class ones
(docs/design.md §5): the base or one compartment alone (`TextModel`), and the composite (`TextCompositeModel`).

    request   {"prompt", "n" | "prompts" (one image each), "negative_prompt", "guidance_scale", "num_inference_steps", "seed",
               "allowed_owners", "estimator"}
    answer    {"images": [n, 3, H, W] in [-1, 1], "prompt"[, "attribution": [{owner key: weight}], "shards"]}

The composite's artifacts: `spec.json` (its compartments by registry URI and weights hash, their owners' keys and
sample counts, the base version and hash) and `prior.safetensors` (p(i | c)). Compartments are fetched and checked
when a request first uses one, merged into a copy of the base UNet, and kept; the revocation watch, the retries and
the refusals are `CompositeModel`'s.
"""

from __future__ import annotations

import copy
import json
import threading
from functools import partial
from pathlib import Path

import torch
from mlflow.pyfunc import PythonModel

from cdm.platform.models.serving import (REQUEST_ATTEMPTS, CompositeModel, LazyShard, NotServed, ShardModel, ShardRevoked,
                                         ShardSet, VersionWatch, _first, model_dir_of, tmp_root_of)


def _request(model_input, default_steps: int, default_guidance: float) -> dict:
    """The prompt request's fields, checked (ValueError names the field)."""
    prompts = _first(model_input, "prompts")
    if prompts is not None:  # one image per prompt (an evaluation's batch)
        prompts = [str(p) for p in prompts]
        if not 1 <= len(prompts) <= 10_000:
            raise ValueError(f"prompts must hold 1..10000 prompts, not {len(prompts)}")
    else:
        prompt = _first(model_input, "prompt", "")
        if not isinstance(prompt, str):
            raise ValueError("prompt must be a string")
        n = int(_first(model_input, "n", 1))
        if not 1 <= n <= 10_000:
            raise ValueError(f"n must be 1..10000, not {n}")
        prompts = [prompt] * n
    steps = int(_first(model_input, "num_inference_steps", default_steps))
    if not 2 <= steps <= 1000:
        raise ValueError(f"num_inference_steps must be 2..1000, not {steps}")
    guidance = float(_first(model_input, "guidance_scale", default_guidance))
    if not 0 <= guidance <= 50:
        raise ValueError(f"guidance_scale must be 0..50, not {guidance}")
    negative = _first(model_input, "negative_prompt")
    return {"prompts": prompts, "prompt": prompts[0] if len(set(prompts)) == 1 else prompts,
            "num_inference_steps": steps, "guidance_scale": guidance,
            "negative_prompt": None if negative is None else str(negative),
            "seed": int(_first(model_input, "seed", 0))}


def _pipeline(parts: dict, composite, scheduler, prior, latent_shape):
    from cdm.text.pipeline import TextCompositePipeline

    return TextCompositePipeline(parts["vae"], parts["tokenizer"], parts["text_encoder"], composite, scheduler,
                                 prior, latent_shape)


class TextModel(PythonModel):
    """The base, one compartment or the paragon of a text workspace served alone, by prompt.

    Artifacts: the base's own pipeline folder and `meta.json` (each component's sha256, checked before anything
    is loaded), or a compartment's `adapter/` (or `unet/`) and `meta.json` naming the base version it adapts (fetched
    from the registry and checked). Refuses once a revocation marks its version or a purge deleted it."""

    def load_context(self, context):
        from mlflow import MlflowClient
        from mlflow.models import Model

        from cdm.platform.models.text_models import TextBase, load_base_folder, load_text_base, load_text_compartment
        from cdm.platform.models.text_models import pipeline_folder

        meta_path = Path(context.artifacts["meta"])
        meta = json.loads(meta_path.read_text())
        logged = Model.load(str(model_dir_of(context)))
        self.watch, self.base = VersionWatch(logged.run_id, getattr(logged, "model_id", None)), None
        self._refuse_if_revoked()  # before its weights are even read
        if "components" in meta:  # the base itself
            folder = pipeline_folder(meta_path.parent)
            from cdm.text.base import base_sha256

            self.base = TextBase(load_base_folder(folder, meta), "", base_sha256(folder))
        else:
            base = load_text_base(MlflowClient(), tmp_root_of(context), meta["base"]["version"])
            unet = load_text_compartment(meta_path.parent, meta.get("weights_sha256"), base)
            self.base = TextBase({**base.parts, "unet": unet}, base.version, base.sha256)

    def _refuse_if_revoked(self) -> None:
        why = self.watch.check()
        if why:
            self.base = None  # never used again in this process
            raise NotServed(why)

    def predict(self, context, model_input, params=None) -> dict:
        from cdm.text.compose import GuidedComposite
        from cdm.text.pipeline import UNetCompartment

        self._refuse_if_revoked()
        base = self.base
        r = _request(model_input, 50, 3.0)
        composite = GuidedComposite([UNetCompartment(base.parts["unet"])], "prior")
        pipe = _pipeline(base.parts, composite, copy.deepcopy(base.parts["scheduler"]), None, base.latent_shape)
        out = pipe(r["prompts"], negative_prompt=r["negative_prompt"], guidance_scale=r["guidance_scale"],
                   num_inference_steps=r["num_inference_steps"],
                   generator=torch.Generator().manual_seed(r["seed"]), callback_on_step_end=self._watch_during())
        self._refuse_if_revoked()  # a revocation accepted while it sampled: these images are not returned
        return {"images": out["images"].numpy(), "prompt": r["prompt"]}

    _watch_during = ShardModel._watch_during


class LazyTextShard(LazyShard):
    """A text compartment `(z_t, t, caption states) -> eps`, fetched, checked and merged on its first call."""

    def __init__(self, load):
        super().__init__(load, None)

    def denoiser(self):
        from cdm.text.pipeline import UNetCompartment

        if self._denoiser is None:
            self._denoiser = UNetCompartment(self._load())
        return self._denoiser


def _fetch_text_shard(shard: dict, base, tmp_root: Path | None):
    from mlflow import MlflowClient

    from cdm.platform.models.registry import model_files
    from cdm.platform.models.text_models import load_text_compartment

    with model_files(MlflowClient(), shard["model"], shard["version"], tmp_root) as files:
        return load_text_compartment(files, shard["weights_sha256"], base)


class TextCompositeModel(CompositeModel):
    """The composite of a text workspace, by prompt: compartments on one base, weighted by the prompt prior (and,
    for `path`, the trajectory), classifier-free guidance applied to the composite. Attribution is the conditional
    mixture's weights averaged over the trajectory, by owner key."""

    def load_context(self, context):
        from mlflow import MlflowClient

        from cdm.platform.models.serving import RevocationWatch
        from cdm.platform.models.text_models import load_prior, load_text_base

        self.spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.watch, self._dropped = RevocationWatch(self.spec["shards"]), set()
        self._lock = threading.Lock()
        tmp_root = tmp_root_of(context)
        self.router = None  # the class composite's; a text composite weighs by the prompt prior
        self.prior = load_prior(Path(context.artifacts["prior"]))
        self.base = load_text_base(MlflowClient(), tmp_root, self.spec["base"]["version"])
        if self.base.sha256 != self.spec["base"]["sha256"]:
            raise ValueError("the registered base differs from the one this composite was composed on")
        self.shards = ShardSet([LazyTextShard(partial(_fetch_text_shard, shard, self.base, tmp_root))
                                for shard in self.spec["shards"]])

    def _revoked(self) -> set[int]:
        """As `CompositeModel._revoked`, and the prompt prior is dropped at the first revocation: it was fitted on
        every component's owners' captions, the revoked ones' too (uniform weights until the composite that
        replaces this one is served)."""
        revoked = super()._revoked()
        if revoked:
            self.prior = None
        return revoked

    def _predict(self, model_input) -> dict:
        from cdm.attribution import attribute
        from cdm.text.compose import TEXT_ESTIMATORS, GuidedComposite

        r = _request(model_input, self.spec["num_inference_steps"], self.spec["guidance_scale"])
        allowed = _first(model_input, "allowed_owners")
        estimator = _first(model_input, "estimator") or self.spec["estimator"]
        if estimator not in TEXT_ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(TEXT_ESTIMATORS)}, not {estimator!r}")
        shards = self.spec["shards"]
        for _ in range(REQUEST_ATTEMPTS):
            revoked = self._revoked()
            subset = list(range(len(shards)))
            if allowed is not None:
                # A compartment is usable only if every owner in it is allowed.
                subset = [i for i in subset if set(shards[i]["owners"]) <= set(allowed)]
                if not subset:
                    raise PermissionError("no shard is composed solely of allowed owners")
            subset = [i for i in subset if i not in revoked]
            if not subset:
                raise PermissionError("every shard of this composite that the request may use was revoked")
            prior = self.prior  # read once: a concurrent request may drop it
            scheduler = copy.deepcopy(self.base.parts["scheduler"])
            composite = GuidedComposite(self.shards, estimator, scheduler=scheduler, subset=subset,
                                        generator=torch.Generator().manual_seed(r["seed"] + 1))
            pipe = _pipeline(self.base.parts, composite, scheduler, prior, self.base.latent_shape)

            def stale(now: set[int], subset=subset, prior=prior, revoked=revoked) -> bool:
                """A revocation reached this trajectory: one of its compartments, or the prior (fitted on all)."""
                return bool(now & set(subset)) or (prior is not None and now != revoked)

            try:
                out = pipe(r["prompts"], negative_prompt=r["negative_prompt"],
                           guidance_scale=r["guidance_scale"], num_inference_steps=r["num_inference_steps"],
                           generator=torch.Generator().manual_seed(r["seed"]),
                           callback_on_step_end=self._watch_during(stale))
            except ShardRevoked:
                continue
            if not stale(self._revoked()):  # nothing it used was revoked while it sampled
                return {"images": out["images"].numpy(), "prompt": r["prompt"],
                        "attribution": attribute(out["attribution"], [s["owners"] for s in shards]),
                        "shards": [shards[i]["id"] for i in subset], "evaluations": composite.evaluations}
        raise PermissionError("revocations kept arriving while this request sampled; ask again")
