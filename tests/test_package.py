"""The ``attnkit`` package namespace: its public functions stay callable whatever was imported before."""

import subprocess
import sys

import pytest

# Importing a submodule named like its function (attnkit.edit, attnkit.transfer) binds the module to the package
# attribute. Before: after `import attnkit.cli` (which imports attnkit.edit), `attnkit.edit(pipe, ...)` raised
# "TypeError: 'module' object is not callable" (the README's "Controllers" block broke that way).
CHECK = """
import importlib, inspect, pkgutil
import attnkit
{first}
import attnkit.cli
for info in pkgutil.iter_modules(attnkit.__path__):   # every submodule
    if not info.name.startswith("_") and info.name not in ("app", "cli", "__main__"):
        importlib.import_module("attnkit." + info.name)
bad = [name for name in attnkit.__all__ if not callable(getattr(attnkit, name))]
assert not bad, f"not callable after importing the submodules: {{bad}}"
for name in ("edit", "segment", "transfer", "style_aligned", "consistent", "generate", "invert"):
    assert callable(getattr(attnkit, name)), name
    assert "pipe" in inspect.signature(getattr(attnkit, name)).parameters, name
import attnkit.edit as module                        # the module is still there for its other names
assert module.EditResult is attnkit.EditResult and module.__name__ == "attnkit.edit"
import attnkit.transfer as module
assert module.__name__ == "attnkit.transfer" and module.TransferResult is attnkit.TransferResult
print("ok")
"""


@pytest.mark.parametrize("first", ["", "attnkit.edit, attnkit.transfer  # the names used before the modules"])
def test_public_functions_stay_callable_after_importing_their_modules(first):
    done = subprocess.run([sys.executable, "-c", CHECK.format(first=first)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_calling_through_the_module_reaches_the_function(monkeypatch):
    import attnkit
    import attnkit.edit as module

    seen = []
    monkeypatch.setattr(module, "edit", lambda *args, **kwargs: seen.append((args, kwargs)) or "done")
    assert module("pipe", "a", "b", seed=1) == "done" and attnkit.edit("pipe", "c", "d") == "done"
    assert seen == [(("pipe", "a", "b"), {"seed": 1}), (("pipe", "c", "d"), {})]



def test_keyword_arguments_named_self_pass_through(monkeypatch):
    """``attnkit.edit(..., self=0.4)``: the self-attention schedule must not collide with the forwarder's own."""
    import attnkit
    import attnkit.edit as module

    monkeypatch.setattr(module, "edit", lambda *args, **kwargs: (args, kwargs))
    assert attnkit.edit("pipe", "a", "b", self=0.4, cross=0.8) == (("pipe", "a", "b"), {"self": 0.4, "cross": 0.8})
