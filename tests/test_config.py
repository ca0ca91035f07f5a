"""Run configs: the shipped ones validate, paths resolve, bad keys and values are named."""

from pathlib import Path

import pytest
import yaml

from pivotmap.config import ConfigError, load_run_config
from pivotmap.flows.demo import demo_config_dict

CONFIGS = Path(__file__).resolve().parents[1] / "infra" / "configs"


@pytest.mark.parametrize("name", ["flanders", "earth-search-example", "demo"])
def test_shipped_configs_validate(name):
    config = load_run_config(CONFIGS / f"{name}.yaml")
    assert config.name
    assert config.grid.spec().tiles_for_bbox(config.region.bbox, config.region.crs)


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    data = tmp_path / "elsewhere"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(demo_config_dict("elsewhere")))
    config = load_run_config(path)
    assert config.source.url == str(data / "catalog.json")
    assert config.labels.nomenclature == str(data / "labels" / "nomenclature.yaml")


def test_committed_demo_config_matches_the_demo_command():
    committed = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    assert committed == demo_config_dict("../../demo-out/data")


def test_unknown_key_is_named(tmp_path):
    raw = demo_config_dict()
    raw["train"]["epoch"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train\.epoch: Extra inputs are not permitted"):
        load_run_config(path)


def test_reversed_period_and_missing_file(tmp_path):
    raw = demo_config_dict()
    raw["period"] = {"start": "2023-12-31", "end": "2023-01-01"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="before period.start"):
        load_run_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nope.yaml")
