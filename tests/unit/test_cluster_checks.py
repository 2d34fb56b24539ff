"""Bad input on the cluster path fails at config load or before workers start, naming the field and the fix
(issue 15): ZeRO options, storage paths, tracking URIs, multi-node runs with node-local state.

The end-to-end version (a real 2-node Ray cluster refusing a sqlite URI) is in
tests/integration/test_zero3_train.py.
"""

from __future__ import annotations

import pytest

from layerexit.deploy.cluster import check_multi_node, is_multi_node, package_dir, package_runtime_env
from layerexit.errors import ConfigError
from layerexit.tracking import check_tracking_uri, is_file_based_uri
from layerexit.training.config import TrainConfig
from layerexit.training.ray_trainer import deepspeed_config


def cfg(**sections) -> TrainConfig:
    data = {"name": "t", "model": {"spec": "tiny"}, **sections}
    return TrainConfig.model_validate(data)


@pytest.mark.parametrize(
    ("sections", "field", "fix"),
    [
        ({"deepspeed": {"extra": {"train_batch_size": 64}}}, "deepspeed.extra.train_batch_size", "optim."),
        ({"deepspeed": {"extra": {"optimizer": {"type": "Adam"}}}}, "deepspeed.extra.optimizer", "optim"),
        ({"deepspeed": {"extra": {"bf16": {"enabled": True}}}}, "deepspeed.extra.bf16", "deepspeed.precision"),
        ({"deepspeed": {"extra": {"zero_optimization": {"stage": 1}}}}, "zero_optimization.stage",
         "deepspeed.zero_stage"),
        ({"deepspeed": {"extra": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}}},
         "zero_optimization.offload_optimizer", "deepspeed.offload_optimizer"),
        ({"deepspeed": {"zero_stage": 2, "extra": {"zero_optimization": {"offload_param": {"device": "cpu"}}}}},
         "offload_param", "zero_stage=3"),
        ({"deepspeed": {"zero_stage": 0, "offload_optimizer": True}, "scaling": {"use_gpu": True}},
         "offload_optimizer", "zero_stage to 1, 2 or 3"),
        ({"deepspeed": {"offload_optimizer": True}}, "offload_optimizer", "use_gpu"),
        ({"deepspeed": {"zero_stage": 4}}, "zero_stage", ""),
        ({"checkpoint": {"storage_path": "s3://bucket/runs"}}, "checkpoint.storage_path", "/mnt/shared"),
        ({"checkpoint": {"storage_path": " "}}, "checkpoint.storage_path", "/mnt/shared"),
        ({"mlflow": {"tracking_uri": "htp://mlflow:5000"}}, "mlflow.tracking_uri", "http"),
        ({"mlflow": {"tracking_uri": "sqllite:///x.db"}}, "mlflow.tracking_uri", "sqlite:///"),
    ],
)
def test_bad_cluster_settings_fail_at_load_naming_field_and_fix(sections: dict, field: str, fix: str) -> None:
    from layerexit.config import validate_config

    with pytest.raises(ConfigError) as err:
        validate_config(TrainConfig, {"name": "t", "model": "tiny", **sections}, "job.yaml")
    text = str(err.value)
    assert field.split(".")[-1] in text and fix in text, text


def test_good_cluster_settings_load_and_reach_deepspeed() -> None:
    c = cfg(deepspeed={"zero_stage": 3, "offload_optimizer": True,
                       "extra": {"zero_optimization": {"stage3_prefetch_bucket_size": 1000}}},
            scaling={"use_gpu": True, "num_workers": 4}, mlflow={"tracking_uri": "http://mlflow:5000"},
            checkpoint={"storage_path": "/mnt/shared/ray-results"})
    ds = deepspeed_config(c)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 1000
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize(
    ("uri", "file_based"),
    [("sqlite:////abs/mlflow.db", True), ("sqlite:///rel.db", True), ("file:///tmp/mlruns", True),
     ("./mlruns", True), ("/data/mlruns", True), ("http://mlflow:5000", False), ("https://mlflow.example.com", False),
     ("postgresql://u@db/mlflow", False), ("postgresql+psycopg2://db/mlflow", False), ("databricks", False)],
)
def test_file_based_tracking_uris(uri: str, file_based: bool) -> None:
    assert is_file_based_uri(uri) is file_based
    check_tracking_uri(uri)  # all of these are valid URIs


def node(cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}


def test_multi_node_detection() -> None:
    assert not is_multi_node([node(4)], 2, {"CPU": 1})
    assert not is_multi_node([node(4), node(4, alive=False)], 2, {"CPU": 1})  # a dead node does not count
    assert is_multi_node([node(0), node(32, 4)], 4, {"CPU": 8, "GPU": 1})  # KubeRay: CPU head + GPU pod
    assert is_multi_node([node(8, 1)], 4, {"CPU": 1, "GPU": 1})  # needs more GPUs than the node has
    assert not is_multi_node([node(32, 4)], 4, {"CPU": 8, "GPU": 1})


def test_multi_node_needs_a_server_and_shared_storage() -> None:
    check_multi_node("sqlite:////x/mlflow.db", "~/ray_results", multi_node=False, num_nodes=1)  # one node: fine
    with pytest.raises(ConfigError, match=r"mlflow.tracking_uri.*2 alive.*http://mlflow:5000"):
        check_multi_node("sqlite:////x/mlflow.db", "/mnt/shared/r", multi_node=True, num_nodes=2)
    with pytest.raises(ConfigError, match="mlflow.tracking_uri"):
        check_multi_node("/home/me/mlruns", "/mnt/shared/r", multi_node=True, num_nodes=3)
    for local in ("~/ray_results/layerexit", "/tmp/runs"):
        with pytest.raises(ConfigError, match=r"checkpoint.storage_path.*/mnt/shared"):
            check_multi_node("http://mlflow:5000", local, multi_node=True, num_nodes=2)
    check_multi_node("http://mlflow:5000", "/mnt/shared/ray-results", multi_node=True, num_nodes=2)


def test_package_reaches_every_node_only_when_needed() -> None:
    one = package_runtime_env({"A": "1"}, multi_node=False)
    assert one == {"env_vars": {"A": "1"}}
    many = package_runtime_env({"A": "1"}, multi_node=True)
    assert many["env_vars"] == {"A": "1"}
    [pkg] = many["py_modules"]
    assert pkg == str(package_dir()) and (package_dir() / "__init__.py").is_file()
    assert package_dir().name == "layerexit"
