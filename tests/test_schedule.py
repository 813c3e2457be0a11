"""Schedules as data (rannc.schedule): every registered schedule passes its checker over a grid of pipeline
shapes, broken lists are rejected with the problem named, and the simulated step time, bubble and in-flight
micro-batches on uniform costs match the closed forms of the literature. No torch, no processes."""

from __future__ import annotations

import pytest

from rannc import schedule
from rannc.schedule import Action, parse, simulate, validate

STAGES = range(1, 7)
MICROBATCHES = range(1, 13)


def _virtual(name: str) -> list[int]:
    return [1, 2, 3] if schedule.supports_virtual_stages(name) else [1]


def _uniform(name: str, virtual_stages: int = 1) -> dict[str, float]:
    """A stage's whole forward costs 1 and its backward 2 (F:B = 1:2), split evenly over virtual stages;
    zero bubble splits B into BI = BW = 1."""
    if name == "zb_h1":
        return {"F": 1.0, "BI": 1.0, "BW": 1.0}
    return {"F": 1.0 / virtual_stages, "B": 2.0 / virtual_stages}


def _strs(actions) -> list[str]:
    return [str(a) for a in actions]


# ---- actions and registry --------------------------------------------------------------------------------

def test_action_prints_kind_microbatch_and_virtual_stage():
    assert [str(a) for a in (Action("F", 3), Action("B", 0), Action("BI", 2, 1), Action("BW", 0, 2))] == [
        "F3", "B0", "BI2@1", "BW0@2"]
    assert parse("F3, B0 BI2@1  BW0@2") == [Action("F", 3), Action("B", 0), Action("BI", 2, 1), Action("BW", 0, 2)]
    with pytest.raises(ValueError, match="kind"):
        Action("X", 0)
    with pytest.raises(ValueError, match="cannot read action 'G1'"):
        parse("F0 G1")


def test_registry_names_and_errors():
    assert {"gpipe", "1f1b", "interleaved_1f1b", "zb_h1"} <= set(schedule.names())
    with pytest.raises(ValueError, match="did you mean '1f1b'"):
        schedule.get("1f1c")
    with pytest.raises(ValueError, match="one virtual stage"):
        schedule.get("1f1b")(4, 8, 2)
    with pytest.raises(ValueError, match=">= 1"):
        schedule.get("gpipe")(0, 8)
    with pytest.raises(ValueError, match="registered twice"):
        schedule.register("gpipe")(lambda p, m, v=1: [])


# ---- validate --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", schedule.names())
def test_every_schedule_validates_over_the_grid(name):
    for p in STAGES:
        for m in MICROBATCHES:
            for v in _virtual(name):
                actions = schedule.get(name)(p, m, v)
                validate(actions, p, m, v)
                assert len(actions) == p


@pytest.mark.parametrize("text, problem", [
    ("F0 F1 B0", r"never runs a backward of F1 \(B1, or BI1 and BW1\)"),
    ("F0 B0 F1 B1 B1", "runs B1 twice"),
    ("F0 B1 F1 B0", "runs B1 before F1"),
    ("F0 F1 B0 BI1 BW1 B1", "runs both B1 and the split backward"),
    ("F0 F1 B0 BI1", "runs BI1 without BW1"),
    ("F0 F1 B0 BW1 BI1", "runs BW1 before BI1"),
    ("F0 B0 B1", "never runs F1"),
    ("F0 F1 F2 B0 B1 B2", "there are 2 micro-batches"),
    ("F0 F1@1 B0 B1@1", "there are 1 virtual stages"),
])
def test_validate_rejects_a_broken_stage_list(text, problem):
    with pytest.raises(ValueError, match=problem):
        validate([parse(text)], 1, 2)


def test_validate_rejects_wrong_stage_count_non_actions_and_deadlocks():
    with pytest.raises(ValueError, match="2 stage lists for 3 stages"):
        validate(schedule.get("1f1b")(2, 4), 3, 4)
    with pytest.raises(ValueError, match="not an Action"):
        validate([["F0"]], 1, 1)
    # Each stage's list is fine on its own, but stage 0 waits for B0 before running F1 and stage 1 waits for
    # F1 before running B0.
    with pytest.raises(ValueError, match="deadlocks.*stage 0 at B0.*stage 1 at F1"):
        validate([parse("F0 B0 F1 B1"), parse("F1 F0 B0 B1")], 2, 2)


# ---- the old helpers, unchanged --------------------------------------------------------------------------

def test_old_helpers_keep_their_lists():
    assert _strs(schedule.gpipe_forward(3)) == ["F0", "F1", "F2"]
    assert _strs(schedule.gpipe_backward(3)) == ["B2", "B1", "B0"]
    assert _strs(schedule.one_f_one_b(0, 2, 4)) == ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"]
    assert _strs(schedule.one_f_one_b(1, 2, 4)) == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]
    assert _strs(schedule.one_f_one_b(0, 3, 2)) == ["F0", "F1", "B0", "B1"]
    assert schedule.in_flight("1f1b", 0, 4, 8) == 4 and schedule.in_flight("1f1b", 3, 4, 8) == 1
    assert schedule.in_flight("gpipe", 3, 4, 8) == 8


