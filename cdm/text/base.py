"""The shared base of a text workspace: a diffusers `StableDiffusionPipeline` folder.

    <folder>/model_index.json  unet/ (UNet2DConditionModel)  vae/ (AutoencoderKL)  text_encoder/ (CLIPTextModel)
             tokenizer/ (CLIPTokenizer: vocab.json, merges.txt)  scheduler/ (DDPMScheduler config)

A team brings its own folder (`load_base`, local files only, safetensors only, every part checked against the
workspace); teams without one pretrain a small base on public captions (`cdm.text.train.pretrain_base`), built here
from configs (`build_base`) as diffusers' own tests build theirs. The safety checker and feature extractor are
never part of it: a base is what denoises, nothing that filters.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


class BaseError(ValueError):
    """A folder that is not a usable base for this workspace (one line, names the part)."""


@dataclass
class TextBaseConfig:
    """Architecture of the small base `cdm pretrain` trains (round-trips through JSON)."""

    image_size: int = 32
    # Three VAE blocks: two 2x downsamplings, so a 32x32 RGB image is a 4x8x8 latent (a 16x16 latent made a UNet
    # step 4x dearer: 0.70 s against 0.17 s at batch 32 on the 2-core CPU).
    vae_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    text_dim: int = 32  # the text encoder's width = the UNet's cross-attention dimension
    text_layers: int = 2
    text_heads: int = 4
    max_prompt_tokens: int = 64  # characters (the tokenizer is character-level) + start and end
    norm_num_groups: int = 8  # GroupNorm groups of UNet and VAE; must divide every block's channels

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TextBaseConfig":
        raw = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def write_tokenizer(captions: list[str], folder: str | Path, max_length: int) -> Path:
    """A character-level `CLIPTokenizer` in `folder` (vocab.json, merges.txt with no merges): every printable ASCII
    character and each character of `captions`, alone and word-final (`</w>`). Any prompt tokenizes: a character
    outside the vocabulary reads as `<|endoftext|>` (CLIP's unknown token)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted({c for c in string.printable if not c.isspace()} | {c for s in captions for c in s.lower()
                                                                      if not c.isspace()})
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length,
                                                              "tokenizer_class": "CLIPTokenizer"}))
    return folder


def build_base(cfg: TextBaseConfig, tokenizer_dir: str | Path, seed: int = 0) -> dict:
    """Fresh components of a base from `cfg` (weights from `seed`): {unet, vae, text_encoder, tokenizer,
    scheduler}."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from cdm.schedulers import NoiseSchedule

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    n_blocks = len(cfg.unet_channels)
    with torch.random.fork_rng(devices=[]):  # initial weights from the seed; the caller's RNG untouched
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=cfg.image_size // 2 ** (len(cfg.vae_channels) - 1), in_channels=cfg.latent_channels,
            out_channels=cfg.latent_channels, block_out_channels=cfg.unet_channels,
            layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups,
            down_block_types=("CrossAttnDownBlock2D",) * (n_blocks - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_blocks - 1),
            cross_attention_dim=cfg.text_dim, attention_head_dim=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=cfg.latent_channels, block_out_channels=cfg.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels), norm_num_groups=cfg.norm_num_groups,
            sample_size=cfg.image_size)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.text_dim, intermediate_size=2 * cfg.text_dim,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_prompt_tokens, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    # The forward process every compartment shares; steps_offset 1 as Stable Diffusion's own scheduler configs.
    s = NoiseSchedule()
    scheduler = DDPMScheduler(num_train_timesteps=s.num_train_timesteps, beta_schedule=s.beta_schedule,
                              prediction_type=s.prediction_type, clip_sample=False, steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def _quiet() -> None:
    """No progress bars from transformers and diffusers while a base is read or written: a command's own output
    stays one line per result or refusal."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def save_base(parts: dict, folder: str | Path) -> Path:
    """`parts` as a `StableDiffusionPipeline` folder (safetensors; no safety checker)."""
    from diffusers import StableDiffusionPipeline

    _quiet()
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BaseError(f"{what}: {path.name} missing") from None
    except (OSError, ValueError) as e:
        raise BaseError(f"{what}: {path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BaseError(f"{what}: {path.name} is not a JSON object")
    return data


EXPECTED_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                    "tokenizer": "CLIPTokenizer"}


