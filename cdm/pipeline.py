"""The sampling pipeline: one `__call__`, the denoising loop written out.

It drives any `Denoiser` — one shard, the paragon or a `CompositeDenoiser` — with a diffusers scheduler.
"""

from __future__ import annotations

from typing import Callable

import torch

from cdm.model import Denoiser


class CDMPipeline:
    """Sample images from a denoiser.

    Args:
        denoiser: `(x_t, t, labels) -> eps`; if it has `reset()`, it is called at the start of each trajectory.
        scheduler: a diffusers DDPMScheduler or DDIMScheduler (the same object a path-weighted composite uses).
        image_shape: (C, H, W).
    """

    def __init__(self, denoiser: Denoiser, scheduler, image_shape: tuple[int, int, int]):
        self.denoiser, self.scheduler, self.image_shape = denoiser, scheduler, tuple(image_shape)

    def check(self, eta: float) -> None:
        """A composite that scores transitions must see the very steps this pipeline takes."""
        from diffusers import DDIMScheduler

        if getattr(self.denoiser, "estimator", None) != "path":
            return
        if self.denoiser.scheduler is not self.scheduler:
            raise ValueError("the path-weighted composite and the pipeline must share one scheduler object")
        if isinstance(self.scheduler, DDIMScheduler) and self.denoiser.eta != eta:
            raise ValueError(f"the composite scores DDIM steps with eta={self.denoiser.eta} but the pipeline "
                             f"samples with eta={eta}")

    @torch.no_grad()
    def __call__(
        self,
        labels: torch.Tensor,
        num_inference_steps: int = 100,
        eta: float = 1.0,
        generator: torch.Generator | None = None,
        progress: bool = False,
        device: torch.device | str = "cpu",
        clip: bool = True,
        callback_on_step_end: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Draw one sample per label (use the null label for unconditional samples). `callback_on_step_end(i, t)`
        runs after each step (as in diffusers' pipelines); raising from it abandons the trajectory.

        Returns:
            [B, C, H, W] images, clamped to [-1, 1] unless `clip` is False.
        """
        from diffusers import DDIMScheduler
        from tqdm.auto import tqdm

        self.check(eta)
        labels = labels.to(device)
        # 1. New trajectory: stateful denoisers (path weights, attribution trace) start afresh.
        if hasattr(self.denoiser, "reset"):
            self.denoiser.reset()
        # 2. Timesteps of the reverse process.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # 3. Start from pure noise.
        x = torch.randn((len(labels), *self.image_shape), generator=generator).to(device)
        step_kwargs = {"eta": eta} if isinstance(self.scheduler, DDIMScheduler) else {}
        for i, t in enumerate(tqdm(self.scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
            t_batch = torch.full((len(labels),), int(t), dtype=torch.long, device=device)
            # 4. Predict the noise.
            eps = self.denoiser(x, t_batch, labels)
            # 5. Step to x_{t-1} (adds sigma_t z for DDPM and DDIM with eta > 0).
            x = self.scheduler.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(i, int(t))
        # 6. Images in [-1, 1].
        return x.clamp(-1, 1) if clip else x
