"""Configuration: defaults, TOML file, RANNC_* variables, validation with the item's name."""

from __future__ import annotations

import pytest

from rannc.config import ConfigError, RannConfig, load_config


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
])
def test_bad_values_name_the_item(tmp_path, item, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"RANNC_CONF_DIR": str(tmp_path), item: value})


def test_min_above_max_pipeline(tmp_path):
    with pytest.raises(ConfigError, match="min_pipeline"):
        load_config({"RANNC_CONF_DIR": str(tmp_path), "RANNC_MIN_PIPELINE": "8", "RANNC_MAX_PIPELINE": "4"})


def test_replace_validates():
    with pytest.raises(ConfigError, match="partition_nmu"):
        RannConfig().replace(partition_nmu=2)
    assert RannConfig().replace(partition_num="3").partition_num == 3
