import torch

from cdm.model import ModelConfig, UNetDenoiser, build_unet, load_unet, model_config_of, save_unet


def test_config_round_trips_as_json():
    for name in ("tiny", "small", "base"):
        cfg = ModelConfig.preset(name, image_size=16)
        assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_unknown_preset_is_a_clear_error():
    try:
        ModelConfig.preset("huge")
    except ValueError as e:
        assert "huge" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_save_load_safetensors_same_outputs(tmp_path):
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    path = save_unet(unet, tmp_path / "shard")
    assert (path / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(path.glob("*.bin"))
    loaded = load_unet(path).eval()
    assert model_config_of(loaded) == cfg
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 5, cfg.null_label])
    with torch.no_grad():
        assert torch.allclose(unet(x, t, class_labels=y).sample, loaded(x, t, class_labels=y).sample)


def test_guidance_changes_conditioned_rows_only():
    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    plain, guided = UNetDenoiser(unet, cfg.null_label), UNetDenoiser(unet, cfg.null_label, guidance_scale=2.0)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 100])
    y = torch.tensor([3, cfg.null_label])
    with torch.no_grad():
        a, b = plain(x, t, y), guided(x, t, y)
    assert torch.allclose(a[1], b[1], atol=1e-6)
    assert not torch.allclose(a[0], b[0], atol=1e-4)


def test_loading_a_unet_never_changes_how_another_thread_builds_one(tmp_path):
    """Shards train on threads while others load their initialization: a load must not patch torch for the whole
    process (diffusers' `from_pretrained` does, and a UNet built meanwhile came out on the meta device)."""
    import threading

    cfg = ModelConfig.preset("tiny")
    path = save_unet(build_unet(cfg, seed=0), tmp_path / "init")
    reference = build_unet(cfg, seed=1).state_dict()
    stop, bad = threading.Event(), []

    def load_repeatedly():
        while not stop.is_set():
            load_unet(path)

    loader = threading.Thread(target=load_repeatedly)
    loader.start()
    try:
        for _ in range(40):
            built = build_unet(cfg, seed=1).state_dict()
            bad += [k for k, v in built.items() if v.is_meta or not torch.equal(v, reference[k])]
    finally:
        stop.set()
        loader.join()
    assert not bad, f"a UNet built during a load came out wrong: {sorted(set(bad))[:3]}"
