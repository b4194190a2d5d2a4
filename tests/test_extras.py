"""Optional dependencies: a missing extra is said in one line that names it, before any work is done."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loop.extras import MissingExtra, require
from tests.helpers import PROJECT, child_env


def test_an_installed_module_is_returned():
    assert require("json", "demo", "the demo").dumps([1]) == "[1]"


def test_a_missing_module_names_the_extra_to_install():
    with pytest.raises(MissingExtra, match=r"the demo needs no_such_module_xyz, which is not installed: "
                                           r"pip install -e '\.\[demo\]'") as caught:
        require("no_such_module_xyz.sub", "demo", "the demo")
    assert isinstance(caught.value.__cause__, ImportError)


def test_the_demo_script_without_gradio_says_which_extra_in_one_line(tmp_path):
    # gradio made unimportable in a child process (None in sys.modules makes its import fail), as on a core install
    code = ("import runpy, sys; sys.modules['gradio'] = None; "
            "sys.argv = ['scripts/demo.py', '--model', 'assets/tiny-whisper-hi']; "
            "runpy.run_path('scripts/demo.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: the demo needs gradio, which is not installed: pip install -e '.[demo]'"]
