"""The planner on synthetic profiles (data parallelism when memory allows, pipelines when it does not,
forced stage counts, clear errors), schedules as data, deployment files, and the 4.9B dry run."""

from __future__ import annotations

import time

import pytest
import torch

from rannc.config import RannConfig
from rannc.graph.blocks import Blocks
from rannc.plan.deployment import Deployment, DeploymentError, show_deployment
from rannc.plan.planner import PlanningError, plan, simulate_deployment
from rannc.profile.profiles import BlockProfile, Linear, ProfileSet
from rannc.runtime.chunks import split_batch
from rannc.schedule import gpipe_backward, gpipe_forward, in_flight, one_f_one_b

GB = 10**9


def _profile(blocks=16, param_bytes=GB, memory=80 * GB, ar_bytes_per_ms=1e8):
    """`blocks` equal blocks of `param_bytes` each, 1 ms + 0.1 ms/sample forward."""
    return ProfileSet(
        blocks=[BlockProfile(fwd_ms=Linear(0.05, 0.1), bwd_ms=Linear(0.1, 0.2), activation_bytes=Linear(0, 1e7),
                             out_bytes=Linear(0, 1e5), tensors=[f"w{k}"]) for k in range(blocks)],
        tensor_bytes={f"w{k}": param_bytes for k in range(blocks)}, trainable={f"w{k}": True for k in range(blocks)},
        device_name="test", device_memory_bytes=memory, allreduce_bytes_per_ms=ar_bytes_per_ms,
        p2p_bytes_per_ms=1e7)


def _bounds(n):
    return Blocks(list(range(n + 1)))


def test_enough_memory_gives_data_parallelism():
    d = plan(_profile(param_bytes=10**7), _bounds(16), 4, 64, RannConfig(), "f")
    assert len(d.stages) == 1 and d.stages[0].ranks == [0, 1, 2, 3] and d.microbatch_count == 1


def test_too_little_memory_gives_a_pipeline_that_fits():
    # 16 GB of parameters x (param + grad + 2 Adam states) = 64 GB: one 40 GB device cannot hold it
    d = plan(_profile(param_bytes=GB, memory=40 * GB), _bounds(16), 4, 64, RannConfig(mem_margin=0.1), "f")
    assert len(d.stages) >= 2
    assert all(s.memory_bytes <= 36 * GB for s in d.stages)
    assert sorted(r for s in d.stages for r in s.ranks) == list(range(len(d.stages) * d.replicas))
    assert [s.first_block for s in d.stages][0] == 0 and d.stages[-1].end_block == 16


def test_partition_num_forces_the_stage_count():
    d = plan(_profile(param_bytes=10**7), _bounds(16), 4, 64, RannConfig(partition_num=2), "f")
    assert len(d.stages) == 2 and d.replicas == 2 and d.stages[1].ranks == [2, 3]


def test_recomputation_when_activations_do_not_fit():
    profile = _profile(blocks=4, param_bytes=GB, memory=40 * GB)
    for b in profile.blocks:
        b.activation_bytes = Linear(0, 2e8)   # 64 samples x 4 blocks = 51 GB kept without recomputation;
    # with it, one micro-batch of 16 (13 GB) at a time: 16 GB of states + 13 GB fits 40 GB
    d = plan(profile, _bounds(4), 1, 64, RannConfig(mem_margin=0.0, min_pipeline=4, max_pipeline=4), "f")
    assert d.stages[0].recompute and d.microbatch_count == 4
    assert d.stages[0].memory_bytes <= 40 * GB


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(PlanningError, match="no partition of the model fits"):
        plan(_profile(param_bytes=10 * GB, memory=20 * GB), _bounds(16), 2, 64, RannConfig(), "f")


def test_gpipe_schedule_lists():
    assert [str(a) for a in gpipe_forward(3)] == ["F0", "F1", "F2"]
    assert [str(a) for a in gpipe_backward(3)] == ["B2", "B1", "B0"]


def test_one_f_one_b_schedule_lists():
    assert [str(a) for a in one_f_one_b(0, 2, 4)] == ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"]
    assert [str(a) for a in one_f_one_b(1, 2, 4)] == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]
    assert [str(a) for a in one_f_one_b(0, 3, 2)] == ["F0", "F1", "B0", "B1"]
    assert in_flight("1f1b", 0, 4, 8) == 4 and in_flight("1f1b", 3, 4, 8) == 1 and in_flight("gpipe", 3, 4, 8) == 8


