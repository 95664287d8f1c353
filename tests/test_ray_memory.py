"""What each Tier 2 actor of ``glinthawk run --ray`` reserves of Ray's memory resource, and the KV it is
given for it (glinthawk/ray_memory.py): computed without Ray, from the machines as ``ray.nodes()`` lists them."""

from __future__ import annotations

import math

import pytest
import torch

from glinthawk.compute.config import ModelConfig
from glinthawk.compute.kvcache import bytes_per_token
from glinthawk.plan import GiB
from glinthawk.ray_cluster import RayCluster, stage_token_bytes
from glinthawk.ray_memory import (RAY_KV_FRACTION, Machine, auto_kv_memory, holds, kv_memory_for, machines_of,
                                  reservation, tier2_options, tier2_sizes, unplaced)
from glinthawk.settings import Tier2Settings


def test_an_actor_reserves_its_kv_and_its_process_as_glinthawk_plan_counts_them():
    assert reservation(0) == GiB
    assert reservation(20 * GiB) == math.ceil(GiB + 20 * GiB * 1.045)
    assert tier2_options(reservation(GiB)) == {"num_cpus": 1, "memory": reservation(GiB), "max_restarts": -1,
                                               "max_task_retries": -1, "scheduling_strategy": "SPREAD"}


def test_a_ray_tier2_actor_takes_a_share_of_its_machines_memory():
    alone = kv_memory_for(64 * GiB, 1)
    assert reservation(alone) <= RAY_KV_FRACTION * 64 * GiB < reservation(alone + 1)  # the most its share holds
    assert alone == pytest.approx((RAY_KV_FRACTION * 64 * GiB - GiB) / 1.045, abs=2)
    quarter = kv_memory_for(64 * GiB, 4)
    assert reservation(quarter) <= RAY_KV_FRACTION * 16 * GiB < reservation(quarter + 1) and quarter < alone
    assert kv_memory_for(64 * GiB, 1, fraction=0.5) < alone
    with pytest.raises(ValueError, match=r"Ray reports 4\.0 GiB of memory on a machine for 4 Tier 2 actor\(s\).*give "
                                         r"--kv-memory \(or --kv-tokens\), or run fewer Tier 2 nodes"):
        kv_memory_for(4 * GiB, 4)


def test_the_machines_are_the_live_ones_with_a_cpu():
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "memory": 64.0 * GiB}},
             {"Alive": False, "Resources": {"CPU": 8.0, "memory": 64.0 * GiB}},  # gone
             {"Alive": True, "Resources": {"memory": 32.0 * GiB}},  # a head started with --num-cpus=0
             {"Alive": True, "Resources": {"CPU": 2.0}}]  # no memory resource: holds no actor
    assert machines_of(nodes) == [Machine(64 * GiB, 8), Machine(0, 2)]
    assert holds(machines_of(nodes), reservation(GiB)) == 8  # its CPUs bound it (its memory holds 31)
    assert holds(machines_of(nodes), reservation(20 * GiB)) == 2  # its memory bounds it


def test_even_machines_give_each_actor_an_even_share_of_its_machine():
    machines = [Machine(64 * GiB, 16)] * 4
    kv = auto_kv_memory(machines, 8)
    assert kv == kv_memory_for(64 * GiB, 2)  # 2 actors a machine
    assert holds(machines, reservation(kv), RAY_KV_FRACTION) >= 8
    assert auto_kv_memory(machines, 9) == kv_memory_for(64 * GiB, 3)  # one machine must hold 3


def test_one_small_machine_holds_fewer_actors_instead_of_shrinking_all():
    """The smallest machine's even share would give each of 4 actors 8 GiB / 2 of KV; the two large
    machines hold all 4 at their own even share, larger, and Ray places none on the small one."""
    machines = [Machine(64 * GiB, 16), Machine(64 * GiB, 16), Machine(8 * GiB, 16)]
    kv = auto_kv_memory(machines, 4)
    assert kv == kv_memory_for(64 * GiB, 2) > kv_memory_for(8 * GiB, 2)
    assert RAY_KV_FRACTION * 8 * GiB < reservation(kv)
    assert auto_kv_memory(machines, 5) == kv_memory_for(64 * GiB, 3)  # still on the large ones, 3 and 2
    # when their CPUs hold no more than 4, the fifth goes to the small machine: all get what it holds alone
    assert auto_kv_memory([Machine(m.memory, 2) for m in machines], 5) == kv_memory_for(8 * GiB, 1)


