from __future__ import annotations

import pytest

from medmamba.engines.recipes import TrainRecipe, merge_overrides, recipe_for


def test_umamba_trains_with_nnunet_defaults():
    for name in ("umamba_bot", "umamba_enc"):
        r = recipe_for(name)
        assert (r.num_epochs, r.iterations_per_epoch, r.val_iterations_per_epoch) == (1000, 250, 50)
        assert (r.optimizer, r.initial_lr, r.weight_decay, r.momentum) == ("sgd", 1e-2, 3e-5, 0.99)
        assert (r.lr_step, r.poly_exponent, r.loss, r.deep_supervision) == ("epoch", 0.9, "dice_ce", True)
        assert (r.oversample_foreground, r.batch_size, r.amp_dtype) == (0.33, None, "bf16")


def test_segmamba_trains_with_ce_only_no_deep_supervision_and_per_iteration_poly():
    r = recipe_for("segmamba")
    assert (r.loss, r.deep_supervision, r.lr_step) == ("ce", False, "iteration")
    assert (r.optimizer, r.initial_lr, r.momentum, r.weight_decay) == ("sgd", 1e-2, 0.99, 3e-5)
    assert r.total_steps() == 1000 * 250


def test_overrides_replace_only_given_fields():
    base = recipe_for("umamba_bot")
    merged = merge_overrides(base, {"num_epochs": 5, "initial_lr": None, "optimizer": "adamw"})
    assert (merged.num_epochs, merged.initial_lr, merged.optimizer) == (5, base.initial_lr, "adamw")
    assert base.num_epochs == 1000  # frozen: the default recipe is untouched


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"num_epoch": 3}, "did you mean 'num_epochs'"),
        ({"optimizer": "sdg"}, "did you mean 'sgd'"),
        ({"amp_dtype": "bf15"}, "amp_dtype must be one of"),
        ({"num_epochs": 0}, "num_epochs >= 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"initial_lr": -1.0}, "initial_lr > 0"),
        ({"val_iterations_per_epoch": 0}, "val_iterations_per_epoch must be at least 1"),
    ],
    ids=[
        "unknown-field",
        "typo-choice",
        "bad-dtype",
        "zero-epochs",
        "zero-batch",
        "negative-lr",
        "no-validation-batch",
    ],
)
def test_invalid_overrides_name_the_field(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        merge_overrides(recipe_for("umamba_bot"), overrides)


def test_recipe_round_trips_through_a_dict_and_rejects_unknown_keys():
    recipe = merge_overrides(recipe_for("segmamba"), {"num_epochs": 7, "seed": 3})
    assert TrainRecipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="unknown recipe field"):
        TrainRecipe.from_dict({**recipe.to_dict(), "epochs": 3})


def test_unknown_network_suggests_a_name():
    with pytest.raises(ValueError, match="did you mean 'segmamba'"):
        recipe_for("segmaba")
