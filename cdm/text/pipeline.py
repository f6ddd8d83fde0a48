"""`TextCompositePipeline`: prompts in; images and per-compartment attribution out. One `__call__`, the denoising
loop written out as in diffusers' `StableDiffusionPipeline`, with the composite (`cdm.text.compose.GuidedComposite`)
in the UNet's place. A paragon or the base alone is a composite of one compartment.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from cdm.text.compose import GuidedComposite, PromptPrior, pooled
from cdm.text.train import decode_latents, encode_captions, tokenize


class TextCompositePipeline:
    """Args:
        vae, tokenizer, text_encoder: the base's (shared by every compartment).
        composite: the compartments, composed and guided.
        scheduler: the sampling scheduler (the object a `path` composite scores).
        prior: p(i | c); None for a single model (the paragon, the base).
        latent_shape: (C, h, w) of the base's latents.
    """

    def __init__(self, vae, tokenizer, text_encoder, composite: GuidedComposite, scheduler,
                 prior: PromptPrior | None, latent_shape: tuple[int, int, int]):
        self.vae, self.tokenizer, self.text_encoder = vae, tokenizer, text_encoder
        self.composite, self.scheduler, self.prior = composite, scheduler, prior
        self.latent_shape = tuple(latent_shape)

    def log_priors(self, prompts: Sequence[str], states: torch.Tensor) -> torch.Tensor:
        """log lambda(c) [B, N] for prompts whose caption states are `states`."""
        n = self.composite.n
        if self.prior is None:
            return torch.zeros(len(prompts), n)
        ids = tokenize(self.tokenizer, prompts)
        features = pooled(states, ids, self.tokenizer.eos_token_id)
        empty = torch.tensor([not p.strip() for p in prompts])
        return self.prior(features, empty)

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        negative_prompt: str | None = None,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 50,
        eta: float = 1.0,
        generator: torch.Generator | None = None,
        progress: bool = False,
        callback_on_step_end: Callable[[int, int], None] | None = None,
    ) -> dict:
        """One image per prompt. Returns {"images": [B, 3, H, W] in [-1, 1], "attribution": [B, N] (the conditional
        mixture's weights averaged over the trajectory)}. `callback_on_step_end(i, t)` runs after each step;
        raising from it abandons the trajectory."""
        from diffusers import DDIMScheduler
        from tqdm.auto import tqdm

        prompts = list(prompts)
        b = len(prompts)
        # 1. Caption states of the prompts and of the negative (or empty) prompt.
        cond = encode_captions(self.tokenizer, self.text_encoder, prompts)
        negative = [negative_prompt or ""] * b
        uncond = encode_captions(self.tokenizer, self.text_encoder, negative[:1]).expand(b, -1, -1)
        # 2. The compartments' priors for both branches; a new trajectory.
        self.composite.guidance_scale = float(guidance_scale)
        self.composite.start(self.log_priors(prompts, cond), self.log_priors(negative, uncond))
        # 3. Timesteps, and pure noise in latent space.
        self.scheduler.set_timesteps(num_inference_steps)
        z = torch.randn((b, *self.latent_shape), generator=generator)
        step_kwargs = {"eta": eta} if isinstance(self.scheduler, DDIMScheduler) else {}
        for i, t in enumerate(tqdm(self.scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
            t_batch = torch.full((b,), int(t), dtype=torch.long)
            # 4. The guided composite's noise prediction.
            eps = self.composite(z, t_batch, cond, uncond)
            # 5. Step to z_{t-1}.
            z = self.scheduler.step(eps, t, z, generator=generator, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(i, int(t))
        # 6. Latents to images.
        return {"images": decode_latents(self.vae, z), "attribution": self.composite.attribution()["mean"]}


class UNetCompartment:
    """A compartment's UNet as `(z_t, t, caption states) -> eps`."""

    def __init__(self, unet):
        self.unet = unet.eval()

    def __call__(self, z_t, t, cond):
        return self.unet(z_t, t, encoder_hidden_states=cond).sample
