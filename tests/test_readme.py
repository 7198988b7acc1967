"""The README's and the guide's examples run and do what they say."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"  # the longer examples live in the guide


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


def stacked_example() -> str:
    section = GUIDE.read_text().split("**Stacked layers**", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_stacked_example_prunes_every_layer_slice(capsys):
    import numpy as np

    namespace: dict = {}
    exec(compile(stacked_example(), str(GUIDE), "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    assert "every pruned leaf 2:4: yes" in printed
    query = np.asarray(namespace["pruned"]["layers"]["MultiHeadDotProductAttention_0"]["query"]["kernel"])
    assert query.shape == (6, 32, 4, 8)
    for layer in query:  # each layer slice (in, heads, head_dim): at most 2 of 4 along `in`
        groups = (layer != 0).reshape(8, 4, -1).sum(axis=1)
        assert (groups == 2).all()
    # the printed table matches the guide's copy of it
    readme_table = GUIDE.read_text().split("**Stacked layers**", 1)[1].split("```\n", 3)[2]
    assert printed.strip() == readme_table.strip().removesuffix("```").strip()