def test_one_f_one_b_plans_with_less_activation_memory():
    profile = _profile(blocks=8, param_bytes=10**8, memory=80 * GB)
    for b in profile.blocks:
        b.activation_bytes = Linear(0, 1e8)
    config = dict(partition_num=4, min_pipeline=8, max_pipeline=8, recompute="never")
    gpipe = plan(profile, _bounds(8), 4, 64, RannConfig(**config), "f")
    ofob = plan(profile, _bounds(8), 4, 64, RannConfig(schedule="1f1b", **config), "f")
    assert ofob.schedule == "1f1b" and gpipe.schedule == "gpipe"
    assert ofob.stages[-1].memory_bytes < gpipe.stages[-1].memory_bytes


def test_chunks_cover_the_batch_with_weights_summing_to_one():
    chunks = split_batch(10, 2, 2)
    rows = [(c.start, c.stop) for m in chunks for c in m]
    assert rows == [(0, 3), (3, 5), (5, 8), (8, 10)]   # 2 micro-batches of 5 rows, each cut in 2
    assert abs(sum(c.weight for m in chunks for c in m) - 1.0) < 1e-12


def test_deployment_file_round_trip_and_checks(tmp_path, capsys):
    d = plan(_profile(param_bytes=10**7), _bounds(16), 2, 32, RannConfig(partition_num=2), "abc")
    path = tmp_path / "d.json"
    d.save(path)
    loaded = Deployment.load(path)
    assert loaded == d
    loaded.check_fits("abc", 2, 32)
    with pytest.raises(DeploymentError, match="another model"):
        loaded.check_fits("xyz", 2, 32)
    with pytest.raises(DeploymentError, match="planned for 2 processes"):
        loaded.check_fits("abc", 4, 32)
    show_deployment(path, 32)
    assert "stages=2" in capsys.readouterr().out


def test_dry_run_plan_of_the_49b_bert_for_8_devices_is_fast(capsys):
    from bert import plan as bert_plan
    start = time.perf_counter()
    deployment = bert_plan.main(["--config_file", "bert/configs/bert_4.9b.json", "--np", "8", "--device", "h100"])
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"dry-run planning took {elapsed:.1f} s"
    assert all(s.memory_bytes <= deployment.memory_limit_bytes for s in deployment.stages)
    assert len(deployment.stages) >= 2   # 78 GB of fp32 weights, grads and LAMB states cannot fit one 80 GB card
    assert "4.91 B parameters" in capsys.readouterr().out


def tiny_factory():
    """For `rannc plan`: a 4-layer MLP and an example batch."""
    import torch
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(4)])
    return model, (torch.randn(8, 32),)


def test_show_and_plan_commands_draw_pictures(tmp_path, capsys):
    import json

    from rannc.cli import main
    d = plan(_profile(param_bytes=GB, memory=40 * GB), _bounds(16), 4, 64, RannConfig(mem_margin=0.1), "f")
    assert len(d.stages) > 1
    path = tmp_path / "d.json"
    d.save(path)
    trace = tmp_path / "trace.rank0"
    events = [{"name": "F0", "ph": "X", "pid": 0, "tid": 0, "ts": 0, "dur": 500},
              {"name": "B0", "ph": "X", "pid": 0, "tid": 0, "ts": 600, "dur": 900}]
    trace.write_text(json.dumps({"traceEvents": events}))
    main(["show", str(path), "--png", str(tmp_path / "d.png"), "--trace", str(trace)])
    assert (tmp_path / "d.png").stat().st_size > 10_000
    main(["plan", "tests.test_planner:tiny_factory", "--np", "2", "--png", str(tmp_path / "p.png"),
          "--save", str(tmp_path / "p.json")])
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert Deployment.load(tmp_path / "p.json").world_size == 2
    assert "planned in" in capsys.readouterr().out


def test_too_few_rows_for_min_pipeline_is_a_clear_error():
    from rannc.plan.planner import profile_sizes
    with pytest.raises(PlanningError, match="min_pipeline=4"):
        plan(_profile(param_bytes=10**7), _bounds(16), 2, 2, RannConfig(min_pipeline=4), "f")
    with pytest.raises(PlanningError, match="global batch of 2 rows"):
        profile_sizes(RannConfig(min_pipeline=4), 2, 16, 2)


