"""Property tests of the path resolver: whatever the relative path, the answer is inside its root or a PathEscape.

A small tree with links that stay inside and links that lead out is built once; hypothesis then
composes paths from hostile segments. Bounded and derandomized (support.fuzz).
"""

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelpress.paths import PathEscape, confined
from support.fuzz import counted, fuzz_settings

SEGMENTS = st.sampled_from(["a", "b", "..", ".", "", "in-link", "out-link", "abs-link", "loop", "x y", "\\", "a\\..", "\0", "~",
                            "%2e%2e", "...", "c"]) | st.text(max_size=4)
PATHS = st.lists(SEGMENTS, min_size=1, max_size=6).map("/".join) | st.sampled_from(["/etc/passwd", "//x", "a//b", "../../x"])


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = tmp_path_factory.mktemp("fuzz")
    root = top / "root"
    (root / "a" / "b").mkdir(parents=True)
    (top / "outside").mkdir()
    (root / "in-link").symlink_to(root / "a")
    (root / "a" / "out-link").symlink_to(top / "outside")
    (root / "abs-link").symlink_to("/etc")
    (root / "loop").symlink_to(root / "loop")
    return root


@fuzz_settings(1500)
@given(relative=PATHS, follow_last=st.booleans())
@counted
def check_resolved_or_refused(root: Path, relative: str, follow_last: bool) -> None:
    try:
        resolved = confined(root, relative, follow_last)
    except PathEscape:
        return
    except (OSError, RuntimeError) as err:  # a link loop: refused by the OS, never followed out
        assert "loop" in relative, err
        return
    real_root = root.resolve()
    real = resolved.resolve() if follow_last else resolved.parent.resolve()
    assert real == real_root or real.is_relative_to(real_root), (relative, real)
    assert ".." not in Path(relative).parts and not relative.startswith("/")


def test_every_resolved_path_stays_inside_its_root(tree: Path) -> None:
    check_resolved_or_refused(tree)
    assert os.path.islink(tree / "abs-link")
