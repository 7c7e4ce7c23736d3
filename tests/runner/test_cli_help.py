"""Every driver's --help says what each option defaults to (what a run does without it)."""

import pytest

from experiments import few_shot, rotation, synthetic


@pytest.mark.parametrize(
    "module, expected",
    [
        (synthetic, ["(default: quick)", "(default: [1, 2, 5])"]),
        (rotation, ["(default: ['c8', 'd8'])", "(default: ['paper', 'swept'])"]),
        (few_shot, ["(default: [5])", "(default: cpu)", "(default: omniglot)"]),
    ],
)
def test_help_shows_the_defaults(capsys, module, expected):
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for phrase in [*expected, "random stream: same seed, same run (default: 0)"]:
        assert phrase in text, phrase
    assert "(default: None)" not in text and "(default: False)" not in text
