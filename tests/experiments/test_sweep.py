import pytest

from experiments.config import ConfigError
from experiments.sweep import expand, main, parse_grid, trial_name


def test_grid_expands_to_the_product_in_order():
    grid = parse_grid(["spec.mode=off,entropy", "refit.schedule=never,on_drop,every"])
    points = expand(grid)
    assert len(points) == 6
    assert points[0] == {"spec.mode": "off", "refit.schedule": "never"}
    assert points[-1] == {"spec.mode": "entropy", "refit.schedule": "every"}
    assert trial_name(points[1]) == "mode=off_schedule=on_drop"


@pytest.mark.parametrize("bad", ["spec.mode", "=a,b", "spec.mode=", "spec.mode=,"])
def test_bad_grid_items_name_themselves(bad):
    with pytest.raises(ConfigError, match="--grid"):
        parse_grid([bad])


def test_duplicate_key_is_refused():
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["a.b=1", "a.b=2"])


def test_bad_value_fails_before_any_trial(capsys):
    assert main(["--grid", "spec.mode=off,sometimes", "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert "spec.mode" in err and "sometimes" in err
