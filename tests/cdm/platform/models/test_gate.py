"""The serving invariant (cdm/platform/models/gate.py) against a real MLflow registry (SQLite) and real owner records:
once a revocation is accepted, no version that saw the owner is made production, composed, or served.

A stateful property test (hypothesis) interleaves train / compose / revoke / go-live / consent / serve and checks
the invariant after every step against a model of which versions saw which revoked owner. Model versions are
created in the registry directly (the gate reads tags only; training them would cost minutes per example).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cdm.config import Params
from cdm.platform.models import composites, gate, registry
from cdm.platform.workspace import owner_records
from cdm.platform.forgetting import begin, go_live, plan
from cdm.platform.workspace.context import Context
from cdm.platform.create import init_workspace
from cdm.platform.models.serving import RevocationWatch
from cdm.platform.models.shards import save_plan

OWNERS = ("ann", "ben", "cat", "dan")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Context:
    ws = init_workspace(tmp_path_factory.mktemp("gate") / "ws", params=Params())
    return Context.load(ws.root)


def reset(ctx: Context) -> None:
    """A registry and owner records as new (one workspace for every example: creating one costs seconds)."""
    c = ctx.client
    for m in registry.registered_models(c):
        c.delete_registered_model(m.name)
    for f in ("owners.json", "shards.json"):
        (ctx.ws.state_dir / f).unlink(missing_ok=True)
    for o in OWNERS:
        owner_records.update(ctx.ws, ctx.ws.owner_key(o), owner=o, state="active")


def register_shard(ctx: Context, sid: str, owners: list[str]) -> str:
    """A shard version of `owners`' data, created the way `registry.log_model` creates one: inside the gate."""
    c, keys = ctx.client, [ctx.ws.owner_key(o) for o in owners]
    name = registry.SHARD_PREFIX + sid
    registry.ensure_registered(c, name)
    with gate.admit_owners(ctx, keys):
        mv = c.create_model_version(name, source="file:///nowhere", tags={
            "cdm.owner_keys": json.dumps(sorted(keys)), "cdm.owner_counts": json.dumps({k: 10 for k in keys}),
            "cdm.class_counts": json.dumps([10] * 10), "cdm.weights_sha256": "0" * 64})
    return str(mv.version)


def register_composite(ctx: Context, spec: dict, expected=gate.ANY) -> str:
    c = ctx.client
    registry.ensure_registered(c, registry.COMPOSITE)
    mv = c.create_model_version(registry.COMPOSITE, source="file:///nowhere", tags=composites.version_tags(spec))
    gate.promote(ctx, str(mv.version), expected)
    return str(mv.version)


def production_spec(ctx: Context) -> tuple[str, dict] | None:
    """(version, spec) of production, rebuilt from its tags (these versions have no artifacts)."""
    mv = registry.alias_version(ctx.client, registry.COMPOSITE)
    if mv is None:
        return None
    shards = []
    for sid, v in json.loads(mv.tags["cdm.components"]).items():
        smv = ctx.client.get_model_version(registry.SHARD_PREFIX + sid, v)
        shards.append(composites._shard_entry(sid, smv))
    return str(mv.version), {"shards": shards, "estimator": "prior", "revocations": []}


