"""Configuration: defaults, TOML file, RANNC_* variables, validation with the item's name."""

from __future__ import annotations

import logging

import pytest

from rannc import config as config_module
from rannc.config import UPSTREAM_ONLY, ConfigError, RannConfig, compiles, load_config, show_items


def test_defaults_are_rannc_defaults(tmp_path):
    config = load_config({"RANNC_CONF_DIR": str(tmp_path)})
    assert config == RannConfig()
    assert config.min_pipeline == 1 and config.max_pipeline == 32 and config.opt_param_factor == 2
    assert config.partition_num == 0 and not config.save_deployment


def test_file_then_environment(tmp_path):
    (tmp_path / "rannc_conf.toml").write_text("mem_limit_gb = 40\nsave_deployment = true\npartition_num = 2\n")
    config = load_config({"RANNC_CONF_DIR": str(tmp_path), "RANNC_PARTITION_NUM": "4"})
    assert config.mem_limit_gb == 40.0 and config.save_deployment is True and config.partition_num == 4


def test_unknown_item_in_file_names_it_and_suggests(tmp_path):
    (tmp_path / "rannc_conf.toml").write_text("mem_limt_gb = 40\n")
    with pytest.raises(ConfigError, match="unknown rannc config item 'mem_limt_gb'.*mem_limit_gb"):
        load_config({"RANNC_CONF_DIR": str(tmp_path)})


def test_unknown_environment_item(tmp_path):
    with pytest.raises(ConfigError, match="RANNC_MAX_PIPELNE"):
        load_config({"RANNC_CONF_DIR": str(tmp_path), "RANNC_MAX_PIPELNE": "3"})


@pytest.mark.parametrize("item,value,message", [
    ("RANNC_MEM_MARGIN", "1.5", "mem_margin"),
    ("RANNC_PARTITION_NUM", "two", "partition_num"),
    ("RANNC_SAVE_DEPLOYMENT", "maybe", "save_deployment"),
    ("RANNC_MIN_PIPELINE", "0", "min_pipeline"),
    ("RANNC_COMPILE", "maybe", "compile"),
])
def test_bad_values_name_the_item(tmp_path, item, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"RANNC_CONF_DIR": str(tmp_path), item: value})


def test_min_above_max_pipeline(tmp_path):
    with pytest.raises(ConfigError, match="min_pipeline"):
        load_config({"RANNC_CONF_DIR": str(tmp_path), "RANNC_MIN_PIPELINE": "8", "RANNC_MAX_PIPELINE": "4"})


def test_compile_is_auto_on_cuda_only_and_takes_booleans(tmp_path, monkeypatch):
    """compile defaults to auto: stages compile on CUDA devices where inductor can generate code for them
    (Triton), not on CPUs and not under zb_h1 (whose split backward a compiled stage cannot give); true and
    false force it, written as any boolean item, also when RannConfig is built directly."""
    import torch.utils._triton

    auto = RannConfig()
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    assert auto.compile == "auto" and compiles(auto, "cuda") and not compiles(auto, "cpu")
    assert not compiles(auto.replace(schedule="zb_h1"), "cuda")
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert not compiles(auto, "cuda")
    assert compiles(auto.replace(compile=True), "cpu") and not compiles(auto.replace(compile="off"), "cuda")
    assert RannConfig(compile=True).compile == "true" and RannConfig(compile=0).compile == "false"
    assert load_config({"RANNC_CONF_DIR": str(tmp_path), "RANNC_COMPILE": "Yes"}).compile == "true"
    with pytest.raises(ConfigError, match="zb_h1"):
        auto.replace(compile=True, schedule="zb_h1")


def test_replace_validates():
    with pytest.raises(ConfigError, match="partition_nmu"):
        RannConfig().replace(partition_nmu=2)
    assert RannConfig().replace(partition_num="3").partition_num == 3


