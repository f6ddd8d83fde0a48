"""Text-to-image compartments (docs/design.md §2b): captioned data, the shared latent base (a diffusers
`StableDiffusionPipeline` folder), LoRA or full compartments on its UNet, composition by prompt with classifier-free
guidance applied to the composite, and prompt alignment.

    captions    imagefolder batches (`metadata.jsonl` beside the PNGs) in memory; the strict caption checks
    digits      the compositional captioned digits (MNIST glyphs, colours, positions) and their questions
    base        the base pipeline: tiny configs, the character-level tokenizer, loading a team's folder offline
    train       latents cached once per image, the base's pretraining, a compartment's fine-tune (LoRA or full)
    compose     the prompt prior p(i | c), compartments on one base, the guided composite
    pipeline    `TextCompositePipeline`: one `__call__`, prompts in, images and attribution out
    alignment   an attribute classifier trained on public data answers each prompt's questions

Plain Python + torch/diffusers/transformers; never imports the platform layer.
"""
