"""Fitting resource requests to the cluster: impossible requests fail at start, actor pools
never starve their read tasks, `num_gpus: auto` follows the hardware, and an autoscaling
cluster is fitted as it can grow (its nodes are then asked for: test_autoscaling.py)."""

from __future__ import annotations

import pytest

from difforge.platform.capacity import Capacity, NodeGroup, fits
from difforge.platform.errors import ResourceError
from difforge.platform.resources import Resources, demand, fit

CPU2 = Capacity(cpus=2.0, node_cpus=2.0)
GPU8 = Capacity(cpus=64.0, gpus=8.0, node_cpus=64.0)


def test_gpu_request_on_a_cpu_cluster_is_an_error_not_a_wait():
    with pytest.raises(ResourceError, match="asks for num_gpus=1.0 but the cluster has no GPU"):
        fit("train", Resources(num_gpus=1), CPU2, 1.0)


def test_auto_gpus_follow_the_cluster():
    assert fit("enc", Resources(num_gpus="auto"), CPU2, 0.25).num_gpus == 0
    fitted = fit("enc", Resources(num_gpus="auto"), GPU8, 0.25)
    assert fitted.num_gpus == 0.25 and fitted.max_actors == 32


def test_actor_pool_never_asks_for_more_cpus_than_exist():
    fitted = fit("enc", Resources(max_actors=4, num_cpus=1), CPU2, 0)
    assert fitted.max_actors == 4 and fitted.max_actors * fitted.num_cpus <= 2.0
    default = fit("enc", Resources(), CPU2, 0)
    assert (default.max_actors, default.num_cpus) == (2, 1.0)


def test_more_workers_than_cpus_is_an_error():
    with pytest.raises(ResourceError, match="3 workers x 1 CPUs; the cluster has 2 CPUs"):
        fit("train", Resources(num_workers=3, num_cpus=1), CPU2, 0)
    with pytest.raises(ResourceError, match="num_cpus=4"):
        fit("train", Resources(num_cpus=4), CPU2, 0)


def test_a_training_job_without_num_cpus_takes_the_node_divided_by_its_workers():
    cluster = Capacity(cpus=16.0, node_cpus=8.0)  # two nodes of 8
    assert fit("t", Resources(num_workers=1), cluster, 0.0).num_cpus == 8
    assert fit("t", Resources(num_workers=3), cluster, 0.0).num_cpus == 2
    assert fit("t", Resources(num_workers=1, num_cpus=3), cluster, 0.0).num_cpus == 3
    assert fit("t", Resources(num_workers=1), CPU2, 0.0).num_cpus == 2
    assert fit("m", Resources(), CPU2, 0.0).num_cpus == 1  # a map task: one


# KubeRay's defaults: a head with 0 CPUs, a CPU group and a GPU group that scale from zero
SCALED_TO_ZERO = Capacity(
    autoscaler=True,
    groups=(NodeGroup({"CPU": 4.0}, 2.0), NodeGroup({"CPU": 8.0, "GPU": 1.0}, 2.0)),
)


def test_a_cluster_scaled_to_zero_is_fitted_as_its_node_groups_can_grow():
    train = fit("t", Resources(num_workers=2), SCALED_TO_ZERO, 0.0)
    assert (train.num_workers, train.num_cpus) == (2, 4.0)  # the largest group's node, halved
    assert demand("job", False, Resources(num_workers=2), train) == [{"CPU": 4.0}] * 2
    encode = fit("enc", Resources(num_gpus="auto"), SCALED_TO_ZERO, 1.0)
    assert encode.num_gpus == 1.0  # `auto`: GPUs, since a group has them
    assert demand("map", True, Resources(), encode) == [{"CPU": 1.0, "GPU": 1.0}]
    assert demand("map", False, Resources(), fit("m", Resources(), SCALED_TO_ZERO, 0.0)) == [
        {"CPU": 1.0}
    ]
    with pytest.raises(ResourceError, match="0 GPUs now and can grow to 2"):
        fit("t", Resources(num_workers=3, num_gpus=1), SCALED_TO_ZERO, 0.0)
    with pytest.raises(ResourceError, match="0 CPUs now and can grow to 24"):
        fit("t", Resources(num_workers=25, num_cpus=1), SCALED_TO_ZERO, 0.0)


def test_an_autoscaler_that_does_not_report_its_groups_refuses_nothing_up_front(monkeypatch):
    unknown = Capacity(autoscaler=True)
    assert fit("t", Resources(num_workers=64, num_cpus=8), unknown, 0.0).num_workers == 64
    monkeypatch.delenv("DIFFORGE_DEVICE_CLASS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert fit("enc", Resources(num_gpus="auto"), unknown, 1.0).num_gpus == 0
    monkeypatch.setenv("DIFFORGE_DEVICE_CLASS", "cuda")  # the GPU cluster's head says so
    assert fit("enc", Resources(num_gpus="auto"), unknown, 1.0).num_gpus == 1.0
    # a fixed cluster is what it holds, whatever the head says
    with pytest.raises(ResourceError, match="no GPU"):
        fit("enc", Resources(num_gpus=1), CPU2, 1.0)
    assert fit("enc", Resources(num_gpus="auto"), CPU2, 1.0).num_gpus == 0


def test_bundles_are_placed_one_per_node():
    two_small = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert fits([{"CPU": 1.0}] * 2, two_small)
    assert not fits([{"CPU": 2.0}], two_small)  # 2 CPUs in all, but not on one node
    assert not fits([{"CPU": 1.0, "GPU": 1.0}], two_small)
    assert fits([{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0}], [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}])