def test_optimizer_step_is_timed_on_a_copy_of_the_wrapped_optimizer():
    """The planner times a copy of the user's optimizer over stand-in tensors. rannc patches the user's optimizer
    (its step reports failures to the other ranks) and an LR scheduler wraps its step: the copy must run its own
    class's step, measure Adam's two moments per parameter byte, and leave the user's optimizer untouched."""
    from rannc.profile.update import measure_update
    from rannc.runtime.optimizer import OptimizerPatch

    model = torch.nn.Linear(64, 64)
    before = model.weight.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    OptimizerPatch(optimizer)
    torch.optim.lr_scheduler.StepLR(optimizer, 1)
    update = measure_update(optimizer, torch.float32, torch.device("cpu"), large_bytes=2**20, repeats=1)
    assert update.state_bytes_per_byte == pytest.approx(2.0, rel=0.01)
    assert not optimizer.state and torch.equal(model.weight, before)


def test_the_optimizer_steps_timing_is_measured_once_per_settings_and_kept(monkeypatch, tmp_path):
    """A second deployment plans with the first one's optimizer timing (a fresh one moved the cuts between
    deployments of one model): measured once per optimizer settings, dtype and device, then taken from this
    process's memory, or from the cache directory in a new process; other settings are measured anew, another
    learning rate (a scheduler's) is not."""
    from rannc.profile import update as update_module
    from rannc.profile.profiles import UpdateProfile

    measured = []

    def fake_measure(optimizer, dtype, device, master_weights=False):
        measured.append(type(optimizer).__name__)
        return UpdateProfile(optimizer_ms_per_byte=float(len(measured)), source="fake")

    monkeypatch.setattr(update_module, "measure_update", fake_measure)
    monkeypatch.setattr(update_module, "_UPDATES", {})
    params = [torch.nn.Parameter(torch.ones(3))]
    cpu, cache = torch.device("cpu"), str(tmp_path)
    first = update_module.cached_update(torch.optim.Adam(params, lr=0.1), torch.float32, cpu, cache_dir=cache)
    again = update_module.cached_update(torch.optim.Adam(params, lr=0.1), torch.float32, cpu, cache_dir=cache)
    assert first == again and first.optimizer_ms_per_byte == 1.0 and measured == ["Adam"]
    update_module.cached_update(torch.optim.Adam(params, lr=0.2), torch.float32, cpu, cache_dir=cache)   # kept
    update_module.cached_update(torch.optim.Adam(params, lr=0.1, weight_decay=0.1), torch.float32, cpu,
                                cache_dir=cache)
    update_module.cached_update(torch.optim.SGD(params, lr=0.1), torch.float32, cpu, cache_dir=cache)
    update_module.cached_update(torch.optim.Adam(params, lr=0.1), torch.bfloat16, cpu, cache_dir=cache)
    assert measured == ["Adam", "Adam", "SGD", "Adam"]
    monkeypatch.setattr(update_module, "_UPDATES", {})   # a new process: the disk cache holds it
    assert update_module.cached_update(torch.optim.Adam(params, lr=0.1), torch.float32, cpu, cache_dir=cache) == first
    monkeypatch.setattr(update_module, "_UPDATES", {})
    update_module.cached_update(torch.optim.Adam(params, lr=0.1), torch.float32, cpu, cache_dir="")
    assert len(measured) == 5   # a new process without a cache directory measures
    kept = update_module.cached_update(torch.optim.Adam(params, lr=0.1), torch.float32, cpu)
    assert kept.optimizer_ms_per_byte == 5.0 and len(measured) == 5
    kept.optimizer_ms_per_byte = 99.0   # a caller's change does not reach the kept profile
    assert update_module.cached_update(torch.optim.Adam(params, lr=0.1), torch.float32, cpu) == UpdateProfile(
        optimizer_ms_per_byte=5.0, source="fake")


def _pipeline_bound_profile():
    """Too many parameters for data parallelism on 4 devices, so that a pipeline must run and its bubble
    matters: 8 equal blocks of 8 GB (x 4 with gradients and Adam states)."""
    return _profile(blocks=8, param_bytes=8 * GB, memory=80 * GB)


