"""The README's example runs and does what it says."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text.split("## Example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_trains_and_stays_2_4(capsys):
    namespace: dict = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)  # noqa: S102
    report = namespace["report"]
    losses = namespace["losses"]
    assert report.all_nm
    assert report.pruned_size == 64 * 128 + 128 * 10
    assert losses[-1] < 0.5 * losses[0]
    assert "every pruned leaf 2:4: yes" in capsys.readouterr().out