def test_registered_schedules_are_the_old_lists():
    for p in STAGES:
        for m in MICROBATCHES:
            gpipe = schedule.get("gpipe")(p, m)
            ofob = schedule.get("1f1b")(p, m)
            for s in range(p):
                assert gpipe[s] == schedule.gpipe_forward(m) + schedule.gpipe_backward(m)
                assert ofob[s] == schedule.one_f_one_b(s, p, m)
            assert schedule.get("interleaved_1f1b")(p, m, 1) == ofob


def test_interleaved_is_megatrons_order():
    # p = 2, m = 4, v = 2: rounds of 2 micro-batches; stage 0 warms up 2 * 1 + (2 - 1) * 2 = 4 forwards.
    actions = schedule.get("interleaved_1f1b")(2, 4, 2)
    assert _strs(actions[0]) == ["F0", "F1", "F0@1", "F1@1", "F2", "B0@1", "F3", "B1@1", "F2@1", "B0", "F3@1",
                                 "B1", "B2@1", "B3@1", "B2", "B3"]
    assert _strs(actions[1]) == ["F0", "F1", "F0@1", "B0@1", "F1@1", "B1@1", "F2", "B0", "F3", "B1", "F2@1",
                                 "B2@1", "F3@1", "B3@1", "B2", "B3"]


def test_zb_h1_holds_back_weight_gradients_on_later_stages():
    actions = schedule.get("zb_h1")(3, 4)
    assert _strs(actions[0]) == ["F0", "F1", "F2", "BI0", "BW0", "F3", "BI1", "BW1", "BI2", "BW2", "BI3", "BW3"]
    assert _strs(actions[2]) == ["F0", "BI0", "F1", "BI1", "F2", "BI2", "BW0", "F3", "BI3", "BW1", "BW2", "BW3"]


# ---- simulate: bubbles -----------------------------------------------------------------------------------
#
# Uniform stages, F:B = 1:2 (per stage and micro-batch F = 1, B = 2), no p2p time. GPipe and 1F1B both take
# (m + p - 1)(F + B) = 3(m + p - 1) per step, of which each stage is busy m(F + B) = 3m, so the bubble
# fraction (idle share of stage time) is exactly (p - 1) / (m + p - 1) -- the "(p - 1)/m of ideal time" of
# Narayanan et al. expressed as a share of the step; the ratio F:B does not enter (checked below too).
# Interleaved with v virtual stages (chunk times F/v, B/v): step m(F + B) + (p - 1)(F + B)/v, bubble
# (p - 1)/(v m + p - 1), exactly for every m >= p. ZB-H1 with F = BI = BW = 1: step 3m + (p - 1), i.e. the
# zero-bubble paper's (p - 1)(F + B - 2W) idle per stage (B = BI + BW), a third of 1F1B's (p - 1)(F + B);
# bubble (p - 1)/(3m + p - 1), exactly for m >= p.

@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(name):
    for p in STAGES:
        for m in MICROBATCHES:
            result = simulate(schedule.get(name)(p, m), _uniform(name))
            assert result.step_ms == pytest.approx(3 * (m + p - 1))
            assert result.busy_ms == pytest.approx([3.0 * m] * p)
            assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("forward, backward", [(1.0, 1.0), (1.0, 3.0), (2.0, 1.0)])
def test_gpipe_and_1f1b_bubble_does_not_depend_on_the_forward_backward_ratio(forward, backward):
    for name in ("gpipe", "1f1b"):
        for p in STAGES:
            for m in MICROBATCHES:
                result = simulate(schedule.get(name)(p, m), {"F": forward, "B": backward})
                assert result.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))


def test_interleaved_bubble_shrinks_by_the_virtual_stages():
    for v in (2, 3):
        for p in STAGES:
            for m in MICROBATCHES:
                result = simulate(schedule.get("interleaved_1f1b")(p, m, v), _uniform("interleaved_1f1b", v))
                one_f_one_b = (p - 1) / (m + p - 1)
                if m >= p:
                    assert result.step_ms == pytest.approx(3 * m + 3 * (p - 1) / v)
                    assert result.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))
                else:   # fewer micro-batches than stages: between the formula and 1F1B
                    assert (p - 1) / (v * m + p - 1) - 1e-9 <= result.bubble_fraction <= one_f_one_b + 1e-9


def test_zb_h1_bubble_is_a_third_of_1f1b():
    for p in STAGES:
        for m in MICROBATCHES:
            zb = simulate(schedule.get("zb_h1")(p, m), _uniform("zb_h1"))
            ofob = simulate(schedule.get("1f1b")(p, m), _uniform("1f1b"))
            assert zb.busy_ms == pytest.approx(ofob.busy_ms)
            if m >= p:
                assert zb.step_ms == pytest.approx(3 * m + (p - 1))
                assert zb.bubble_fraction == pytest.approx((p - 1) / (3 * m + p - 1))
                assert sum(zb.idle_ms) == pytest.approx(sum(ofob.idle_ms) / 3)
            else:
                assert zb.bubble_fraction <= ofob.bubble_fraction + 1e-9