class Serving(RuleBasedStateMachine):
    """The model: which (shard, version) saw which owner, and which owners are revoked now."""

    def __init__(self):
        super().__init__()
        self.ctx = CTX
        self.versions: dict[tuple[str, str], set[str]] = {}  # shard version -> owners it saw
        self.tainted: set[tuple[str, str]] = set()  # versions that saw an owner after their revocation began
        self.revoked: set[str] = set()
        self.servers: list[tuple[dict, RevocationWatch]] = []
        self.plan: dict[str, list[str]] = {}
        # Production versions when a revocation was accepted whose go-live has not run yet: only these may still
        # hold a version that saw the owner (`cdm revoke` goes live before it returns).
        self.stale: dict[str, str | None] = {}  # owner -> production version at acceptance

    @initialize()
    def fresh(self):
        reset(self.ctx)

    # Training and composition each take a while: a revocation may be accepted between their start (data read,
    # spec built) and their end (version created, production moved): `meanwhile` is that revocation.
    @rule(owners=st.lists(st.sampled_from(OWNERS), min_size=1, max_size=2, unique=True),
          meanwhile=st.none() | st.sampled_from(OWNERS))
    def train(self, owners, meanwhile):
        if any(o in self.revoked for o in owners):
            return  # `active_owners` leaves them out of every plan
        sid = "s" + "".join(sorted(o[0] for o in owners))
        if meanwhile is not None:
            self.accept(meanwhile)
        if any(o in self.revoked for o in owners):
            with pytest.raises(gate.Refused):
                register_shard(self.ctx, sid, owners)
            return
        version = register_shard(self.ctx, sid, owners)
        self.versions[(registry.SHARD_PREFIX + sid, version)] = set(owners)
        self.plan[sid] = sorted(owners)
        save_plan(self.ctx.ws, self.plan)

    @precondition(lambda self: self.plan)
    @rule(meanwhile=st.none() | st.sampled_from(OWNERS))
    def compose(self, meanwhile):
        try:
            spec = composites.build_spec(self.ctx, "prior")
        except composites.NothingToCompose:  # every planned shard's versions saw a revoked owner
            return
        used = {(s["model"], s["version"]) for s in spec["shards"]}
        assert not used & self.tainted, "a composite was built from a version that saw a revoked owner"
        registry.ensure_registered(self.ctx.client, registry.COMPOSITE)
        version = self.ctx.client.create_model_version(registry.COMPOSITE, source="file:///nowhere",
                                                       tags=composites.version_tags(spec)).version
        if meanwhile is not None:
            self.accept(meanwhile)
        if used & self.tainted:
            with pytest.raises(gate.Refused):
                gate.promote(self.ctx, str(version))
        else:
            gate.promote(self.ctx, str(version))

    @rule(owner=st.sampled_from(OWNERS))
    def revoke(self, owner):
        self.accept(owner)

    def accept(self, owner):
        if owner in self.revoked:
            return
        key = self.ctx.ws.owner_key(owner)
        prod = production_spec(self.ctx)
        with self.ctx.ws.lock():
            begin.accept(self.ctx, key, f"rev-{owner}")
        self.stale[owner] = prod[0] if prod else None
        self.revoked.add(owner)
        self.tainted |= {v for v, seen in self.versions.items() if owner in seen}
        self.plan = {s: [o for o in os_ if o != owner] for s, os_ in self.plan.items()}
        self.plan = {s: os_ for s, os_ in self.plan.items() if os_}
        save_plan(self.ctx.ws, self.plan)

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def go_live(self, data):
        """A revocation's go-live: production minus every shard that saw the owner, by compare-and-set."""
        owner = data.draw(st.sampled_from(sorted(self.stale)))
        prod = production_spec(self.ctx)
        if prod is None:
            self.stale.pop(owner)
            return
        key = self.ctx.ws.owner_key(owner)
        # As `go_live.go_live` does: the owner's shards and every other component the gate refuses.
        drop = {s["id"] for s in prod[1]["shards"] if key in s["owners"]} | gate.unservable_shards(self.ctx, prod[1])
        try:
            spec = composites.spec_without(prod[1], drop, "prior", [])
        except composites.NothingToCompose:
            gate.unpromote(self.ctx, expected=prod[0])
            self.stale.pop(owner)
            return
        register_composite(self.ctx, spec, expected=prod[0])  # never refused: two revocations do not block
        self.stale.pop(owner)

    @precondition(lambda self: self.revoked - set(self.stale))
    @rule(data=st.data())
    def consent(self, data):
        owner = data.draw(st.sampled_from(sorted(self.revoked - set(self.stale))))
        owner_records.update(self.ctx.ws, self.ctx.ws.owner_key(owner), state="active")
        self.revoked.discard(owner)

    @rule()
    def serve(self):
        """A serving process loads production now and keeps it."""
        prod = production_spec(self.ctx)
        if prod is not None:
            watch = RevocationWatch(prod[1]["shards"])
            self.servers.append((prod[1], watch))

    @invariant()
    def production_never_holds_a_tainted_version(self):
        prod = production_spec(self.ctx)
        if prod is None:
            return
        for s in prod[1]["shards"]:
            if (s["model"], s["version"]) in self.tainted:
                # Only a production that was already production when an owner of that version was accepted, and
                # whose go-live has not run yet.
                seen = self.versions[(s["model"], s["version"])]
                assert any(prod[0] == self.stale.get(o, "-") for o in seen), \
                    f"production v{prod[0]} serves {s['model']} v{s['version']} after its owner's revocation"

    @invariant()
    def every_server_drops_exactly_the_tainted_components(self):
        for spec, watch in self.servers:
            expected = {i for i, s in enumerate(spec["shards"]) if (s["model"], s["version"]) in self.tainted}
            assert watch.check() == expected


