"""Training on a text base: latents encoded once, the base's own pretraining, a compartment's fine-tune.

    latents    x [N, 3, H, W] -> VAE mean * scaling_factor -> [N, 4, h, w]   (once per image; cached by the caller)
    captions   tokenizer + text encoder -> last hidden states [N, L, D]       (the UNet cross-attends to them)
    pretrain   public captions only: the VAE (reconstruction + a small KL), then UNet and text encoder together
    fine-tune  an owner's latents and captions: a LoRA adapter on the frozen UNet (diffusers'
               `train_text_to_image_lora.py` recipe) or every UNet weight; the VAE and text encoder stay frozen

Captions are dropped (replaced by the empty prompt) with probability `caption_dropout`, so every model also learns
p(x) and classifier-free guidance has an unconditional branch to push away from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from cdm.adapters import AdapterConfig, adapter_state, attach, trainable

# The attention and resnet projections of a UNet2DConditionModel (what diffusers' text-to-image LoRA script targets,
# plus the residual convolutions): a UNet2DConditionModel has no class embedding to adapt.
TEXT_ADAPTER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")


def text_adapter(rank: int = 8) -> AdapterConfig:
    return AdapterConfig(rank=rank, alpha=rank, targets=TEXT_ADAPTER_TARGETS)


@dataclass
class TextTrainConfig:
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3  # LoRA's rate; a full fine-tune of every UNet weight wants about a tenth of it
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    caption_dropout: float = 0.1  # P(caption -> ""): the unconditional branch of classifier-free guidance
    seed: int = 0
    # A LoRA adapter on the frozen base UNet (the default); None fine-tunes every UNet weight.
    adapter: AdapterConfig | None = field(default_factory=text_adapter)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # bf16 on a GPU (accelerate)
    # The stopping rule, with a validation split (`train_unet(..., val=...)`): the held-out loss is scored at step 0
    # (the base itself) and every `eval_every` steps under the same noise; training stops after `patience` scores
    # without a gain of `min_delta` (relative), or at `steps` (flagged), and the best scored weights are kept —
    # so a compartment never ends worse on held-out data than the base it started from.
    eval_every: int = 50
    patience: int = 3
    min_delta: float = 0.002


@dataclass
class TextTrainResult:
    unet: torch.nn.Module  # the base with the adapter merged in (LoRA), or the fine-tuned UNet
    losses: list[float]
    seconds: float
    adapter: dict[str, torch.Tensor] | None = None  # the adapter's weights alone: what a compartment registers
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss), step 0 first
    best_step: int | None = None  # the step whose weights were kept (0: the base itself); None without `val`
    stopped: Literal["plateau", "cap", "steps"] = "steps"  # cap: the rule had not fired when `steps` ran out


@torch.no_grad()
def heldout_loss(model, latents: torch.Tensor, cond: torch.Tensor, scheduler, seed: int = 0,
                 batch_size: int = 64, draws: int = 4) -> float:
    """Mean denoising loss on held-out (latents [M, C, h, w], caption states [M, L, D]) under noise and timesteps
    fixed by `seed` (the same at every evaluation: differences between scores are the model's, not the draw's)."""
    g = torch.Generator().manual_seed(seed)
    n_train = scheduler.config.num_train_timesteps
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for _ in range(draws):
        for i in range(0, len(latents), batch_size):
            z0, c = latents[i:i + batch_size], cond[i:i + batch_size]
            t = torch.randint(0, n_train, (len(z0),), generator=g)
            eps = torch.randn(z0.shape, generator=g)
            pred = model(scheduler.add_noise(z0, eps, t).to(dev), t.to(dev), encoder_hidden_states=c.to(dev)).sample
            total += float(F.mse_loss(pred.float(), eps.to(dev), reduction="sum"))
            count += eps.numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> latents [N, C, h, w]: the posterior's mean (deterministic, so a cached
    latent is the image's one latent), scaled by the VAE's `scaling_factor`."""
    vae = vae.eval()
    out = [vae.encode(x[i:i + batch_size]).latent_dist.mean for i in range(0, len(x), batch_size)]
    return torch.cat(out) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Latents -> images [N, 3, H, W] clamped to [-1, 1]."""
    out = [vae.decode(z[i:i + batch_size] / vae.config.scaling_factor).sample for i in range(0, len(z), batch_size)]
    return torch.cat(out).clamp(-1, 1)


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids [N, L], padded (and truncated) to the tokenizer's model_max_length, as Stable Diffusion does."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_captions(tokenizer, text_encoder, captions: Sequence[str], batch_size: int = 256,
                    grad: bool = False) -> torch.Tensor:
    """Captions -> the text encoder's last hidden states [N, L, D] (what the UNet cross-attends to)."""
    ids = tokenize(tokenizer, captions)
    with torch.set_grad_enabled(grad):
        out = [text_encoder(ids[i:i + batch_size])[0] for i in range(0, len(ids), batch_size)]
    return torch.cat(out)


def _accelerator(mixed_precision: str):
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision if torch.cuda.is_available() else "no", cpu=not
                       torch.cuda.is_available())


