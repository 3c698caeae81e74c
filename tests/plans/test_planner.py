"""The Mamba-aware planner: nnU-Net's configurations unchanged, ours inherit their data, name our classes, load
through nnunetv2, build through ``get_network_from_plans`` and fit the memory budget."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from medmamba.errors import PlanError
from medmamba.plans._nnunet import nnunet_folders, stdout_to_log
from medmamba.plans.planner import MedmambaPlanner

from .conftest import GPU_MEMORY_GB, NETWORKS


def ours(planned) -> list[str]:
    return [f"{base}_{n}" for base in ("3d_fullres", "2d") for n in NETWORKS]


def test_nnunets_own_configurations_are_what_its_planner_makes(planned, raw_dataset, tmp_path):
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    folder = tmp_path / raw_dataset.name
    shutil.copytree(planned.plans_file.parent, folder)
    with nnunet_folders(raw_dataset.parent, tmp_path), stdout_to_log(__import__("logging").getLogger("test")):
        stock = ExperimentPlanner(raw_dataset.name, GPU_MEMORY_GB, plans_name="medmambaPlans").plan_experiment()
    for name, config in stock["configurations"].items():
        assert json.loads(json.dumps(planned.plans["configurations"][name])) == json.loads(json.dumps(config)), name


def test_plans_load_with_nnunets_plans_manager_and_inherit_its_data(planned):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(str(planned.plans_file))
    assert set(ours(planned)) <= set(manager.available_configurations)
    for name in ours(planned):
        base = name.split("_umamba")[0]
        config, parent = manager.get_configuration(name), manager.get_configuration(base)
        assert planned.plans["configurations"][name]["inherits_from"] == base
        assert config.data_identifier == parent.data_identifier  # same preprocessed folder
        assert config.spacing == parent.spacing and config.normalization_schemes == parent.normalization_schemes
        assert config.network_arch_class_name.startswith("medmamba.networks.nnunet.UMamba")
        assert len(config.patch_size) == len(parent.patch_size)
        strides = config.pool_op_kernel_sizes
        assert all(p % int(torch.tensor(strides)[:, i].prod()) == 0 for i, p in enumerate(config.patch_size))


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("base", ["3d_fullres", "2d"])
def test_get_network_from_plans_builds_our_network_at_the_planned_patch(planned, base, network):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    config = PlansManager(str(planned.plans_file)).get_configuration(f"{base}_{network}")
    net = get_network_from_plans(
        config.network_arch_class_name,
        config.network_arch_init_kwargs,
        config.network_arch_init_kwargs_req_import,
        1,
        3,
        allow_init=True,
        deep_supervision=True,
    )
    assert type(net).__module__ == "medmamba.networks.nnunet"
    with torch.no_grad():
        outputs = net(torch.randn(1, 1, *config.patch_size))
    strides = torch.tensor(config.pool_op_kernel_sizes)
    assert len(outputs) == len(strides) - 1
    for i, out in enumerate(outputs):
        expected = [p // int(s) for p, s in zip(config.patch_size, strides[: i + 1].prod(0), strict=True)]
        assert list(out.shape) == [1, 3, *expected]


def test_every_planned_configuration_fits_the_budget(planned):
    budget = GPU_MEMORY_GB * 2**30
    for name in ours(planned):
        config = planned.plans["configurations"][name]
        estimate = planned.estimates[name]
        assert estimate.batch_size == config["batch_size"] >= 2
        assert list(estimate.patch_size) == config["patch_size"]
        assert estimate.device_bytes <= budget
    rows = {r["configuration"]: r for r in planned.summary()}
    assert rows["3d_fullres"]["network"].endswith("PlainConvUNet") and rows["3d_fullres"]["gpu_memory_gb"] > 0


def plan(raw_dataset, preprocessed, gpu_memory_gb: float, networks=("umamba_bot",)) -> MedmambaPlanner:
    with nnunet_folders(raw_dataset.parent, preprocessed):
        planner = MedmambaPlanner(raw_dataset.name, gpu_memory_gb, networks=networks)
        planner.plan_experiment()
    return planner


def test_a_smaller_budget_gives_a_smaller_patch_that_fits_it(planned, raw_dataset, tmp_path):
    shutil.copytree(planned.plans_file.parent, tmp_path / raw_dataset.name)
    # just too little for batch 2 at the patch the 8 GB plan chose
    budget = (planned.estimates["3d_fullres_umamba_bot"].with_batch(2).device_bytes - 1) / 2**30
    planner = plan(raw_dataset, tmp_path, budget)
    small = planner.plans["configurations"]["3d_fullres_umamba_bot"]
    large = planned.plans["configurations"]["3d_fullres_umamba_bot"]
    assert torch.tensor(small["patch_size"]).prod() < torch.tensor(large["patch_size"]).prod()
    assert small["batch_size"] == 2
    assert planner.estimates["3d_fullres_umamba_bot"].device_bytes <= budget * 2**30
    written = json.loads((tmp_path / raw_dataset.name / "medmambaPlans.json").read_text())
    assert written["configurations"]["3d_fullres_umamba_bot"] == small


def test_a_budget_below_the_cuda_context_is_a_plan_error(planned, raw_dataset, tmp_path):
    shutil.copytree(planned.plans_file.parent, tmp_path / raw_dataset.name)
    with pytest.raises(PlanError, match=r"0\.5 GB is less than a CUDA context alone.*--gpu-memory-gb"):
        plan(raw_dataset, tmp_path, 0.5)


def test_the_shrinking_loop_stops_with_a_plan_error_when_even_a_small_patch_does_not_fit(planned, raw_dataset):
    from medmamba.plans.architectures import architecture
    from medmamba.plans.memory import device_bytes

    block = planned.plans["configurations"]["3d_fullres_umamba_bot"]["architecture"]
    # room for the weights, gradients and optimizer state of this network, and not one sample more
    budget = device_bytes(planned.estimates["3d_fullres_umamba_bot"].fixed_bytes) / 2**30
    with nnunet_folders(raw_dataset.parent, planned.plans_file.parent.parent):
        planner = MedmambaPlanner(raw_dataset.name, budget, networks=("umamba_bot",))
        with planner._planning(architecture("umamba_bot")):
            args = (1, 3, block["network_class_name"], block["arch_kwargs"], block["_kw_requires_import"])
            assert planner.static_estimate_VRAM_usage((16, 32, 32), *args) == float("inf")  # keep shrinking
            with pytest.raises(
                PlanError, match=r"umamba_bot does not fit 0\.\d+ GB at batch 2 even with a small patch"
            ):
                planner.static_estimate_VRAM_usage((8, 8, 8), *args)


def test_segmamba_keeps_its_stages_and_gets_a_patch_on_the_16_grid(planned, raw_dataset, tmp_path):
    shutil.copytree(planned.plans_file.parent, tmp_path / raw_dataset.name)
    planner = plan(raw_dataset, tmp_path, 8.0, networks=("segmamba",))
    config = planner.plans["configurations"]["3d_fullres_segmamba"]
    assert all(p % 16 == 0 for p in config["patch_size"])
    assert config["architecture"]["arch_kwargs"]["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 4
    assert "2d_segmamba" not in planner.plans["configurations"]
    assert config["architecture"]["network_class_name"] == "medmamba.networks.nnunet.SegMamba"
    assert planner.estimates["3d_fullres_segmamba"].device_bytes <= 8 * 2**30
    assert planner.estimates["3d_fullres_segmamba"].parameters > 60e6  # the paper's 67 M network, not a shrunk one


def test_unknown_network_is_a_plan_error_with_a_suggestion(raw_dataset, tmp_path):
    with pytest.raises(PlanError, match="Did you mean 'umamba_bot'"):
        plan(raw_dataset, tmp_path, 8.0, networks=("umamba_bott",))


def test_network_kwargs_enter_the_plans_and_the_memory_model(planned, raw_dataset, tmp_path):
    # SegMamba with its Mamba layers in the AMP dtype keeps less for the backward: the same patch fits a larger
    # batch, or a larger patch the same one
    shutil.copytree(planned.plans_file.parent, tmp_path / raw_dataset.name)
    with nnunet_folders(raw_dataset.parent, tmp_path):
        plans = {}
        for ssm_fp32 in (True, False):
            planner = MedmambaPlanner(raw_dataset.name, 8.0, networks=("segmamba",),
                                      network_kwargs={"segmamba": {"ssm_fp32": ssm_fp32}})  # fmt: skip
            planner.plan_experiment()
            plans[ssm_fp32] = planner
    kept, half = (plans[f].plans["configurations"]["3d_fullres_segmamba"] for f in (True, False))
    assert kept["architecture"]["arch_kwargs"]["ssm_fp32"] is True
    assert half["architecture"]["arch_kwargs"]["ssm_fp32"] is False
    est = {f: plans[f].estimates["3d_fullres_segmamba"] for f in (True, False)}
    assert est[False].with_batch(2).device_bytes <= 8 * 2**30
    if half["patch_size"] == kept["patch_size"]:
        assert est[False].bytes_per_sample < est[True].bytes_per_sample and half["batch_size"] >= kept["batch_size"]
    else:
        assert math.prod(half["patch_size"]) > math.prod(kept["patch_size"])


def test_network_kwargs_for_an_unplanned_network_or_argument_are_plan_errors(raw_dataset, tmp_path):
    from medmamba.plans.architectures import architecture

    assert architecture("umamba_enc").with_kwargs({"ssm_fp32": False}).arch_kwargs["ssm_fp32"] is False
    with pytest.raises(PlanError, match="does not take features_per_stage"):  # nnU-Net's planner decides the stages
        architecture("umamba_bot").with_kwargs({"features_per_stage": [8, 16]})
    with nnunet_folders(raw_dataset.parent, tmp_path):
        with pytest.raises(PlanError, match="names segmamba, which is not planned"):
            MedmambaPlanner(raw_dataset.name, 8.0, networks=("umamba_bot",), network_kwargs={"segmamba": {}})
        with pytest.raises(PlanError, match="does not take strides"):
            MedmambaPlanner(raw_dataset.name, 8.0, networks=("segmamba",), network_kwargs={"segmamba": {"strides": 1}})