CTX: Context | None = None


def run_machine(ctx: Context, examples: int, steps: int) -> None:
    global CTX
    CTX = ctx
    Serving.TestCase.settings = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                                         suppress_health_check=list(HealthCheck))
    Serving.TestCase().runTest()


def test_no_interleaving_serves_a_revoked_owner(ctx):
    run_machine(ctx, examples=30, steps=14)


@pytest.mark.slow
def test_no_interleaving_serves_a_revoked_owner_long_run(ctx):
    run_machine(ctx, examples=150, steps=25)


def test_promote_is_a_compare_and_set_that_refuses_revoked_versions(ctx):
    reset(ctx)
    v1 = register_shard(ctx, "sa", ["ann"])
    register_shard(ctx, "sb", ["ben"])
    save_plan(ctx.ws, {"sa": ["ann"], "sb": ["ben"]})
    first = register_composite(ctx, composites.build_spec(ctx, "prior"))
    with pytest.raises(gate.ProductionMoved):  # someone else's expectation of production is stale
        register_composite(ctx, composites.build_spec(ctx, "prior"), expected=str(int(first) + 7))
    with ctx.ws.lock():
        begin.accept(ctx, ctx.ws.owner_key("ann"), "rev-test")
    assert ctx.client.get_model_version(registry.SHARD_PREFIX + "sa", v1).tags[registry.REVOKED] == "rev-test"
    assert ctx.client.get_model_version(registry.COMPOSITE, first).tags[registry.REVOKED] == "rev-test"
    assert registry.revocation_epoch(ctx.client) == "1"
    # The composite that holds ann's shard can no longer be promoted; a new version of her data is refused.
    with pytest.raises(gate.Refused):
        gate.promote(ctx, first)
    with pytest.raises(gate.Refused):
        register_shard(ctx, "sa", ["ann"])
    # build_spec leaves the shard out (every version saw her) and says so.
    spec = composites.build_spec(ctx, "prior")
    assert [s["id"] for s in spec["shards"]] == ["sb"] and spec["left_out"] == ["sa"]


def test_a_registry_outage_is_an_error_in_promote_plan_and_go_live(ctx, monkeypatch, dead_registry):
    """A registry that cannot be read is never "no production": promote's expect-no-production check, the
    revocation's plan and go-live raise instead of acting on it (on the old code promote moved the alias with
    expected=None and go-live recorded `composite_live=None`, "nothing is served", while production still named
    the owner's shard)."""
    from mlflow.exceptions import MlflowException

    from cdm.platform.forgetting.record import Plan, Revocation

    reset(ctx)
    save_plan(ctx.ws, {"sa": ["ann"], "sb": ["ben"]})
    spec = {"shards": [composites._shard_entry(sid, ctx.client.get_model_version(registry.SHARD_PREFIX + sid, v))
                       for sid, v in (("sa", register_shard(ctx, "sa", ["ann"])),
                                      ("sb", register_shard(ctx, "sb", ["ben"])))],
            "estimator": "prior", "revocations": []}
    live = register_composite(ctx, spec)
    down = Context(ctx.ws, ctx.params, ctx.config, ctx.stack)
    down.__dict__["client"] = dead_registry  # the same workspace while its MLflow server is down
    registry.ensure_registered(ctx.client, registry.COMPOSITE)
    other = str(ctx.client.create_model_version(registry.COMPOSITE, source="file:///nowhere",
                                                tags=composites.version_tags(spec)).version)
    with pytest.raises(MlflowException):
        gate.promote(down, other, expected=None)
    with pytest.raises(MlflowException):
        gate.unpromote(down, expected=live)
    rev = Revocation(request_id="rev-outage", owner_key=ctx.ws.owner_key("ann"), received="now", received_ts=0.0,
                     shards={"sa": [ctx.ws.owner_key("ann")]})
    with pytest.raises(MlflowException):
        plan.plan(down, rev)
    with pytest.raises(MlflowException):
        go_live.go_live(down, rev, Plan(exclusive_shards=["sa"], shared_shards=[], composite_before=live,
                                        estimator="prior"))
    assert str(registry.alias_version(ctx.client, registry.COMPOSITE).version) == live  # nothing moved