def test_zb_h1_idle_is_f_plus_b_minus_2w_when_w_is_short():
    # B = BI + BW = 2, W = 0.5: idle per stage (p - 1)(F + B - 2W) = 2(p - 1).
    costs = {"F": 1.0, "BI": 1.5, "BW": 0.5}
    for p in STAGES:
        for m in range(p, 13):
            result = simulate(schedule.get("zb_h1")(p, m), costs)
            assert result.step_ms == pytest.approx(3 * m + 2 * (p - 1))


def test_p2p_time_adds_two_hops_per_stage_boundary_to_gpipe():
    for p in STAGES:
        for m in MICROBATCHES:
            result = simulate(schedule.get("gpipe")(p, m), _uniform("gpipe"), p2p_ms=0.5)
            assert result.step_ms == pytest.approx(3 * (m + p - 1) + 2 * (p - 1) * 0.5)
            # 1F1B waits for each round trip in its steady state, so it never beats GPipe once p2p > 0
            ofob = simulate(schedule.get("1f1b")(p, m), _uniform("1f1b"), p2p_ms=0.5)
            assert ofob.step_ms >= result.step_ms - 1e-9


def test_costs_per_stage_and_as_a_callable():
    # GPipe, p = 2, m = 2, stage 1 twice as slow as stage 0, against a hand count.
    costs = {(0, "F"): 1.0, (0, "B"): 2.0, (1, "F"): 2.0, (1, "B"): 4.0}
    result = simulate(schedule.get("gpipe")(2, 2), costs)
    # stage 0: F0 0-1, F1 1-2; stage 1: F0 1-3, F1 3-5, B1 5-9, B0 9-13; stage 0: B1 9-11, B0 13-15
    assert result.step_ms == pytest.approx(15.0)
    assert result.busy_ms == pytest.approx([6.0, 12.0])
    assert result.bubble_fraction == pytest.approx((2 * 15 - 18) / (2 * 15))
    rows = [(s, str(a), start, end) for s, a, start, end in result.timeline]
    assert rows[:3] == [(0, "F0", 0.0, 1.0), (0, "F1", 1.0, 2.0), (1, "F0", 1.0, 3.0)]
    assert rows[-1] == (0, "B0", 13.0, 15.0)
    same = simulate(schedule.get("gpipe")(2, 2), lambda stage, action: costs[stage, action.kind])
    assert same.step_ms == result.step_ms and same.timeline == result.timeline
    with pytest.raises(ValueError, match="no duration for B on stage 1"):
        simulate(schedule.get("gpipe")(2, 2), {"F": 1.0})
    with pytest.raises(ValueError, match="negative"):
        simulate(schedule.get("gpipe")(2, 2), {"F": 1.0, "B": -1.0})


# ---- simulate: memory ------------------------------------------------------------------------------------

def test_peak_in_flight_gpipe_all_1f1b_stages_downstream():
    for p in STAGES:
        for m in MICROBATCHES:
            gpipe = simulate(schedule.get("gpipe")(p, m), _uniform("gpipe"))
            ofob = simulate(schedule.get("1f1b")(p, m), _uniform("1f1b"))
            zb = simulate(schedule.get("zb_h1")(p, m), _uniform("zb_h1"))
            assert gpipe.peak_in_flight == [m] * p
            assert ofob.peak_in_flight == [min(m, p - s) for s in range(p)]
            # ZB-H1 keeps each micro-batch's activations until its BW: 1F1B's peak (that of stage 0) everywhere
            assert zb.peak_in_flight == [min(m, p)] * p
            assert zb.peak_weight_pending == [min(m, s + 1) for s in range(p)]
            assert gpipe.peak_weight_pending == ofob.peak_weight_pending == [0] * p
            for s in range(p):
                assert schedule.in_flight("gpipe", s, p, m) == m
                assert schedule.in_flight("1f1b", s, p, m) == min(m, p - s)


def test_peak_in_flight_interleaved():
    # (micro-batch, virtual stage) pairs held: the warm-up plus one, (v - 1) p + 2 (p - 1 - s) + 1, at most m v;
    # in micro-batches of a whole stage that is p + (p - 1 - 2s)/v on stage s, "comparable" to 1F1B's p - s.
    for v in (2, 3):
        for p in STAGES:
            for m in range(p, 13, p):
                result = simulate(schedule.get("interleaved_1f1b")(p, m, v), _uniform("interleaved_1f1b", v))
                expected = [min(m * v, (v - 1) * p + 2 * (p - 1 - s) + 1) for s in range(p)]
                assert result.peak_in_flight == expected
                assert [schedule.in_flight("interleaved_1f1b", s, p, m, v) for s in range(p)] == expected
