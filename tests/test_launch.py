"""Launchers and deployment files in a live run: torchrun / mpirun / SLURM variables, a dry run for more
devices than are running, and reusing a saved deployment."""

from __future__ import annotations

import torch

from rannc.dist import launch_env

import models
from distributed import run_ranks


def test_launcher_variables():
    assert launch_env({}) == (0, 1, 0)
    assert launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    assert launch_env({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
                       "OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == (5, 8, 1)
    assert launch_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}) == (2, 4, 0)


def _dry_run(rank, world, path):
    import rannc
    torch.manual_seed(0)
    model = models.make("mlp")
    wrapped = rannc.RaNNCModule(model, partitioning_dry_run_np=4, partition_num=2, save_deployment=True,
                                deployment_file=path, profile_repeats=1)
    try:
        wrapped(*models.global_batch("mlp", 8, 0))
    except SystemExit as stop:
        return stop.code
    return "did not exit"


def _reuse(rank, world, path):
    import rannc
    torch.manual_seed(0)
    model = models.make("mlp")
    first = rannc.RaNNCModule(model, partition_num=2, save_deployment=True, deployment_file=path)
    batch = models.local_part(models.global_batch("mlp", 8, 0), rank, world)
    expected = first(*batch).item()
    rannc.barrier()
    torch.manual_seed(0)
    again = rannc.RaNNCModule(models.make("mlp"), load_deployment=True, deployment_file=path)
    loss = again(*batch).item()
    return expected, loss, [s.ranks for s in again.deployment.stages]


def test_dry_run_plans_for_more_devices_and_exits(tmp_path):
    path = tmp_path / "dry.json"
    assert run_ranks(_dry_run, 1, str(path), timeout=120) == [0]
    from rannc.plan.deployment import Deployment
    deployment = Deployment.load(path)
    assert deployment.world_size == 4 and len(deployment.stages) == 2 and deployment.replicas == 2


def test_saved_deployment_is_reused(tmp_path):
    for expected, loss, stages in run_ranks(_reuse, 2, str(tmp_path / "d.json"), timeout=120):
        assert stages == [[0], [1]]
        assert abs(expected - loss) < 1e-6


def _traced(rank, world, path, schedule):
    import rannc
    torch.manual_seed(0)
    wrapped = rannc.RaNNCModule(models.make("mlp"), partition_num=2, trace_events=True, event_trace_file=path,
                                min_pipeline=2, max_pipeline=2, schedule=schedule)
    wrapped(*models.local_part(models.global_batch("mlp", 8, 0), rank, world)).backward()
    import json
    with open(wrapped.save_trace()) as f:
        return [e["name"] for e in json.load(f)["traceEvents"]]


def test_trace_events_record_the_schedule(tmp_path):
    names = run_ranks(_traced, 2, str(tmp_path / "trace.json"), "gpipe", timeout=120)
    assert names == [["F0", "F1", "B1", "B0"]] * 2
    names = run_ranks(_traced, 2, str(tmp_path / "trace.json"), "1f1b", timeout=120)
    assert names == [["F0", "F1", "B0", "B1"], ["F0", "B0", "F1", "B1"]]


def test_multi_node_mpirun_without_master_addr_is_a_clear_error():
    import pytest

    from rannc.dist import _default_master_addr
    assert _default_master_addr({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == "127.0.0.1"
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        _default_master_addr({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"})
