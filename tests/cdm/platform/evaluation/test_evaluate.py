"""The evaluation gate on trained digit models: green when the same models are re-evaluated with another seed,
red when one shard of the composite is replaced by an untrained one."""

import pytest
import torch

from cdm.compose import CompositeDenoiser, class_priors
from cdm.config import EvaluateParams, Params
from cdm.model import UNetDenoiser, build_unet
from cdm.platform.evaluation.evaluate import Models, measure, regressions
from cdm.schedulers import NoiseSchedule, sampling_scheduler
from tests.cdm.conftest import CFG

SETTINGS = dict(n_samples=150, sets=5, nll_steps=10)


def models(shards, counts, paragon) -> Models:
    priors = class_priors(counts)

    def composite(seed):
        return CompositeDenoiser([UNetDenoiser(u, CFG.null_label) for u in shards], priors, "prior",
                                 scheduler=sampling_scheduler(NoiseSchedule()),
                                 generator=torch.Generator().manual_seed(seed))

    return Models(composite_for=composite, shards=shards, priors=priors, paragon=paragon,
                  sampler=lambda: sampling_scheduler(NoiseSchedule()), num_inference_steps=25, eta=1.0,
                  image_shape=(1, 8, 8), null_label=CFG.null_label)


@pytest.fixture(scope="module")
def evaluations(digits_split, digits_feature_net, by_class_shards, digits_paragon):
    owners, held = digits_split
    unets, (low, high) = by_class_shards
    counts = torch.stack([low.class_counts(10), high.class_counts(10)]).float()
    good = models(unets, counts, digits_paragon)
    broken = models([unets[0], build_unet(CFG, seed=3).eval()], counts, digits_paragon)
    out = {}
    for name, m, seed in (("production", good, 0), ("reseeded", good, 11), ("degraded", broken, 0)):
        out[name] = measure(m, owners, held, digits_feature_net, EvaluateParams(seed=seed, **SETTINGS))
    return out


def gate(metrics):
    params = Params()
    params.evaluate = EvaluateParams(**SETTINGS)
    return regressions(metrics, params)


def test_the_gate_stays_green_when_the_production_models_are_reseeded(evaluations):
    for name in ("production", "reseeded"):
        m = evaluations[name]
        assert gate(m) == [], (name, m["fid_ratio_ci"], m["nll"]["gap_bpd"])
    # The two evaluations agree within their intervals.
    a, b = evaluations["production"], evaluations["reseeded"]
    assert a["fid_ratio_ci"][0] <= b["fid_ratio_ci"][1] and b["fid_ratio_ci"][0] <= a["fid_ratio_ci"][1]


def test_the_gate_turns_red_for_a_composite_with_an_untrained_shard(evaluations):
    red = gate(evaluations["degraded"])
    assert any(r.startswith("fid_ratio") for r in red) and any(r.startswith("NLL gap") for r in red), red


def test_every_figure_comes_with_its_interval_and_floor(evaluations):
    m = evaluations["production"]
    assert m["fid_ci"][0] <= m["fid"] <= m["fid_ci"][1] and m["sets"] == 5 and m["n_samples"] == 150
    assert m["floor_real"]["mean"] > 0 and m["floor_seed"]["n"] == 4
    for k in ("composite_bpd", "paragon_bpd", "gap_bpd"):
        assert m["nll"][k]["low"] <= m["nll"][k]["mean"] <= m["nll"][k]["high"]
    assert len(m["nll"]["shards_bpd"]) == 2



def test_users_read_one_verdict_per_figure_from_its_interval(evaluations):
    """met / inconclusive / failed from each interval against the params' goal: the untrained shard's composite fails
    the ratio and the gap, the production one does not; memorization carries its positive control."""
    from cdm.platform.evaluation.evaluate import verdicts

    params = Params()
    good, bad = verdicts(evaluations["production"], params), verdicts(evaluations["degraded"], params)
    assert bad["fid_ratio"].startswith("failed") and bad["nll_gap"].startswith("failed"), bad
    assert not good["fid_ratio"].startswith("failed") and not good["nll_gap"].startswith("failed"), good
    mem = evaluations["production"]["memorization_check"]
    assert mem["fired"] and good["memorization"].split()[0] in ("met", "inconclusive")
    blind = {**evaluations["production"], "memorization_check": {**mem, "fired": False, "control_found": 0.4}}
    assert verdicts(blind, params)["memorization"].startswith("no verdict")