def test_auto_schedule_prefers_the_simplest_unless_another_is_faster():
    profile = _pipeline_bound_profile()
    items = dict(partition_num=4, min_pipeline=4, max_pipeline=4, mem_margin=0.0)
    chosen = plan(profile, _bounds(8), 4, 64, RannConfig(schedule="auto", **items), "f")
    forced = {name: plan(profile, _bounds(8), 4, 64, RannConfig(schedule=name, virtual_stages=v, **items), "f")
              for name, v in [("gpipe", 1), ("1f1b", 1), ("zb_h1", 1), ("interleaved_1f1b", 2)]}
    # 4 stages, 4 micro-batches: GPipe's bubble is 3/7 of the step; zero bubble and interleaving shrink it (the
    # split backward's parts are priced at their measured cost, 1.8 x the whole backward, so it gains less)
    assert forced["gpipe"].bubble_fraction == pytest.approx(3 / 7, abs=0.02)
    assert forced["zb_h1"].bubble_fraction < 0.8 * forced["gpipe"].bubble_fraction
    assert forced["interleaved_1f1b"].predicted_step_ms < 0.9 * forced["gpipe"].predicted_step_ms
    fastest = min(d.predicted_step_ms for name, d in forced.items() if name != "zb_h1")   # not in auto yet
    assert chosen.predicted_step_ms <= fastest * 1.03 + 1e-9
    assert chosen.schedule == "interleaved_1f1b" and chosen.virtual_stages == 2
    # a model returning more than one scalar can only run GPipe
    only_gpipe = plan(profile, _bounds(8), 4, 64, RannConfig(schedule="auto", **items), "f", in_call_ok=False)
    assert only_gpipe.schedule == "gpipe"
    # data parallelism (one stage) is GPipe whatever the schedule option
    small = plan(_profile(param_bytes=10**7), _bounds(16), 4, 64, RannConfig(schedule="auto"), "f")
    assert len(small.stages) == 1 and small.schedule == "gpipe"


def test_hops_between_ranks_are_priced_and_can_outweigh_interleaving(tmp_path):
    """Where a transfer waits while ranks compute (p2p_hop_ms, measured on CPUs), every hop of a micro-batch
    between ranks delays it: GPipe's step grows by the fill and drain's 2 x (stages - 1) hops, interleaving's by
    more (each piece's hop), and with hops long enough the planner keeps the simpler schedule. The deployment
    keeps the hop, so its report and picture simulate what the planner did."""
    items = dict(partition_num=4, min_pipeline=4, max_pipeline=4, mem_margin=0.0)
    for_schedule = {}
    for hop in (0.0, 2.0, 20.0):
        profile = _pipeline_bound_profile()
        profile.p2p_hop_ms = hop
        for_schedule[hop] = {name: plan(profile, _bounds(8), 4, 64,
                                        RannConfig(schedule=name, virtual_stages=v, **items), "f")
                             for name, v in [("gpipe", 1), ("interleaved_1f1b", 2), ("auto", 2)]}
    gpipe = [for_schedule[h]["gpipe"].predicted_step_ms for h in (0.0, 2.0)]
    with_hops = for_schedule[2.0]["gpipe"]
    delayed = simulate_deployment(with_hops).step_ms
    with_hops.p2p_hop_ms = 0.0
    assert delayed == pytest.approx(simulate_deployment(with_hops).step_ms + 2 * 3 * 2.0)
    with_hops.p2p_hop_ms = 2.0
    interleaved = [for_schedule[h]["interleaved_1f1b"].predicted_step_ms for h in (0.0, 2.0)]
    assert interleaved[1] - interleaved[0] > gpipe[1] - gpipe[0]
    assert for_schedule[0.0]["auto"].schedule == "interleaved_1f1b"
    assert for_schedule[20.0]["auto"].schedule in ("gpipe", "1f1b")
    chosen = for_schedule[2.0]["interleaved_1f1b"]
    assert chosen.p2p_hop_ms == 2.0 and "hop=2.00 ms" in chosen.table()
    chosen.save(tmp_path / "d.json")
    assert Deployment.load(tmp_path / "d.json").p2p_hop_ms == 2.0


