"""The one Registry every choice by name goes through (criteria, retrain policies, models, datasets)."""

import pytest

from prunebench.config import ConfigError, CriterionConfig
from prunebench.config.options import MagnitudeConfig
from prunebench.config.registry import Registry


def test_a_registry_holds_classes_and_functions_and_returns_them_unchanged():
    things = Registry("criterion")

    @things.register("magnitude")
    class Magnitude:
        pass

    def build():
        return 1

    assert things.register("random")(build) is build and things.register("other")(build) is build
    assert things.get("magnitude") is Magnitude and things["random"] is build
    assert "magnitude" in things and "nothing" not in things
    assert list(things) == things.names() == ["magnitude", "other", "random"] and len(things) == 3


def test_a_name_registered_twice_is_refused():
    things = Registry("retrain")
    things.register("retain")(print)
    with pytest.raises(ValueError, match="retrain 'retain' registered twice"):
        things.register("retain")(len)
    assert things.get("retain") is print


def test_an_unknown_name_is_answered_in_one_line_with_the_choices():
    things = Registry("model")
    for name in ("vgg16", "lenet5", "resnet20"):
        things.register(name)(print)
    with pytest.raises(ConfigError, match=r"^model='vgg61' is not one of: lenet5, resnet20, vgg16$"):
        things.get("vgg61")
    with pytest.raises(ConfigError, match="is not one of"):
        things.options("vgg61")


def test_the_options_class_is_the_names_own_or_the_groups_base():
    things = Registry("criterion")
    things.register("magnitude")(print)
    things.register("random")(print)
    assert things.options("magnitude") is MagnitudeConfig
    assert issubclass(things.options("random"), CriterionConfig)


def test_every_package_registers_through_it():
    from prunebench.criteria import CRITERIA
    from prunebench.data import DATASETS
    from prunebench.models import MODELS
    from prunebench.retrain import POLICIES

    for registry, group in ((CRITERIA, "criterion"), (DATASETS, "dataset"), (MODELS, "model"),
                            (POLICIES, "retrain")):
        assert isinstance(registry, Registry) and registry.group == group and len(registry) > 0


def test_schedules_are_registered_like_criteria_and_an_unknown_one_is_refused_in_one_line():
    from prunebench.config import ScheduleConfig
    from prunebench.schedules import SCHEDULES, build_schedule

    assert SCHEDULES.names() == ["dynamic", "gradual", "iterative", "oneshot"]
    assert build_schedule(ScheduleConfig(name="iterative", rounds=3)).name == "iterative"
    with pytest.raises(ConfigError, match="schedule='bogus' is not one of: dynamic, gradual, iterative, oneshot"):
        build_schedule(ScheduleConfig(name="bogus"))