def train_unet(unet, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, scheduler,
               cfg: TextTrainConfig, progress: bool = False, desc: str = "fine-tune",
               val: tuple[torch.Tensor, torch.Tensor] | None = None) -> TextTrainResult:
    """Fine-tune `unet` (consumed) on (latents [N, C, h, w], caption states [N, L, D]); `uncond` [1, L, D] is the
    empty prompt's states. With `cfg.adapter` only the adapter trains and the result's `unet` has it merged. With
    `val` (held-out latents and caption states) the stopping rule of `TextTrainConfig` applies."""
    import copy

    from tqdm.auto import tqdm

    t0 = time.time()
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):  # the adapter's initial weights from the seed; the caller's RNG alone
        torch.manual_seed(cfg.seed)
        model = attach(unet, cfg.adapter) if cfg.adapter is not None else unet
    model.train()
    acc = _accelerator(cfg.mixed_precision)
    opt = torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, opt = acc.prepare(model, opt)
    n_train = scheduler.config.num_train_timesteps
    losses, scores = [], []
    best: tuple[float, int, dict] | None = None  # (held-out loss, step, trainable weights)
    stopped = "steps"

    def snapshot() -> dict:
        return {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()
                if cfg.adapter is None or "lora_" in k}

    def score(step: int) -> bool:
        """Score the held-out loss at `step`; True when the rule says stop."""
        nonlocal best
        loss = heldout_loss(model, *val, scheduler, seed=cfg.seed + 7919)
        scores.append((step, loss))
        if best is None or loss < best[0] * (1 - cfg.min_delta):
            best = (loss, step, snapshot())
        return step - best[1] >= cfg.patience * cfg.eval_every

    if val is not None:
        score(0)
    for step in tqdm(range(1, cfg.steps + 1), desc=desc, disable=not progress, leave=False):
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=g)
        z0, c = latents[idx], cond[idx]
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout  # [B]
        c = torch.where(drop[:, None, None], uncond.expand_as(c), c)
        t = torch.randint(0, n_train, (cfg.batch_size,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        zt = scheduler.add_noise(z0, eps, t)
        dev = acc.device
        with acc.autocast():
            pred = model(zt.to(dev), t.to(dev), encoder_hidden_states=c.to(dev)).sample
            loss = F.mse_loss(pred.float(), eps.to(dev))
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(trainable(model), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if val is not None and step % cfg.eval_every == 0 and score(step):
            stopped = "plateau"
            break
    else:
        if val is not None:  # the steps ran out before the rule fired
            if scores[-1][0] != cfg.steps:
                score(cfg.steps)
            stopped = "cap"
    model = acc.unwrap_model(model).to("cpu").eval()
    if best is not None:  # the best scored weights (step 0: the adapter at its start, the base itself)
        loaded = model.load_state_dict(copy.deepcopy(best[2]), strict=False)
        if loaded.unexpected_keys or set(best[2]) & set(loaded.missing_keys):
            raise RuntimeError("the best weights do not fit the model they were taken from")
    extra = {"val_losses": scores, "best_step": best[1] if best else None, "stopped": stopped}
    if cfg.adapter is None:
        return TextTrainResult(model.requires_grad_(False), losses, time.time() - t0, **extra)
    state = adapter_state(model)
    return TextTrainResult(model.merge_and_unload().eval().requires_grad_(False), losses, time.time() - t0, state,
                           **extra)


@dataclass
class PretrainConfig:
    """The small base `cdm pretrain` trains on public captions (teams without a base of their own)."""

    vae_steps: int = 600
    vae_lr: float = 2e-3
    vae_kl: float = 1e-5  # a nearly deterministic autoencoder: latents carry the image, the KL only keeps them finite
    unet_steps: int = 1500
    lr: float = 1e-3
    batch_size: int = 32
    caption_dropout: float = 0.1
    seed: int = 0


def train_vae(vae, x: torch.Tensor, cfg: PretrainConfig, progress: bool = False) -> list[float]:
    """Reconstruction (MSE) plus a small KL on the public images; then `scaling_factor` set so the latents have
    unit variance (as Stable Diffusion's 0.18215 does for its VAE)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    vae.train()
    losses = []
    for _ in tqdm(range(cfg.vae_steps), desc="base VAE", disable=not progress, leave=False):
        batch = x[torch.randint(0, len(x), (cfg.batch_size,), generator=g)]
        posterior = vae.encode(batch).latent_dist
        rec = vae.decode(posterior.sample(generator=None)).sample
        loss = F.mse_loss(rec, batch) + cfg.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    vae.eval()
    vae.register_to_config(scaling_factor=1.0)
    z = encode_latents(vae, x[:512])
    vae.register_to_config(scaling_factor=float(1.0 / z.std().clamp(min=1e-3)))
    return losses


def pretrain_base(parts: dict, x: torch.Tensor, captions: Sequence[str], cfg: PretrainConfig,
                  progress: bool = False) -> dict:
    """Train a freshly built base (`cdm.text.base.build_base`) on public images and captions, in place: the VAE
    first, then the UNet and the text encoder together. Returns {vae_losses, unet_losses, seconds}."""
    from tqdm.auto import tqdm

    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vae_losses = train_vae(parts["vae"], x, cfg, progress)
    latents = encode_latents(parts["vae"], x)
    unet, text_encoder, tokenizer, scheduler = (parts[k] for k in ("unet", "text_encoder", "tokenizer",
                                                                   "scheduler"))
    ids, empty = tokenize(tokenizer, captions), tokenize(tokenizer, [""])
    g = torch.Generator().manual_seed(cfg.seed + 1)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    unet.train()
    text_encoder.train()
    losses = []
    for _ in tqdm(range(cfg.unet_steps), desc="base UNet", disable=not progress, leave=False):
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        tokens = torch.where(drop[:, None], empty.expand(cfg.batch_size, -1), ids[idx])
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        eps = torch.randn(latents[idx].shape, generator=g)
        pred = unet(scheduler.add_noise(latents[idx], eps, t), t, encoder_hidden_states=text_encoder(tokens)[0]).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    for m in (unet, text_encoder, parts["vae"]):
        m.eval().requires_grad_(False)
    return {"vae_losses": vae_losses, "unet_losses": losses, "seconds": time.time() - t0}
