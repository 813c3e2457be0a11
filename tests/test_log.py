"""rannc's console logging next to tqdm bars: log lines go through tqdm.write (so they print above an active
bar, never glued to it), the handler is installed once on rank 0 only, and the profiler's bar stays out of
output that is not a terminal."""

import io
import logging
import sys

import pytest
import torch
import tqdm
from torch import nn

from rannc.log import FORMAT, TqdmLoggingHandler, setup_logging


@pytest.fixture
def rannc_logger():
    """The "rannc" logger without handlers and with its level unset, restored afterwards."""
    logger = logging.getLogger("rannc")
    saved_handlers, saved_level = logger.handlers[:], logger.level
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    yield logger
    logger.handlers[:] = saved_handlers
    logger.setLevel(saved_level)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_handler_is_installed_once_on_verbose_rank_0(rannc_logger):
    setup_logging(verbose=True, rank=0)
    setup_logging(verbose=True, rank=0)
    assert len(rannc_logger.handlers) == 1
    handler = rannc_logger.handlers[0]
    assert isinstance(handler, TqdmLoggingHandler)
    assert handler.formatter._fmt == FORMAT == "<%(name)s>: %(message)s"
    assert rannc_logger.getEffectiveLevel() == logging.INFO


@pytest.mark.parametrize("verbose, rank", [(False, 0), (True, 1), (False, 3)])
def test_no_handler_unless_verbose_on_rank_0(rannc_logger, verbose, rank):
    setup_logging(verbose=verbose, rank=rank)
    assert rannc_logger.handlers == []
    assert rannc_logger.level == logging.NOTSET


def test_a_handler_the_user_installed_is_kept_alone(rannc_logger):
    user_handler = logging.StreamHandler(io.StringIO())
    rannc_logger.addHandler(user_handler)
    setup_logging(verbose=True, rank=0)
    assert rannc_logger.handlers == [user_handler]


def test_debug_level_set_by_the_user_is_kept(rannc_logger):
    rannc_logger.setLevel(logging.DEBUG)
    setup_logging(verbose=True, rank=0)
    assert rannc_logger.level == logging.DEBUG


def test_records_are_written_through_tqdm_write_to_stderr(rannc_logger, monkeypatch):
    written = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, end="\n", nolock=False:
                                                          written.append((s, file))))
    setup_logging(verbose=True, rank=0)
    logging.getLogger("rannc.RaNNCModule").info("Tracing model %s", "...")
    logging.getLogger("rannc.RaNNCModule").debug("not shown at INFO")
    assert written == [("<rannc.RaNNCModule>: Tracing model ...", sys.stderr)]


def test_log_line_lands_above_an_active_bar_not_on_it(rannc_logger, monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    setup_logging(verbose=True, rank=0)
    with tqdm.tqdm(total=3, desc="Iteration", file=terminal, mininterval=0) as bar:
        bar.update(1)
        logging.getLogger("rannc.RaNNCModule").info("Profiling finished")
        bar.update(1)
    lines = terminal.getvalue().split("\n")
    # tqdm.write clears the bar's line first, so the message starts a line of its own (after the
    # clearing carriage return) instead of being appended to "Iteration: 33%|...".
    message_lines = [line for line in lines if "Profiling finished" in line]
    assert len(message_lines) == 1
    assert message_lines[0].rsplit("\r", 1)[-1] == "<rannc.RaNNCModule>: Profiling finished"
    assert "Iteration" not in message_lines[0].rsplit("\r", 1)[-1]


def _profile_tiny_model(show_progress: bool) -> None:
    from rannc.graph.blocks import linearize, make_blocks
    from rannc.graph.capture import capture
    from rannc.profile.profiler import profile_blocks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    inputs = (torch.randn(4, 8),)
    captured = capture(model, inputs)
    lin = linearize(captured)
    blocks = make_blocks(lin, 4)
    profile_blocks(captured, lin, blocks, list(inputs), [2], torch.device("cpu"), repeats=1,
                   show_progress=show_progress)


def test_profiler_bar_is_off_when_stderr_is_not_a_terminal(monkeypatch):
    not_a_terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", not_a_terminal)
    _profile_tiny_model(show_progress=True)
    assert not_a_terminal.getvalue() == ""


def test_profiler_bar_shows_on_a_terminal_and_is_not_left_behind(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _profile_tiny_model(show_progress=True)
    output = terminal.getvalue()
    assert "rannc: profiling blocks" in output
    # leave=False: the bar's last act is to clear its line, so nothing of it stays on screen.
    assert output.rstrip("\r").rsplit("\r", 1)[-1].strip() == ""
    assert "\n" not in output


def test_profiler_bar_off_when_not_asked_for(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _profile_tiny_model(show_progress=False)
    assert terminal.getvalue() == ""
