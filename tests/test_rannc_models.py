"""RaNNC's own test procedure on RaNNC-style models (`rannc_models.py`): a RaNNCModule and a single-process
reference trained side by side on the same global batches, at 1, 2 and 3 gloo ranks with 1 and 2 stages,
with the outputs returned ("out": the loss is computed outside, per rank) and with the loss folded in
("loss"). Compared each step: losses and outputs, gradients (get_param_grad, at update steps), the clipped
norm, parameters and buffers (state_dict(rank0_only=False)) and num_batches_tracked; after 3 steps also
get_param, state_dict() on rank 0 and the global optimizer state. Then (a quarter of the cases) the model and
optimizer state dicts are loaded into a fresh model + RaNNCModule + optimizer in the same processes, before
or after its deployment, and one more step must equal the reference's fourth. Settings vary over the matrix
(`_settings`): Adam / SGD + clip_grad_norm, accumulation patterns, micro-batch counts (planner's or forced
to 2), inputs by position or keyword. At world 1, 2 stages must be refused. rannc.clear() is not needed
between modules: RaNNCModules coexist (a resumed module is built next to the first, which still answers
afterwards); clear(); barrier() synchronises every rank (tested).

One run_ranks call per world size runs that world's cases (`_included`) for each stage count (process start
and capture dominate the time); ranks return per-case
error summaries and the parent asserts one test per model, way, world and stages. Every rank checks
against its own reference, so every rank's view of outputs, gradients and state dicts is checked.
`_run(world, sabotage)` breaks the reference on purpose ("loss_term", "ref_step", "resume_opt",
"bn_groups", comma-separated) to check that the assertions trip.

Reference semantics (see the README's "Bring your own model"):
  * "out": each rank's loss is criterion(its rows of the output, its targets); the gradients are the sum
    over ranks, so the reference loss is sum_r criterion(ref_out[rows_r], y_r).
  * "loss": the result is the loss of the global batch; the reference is the model on the global batch.
  * BatchNorm (micro-batches pinned to 1): with 1 stage on W ranks every replica normalises its own rows,
    so the reference runs each rank's rows separately, each from the same old running statistics, and then
    averages them; with 2 stages each stage has one replica (pinned: the planner would also try unequal
    replica counts at 3 ranks) and the reference is the plain global batch.
    "nograd" (training-mode calls under torch.no_grad()) checks the replica averaging without backward.
  * accumulation (acc=2): "toggle" is RaNNC's pattern, delay_grad_allreduce(micro < acc - 1); "explicit"
    delays every micro-step and calls wrapped.allreduce_grads() before the update.
"""

from __future__ import annotations

import copy
import inspect
import time
import traceback

import pytest
import torch

import rannc_models as rm
from distributed import run_ranks

RTOL = 1e-5
ALWAYS_RESUME = ("shared_emb", "bn")
STEPS = 3
NAMES = list(rm.SPECS)
CASES = [(name, way) for name in NAMES for way in rm.SPECS[name].ways]
COMBOS = [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2)]   # (world, stages); 2 stages need 2 ranks

# Known rannc bugs: (world, stages, name, way) -> reason; these cases run last in their world's run, and the
# run goes on after them when they raise (they raise the same way on every rank).
KNOWN_BUGS: dict[tuple[int, int, str, str], str] = {}


# ---- per-case settings -------------------------------------------------------------------------------------