def test_cpus_bound_the_actors_a_machine_holds():
    assert auto_kv_memory([Machine(64 * GiB, 1), Machine(64 * GiB, 1)], 2) == kv_memory_for(64 * GiB, 1)


@pytest.mark.parametrize("machines", [[Machine(4 * GiB, 8)], [], [Machine(64 * GiB, 2)]])
def test_machines_that_cannot_hold_the_actors_are_refused_in_one_line(machines):
    with pytest.raises(ValueError, match=r"^Ray's \d machine\(s\) with a CPU .* cannot hold 4 Tier 2 actor\(s\).* give "
                                         r"--kv-memory \(or --kv-tokens\), or run fewer Tier 2 nodes$"):
        auto_kv_memory(machines, 4)


def test_a_given_kv_size_is_reserved_as_it_is_and_refused_when_no_machine_holds_it():
    machines = [Machine(16 * GiB, 8)] * 2
    (size,) = tier2_sizes(Tier2Settings(kv_memory="6GiB", kv_dtype="int8"), machines, 4, [0])
    assert size.args == ["--kv-memory", "6GiB", "--kv-dtype", "int8"] and size.reserve == reservation(6 * GiB)
    tokens = tier2_sizes(Tier2Settings(kv_tokens=1000), machines, 2, [100, 300])  # two stages, their own layers
    assert [s.reserve for s in tokens] == [reservation(100_000), reservation(300_000)]
    assert tokens[0].args == ["--kv-tokens", "1000"]
    with pytest.raises(ValueError, match=r"^each Tier 2 actor reserves 7\.3 GiB of Ray's memory resource .* Ray's "
                                         r"machines hold 4 of the 5; give a smaller --kv-memory"):
        tier2_sizes(Tier2Settings(kv_memory="6GiB"), machines, 5, [0])


def test_no_kv_size_gives_every_stage_the_largest_the_machines_hold():
    machines = [Machine(64 * GiB, 16)] * 2
    sizes = tier2_sizes(Tier2Settings(kv_dtype="int8"), machines, 4, [0, 0])
    kv = kv_memory_for(64 * GiB, 2)
    assert [(s.args, s.reserve) for s in sizes] == [(["--kv-memory", str(kv), "--kv-dtype", "int8"],
                                                     reservation(kv))] * 2


def test_kv_tokens_cost_each_stages_layers_in_the_kv_dtype(model_dir):
    config = ModelConfig.from_file(model_dir / "config.json")

    def per_token(layers: int, dtype: torch.dtype) -> int:
        return bytes_per_token(layers, config.num_kv_heads, config.head_dim, dtype)

    whole = [None]
    assert stage_token_bytes(model_dir, whole, "auto", "auto") == [per_token(config.num_layers, torch.float32)]
    assert stage_token_bytes(model_dir, whole, "bfloat16", "auto") == [per_token(config.num_layers, torch.bfloat16)]
    assert stage_token_bytes(model_dir, [range(0, 1), range(1, 2)], "float32", "int8") == [per_token(1, torch.int8)] * 2


class FakeRay:
    """What ``RayCluster`` asks Ray about its machines, for one of 32 GiB of Ray memory and 8 CPUs."""

    @staticmethod
    def nodes() -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": 8.0, "memory": 32.0 * GiB}}]


def test_the_cluster_reserves_each_stages_kv_tokens_and_refuses_before_starting_anything(model_dir):
    cluster = RayCluster.from_options("local", model_dir, 2, stages=2, dtype="float32", kv_tokens=4096)
    config = ModelConfig.from_file(model_dir / "config.json")
    one_layer = bytes_per_token(1, config.num_kv_heads, config.head_dim, torch.float32)
    assert [s.reserve for s in cluster._tier2_sizes(FakeRay)] == [reservation(4096 * one_layer)] * 2
    big = RayCluster.from_options("local", model_dir, 2, kv_memory="20GiB")
    with pytest.raises(RuntimeError, match=r"^each Tier 2 actor reserves 21\.9 GiB .* hold 1 of the 2"):
        big._tier2_sizes(FakeRay)
    assert big.tier1 is None and big.tier2 == []


def test_an_actor_left_pending_is_named_with_the_memory_it_misses():
    message = unplaced(2, 4, 3 * GiB, 1.5 * GiB, 300)
    assert message == ("2 of 4 Tier 2 actor(s) did not start within 300 s: they need 6.0 GiB of Ray's memory resource "
                       "(3.0 GiB each) and Ray has 1.5 GiB of it free on all machines together; free some (other work "
                       "holds it), or give a smaller --kv-memory or fewer Tier 2 nodes")
    assert "\n" not in message
