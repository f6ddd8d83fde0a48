import torch

from cdm.data import digits_dataset
from cdm.model import ModelConfig
from cdm.schedulers import NoiseSchedule
import pytest

from cdm.train import PlateauConfig, TrainConfig, _HeldoutJudge, assign_slices, train_shard

CFG = ModelConfig.preset("tiny")


def small_data(n=96):
    return digits_dataset().subset(range(n))


def same_weights(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.allclose(sa[k], sb[k], atol=atol, rtol=0) for k in sa)


def test_seeded_training_is_reproducible_and_learns():
    data = small_data()
    cfg = TrainConfig(steps=60, batch_size=32, seed=3)
    r1 = train_shard(data, CFG, cfg, progress=False)
    r2 = train_shard(data, CFG, cfg, progress=False)
    assert same_weights(r1.unet, r2.unet)
    assert r1.losses == r2.losses and len(r1.losses) == 60
    assert sum(r1.losses[-10:]) / 10 < sum(r1.losses[:10]) / 10
    r3 = train_shard(data, CFG, TrainConfig(steps=60, batch_size=32, seed=4), progress=False)
    assert not same_weights(r1.unet, r3.unet)


def test_slices_are_stable_under_removal():
    ids = [f"id{i}" for i in range(50)]
    before = assign_slices(ids, 4)
    after = assign_slices(ids[:10] + ids[11:], 4)
    assert torch.equal(torch.cat([before[:10], before[11:]]), after)


def test_removal_resumes_from_the_last_untouched_slice_and_matches_scratch(tmp_path):
    data = small_data()
    cfg = TrainConfig(steps=40, batch_size=16, num_slices=4, seed=1)
    full = train_shard(data, CFG, cfg, checkpoint_dir=tmp_path, progress=False)
    assert full.resumed_from_slice == -1 and len(list(tmp_path.glob("*.safetensors"))) == 4
    # Remove one sample that sits in slice 2.
    slices = assign_slices(data.ids, 4)
    victim = int((slices == 2).nonzero()[0])
    reduced = data.subset([i for i in range(len(data)) if i != victim])
    resumed = train_shard(reduced, CFG, cfg, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from_slice == 1
    assert resumed.steps_run == 20  # only slices 2 and 3 were trained again
    assert resumed.slice_keys[:2] == full.slice_keys[:2] and resumed.slice_keys[2] != full.slice_keys[2]
    scratch = train_shard(reduced, CFG, cfg, checkpoint_dir=None, progress=False)
    assert same_weights(resumed.unet, scratch.unet, atol=1e-6)
    assert torch.allclose(torch.tensor(resumed.losses), torch.tensor(scratch.losses), atol=1e-6)
    # Training the full data again is served entirely from checkpoints.
    again = train_shard(data, CFG, cfg, checkpoint_dir=tmp_path, progress=False)
    assert again.resumed_from_slice == 3 and again.steps_run == 0
    assert same_weights(again.unet, full.unet, atol=1e-6)


def test_empty_data_is_refused():
    data = small_data().subset([])
    try:
        train_shard(data, CFG, TrainConfig(steps=1), progress=False)
    except ValueError as e:
        assert "no data" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_shards_trained_on_threads_get_the_weights_their_seed_says():
    """Bug: `train_shard` seeded torch's global RNG, so shards trained on threads (`max_workers: 2`) raced for it
    and a rerun could give other weights for the same config hash. Here two shards train at once while a third
    thread keeps drawing from the global RNG (any other work in the process)."""
    import threading

    data = small_data(32)
    cfgs = [TrainConfig(steps=2, batch_size=8, num_slices=1, seed=s, ema_decay=None) for s in (5, 6)]
    sequential = [train_shard(data, CFG, c, progress=False).unet for c in cfgs]
    stop, results = threading.Event(), {}

    def noise():
        while not stop.is_set():
            torch.manual_seed(int(torch.randint(0, 1000, (1,))))
            torch.rand(256)

    def shard(i):
        results[i] = train_shard(data, CFG, cfgs[i], progress=False).unet

    noisy = threading.Thread(target=noise)
    noisy.start()
    try:
        workers = [threading.Thread(target=shard, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        stop.set()
        noisy.join()
    assert all(same_weights(sequential[i], results[i]) for i in range(2))


def test_plateau_rule_stops_at_the_held_out_plateau_and_returns_the_best_weights():
    data = digits_dataset().subset(range(200))
    train, held = data.subset(range(32)), data.subset(range(160, 200))
    rule = PlateauConfig(every=10, patience=2, min_delta=0.1, draws=2)
    cap = 3000
    r = train_shard(train, CFG, TrainConfig(steps=cap, batch_size=16, seed=1), progress=False, validation=held,
                    plateau=rule)
    # Stopped long before the cap, after `patience` evaluations without 10% progress: not flagged as capped.
    assert r.steps_run < cap and r.steps_run % rule.every == 0 and not r.capped
    steps, values = zip(*r.heldout_losses)
    assert list(steps) == list(range(0, r.steps_run + 1, rule.every))  # step 0 (the starting weights) first
    assert r.best_step == steps[values.index(min(values))]
    # The returned weights are those of the best evaluation: re-scoring them gives the best loss.
    judge = _HeldoutJudge(held, rule, NoiseSchedule(), torch.device("cpu"))
    assert judge.loss(r.unet) == pytest.approx(min(values), rel=1e-5)
    # ...and training went somewhere: the best held-out loss is below the first evaluation's.
    assert min(values) < values[0]
    # A cap the rule cannot reach is flagged: the model was stopped by its budget, not by its data.
    # (One evaluation after step 0 cannot make `patience` = 2 stalls: the rule cannot fire before this cap.)
    short = train_shard(train, CFG, TrainConfig(steps=rule.every, batch_size=16, seed=1), progress=False,
                        validation=held, plateau=rule)
    assert short.capped and short.steps_run == rule.every


def test_plateau_rule_needs_held_out_data_and_one_slice(tmp_path):
    data = small_data()
    with pytest.raises(ValueError, match="held-out"):
        train_shard(data, CFG, TrainConfig(steps=10), progress=False, plateau=PlateauConfig())
    with pytest.raises(ValueError, match="one slice"):
        train_shard(data, CFG, TrainConfig(steps=10, num_slices=2), progress=False, validation=data,
                    plateau=PlateauConfig())


def test_the_plateau_rule_returns_the_starting_weights_when_training_only_makes_them_worse():
    """Step 0 is scored: a fine-tune from a shared base at a rate far too high ends as the base itself (the
    control: every later evaluation is worse than the base's, or not a number)."""
    data = digits_dataset().subset(range(200))
    train, held = data.subset(range(64)), data.subset(range(160, 200))
    base = train_shard(train, CFG, TrainConfig(steps=60, batch_size=16, seed=1, ema_decay=None), progress=False)
    init = {k: v.clone() for k, v in base.unet.state_dict().items()}
    rule = PlateauConfig(every=5, patience=2, min_delta=0.0, draws=2)
    from cdm.safetensors_io import state_sha256

    r = train_shard(train, CFG, TrainConfig(steps=40, batch_size=16, seed=2, lr=5.0, ema_decay=None,
                                            init_sha256=state_sha256(init)),
                    progress=False, validation=held, plateau=rule, init_state=init)
    steps, values = zip(*r.heldout_losses)
    assert steps[0] == 0 and r.best_step == 0
    assert all(not v <= values[0] for v in values[1:])
    assert all(torch.equal(v, init[k]) for k, v in r.unet.state_dict().items())
