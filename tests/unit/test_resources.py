"""Fitting resource requests to the cluster: impossible requests fail at start, actor pools
never starve their read tasks, and `num_gpus: auto` follows the hardware."""

from __future__ import annotations

import pytest

from difforge.platform.errors import ResourceError
from difforge.platform.resources import fit
from difforge.platform.spec import Resources

CPU2 = {"CPU": 2.0}
GPU8 = {"CPU": 64.0, "GPU": 8.0}


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
    cluster = {"CPU": 16.0, "node_cpus": 8.0}  # two nodes of 8
    assert fit("t", Resources(num_workers=1), cluster, 0.0).num_cpus == 8
    assert fit("t", Resources(num_workers=3), cluster, 0.0).num_cpus == 2
    assert fit("t", Resources(num_workers=1, num_cpus=3), cluster, 0.0).num_cpus == 3
    assert fit("t", Resources(num_workers=1), {"CPU": 2.0}, 0.0).num_cpus == 2
    assert fit("m", Resources(), {"CPU": 2.0}, 0.0).num_cpus == 1  # a map task: one
