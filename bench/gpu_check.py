"""A short check of the GPU path, one call (under 8 minutes on one H100/H200):

1. training through accelerate, fp32 vs bf16 mixed precision (tiny and base presets), and from a shared init;
2. serving cost of 8 shards vs the paragon at batch 256 and 1000 — prior, path sparse, path dense, each through the
   loop and through the grouped network (`bench/serving_cost.py`'s modes and interleaved timing);
3. the paragon and the grouped network as CUDA graphs (`torch.compile(mode="reduce-overhead")`, fixed shapes);
4. bf16 autocast for sampling: its time, and its FID change (paired sample sets, fp32 vs bf16, 95% interval);
5. text-to-image: a LoRA compartment on the default text base (`cdm.text`), fp32 vs bf16 through accelerate, seconds
   per step and the losses (`--text-only` runs this section alone). Sampling of text composites on the device is
   not covered: `TextCompositePipeline` keeps its latents on the CPU.

Writes a JSON report (default $OUT/gpu_check.json, else bench/gpu_check.json). Runs on a CPU too (slowly; sections
3 and 4's timing need CUDA and are skipped there):

    python bench/gpu_check.py [--steps 300] [--repeats 3] [--fid-sets 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import serving_cost  # noqa: E402

SERVING_MODES = ["paragon", "prior loop", "prior grouped net", "path sparse loop", "path sparse grouped net",
                 "path dense loop", "path dense batched net"]


def _train(preset: str, mp: str, steps: int, batch_size: int) -> tuple[dict, dict]:
    """One training configuration (in its own process): timings, losses, and the final state dict (on the CPU)."""
    from cdm.data import digits_dataset
    from cdm.model import ModelConfig
    from cdm.train import TrainConfig, train_shard

    tcfg = TrainConfig(steps=steps, batch_size=batch_size, mixed_precision=mp, lr=1e-3)
    t0 = time.perf_counter()
    r = train_shard(digits_dataset(), ModelConfig.preset(preset), tcfg, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return ({"seconds": round(time.perf_counter() - t0, 2), "steps": steps,
             "ms_per_step": round(1000 * r.seconds / steps, 2),
             "loss_first10": sum(r.losses[:10]) / 10, "loss_last10": sum(r.losses[-10:]) / 10, "mixed_precision": mp},
            {k: v.detach().cpu().clone() for k, v in r.unet.state_dict().items()})


def _text_train(mp: str, steps: int, batch_size: int) -> dict:
    """A LoRA compartment on a freshly built default text base (random weights: timing and numerics, not quality),
    trained on compositional digits through accelerate at mixed precision `mp` (in its own process)."""
    import tempfile

    from cdm.text.base import TextBaseConfig, build_base, write_tokenizer
    from cdm.text.digits import Domain, caption, glyph_pools, make_scenes, render_all
    from cdm.text.train import TextTrainConfig, encode_captions, encode_latents, train_unet

    scenes = make_scenes(512, Domain(), 0)
    x = torch.from_numpy(render_all(scenes, glyph_pools(), 0)).permute(0, 3, 1, 2).float() / 127.5 - 1
    captions = [caption(s) for s in scenes]
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_base(TextBaseConfig(), write_tokenizer(captions, Path(tmp) / "tok", 64))
    z = encode_latents(parts["vae"], x)
    cond = encode_captions(parts["tokenizer"], parts["text_encoder"], captions)
    empty = encode_captions(parts["tokenizer"], parts["text_encoder"], [""])
    cfg = TextTrainConfig(steps=steps, batch_size=batch_size, mixed_precision=mp)
    t0 = time.perf_counter()
    r = train_unet(parts["unet"], z, cond, empty, parts["scheduler"], cfg)
    seconds = time.perf_counter() - t0
    return {"mixed_precision": mp, "steps": steps, "batch_size": batch_size, "seconds_per_step": seconds / steps,
            "loss_first10": sum(r.losses[:10]) / 10, "loss_last10": sum(r.losses[-10:]) / 10,
            "adapter_bytes": sum(v.numel() * v.element_size() for v in r.adapter.values())}


def text_section(steps: int, cuda: bool, report: dict) -> None:
    """5. Text LoRA training, fp32 vs bf16, each in a process of its own (accelerate keeps one precision each)."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    for name, mp in (("fp32", "no"), ("bf16", "bf16" if cuda else "no")):
        with spawn.Pool(1) as pool:
            report[f"text_train_{name}"] = pool.apply(_text_train, (mp, steps, 256 if cuda else 32))