def test_split_backward_is_priced_at_the_shares_the_profile_measured(tmp_path):
    """The profiler times the split backward (BI, BW) of a few blocks; zb_h1's plan prices BI and BW at those
    shares of the backward (the fixed SPLIT_BACKWARD where a profile has none, as older ones), and its
    deployment keeps them, so that its report and picture simulate what the planner did."""
    from rannc.graph.blocks import linearize, make_blocks
    from rannc.graph.capture import capture
    from rannc.profile.profiler import profile_blocks

    torch.manual_seed(0)
    layers = [m for _ in range(4) for m in (torch.nn.Linear(64, 64), torch.nn.Tanh())]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(64, 1))
    inputs = (torch.randn(32, 64),)
    captured = capture(model, inputs)
    lin = linearize(captured)
    _, calibration = profile_blocks(captured, lin, make_blocks(lin, 4), list(inputs), [8, 16],
                                    torch.device("cpu"), repeats=2, show_progress=False)
    shares = calibration.split_backward
    assert set(shares) == {"BI", "BW"} and all(0.05 < v < 5.0 for v in shares.values()), shares

    items = dict(partition_num=4, min_pipeline=4, max_pipeline=4, mem_margin=0.0)
    steps, simulated = {}, {}
    for measured in ({}, {"BI": 0.4, "BW": 0.6}, {"BI": 0.8, "BW": 1.0}):
        profile = _pipeline_bound_profile()
        profile.calibration.split_backward = dict(measured)
        deployment = plan(profile, _bounds(8), 4, 64, RannConfig(schedule="zb_h1", **items), "f")
        assert deployment.split_backward == measured
        steps[tuple(measured.values())] = deployment.predicted_step_ms
        simulated[tuple(measured.values())] = simulate_deployment(deployment).step_ms
    assert steps[()] == pytest.approx(steps[(0.8, 1.0)])          # no measurement: the fixed shares
    assert steps[(0.4, 0.6)] < 0.9 * steps[(0.8, 1.0)]             # a cheaper split, a shorter step
    assert simulated[(0.4, 0.6)] < 0.9 * simulated[(0.8, 1.0)]     # the report's simulation as the planner's
    deployment.save(tmp_path / "d.json")
    assert Deployment.load(tmp_path / "d.json").split_backward == {"BI": 0.8, "BW": 1.0}


def test_virtual_stages_cut_the_model_into_pieces_placed_round_robin(tmp_path):
    profile = _profile(blocks=8, param_bytes=4 * GB, memory=80 * GB)   # 2 pieces of 2 blocks (32 GB) per rank
    d = plan(profile, _bounds(8), 4, 64, RannConfig(schedule="interleaved_1f1b", virtual_stages=2, partition_num=2,
                                                    min_pipeline=4, max_pipeline=4, mem_margin=0.0), "f")
    assert d.virtual_stages == 2 and d.pipeline_depth == 2 and len(d.stages) == 4
    assert [s.ranks for s in d.stages] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert d.pieces_of_rank(3) == [1, 3] and d.stage_of_rank(3) == 1
    assert [s.first_block for s in d.stages] == sorted(s.first_block for s in d.stages) and d.stages[-1].end_block == 8
    path = tmp_path / "d.json"
    d.save(path)
    assert Deployment.load(path) == d
    assert "virtual_stages=2" in d.table()
    with pytest.raises(PlanningError, match="exceeds"):
        plan(profile, _bounds(8), 8, 64, RannConfig(schedule="interleaved_1f1b", virtual_stages=2, partition_num=5),
             "f")


def test_unequal_replicas_give_every_rank_work():
    """3 devices and 2 stages: the planner searches 1 + 2 and 2 + 1 replicas (RaNNC's unequal replica counts),
    so no rank sits idle when a pipeline is needed; a forced vector places ranks in stage order."""
    profile = _profile(blocks=8, param_bytes=10**7)
    items = dict(partition_num=2, min_pipeline=4, max_pipeline=4, mem_margin=0.0)
    d = plan(profile, _bounds(8), 3, 64, RannConfig(**items), "f")
    assert sorted(len(s.ranks) for s in d.stages) == [1, 2]
    assert sorted(r for s in d.stages for r in s.ranks) == [0, 1, 2]
    assert "replicas=" in d.table() and ("replicas=1,2" in d.table() or "replicas=2,1" in d.table())
    forced = plan(profile, _bounds(8), 4, 64, RannConfig(stage_replicas="2,1,1", min_pipeline=4, max_pipeline=4,
                                                         mem_margin=0.0), "f")
    assert [s.ranks for s in forced.stages] == [[0, 1], [2], [3]] and forced.idle_ranks() == []
    idle = plan(profile, _bounds(8), 4, 64, RannConfig(stage_replicas="1,2", min_pipeline=4, max_pipeline=4), "f")
    assert idle.idle_ranks() == [3] and "idle ranks: [3]" in idle.table()
    with pytest.raises(PlanningError, match="stage_replicas"):
        plan(profile, _bounds(8), 3, 64, RannConfig(stage_replicas="2,2"), "f")


