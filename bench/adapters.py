"""What a LoRA compartment costs against a full shard: trainable parameters and stored bytes per owner, for each
model preset at 16x16 (the benchmarks' MNIST size) and several ranks. Counts, not quality: the quality of LoRA
compartments is measured by the quality benchmark. Writes bench/adapters.json.

    python bench/adapters.py [--out bench/adapters.json] [--image-size 16] [--ranks 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cdm.adapters import AdapterConfig, adapter_state, attach, size  # noqa: E402
from cdm.model import ModelConfig, build_unet  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "adapters.json"))
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    args = ap.parse_args()
    rows = []
    for preset in ("tiny", "small", "base"):
        cfg = ModelConfig.preset(preset, image_size=args.image_size)
        full = size(build_unet(cfg, seed=0).state_dict())
        for rank in args.ranks:
            lora = size(adapter_state(attach(build_unet(cfg, seed=0), AdapterConfig(rank=rank, alpha=rank))))
            rows.append({"preset": preset, "rank": rank, "full_parameters": full["parameters"],
                         "full_bytes": full["bytes"], "adapter_parameters": lora["parameters"],
                         "adapter_bytes": lora["bytes"], "adapter_fraction": round(lora["bytes"] / full["bytes"], 4)})
            print(json.dumps(rows[-1]))
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "image_size": args.image_size,
                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