def _settings(world: int, stages: int, name: str, way: str) -> dict:
    """Optimizer, accumulation, clipping, and whether (and when) a resumed run loads the saved state, varied
    over the matrix: per (world, stages) every model trains once with Adam and once with SGD (+ clipping), at
    2 and 3 ranks both accumulation patterns appear, and a quarter of the models (the tied-embedding and BatchNorm
    ones everywhere; `layernorm` and `shared_param` never, `param_free` has nothing to resume) resume one of their
    ways: a resume deploys a second module, and capturing it is most of a case's time."""
    m, v = NAMES.index(name), ("out", "loss", "nograd").index(way) % 2
    opt = ("adam", "sgd")[(m // 2 + v + world) % 2]
    if world == 1:
        acc = ("toggle", "none")[(m + v) % 2]
    else:
        acc = "explicit" if (m + v + world) % 3 == 0 else "toggle"
    ways = [w for w in rm.SPECS[name].ways if w != "nograd"]
    resume = (rm.SPECS[name].has_params and way == ways[(m + world + stages) % len(ways)]
              and (name in ALWAYS_RESUME or (m + world + stages) % 4 == 0))
    # forced micro-batches: replica j of micro-batch m then runs rows other than its rank's local batch
    micro = 2 if not rm.SPECS[name].batchnorm and (m + v + world) % 2 == 1 else None
    return {"opt": opt, "acc": acc, "clip": opt == "sgd", "micro": micro, "keyword": (m + stages) % 2 == 0,
            "resume": ("after" if (m + stages + world) % 2 == 0 else "before") if resume else None}


def _optimizer(kind: str, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.Adam(params, lr=0.01, eps=1e-3)


# ---- comparison helpers --------------------------------------------------------------------------------------

class Errors:
    """The largest relative error per metric, with where it occurred."""

    def __init__(self):
        self.worst: dict[str, tuple[float, str]] = {}

    def add(self, metric: str, value, ref, where: str) -> None:
        if ref is None and value is None:
            err = 0.0
        elif ref is None or value is None:
            err = float("inf")
            where += f" (missing: {'rannc' if value is None else 'reference'})"
        else:
            value = torch.as_tensor(value).detach().float().cpu()
            ref = torch.as_tensor(ref).detach().float().cpu()
            if value.shape != ref.shape:
                err = float("inf")
                where += f" (shape {tuple(value.shape)} vs {tuple(ref.shape)})"
            elif ref.numel() == 0:
                err = 0.0
            else:
                err = ((value - ref).abs().max() / (ref.abs().max() + 1e-3)).item()
                if err != err:  # NaN
                    err = float("inf")
        if metric not in self.worst or err > self.worst[metric][0]:
            self.worst[metric] = (err, where)


def _leaves(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [leaf for k in sorted(out) for leaf in _leaves(out[k])]
    if isinstance(out, (tuple, list)):
        return [leaf for o in out for leaf in _leaves(o)]
    raise TypeError(type(out))


def _take_rows(out, sl: slice):
    if isinstance(out, torch.Tensor):
        return out[sl]
    if isinstance(out, dict):
        return {k: _take_rows(v, sl) for k, v in out.items()}
    return type(out)(_take_rows(o, sl) for o in out)


# ---- the reference -------------------------------------------------------------------------------------------

class Reference:
    """The single-process model, called on the global batch; `groups` are the row ranges it normalises
    separately (one per replica for BatchNorm in a replicated stage, else the whole batch)."""

    def __init__(self, model, name: str, way: str, world: int, groups: list[slice]):
        self.model = model
        self.spec = rm.SPECS[name]
        self.way = way
        self.world = world
        self.groups = groups

    def _each_group(self, call):
        """call(rows) for every group; running buffers: each group starts from the same old values, the
        floating ones end as their average (rannc's replica averaging), the others as the last group left them."""
        if len(self.groups) == 1:
            return [call(self.groups[0])]
        buffers = dict(self.model.named_buffers())
        old = {n: b.detach().clone() for n, b in buffers.items()}
        results, new = [], []
        # writes through .data: batch_norm saved the running buffers for backward (unused in train mode), and
        # autograd's version counter must not see these resets
        for sl in self.groups:
            for n, b in buffers.items():
                b.data.copy_(old[n])
            results.append(call(sl))
            new.append({n: b.detach().clone() for n, b in buffers.items()})
        for n, b in buffers.items():
            if b.is_floating_point():
                b.data.copy_(torch.stack([v[n] for v in new]).mean(0))
            else:
                b.data.copy_(new[-1][n])
        return results

    def step(self, x, y):
        """(the loss to backward, {rank: what that rank's call returns (loss or outputs)}, {rank: its loss})"""
        batch = x.shape[0]
        if self.way == "loss":
            losses = self._each_group(lambda sl: (self.model(x[sl], y[sl]), sl))
            total = sum(loss * ((sl.stop - sl.start) / batch) for loss, sl in losses)
            return total, {r: total for r in range(self.world)}, {r: total for r in range(self.world)}
        outs = self._each_group(lambda sl: (self.model(x[sl]), sl))
        per_rank_out = {}
        for r in range(self.world):
            rows = rm.rows(r, self.world, batch)
            for out, sl in outs:
                if sl.start <= rows.start and rows.stop <= sl.stop:
                    per_rank_out[r] = _take_rows(out, slice(rows.start - sl.start, rows.stop - sl.start))
        per_rank_loss = {r: self.spec.criterion(per_rank_out[r], y[rm.rows(r, self.world, batch)])
                         for r in range(self.world)}
        return sum(per_rank_loss.values()), per_rank_out, per_rank_loss


# ---- one case on one rank ------------------------------------------------------------------------------------

def _run_case(rank: int, world: int, stages: int, name: str, way: str, settings: dict, errors: Errors,
              info: dict, sabotage: str | None) -> None:
    import rannc

    spec = rm.SPECS[name]
    pinned = 1 if spec.batchnorm else settings["micro"]
    items = {"min_pipeline": pinned, "max_pipeline": pinned} if pinned else {}
    if spec.batchnorm and stages > 1:   # one replica per stage: unequal counts would normalise other row groups
        items["stage_replicas"] = ",".join(["1"] * stages)
    acc = 1 if settings["acc"] == "none" else 2
    train = way != "nograd"            # "nograd": training-mode calls under torch.no_grad(), no backward
    model_way = "out" if way == "nograd" else way
    model = rm.make(name, model_way, seed=0)
    ref_model = copy.deepcopy(model)
    groups = ([rm.rows(r, world) for r in range(world)] if spec.batchnorm and stages == 1
              else [slice(0, rm.BATCH)])
    if "bn_groups" in (sabotage or ""):
        groups = [slice(0, rm.BATCH)]
    ref = Reference(ref_model, name, model_way, world, groups)
    use_opt = spec.has_params and train
    opt = _optimizer(settings["opt"], model.parameters()) if use_opt else None
    ref_opt = _optimizer(settings["opt"], ref_model.parameters()) if use_opt else None
    wrapped = rannc.RaNNCModule(model, opt, partition_num=stages, profile_repeats=1, **items)
    t_start = time.perf_counter()
    param_names = [n for n, _ in ref_model.named_parameters()]
    my_rows = rm.rows(rank, world)
    arg = next(iter(inspect.signature(model.forward).parameters))   # the input's name, for keyword calls
    calls = {"n": 0}   # training calls so far (num_batches_tracked must count exactly these)

    def train_step(step: int, wrapped, opt, tag: str, compare: bool = True) -> None:
        for micro in range(acc):
            if settings["acc"] == "toggle":
                rannc.delay_grad_allreduce(micro < acc - 1)
            elif settings["acc"] == "explicit":
                rannc.delay_grad_allreduce(True)
            x, y = rm.global_batch(name, seed=step * acc + micro)
            where = f"{tag}step {step} micro {micro}"
            with torch.set_grad_enabled(train):
                if way == "loss":
                    loss = wrapped(x[my_rows], target=y[my_rows])
                else:
                    out = wrapped(**{arg: x[my_rows]}) if settings["keyword"] else wrapped(x[my_rows])
                    loss = spec.criterion(out, y[my_rows])
            if loss.requires_grad:
                loss.backward()
            if not compare:
                continue
            calls["n"] += 1
            with torch.set_grad_enabled(train):
                ref_total, ref_outs, ref_losses = ref.step(x, y)
            if "loss_term" in (sabotage or "") and way == "out" and world > 1:
                ref_total = ref_total - ref_losses[world - 1]   # forget the last rank's loss term
            if ref_total.requires_grad:
                ref_total.backward()
            errors.add("loss", loss, ref_losses[rank], where)
            if way != "loss":
                mine, theirs = _leaves(out), _leaves(ref_outs[rank])
                if len(mine) != len(theirs):
                    errors.add("out", None, 0.0, f"{where} ({len(mine)} vs {len(theirs)} outputs)")
                for k, (a, b) in enumerate(zip(mine, theirs)):
                    errors.add("out", a, b, f"{where} output {k}")
        if settings["acc"] == "explicit":
            wrapped.allreduce_grads()
            rannc.delay_grad_allreduce(False)
        if compare and opt is not None:
            for n in param_names:  # collective: same names, same order on every rank
                ref_grad = ref_model.get_parameter(n).grad
                errors.add(tag + "grad", wrapped.get_param_grad(n), ref_grad, f"{tag}step {step} {n}")
        if opt is not None:
            if settings["clip"]:
                norm = wrapped.clip_grad_norm(1.0)
                if compare:
                    ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
                    errors.add(tag + "norm", norm, ref_norm, f"{tag}step {step}")
            opt.step()
            opt.zero_grad()
            if compare:
                if "ref_step" not in (sabotage or "") or step != 1:
                    ref_opt.step()
                ref_opt.zero_grad()
        if compare:
            state = wrapped.state_dict(rank0_only=False)
            ref_state = ref_model.state_dict()
            for key, value in ref_state.items():
                errors.add(tag + "state", state.get(key), value, f"{tag}step {step} {key}")
                if key.endswith("num_batches_tracked"):   # capture and profiling do not count
                    errors.add("num_batches_tracked", state.get(key), calls["n"], f"{tag}step {step} {key}")
            if set(state) != set(ref_state):
                errors.add(tag + "state", None, 0.0, f"{tag}step {step} keys {sorted(state)}")

    for step in range(STEPS):
        train_step(step, wrapped, opt, "")
        if step == 0:
            info["first_step_s"] = round(time.perf_counter() - t_start, 2)
    info["train_s"] = round(time.perf_counter() - t_start, 2)
    d = wrapped.deployment
    info.update(stages=len(d.stages), micro=d.microbatch_count, replicas=d.replicas)
    if len(d.stages) != stages:
        errors.add("plan", None, 0.0, f"{len(d.stages)} stages planned, {stages} asked for")
    if pinned and d.microbatch_count != pinned:
        errors.add("plan", None, 0.0, f"{d.microbatch_count} micro-batches with min=max_pipeline={pinned}")
    if opt is None:
        return
    for n in param_names:
        errors.add("get_param", wrapped.get_param(n), ref_model.get_parameter(n), n)
    for n, b in ref_model.named_buffers():
        errors.add("get_param", wrapped.get_param(n), b, n)
    opt_state = opt.state_dict(from_global=True)
    ref_opt_state = ref_opt.state_dict()
    for index, entries in ref_opt_state["state"].items():
        for key, value in entries.items():
            errors.add("optstate", opt_state["state"].get(index, {}).get(key), value, f"param {index} {key}")
    model_state = wrapped.state_dict(rank0_only=False)
    rank0_state = wrapped.state_dict()   # RaNNC's default: the full dict on rank 0 only
    if rank == 0:
        for key, value in model_state.items():
            errors.add("state_dict()", rank0_state.get(key), value, f"rank-0 state_dict() {key}")
    elif rank0_state:
        errors.add("state_dict()", None, 0.0, f"state_dict() on rank {rank} has {len(rank0_state)} entries")
    if settings["resume"] is None:
        return

    # resume: a fresh model (other initial values) + RaNNCModule + optimizer, loading both state dicts
    model2 = rm.make(name, way, seed=1)
    opt2 = _optimizer(settings["opt"], model2.parameters())
    wrapped2 = rannc.RaNNCModule(model2, opt2, partition_num=stages, profile_repeats=1, **items)
    if settings["resume"] == "after":   # deploy first with a throw-away step, then load over it
        train_step(STEPS + 7, wrapped2, opt2, "resume-", compare=False)
    wrapped2.load_state_dict(model_state)
    if "resume_opt" not in (sabotage or ""):
        opt2.load_state_dict(opt_state, from_global=True)
    train_step(STEPS, wrapped2, opt2, "resume-")
    # the first module still works next to the second
    state = wrapped.state_dict(rank0_only=False)
    errors.add("first-module-state", state[param_names[0]], model_state[param_names[0]], "after resume")


def _worker(rank: int, world: int, cases: list, sabotage: str | None = None) -> list:
    """cases: (stages, name, way); returns per case (case, settings, info, worst errors, error text, seconds)."""
    import rannc

    out = []
    for stages, name, way in cases:
        settings = _settings(world, stages, name, way)
        errors, info = Errors(), {}
        t0 = time.perf_counter()
        try:
            _run_case(rank, world, stages, name, way, settings, errors, info, sabotage)
        except Exception as exc:
            out.append(((stages, name, way), settings, info, errors.worst,
                        f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", time.perf_counter() - t0))
            if (world, stages, name, way) not in KNOWN_BUGS:
                break   # stop here: ranks may be out of step in their collectives now
            continue
        finally:
            rannc.delay_grad_allreduce(False)
        out.append(((stages, name, way), settings, info, errors.worst, None, time.perf_counter() - t0))
    if world == 2 and len(out) == len(cases):   # last: clear() ends this process group
        if rank == 0:
            time.sleep(1.5)
        arrived = time.time()
        rannc.clear()
        rannc.barrier()
        out.append(("clear-barrier", None, {}, {}, (arrived, time.time()), 0.0))
    if world == 1:   # two stages need two processes: planning says so at the first call
        wrapped = rannc.RaNNCModule(rm.make("mlp", "out"), partition_num=2, profile_repeats=1)
        try:
            wrapped(rm.global_batch("mlp", 0)[0])
            refused = "no error"
        except rannc.PlanningError as exc:
            refused = str(exc)
        out.append(("two stages on one rank", None, {}, {}, refused, 0.0))
    return out


# ---- the parent ----------------------------------------------------------------------------------------------

_RUNS: dict = {}


def _merge(per_rank: list) -> dict:
    """Per case: the errors merged over ranks (worst per metric) and the first error message."""
    merged = {}
    for rank, results in enumerate(per_rank):
        for case, settings, info, worst, error, seconds in results:
            if case == "two stages on one rank":
                merged[case] = error
                continue
            if case == "clear-barrier":
                merged.setdefault(case, []).append(error)   # (arrived, left) per rank
                continue
            entry = merged.setdefault(case, {"settings": settings, "info": info, "worst": {}, "error": None,
                                             "seconds": 0.0})
            entry["seconds"] = max(entry["seconds"], seconds)
            if error and entry["error"] is None:
                entry["error"] = f"rank {rank}: {error}"
            for metric, (err, where) in worst.items():
                if metric not in entry["worst"] or err > entry["worst"][metric][0]:
                    entry["worst"][metric] = (err, f"rank {rank}: {where}")
    return merged


def _run(world: int, sabotage: str | None = None):
    """One run_ranks per world size (process start and torch import cost seconds) for all its stage counts,
    shared by that world's tests."""
    key = (world, sabotage)
    if key not in _RUNS:
        cases = [(stages, name, way) for w, stages in COMBOS if w == world for name, way in CASES
                 if _included(world, stages, name, way)]
        cases.sort(key=lambda c: (world,) + c in KNOWN_BUGS)   # known failures last
        try:
            _RUNS[key] = _merge(run_ranks(_worker, world, cases, sabotage, timeout=400))
        except AssertionError as exc:
            _RUNS[key] = exc
    return _RUNS[key]


def _included(world: int, stages: int, name: str, way: str) -> bool:
    """Every model both ways on the 2-stage plan of 2 ranks; on one stage at 1 and at 2 ranks one way each, the
    other way at the other world size (the way that resumes, where one does); at 3 ranks half of the models
    (alternating, so that each (stages, way) sees both halves' kinds of model); the tied-embedding and
    BatchNorm ones always both ways. That is what keeps the suite's time in bounds: every case captures its
    model anew. "nograd" matters where BatchNorm statistics are averaged over replicas: one stage on several
    ranks."""
    if way == "nograd":
        return stages == 1 and world > 1
    m = NAMES.index(name)
    if name in ALWAYS_RESUME:
        return True
    if world == 3:
        return (m + stages) % 2 == 0
    ways = rm.SPECS[name].ways
    if stages == 1 and len(ways) > 1:
        return way == ways[(m + world + stages) % len(ways)]   # _settings' choice of the way that resumes
    return True


def _failures(entry: dict) -> list[str]:
    return [f"{metric} differs by {err:.2e} at {where}" for metric, (err, where) in sorted(entry["worst"].items())
            if not err <= RTOL]


def _params():
    out = []
    for world, stages in COMBOS:
        for name, way in CASES:
            if not _included(world, stages, name, way):
                continue
            marks = []
            reason = KNOWN_BUGS.get((world, stages, name, way))
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            out.append(pytest.param(world, stages, name, way, marks=marks, id=f"w{world}-s{stages}-{name}-{way}"))
    return out


def _check(world: int, case: tuple, label: str) -> None:
    results = _run(world)
    if isinstance(results, AssertionError):
        pytest.fail(f"{label}: the run of world {world} failed: {results}")
    entry = results.get(case)
    if entry is None:
        failed = [f"{c}: {e['error']}" for c, e in results.items() if isinstance(e, dict) and e["error"]]
        pytest.fail(f"{label}: not run, an earlier case failed: {failed[:1]}")
    assert entry["error"] is None, f"{label} ({entry['settings']}) raised: {entry['error']}"
    failures = _failures(entry)
    assert not failures, f"{label} ({entry['settings']}, plan {entry['info']}): " + "; ".join(failures)


@pytest.mark.parametrize("world,stages,name,way", _params())
def test_model_matches_single_process(world, stages, name, way):
    _check(world, (stages, name, way), f"{name} way={way} world={world} stages={stages}")


def test_barrier_after_clear_waits_for_every_rank():
    """Upstream's loop between models is clear(); barrier(); wrap the next model: the barrier keeps a rank
    from re-creating communicators while another still uses the old ones. At the end of the world-2 run rank
    0 arrives 1.5 s late, as it does when it saves a checkpoint or writes logs alone."""
    results = _run(2)
    if isinstance(results, AssertionError) or "clear-barrier" not in results:
        pytest.fail(f"the world-2 run did not get to clear(): {results if isinstance(results, AssertionError) else ''}")
    times = results["clear-barrier"]
    last_arrival = max(arrived for arrived, _ in times)
    for rank, (_, left) in enumerate(times):
        assert left >= last_arrival, f"rank {rank} left the barrier {last_arrival - left:.2f} s before rank 0 arrived"


def test_two_stages_on_one_rank_are_refused():
    results = _run(1)
    assert not isinstance(results, AssertionError), results
    assert "partition_num=2 exceeds the 1 processes" in results.get("two stages on one rank", ""), results.get(
        "two stages on one rank")