def test_both_directions_of_a_cut_are_priced():
    """A stage after a cut receives values in forward and sends their gradients back in backward: as many
    bytes, one transfer each; the first stage sends no gradients, the last no values."""
    profile = _profile(param_bytes=GB, memory=40 * GB)
    profile.p2p_latency_ms = 0.5
    d = plan(profile, _bounds(16), 2, 64, RannConfig(partition_num=2, min_pipeline=4, max_pipeline=4), "f")
    transfer = 0.5 + 16 * 1e5 / 1e7             # latency + a cut's bytes for a micro-batch of 16 samples
    first, last = d.stages
    assert (first.send_ms, first.grad_send_ms) == (pytest.approx(transfer), 0.0)
    assert (last.send_ms, last.grad_send_ms) == (0.0, pytest.approx(transfer))


def _live_profile_of_tiny_bert(rank, world, cache_dir):
    """A first call of the tiny BERT (the batch bert.plan plans for: seq 128, 20 masked positions), which
    leaves its measured profile in `cache_dir`."""
    import rannc
    from benchmarks.bert_throughput import make_batch
    from bert.modeling import BertConfig, BertForPreTrainingWithCriterion

    config = BertConfig.from_json_file("bert/configs/bert_tiny.json")
    torch.manual_seed(0)
    wrapped = rannc.RaNNCModule(BertForPreTrainingWithCriterion(config), profile_cache_dir=cache_dir)
    wrapped(*make_batch(config, 8, 128, 20, torch.device("cpu"), 0)).backward()


def test_dry_run_plans_from_a_profile_measured_on_one_device(tmp_path, capsys):
    """A one-device run's profile plans for more devices: its measured block times, not the estimates."""
    from bert import plan as bert_plan

    from distributed import run_ranks
    run_ranks(_live_profile_of_tiny_bert, 1, str(tmp_path))
    path, = tmp_path.glob("profile_*.json")
    args = ["--config_file", "bert/configs/bert_tiny.json", "--np", "4", "--batch_size", "32"]
    measured = bert_plan.main(args + ["--profile", str(path)])
    assert "measured profiles and planned for 4 x" in capsys.readouterr().out
    estimated = bert_plan.main(args)
    # the CPU's measured milliseconds, not an H200's estimated microseconds
    assert measured.predicted_step_ms > 10 * estimated.predicted_step_ms
    with pytest.raises(ValueError, match="do not match"):
        bert_plan.main(["--config_file", "bert/configs/bert_base.json", "--np", "4", "--profile", str(path)])


def test_kept_measurements_survive_unreadable_and_unwritable_files(tmp_path):
    """The on-disk cache of link speeds and optimizer timings: written whole through a renamed file, a
    truncated file is ignored with a word (and measured again by the caller), a place that cannot be written
    is said, not fatal; no cache directory, no file."""
    from rannc.profile import json_cache

    said = []
    path = json_cache.cache_file(str(tmp_path), "links", "abc")
    assert json_cache.read(path, "link cache", said.append) is None and not said
    json_cache.write(path, {"p2p_hop_ms": 0.5}, "link cache", said.append)
    assert json_cache.read(path, "link cache", said.append) == {"p2p_hop_ms": 0.5}
    assert list(tmp_path.iterdir()) == [path] and not said
    path.write_text('{"p2p_hop_ms": 0.')
    assert json_cache.read(path, "link cache", said.append) is None
    assert said[-1].startswith(f"Ignoring unreadable link cache {path}")
    json_cache.write(json_cache.cache_file(str(path), "update", "x"), {}, "optimizer timing", said.append)
    assert said[-1].startswith("Could not save optimizer timing")   # a file stands where the directory would be
    assert json_cache.cache_file("", "links", "abc") is None
