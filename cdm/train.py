"""Training one shard with accelerate: seeded, reproducible, optional EMA, slice checkpoints.

Slices (SISA-style): a shard's samples are assigned to ordered slices by their content hash. Training visits the
slices in order; while on slice k it draws batches from slices 0..k and takes `steps // num_slices` optimizer
steps, then writes a checkpoint keyed by the hash of the slices so far (plus the configuration). Removing samples
that sit in slice k changes only the keys from k on, so retraining resumes from checkpoint k-1 and reproduces,
bit for bit on CPU, what training on the reduced data from scratch with the same seed gives.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from cdm.adapters import AdapterConfig, adapter_state, attach, trainable
from cdm.data import Dataset
from cdm.model import ModelConfig, build_unet
from cdm.safetensors_io import load_tree, save_tree, state_sha256
from cdm.schedulers import NoiseSchedule, train_scheduler


@dataclass
class TrainConfig:
    steps: int = 600  # total optimizer steps over all slices
    batch_size: int = 64
    lr: float = 2e-3  # tiny UNets on 8x8 images tolerate a high rate; lower it for `base`
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # Probability of replacing a label by the null label, so the shard also learns p(x) (unconditional sampling
    # and classifier-free guidance).
    label_dropout: float = 0.15
    # EMA of the weights (diffusers' EMAModel): the decay warms up as min(decay, (1+s)/(10+s)), s = updates - 1
    # (the first update copies the weights). None disables it.
    ema_decay: float | None = 0.995
    ema: str = "diffusers.EMAModel"  # which EMA (part of the config hash: checkpoints of another EMA never match)
    num_slices: int = 1
    seed: int = 0
    # sha256 (`state_sha256`) of the shared initialization every shard starts from: a UNet pretrained on public
    # data that belongs to no owner, so forgetting an owner never touches it. None: random initialization.
    init_sha256: str | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # A LoRA adapter on the frozen initialization instead of a full fine-tune (needs `init_sha256`); None: every
    # weight trains.
    adapter: AdapterConfig | None = None

    def config_hash(self, model: ModelConfig, schedule: NoiseSchedule) -> str:
        """Hash of everything that determines the weights besides the data."""
        train = asdict(self)
        if train["adapter"] is None:  # full fine-tunes keep the hashes (and checkpoints) they had before adapters
            del train["adapter"]
        blob = json.dumps({"train": train, "model": json.loads(model.to_json()), "schedule": asdict(schedule)},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class PlateauConfig:
    """Stop a model when its held-out denoising loss stops falling (docs/design.md §6): training on past that point
    buys no quality and is where a small shard starts to memorize. `TrainConfig.steps` stays the cap."""

    every: int = 100  # optimizer steps between two evaluations of the held-out loss
    patience: int = 3  # evaluations in a row without a relative improvement of `min_delta` before stopping
    min_delta: float = 0.01  # relative improvement over the loss at the last progress that counts as progress
    # (t, noise) draws per held-out image. They are drawn once, so every evaluation scores the same noisy images
    # and two evaluations differ only by the weights.
    draws: int = 8
    seed: int = 1234


@dataclass
class TrainResult:
    unet: torch.nn.Module  # EMA weights when EMA is on
    losses: list[float]  # one per optimizer step, including steps restored from checkpoints
    slice_keys: list[str]  # checkpoint key after each slice
    resumed_from_slice: int  # index of the last slice restored from a checkpoint, -1 when trained from scratch
    seconds: float
    steps_run: int  # optimizer steps actually run in this call
    # With a plateau rule: (step, held-out loss) at each evaluation, and the step whose weights were returned (the
    # best held-out loss); None without one.
    heldout_losses: list[tuple[int, float]] | None = None
    best_step: int | None = None
    # A LoRA compartment: the adapter's weights alone (what is registered); `unet` is the base with it merged.
    adapter: dict[str, torch.Tensor] | None = None
    # With a plateau rule: True when the run ended at the step cap before the rule fired (still improving, or not
    # yet stalled for `patience` evaluations): a model that was stopped by its budget, not by its data.
    capped: bool = False

    def smoothed_losses(self, alpha: float = 0.05) -> list[float]:
        """The training loss as logged: the per-step batch MSE, exponentially smoothed (weight `alpha` on the new
        step, bias-corrected), so that its last value is the loss the model ended with."""
        out, avg = [], 0.0
        for i, v in enumerate(self.losses):
            avg = (1 - alpha) * avg + alpha * v
            out.append(avg / (1 - (1 - alpha) ** (i + 1)))
        return out


def assign_slices(ids: list[str], num_slices: int) -> torch.Tensor:
    """Slice index per sample, from its content hash: stable when other samples are added or removed."""
    return torch.tensor([int(hashlib.sha256(i.encode()).hexdigest()[:8], 16) % num_slices for i in ids],
                        dtype=torch.long)


def slice_keys(ids: list[str], num_slices: int, config_hash: str, slice_of: torch.Tensor | None = None) -> list[str]:
    """Checkpoint key after each slice: hash of the config and of the sorted sample ids of slices 0..k."""
    slices = (assign_slices(ids, num_slices) if slice_of is None else slice_of).tolist()
    keys, h = [], hashlib.sha256(config_hash.encode())
    for k in range(num_slices):
        for sample_id in sorted(i for i, s in zip(ids, slices) if s == k):
            h.update(sample_id.encode())
        h.update(f"|slice{k}|".encode())
        keys.append(h.copy().hexdigest())
    return keys


def _slice_generator(seed: int, k: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:15], 16))
    return g


def _accelerator(mixed_precision: str):
    """An Accelerator for this precision. accelerate keeps one process-wide state and offers no public way to reset
    it, so a process trains with one precision (the flows use `train.mixed_precision` throughout); asking for
    another one is a clear error rather than a silent reset."""
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    except ValueError as e:
        raise ValueError(f"this process already trains with another mixed precision than {mixed_precision!r}; "
                         "run each precision in its own process") from e


def train_shard(
    data: Dataset,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    schedule: NoiseSchedule | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    desc: str = "shard",
    slice_of: torch.Tensor | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
    validation: Dataset | None = None,
    plateau: PlateauConfig | None = None,
) -> TrainResult:
    """Train one shard's UNet on `data`.

    Args:
        data: the shard's samples (x in [-1, 1], labels, content ids).
        model_cfg: the UNet architecture.
        cfg: optimisation settings (steps, slices, seed, EMA, mixed precision).
        schedule: the forward noising process shared by all shards.
        checkpoint_dir: where slice checkpoints are read and written; None disables them.
        progress: show a tqdm progress bar.
        desc: label of the progress bar.
        slice_of: [N] slice of each sample (e.g. by owner, in ingestion order, for shared shards); default: by
            content hash.
        init_state: the shared initialization (a UNet state dict); its `state_sha256` must equal
            `cfg.init_sha256`, which the checkpoint keys and the config hash cover.
        validation: held-out samples from the shard's own distribution (never trained on), for `plateau`.
        plateau: stop once the held-out denoising loss has not improved for `plateau.patience` evaluations and
            return the weights of the best evaluation; `cfg.steps` is the cap. One slice, no checkpoints.
    Returns:
        The trained UNet (on CPU, EMA weights if enabled), the loss history and the slice keys.
    """
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    if len(data) == 0:
        raise ValueError("cannot train a shard on no data")
    if (init_state is None) != (cfg.init_sha256 is None):
        raise ValueError("init_state and cfg.init_sha256 go together: give both or neither")
    if cfg.adapter is not None and init_state is None:
        raise ValueError("a LoRA adapter trains on a shared initialization: give init_state and cfg.init_sha256")
    if init_state is not None and state_sha256(init_state) != cfg.init_sha256:
        raise ValueError(f"init_state hash {state_sha256(init_state)[:12]} != cfg.init_sha256 {cfg.init_sha256[:12]}")
    if plateau is not None and (validation is None or len(validation) == 0):
        raise ValueError("plateau stopping needs held-out validation samples")
    if plateau is not None and (cfg.num_slices != 1 or checkpoint_dir is not None):
        raise ValueError("plateau stopping trains one slice without checkpoints (its stopping step is not in the keys)")
    schedule = schedule or NoiseSchedule()
    noise = train_scheduler(schedule)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
    slices = assign_slices(data.ids, cfg.num_slices) if slice_of is None else torch.as_tensor(slice_of)
    if len(slices) != len(data) or int(slices.min()) < 0 or int(slices.max()) >= cfg.num_slices:
        raise ValueError(f"slice_of must give each of the {len(data)} samples a slice in [0, {cfg.num_slices})")
    keys = slice_keys(data.ids, cfg.num_slices, cfg.config_hash(model_cfg, schedule), slices)
    steps_per_slice = [cfg.steps // cfg.num_slices + (1 if k < cfg.steps % cfg.num_slices else 0)
                       for k in range(cfg.num_slices)]

    # Canonical order: by slice, then by id, so that batch indices mean the same samples on every run.
    order = sorted(range(len(data)), key=lambda i: (int(slices[i]), data.ids[i]))
    data = data.subset(order)
    slices = slices[order]
    ends = [int((slices <= k).sum()) for k in range(cfg.num_slices)]  # samples in slices 0..k = data[:ends[k]]

    accelerator = _accelerator(cfg.mixed_precision)
    unet = build_unet(model_cfg, seed=cfg.seed)  # its own generator: shards trained on threads do not race
    if init_state is not None:
        unet.load_state_dict(init_state)
    if cfg.adapter is not None:
        with torch.random.fork_rng(devices=[]):  # the adapter's initial A from the seed, the caller's RNG untouched
            torch.manual_seed(cfg.seed)
            unet = attach(unet, cfg.adapter)  # the base frozen; only the adapter's weights train
    optimizer = torch.optim.AdamW(trainable(unet), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    ema_state = None

    # 1. Resume from the last slice whose checkpoint exists (its key covers config and data of slices 0..k).
    resumed = -1
    if ckpt_dir is not None:
        for stale in ckpt_dir.glob("*.tmp"):  # half-written by a killed run (checkpoints are written atomically)
            stale.unlink()
        for k in reversed(range(cfg.num_slices)):
            path = ckpt_dir / f"{keys[k]}.safetensors"
            if path.is_file():
                state = load_tree(path)
                unet.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                ema_state = state.get("ema")
                losses = list(state["losses"])
                resumed = k
                break

    unet, optimizer = accelerator.prepare(unet, optimizer)
    device = accelerator.device
    ema = EMAModel(trainable(accelerator.unwrap_model(unet)), decay=cfg.ema_decay) if cfg.ema_decay else None
    if ema is not None and ema_state is not None:
        ema.load_state_dict(ema_state)
    if ema is not None:
        ema.to(device)
    x_all, y_all = data.x.to(device), data.y.to(device)
    rank, world = accelerator.process_index, accelerator.num_processes
    judge = _HeldoutJudge(validation, plateau, schedule, device) if plateau is not None else None
    started, steps_run, fired = time.perf_counter(), 0, False
    bar = tqdm(total=cfg.steps, initial=sum(steps_per_slice[: resumed + 1]), desc=desc, disable=not progress,
               leave=False)
    unet.train()
    if judge is not None:  # step 0 is scored too: the starting weights (a shared base) may be the best there is
        judge.stalled(accelerator.unwrap_model(unet), ema, 0)
    for k in range(resumed + 1, cfg.num_slices):
        g = _slice_generator(cfg.seed, k)
        n_avail = ends[k]
        for _ in range(steps_per_slice[k]):
            # 2. Draw a batch from slices 0..k, timesteps, noise and the label-dropout mask (CPU generator).
            idx = torch.randint(0, n_avail, (cfg.batch_size,), generator=g)
            t = torch.randint(0, schedule.num_train_timesteps, (cfg.batch_size,), generator=g)
            eps = torch.randn((cfg.batch_size, *data.x.shape[1:]), generator=g)
            drop = torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout
            # Each process takes its share of the batch (multi-GPU); one process takes all of it.
            idx, t, eps, drop = (v[rank::world].to(device) for v in (idx, t, eps, drop))
            x0, y = x_all[idx], y_all[idx]
            y = torch.where(drop, torch.full_like(y, model_cfg.null_label), y)
            # 3. Noise and predict.
            x_t = noise.add_noise(x0, eps, t)
            with accelerator.autocast():
                pred = unet(x_t, t, class_labels=y).sample
            loss = F.mse_loss(pred.float(), eps)
            # 4. Optimise.
            accelerator.backward(loss)
            if cfg.grad_clip:
                accelerator.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(trainable(accelerator.unwrap_model(unet)))
            losses.append(float(loss.detach()))
            steps_run += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            # 5. With a plateau rule: score the held-out loss every `plateau.every` steps; stop when it has stalled.
            if (judge is not None and steps_run % plateau.every == 0
                    and judge.stalled(accelerator.unwrap_model(unet), ema, steps_run)):
                fired = True
                break
        # 6. Checkpoint after the slice.
        if ckpt_dir is not None and accelerator.is_main_process:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {"model": accelerator.unwrap_model(unet).state_dict(), "optimizer": optimizer.state_dict(),
                     "losses": losses}
            if ema is not None:
                state["ema"] = ema.state_dict()
            save_tree(state, ckpt_dir / f"{keys[k]}.safetensors")
    bar.close()

    model = accelerator.unwrap_model(unet)
    if judge is not None:
        judge.stalled(model, ema, steps_run)  # the last steps count too (scored on the device, before the move)
    final = model.to("cpu").float()
    if judge is not None:
        final.load_state_dict(judge.best_state)
    elif ema is not None:
        ema.copy_to(trainable(final))
    adapter = None
    if cfg.adapter is not None:
        adapter = adapter_state(final)
        final = final.merge_and_unload()  # a plain UNet: base + the adapter's update
    final.eval()
    return TrainResult(final, losses, keys, resumed, time.perf_counter() - started, steps_run,
                       judge.history if judge else None, judge.best_step if judge else None, adapter,
                       capped=judge is not None and not fired)


class _HeldoutJudge:
    """The plateau rule's bookkeeping: fixed (t, noise) draws on the held-out images, the loss history and the
    best weights seen (EMA weights when EMA is on: those are the ones a shard ships)."""

    def __init__(self, validation: Dataset, rule: PlateauConfig, schedule: NoiseSchedule, device: torch.device):
        g = torch.Generator().manual_seed(rule.seed)
        n = len(validation) * rule.draws
        self.x0 = validation.x.repeat(rule.draws, 1, 1, 1).to(device)  # [n, C, H, W]
        self.y = validation.y.repeat(rule.draws).to(device)  # [n]
        self.t = torch.randint(0, schedule.num_train_timesteps, (n,), generator=g).to(device)
        self.eps = torch.randn(self.x0.shape, generator=g).to(device)
        self.noise, self.rule = train_scheduler(schedule), rule
        self.history: list[tuple[int, float]] = []
        self.best, self.best_step, self.best_state = float("inf"), 0, None  # the weights returned
        self.mark, self.waited = float("inf"), 0  # the loss at the last real progress, evaluations since

    def loss(self, unet: torch.nn.Module) -> float:
        x_t = self.noise.add_noise(self.x0, self.eps, self.t)
        unet.eval()
        with torch.no_grad():
            pred = torch.cat([unet(x_t[i:i + 1024], self.t[i:i + 1024], class_labels=self.y[i:i + 1024]).sample
                              for i in range(0, len(x_t), 1024)])
        unet.train()
        return float(F.mse_loss(pred.float(), self.eps))

    def stalled(self, unet: torch.nn.Module, ema, step: int) -> bool:
        if self.history and self.history[-1][0] == step:
            return True
        params = trainable(unet)
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        value = self.loss(unet)
        self.history.append((step, value))
        if value < self.best:
            self.best, self.best_step = value, step
            self.best_state = {k: v.detach().to("cpu", copy=True).float() for k, v in unet.state_dict().items()}
        if value < self.mark * (1 - self.rule.min_delta):
            self.mark, self.waited = value, 0
        else:
            self.waited += 1
        if ema is not None:
            ema.restore(params)
        return self.waited >= self.rule.patience