def check_folder(folder: str | Path) -> dict:
    """The layout of a `StableDiffusionPipeline` folder, checked without loading any weight: model_index.json
    names the pipeline and each component's class; each component folder holds its config and, for models,
    safetensors weights (a pickle is never loaded). Returns model_index.json. Raises `BaseError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BaseError(f"{folder}: not a folder")
    index = _read_json(folder / "model_index.json", "not a diffusers pipeline folder")
    if index.get("_class_name") != "StableDiffusionPipeline":
        raise BaseError(f"model_index.json names {index.get('_class_name')!r}, not a StableDiffusionPipeline")
    for part in COMPONENTS:
        entry = index.get(part)
        if not (isinstance(entry, list) and len(entry) == 2) or not (folder / part).is_dir():
            raise BaseError(f"the pipeline has no {part}/ component")
        expected = EXPECTED_CLASSES.get(part)
        if expected and entry[1] not in (expected, expected + "Fast"):
            raise BaseError(f"{part}/ is a {entry[1]}, expected a {expected}")
    for part in ("unet", "vae"):
        _read_json(folder / part / "config.json", f"{part}/")
        if not (folder / part / "diffusion_pytorch_model.safetensors").is_file():
            raise BaseError(f"{part}/ has no diffusion_pytorch_model.safetensors (pickled weights are not loaded)")
    _read_json(folder / "text_encoder" / "config.json", "text_encoder/")
    if not (folder / "text_encoder" / "model.safetensors").is_file():
        raise BaseError("text_encoder/ has no model.safetensors (pickled weights are not loaded)")
    if not any((folder / "tokenizer" / f).is_file() for f in ("vocab.json", "tokenizer.json")):
        raise BaseError("tokenizer/ has neither vocab.json nor tokenizer.json")
    _read_json(folder / "scheduler" / "scheduler_config.json", "scheduler/")
    return index


def load_base(folder: str | Path, image_size: int | None = None) -> dict:
    """The components of a base folder, local files only, weights loaded strictly (`check_folder` first):
    {unet, vae, text_encoder, tokenizer, scheduler}. With `image_size`, the VAE and UNet must fit the workspace's
    images (the VAE's sample size and the UNet's latent size). Raises `BaseError` with one line."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    check_folder(folder)
    _quiet()
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True,
                                                    use_safetensors=True, low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True, use_safetensors=True,
                                            low_cpu_mem_usage=False)
        text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True,
                                                     use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BaseError(f"the pipeline's weights do not load: {first}") from None
    check_fits(unet, vae, text_encoder, image_size)
    for m in (unet, vae, text_encoder):
        m.eval().requires_grad_(False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def latent_size(vae, image_size: int) -> int:
    return image_size // 2 ** (len(vae.config.block_out_channels) - 1)


def check_fits(unet, vae, text_encoder, image_size: int | None) -> None:
    """The parts fit one another and, with `image_size`, the workspace."""
    if unet.config.in_channels != vae.config.latent_channels:
        raise BaseError(f"the UNet takes {unet.config.in_channels} channels but the VAE's latents have "
                        f"{vae.config.latent_channels}")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise BaseError(f"the UNet cross-attends to {unet.config.cross_attention_dim}-d text but the text encoder "
                        f"gives {text_encoder.config.hidden_size}-d")
    if vae.config.in_channels != 3:
        raise BaseError(f"the VAE encodes {vae.config.in_channels}-channel images; a text workspace holds RGB")
    if image_size is not None:
        if vae.config.sample_size not in (image_size, [image_size, image_size]):
            raise BaseError(f"the VAE was built for {vae.config.sample_size}px images; this workspace's "
                            f"data.image_size is {image_size}")
        if unet.config.sample_size != latent_size(vae, image_size):
            raise BaseError(f"the UNet denoises {unet.config.sample_size}px latents; {image_size}px images give "
                            f"{latent_size(vae, image_size)}px latents")


def component_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of each weight, configuration and tokenizer file of a base folder, by relative path (its provenance
    record: the configurations decide the architecture the weights are read into)."""
    folder = Path(folder)
    out = {}
    for rel in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):
        path = folder / rel
        if path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def base_sha256(folder: str | Path) -> str:
    """One hash over every component's hash: what a compartment names as its base."""
    return hashlib.sha256(json.dumps(component_hashes(folder), sort_keys=True).encode()).hexdigest()