def bf16_fid(data, paragon, device: str, sets: int, set_size: int, log) -> dict:
    """FID of the paragon's samples under bf16 autocast over its fp32 samples, paired set by set (same seeds), on the
    digits feature network; the interval says whether bf16 moved FID beyond the instrument's noise."""
    from cdm.metrics import train_feature_net
    from cdm.pipeline import CDMPipeline
    from cdm.quality import features, fid_interval, ratio_interval
    from cdm.schedulers import NoiseSchedule, sampling_scheduler

    net = train_feature_net(data).eval()
    reference = features(net, data.x)
    labels = torch.full((set_size,), paragon.null_label, device=device)
    fakes: dict[str, list] = {"fp32": [], "bf16": []}
    for k in range(sets):
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            pipe = CDMPipeline(paragon, sampling_scheduler(NoiseSchedule()), (1, 8, 8))
            with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
                x = pipe(labels, 50, generator=torch.Generator().manual_seed(1000 + k), device=device)
            fakes[name].append(features(net, x.float().cpu()))
        log(f"bf16 FID: set {k + 1}/{sets}")
    return {"sets": sets, "set_size": set_size, "fid_fp32": fid_interval(reference, fakes["fp32"]).as_dict(),
            "fid_bf16": fid_interval(reference, fakes["bf16"]).as_dict(),
            "ratio_bf16_over_fp32": ratio_interval(reference, fakes["bf16"], fakes["fp32"]).as_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--no-tf32", action="store_true", help="exact fp32 convolutions and matmuls on the GPU")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds per serving mode")
    ap.add_argument("--shard-base-steps", type=int, default=200, help="steps of the base the 8 shards fine-tune")
    ap.add_argument("--batches", default="256,1000", help="serving batch sizes (the last one is used by 3 and 4)")
    ap.add_argument("--fid-sets", type=int, default=10, help="paired sample sets for the bf16 FID ratio")
    ap.add_argument("--fid-set-size", type=int, default=400)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "bench"), "gpu_check.json"))
    ap.add_argument("--text-only", action="store_true", help="section 5 alone (text-to-image LoRA training)")
    args = ap.parse_args()
    started = time.perf_counter()

    from cdm.compose import class_priors
    from cdm.data import digits_dataset
    from cdm.grouped_unet import GroupedUNet
    from cdm.model import ModelConfig, UNetDenoiser
    from cdm.train import TrainConfig, train_shard

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {line}", flush=True)

    cuda = torch.cuda.is_available()
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    device = "cuda" if cuda else "cpu"
    report = {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "tf32": not args.no_tf32}

    def save() -> None:
        """Write what is measured so far: a run cut short by its time limit still leaves its sections."""
        report["seconds"] = round(time.perf_counter() - started, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.text_only:
        text_section(args.steps, cuda, report)
        save()
        print(json.dumps(report, indent=2))
        return
    data = digits_dataset()
    # 1. Training through accelerate: fp32 vs bf16 mixed precision, same seed. accelerate keeps one precision per
    #    process, so each configuration trains in a process of its own (spawned).
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    for name, preset, mp in (("tiny-fp32", "tiny", "no"), ("tiny-bf16", "tiny", "bf16" if cuda else "no"),
                             ("base-bf16", "base", "bf16" if cuda else "no")):
        with spawn.Pool(1) as pool:
            report[f"train_{name}"], state = pool.apply(_train, (preset, mp, args.steps, 256 if cuda else 64))
        if name == "tiny-bf16":
            init = state
    # 1b. The shared initialization on the device: a shard started from it begins where it ended.
    from cdm.safetensors_io import state_sha256

    tcfg = TrainConfig(steps=max(30, args.steps // 5), batch_size=256 if cuda else 64, lr=1e-3,
                       mixed_precision="bf16" if cuda else "no", init_sha256=state_sha256(init), seed=1)
    r = train_shard(data, ModelConfig.preset("tiny"), tcfg, init_state=init, progress=False)
    report["train_from_shared_init"] = {"steps": tcfg.steps, "loss_first10": sum(r.losses[:10]) / 10,
                                        "loss_last10": sum(r.losses[-10:]) / 10}
    log("training checks done")
    save()
    cfg = ModelConfig.preset("tiny")
    # 2. Serving cost on the device: paragon, prior, path sparse and path dense, loop vs grouped network, at
    #    batch 256 and 1000 (bench/serving_cost.py's modes and timing: interleaved rounds, paired ratios).
    unets, _ = serving_cost.shards(8, args.shard_base_steps, 40)
    paragon = UNetDenoiser(unets[0].to(device), cfg.null_label)
    members = serving_cost.members_of(unets, device)
    priors = class_priors(torch.ones(8, 10)).to(device)
    batches = [int(b) for b in args.batches.split(",")]
    for batch in batches:
        labels = torch.full((batch,), cfg.null_label, device=device)
        report[f"serving_batch{batch}"] = serving_cost.time_modes(
            SERVING_MODES, members, paragon, priors, labels, 50, args.repeats, device, log=log)
        save()
    # 3. Fixed shapes as CUDA graphs: the paragon and the grouped network compiled with mode="reduce-overhead"
    #    (prior keeps its groups for a whole trajectory, so every step has the same shapes).
    if cuda:
        try:
            t0 = time.perf_counter()
            net = GroupedUNet(unets).to(device)
            net.network = torch.compile(net.network, mode="reduce-overhead")
            graphs = serving_cost.time_modes(
                ["paragon", "prior grouped net"], {**members, "net": net},
                UNetDenoiser(torch.compile(unets[0], mode="reduce-overhead"), cfg.null_label), priors, labels, 50,
                args.repeats, device, log=log)
            report[f"cuda_graphs_batch{batches[-1]}"] = {"modes": graphs,
                                                         "compile_and_warmup_s": time.perf_counter() - t0}
        except Exception as exc:  # a compiler failure must not cost the rest of the report
            report[f"cuda_graphs_batch{batches[-1]}"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        save()
    # 4. bf16 autocast: time, and what it does to FID (paired sample sets of the paragon, fp32 vs bf16).
    if cuda:
        report[f"bf16_batch{batches[-1]}"] = serving_cost.time_modes(
            ["paragon", "prior grouped net"], members, paragon, priors, labels, 50, args.repeats, device,
            torch.bfloat16, log=log)
    report["bf16_fid"] = bf16_fid(data, paragon, device, args.fid_sets, args.fid_set_size, log)
    save()
    # 5. Text-to-image LoRA training on the device.
    text_section(args.steps, cuda, report)
    log("text training checks done")
    save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
