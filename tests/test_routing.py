"""Routing policies on synthetic replicas: balance and affinity behave as documented."""

import random
from collections import Counter

from serving.ingress.adapter_routing import AdapterPlacement
from serving.ingress.pool import Replica
from serving.ingress.routing import PowerOfTwo, PrefixAffinity, RoundRobin, routing_text


def replicas(n=2):
    return [Replica(f"r{i}", f"http://127.0.0.1:{9000 + i}", 0) for i in range(n)]


def test_round_robin_alternates():
    rs = replicas(3)
    policy = RoundRobin()
    assert [policy.choose(rs, "").replica_id for _ in range(6)] == ["r0", "r1", "r2"] * 2


def test_power_of_two_prefers_less_loaded():
    rs = replicas(2)
    rs[0].in_flight = 5
    policy = PowerOfTwo(random.Random(0))
    assert all(policy.choose(rs, "").replica_id == "r1" for _ in range(20))


def test_prefix_affinity_sticks_to_the_replica_that_served_the_prefix():
    rs = replicas(2)
    policy = PrefixAffinity(block_chars=16, rng=random.Random(1))
    system = "You are a careful assistant. " * 8
    first = policy.choose(rs, system + "question one").replica_id
    for i in range(10):
        assert policy.choose(rs, system + f"question {i}").replica_id == first


def test_prefix_affinity_balances_distinct_prefixes_and_busy_owner():
    rs = replicas(2)
    policy = PrefixAffinity(block_chars=16, imbalance=2, rng=random.Random(2))
    counts = Counter()
    for i in range(200):
        chosen = policy.choose(rs, f"{i:04d} a different system prompt for every request")
        chosen.in_flight += 1
        counts[chosen.replica_id] += 1
        if i % 2:  # requests finish over time
            for r in rs:
                r.in_flight = max(0, r.in_flight - 1)
    assert max(counts.values()) <= 0.6 * sum(counts.values())
    # A busy owner loses its affinity instead of queueing more work.
    rs = replicas(2)
    policy = PrefixAffinity(block_chars=16, imbalance=2, rng=random.Random(3))
    prompt = "shared system prompt " * 10
    owner = policy.choose(rs, prompt)
    owner.in_flight = 10
    assert policy.choose(rs, prompt).replica_id != owner.replica_id


def test_prefix_memory_is_bounded():
    policy = PrefixAffinity(block_chars=8, max_entries=50)
    rs = replicas(2)
    for i in range(500):
        policy.choose(rs, f"{i:08d}" * 4)
    assert len(policy._owner) <= 50


def test_routing_text_tolerates_any_json():
    assert routing_text({"messages": [{"role": 1, "content": [{"text": 1}, {"text": "a"}]}, 5]}) == "\na\n"
    assert routing_text({"prompt": [1, 2]}) == ""
    assert routing_text({"messages": [{"role": "user", "content": "hi"}]}) == "user\nhi\n"


# --- adapter affinity (ingress/adapter_routing.py) ------------------------------------------

def _route(placement, policy, rs, adapter):
    chosen = policy.choose(placement.candidates(rs, adapter), "")
    placement.served(chosen, adapter)
    return chosen


def test_two_adapters_with_one_slot_each_settle_on_their_own_replicas():
    rs = replicas(2)
    placement, policy = AdapterPlacement(slots=1), RoundRobin()
    rng = random.Random(4)
    served = Counter()
    for _ in range(200):
        adapter = rng.choice(["a", "b"])
        served[(adapter, _route(placement, policy, rs, adapter).replica_id)] += 1
    # After each adapter's first request, every request finds its adapter's replica.
    owners = {a: max(("r0", "r1"), key=lambda r: served[(a, r)]) for a in "ab"}
    assert owners["a"] != owners["b"]
    assert served[("a", owners["b"])] + served[("b", owners["a"])] <= 1
    # Round-robin alone sends about half of each adapter's requests to the other replica.
    rr, mixed = RoundRobin(), 0
    for i in range(200):
        adapter = rng.choice(["a", "b"])
        mixed += rr.choose(rs, "").replica_id != owners[adapter]
    assert mixed > 60


def test_a_busy_holder_shares_its_adapter_instead_of_queueing_it():
    rs = replicas(2)
    placement, policy = AdapterPlacement(slots=1, imbalance=2), PowerOfTwo(random.Random(5))
    holder = _route(placement, policy, rs, "a")
    holder.in_flight = 3  # more than 2 above the idle replica
    other = _route(placement, policy, rs, "a")
    assert other is not holder and "a" in other.recent_adapters
    holder.in_flight = 2  # within the bound again: holders are preferred, the least loaded
    assert _route(placement, policy, rs, "a") is other


def test_base_model_requests_and_a_single_replica_pass_through():
    rs = replicas(2)
    placement = AdapterPlacement(slots=1)
    assert placement.candidates(rs, None) == rs
    placement.served(rs[0], None)
    assert not rs[0].recent_adapters
    assert placement.candidates(rs[:1], "a") == rs[:1]


def test_a_replica_remembers_as_many_adapters_as_it_has_slots():
    rs = replicas(3)
    placement = AdapterPlacement(slots=2)
    for adapter in ("a", "b", "c"):
        placement.served(rs[0], adapter)
    assert list(rs[0].recent_adapters) == ["b", "c"]  # "a" was least recent: evicted
    # A new adapter goes to a replica with a free slot, not to the full one.
    assert [r.replica_id for r in placement.candidates(rs, "d")] == ["r1", "r2"]
