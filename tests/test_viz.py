"""msr.viz's curve figure: readable ticks and titles."""

from msr import viz


def test_integer_curves_get_integer_ticks_and_a_long_title_wraps():
    title = "a job name that is long: the adapted network on 50 test episodes (accuracy 88.0%)"
    figure = viz.plot_curves({"h-flip": {1: 0.4, 2: 0.3, 3: 0.3, 4: 0.1}}, "block", "error", title)
    ax = figure.axes[0]
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 4]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert "\n" in ax.get_title() and ax.get_title().replace("\n", " ") == title
    assert ax.get_xlabel() == "block" and ax.get_ylabel() == "error"


def test_fractional_curves_keep_the_default_ticks():
    figure = viz.plot_curves({"a": {0.5: 1.0, 1.5: 2.0}}, "x", "y", "short")
    ax = figure.axes[0]
    assert any(not float(t).is_integer() for t in ax.get_xticks())
    assert ax.get_title() == "short"