def test_show_config_items_is_an_item(tmp_path):
    config = load_config({"RANNC_CONF_DIR": str(tmp_path), "RANNC_SHOW_CONFIG_ITEMS": "true",
                          "RANNC_SYNC_ALLREDUCE": "true", "RANNC_PARTITION_NUM": "2"})
    assert config.show_config_items is True and config.sync_allreduce is True
    text = show_items(config)
    for name in RannConfig.item_names():
        assert name in text
    assert "partition_num" in text and "= 2  (default 0)" in text


@pytest.fixture
def fresh_notices(monkeypatch):
    monkeypatch.setattr(config_module, "_WARNED", set())


def _notices(caplog, item):
    return [r for r in caplog.records if r.name == "rannc.config" and f"'{item}'" in r.getMessage()]


def test_upstream_only_item_warns_once(tmp_path, caplog, fresh_notices):
    (tmp_path / "rannc_conf.toml").write_text("checkpointing = true\ndecomposer = \"ml_part\"\n")
    env = {"RANNC_CONF_DIR": str(tmp_path), "RANNC_PROFILING_ITER": "2", "RANNC_PIPELINE_NUM": "4"}
    with caplog.at_level(logging.WARNING, logger="rannc.config"):
        first = load_config(env)
        load_config(env)
        RannConfig().replace(checkpointing=True, run_watchdog=True)
    assert first == RannConfig()  # no effect
    for item, closest in [("checkpointing", "recompute"), ("decomposer", None), ("profiling_iter", "profile_repeats"),
                          ("pipeline_num", None), ("run_watchdog", "comm_timeout_s")]:
        records = _notices(caplog, item)
        assert len(records) == 1, (item, [r.getMessage() for r in records])
        message = records[0].getMessage()
        assert "RaNNC's" in message and "no effect" in message
        assert (f"'{closest}'" in message) if closest else ("no counterpart" in message)


def test_upstream_only_names_are_upstream_items():
    assert not set(UPSTREAM_ONLY) & set(RannConfig.item_names())
    assert all(v is None or v in RannConfig.item_names() for v in UPSTREAM_ONLY.values())


def test_typo_of_upstream_item_still_fails(tmp_path, fresh_notices):
    with pytest.raises(ConfigError, match="RANNC_CHECKPOINTNG.*'checkpointing'.*'recompute'"):
        load_config({"RANNC_CONF_DIR": str(tmp_path), "RANNC_CHECKPOINTNG": "1"})
    with pytest.raises(ConfigError, match="show_config_item'.*show_config_items"):
        RannConfig().replace(show_config_item=True)


def test_load_deployment_path(tmp_path):
    config = RannConfig().replace(load_deployment="/data/plan.json")
    assert config.load_deployment is True and config.deployment_file == "/data/plan.json"
    config = RannConfig().replace(load_deployment=tmp_path / "p.json")
    assert config.load_deployment is True and config.deployment_file == str(tmp_path / "p.json")
    config = RannConfig().replace(load_deployment=None)
    assert config.load_deployment is False and config.deployment_file == RannConfig().deployment_file
    assert RannConfig().replace(load_deployment="true").deployment_file == RannConfig().deployment_file
    assert RannConfig().replace(load_deployment="/a.json", deployment_file="/a.json").deployment_file == "/a.json"
    with pytest.raises(ConfigError, match="load_deployment.*deployment_file"):
        RannConfig().replace(load_deployment="/a.json", deployment_file="/b.json")
    with pytest.raises(ConfigError, match="load_deployment"):
        RannConfig().replace(load_deployment="")
    (tmp_path / "rannc_conf.toml").write_text('load_deployment = "/data/from_file.json"\n')
    config = load_config({"RANNC_CONF_DIR": str(tmp_path)})
    assert config.load_deployment is True and config.deployment_file == "/data/from_file.json"


def test_gather_inputs_item():
    assert RannConfig().gather_inputs is True
    assert RannConfig().replace(gather_inputs=False).gather_inputs is False


@pytest.mark.parametrize("value", [0, -1])
def test_comm_timeout_must_be_positive(value):
    with pytest.raises(ConfigError, match="comm_timeout_s.*> 0"):
        RannConfig().replace(comm_timeout_s=value)
