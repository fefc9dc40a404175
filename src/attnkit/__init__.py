"""attnkit: the attention layers of text-to-image diffusion models in your hands.

Names load on first use (PEP 562): ``import attnkit`` and ``attnkit --help`` stay fast because nothing imports
torch or diffusers until a function needs them. Add a public name to ``_EXPORTS`` (module -> names) and to the
``TYPE_CHECKING`` block below, not as a plain import (``tests/test_cli.py`` checks that the CLI starts
without torch).
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports at the end exist for type checkers only)
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from attnkit.notices import mute_torchvision_note  # noqa: E402 (logging only: no torch)

mute_torchvision_note()

_EXPORTS: dict[str, tuple[str, ...]] = {
    "attnkit.adapters": ("text_tokenizer",),
    "attnkit.controllers": ("LocalBlend", "MaskedMutualSelfAttention", "MutualSelfAttention", "Refine", "Replace",
                            "Reweight", "StyleAligned", "SubjectShare"),
    "attnkit.controllers.cross_image": ("CrossImageAttention", "MaskedAdaIN"),
    "attnkit.concepts": ("ConceptAttention", "ConceptMaps", "concept_maps", "embed_concepts"),
    "attnkit.stable_flow": ("StableFlowInjection", "StableFlowResult", "VitalLayers", "stable_flow_edit",
                            "vital_layers"),
    "attnkit.edit": ("EditResult", "edit"),
    "attnkit.flow_edit": ("FlowEditResult", "flow_edit"),
    "attnkit.flow_inversion": ("FlowGeneration", "FlowInversion", "rf_edit", "rf_invert", "rf_reconstruct"),
    "attnkit.engine": ("AttentionCall", "Controller", "LayerInfo", "Layout", "Selection", "control",
                       "describe_layers", "shared_latents"),
    "attnkit.inversion": ("Inversion", "invert"),
    "attnkit.models": ("ModelDefaults", "defaults_for", "load_pipeline"),
    "attnkit.notices": ("AttnkitError", "AttnkitWarning"),
    "attnkit.sampling": ("Generation", "generate"),
    "attnkit.segmentation": ("Segment", "Segmentation", "segment"),
    "attnkit.shared": ("SharedResult", "consistent", "mutual_edit", "style_aligned"),
    "attnkit.store": ("AttentionStore",),
    "attnkit.threads": ("set_threads",),
    "attnkit.transfer": ("TransferResult", "transfer"),
    "attnkit.viz": ("image_grid", "map_grid", "overlay", "read_png_metadata", "save_png", "word_strip"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


class _FunctionModule(types.ModuleType):
    """A submodule that shares its name with the public function it defines (``attnkit.edit``,
    ``attnkit.transfer``). Importing ``attnkit.edit`` makes Python bind the *module* to ``attnkit.edit``,
    shadowing the function, so ``attnkit.edit`` is always that module and the module forwards calls (and its
    signature) to the function: ``attnkit.edit(pipe, ...)`` works whatever was imported first, and
    ``import attnkit.edit as m`` gives the module (for ``m.EditResult`` or monkeypatching) in any order. Making
    the package attribute the function instead would turn ``import attnkit.edit as m`` into the function."""

    def __call__(module, /, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (positional-only: edit takes self=)
        return getattr(module, module.__name__.rpartition(".")[2])(*args, **kwargs)

    @property
    def __signature__(self) -> Any:
        import inspect

        return inspect.signature(getattr(self, self.__name__.rpartition(".")[2]))


class _Package(types.ModuleType):
    """The ``attnkit`` package itself: it makes a submodule named like its function callable as it is bound."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (isinstance(value, types.ModuleType) and _WHERE.get(name) == f"{__name__}.{name}"
                and callable(getattr(value, name, None))):
            value.__class__ = _FunctionModule  # also over a module's own forwarding class (transfer.py has one)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"attnkit.{name}") is not None:
            return importlib.import_module(f"attnkit.{name}")  # attnkit.inversion.use_ddim etc. without an import
        raise AttributeError(f"module 'attnkit' has no attribute {name!r}")
    imported = importlib.import_module(module)
    if module == f"{__name__}.{name}":  # attnkit.edit: always the callable module, never sometimes the function,
        imported.__class__ = _FunctionModule  # so that `import attnkit.edit as m` gives the module in any order
        value = imported
    else:
        value = getattr(imported, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static type checkers and IDEs see: the same names, imported eagerly
    from attnkit.adapters import text_tokenizer
    from attnkit.concepts import ConceptAttention, ConceptMaps, concept_maps, embed_concepts
    from attnkit.controllers import (
        LocalBlend,
        MaskedMutualSelfAttention,
        MutualSelfAttention,
        Refine,
        Replace,
        Reweight,
        StyleAligned,
        SubjectShare,
    )
    from attnkit.controllers.cross_image import CrossImageAttention, MaskedAdaIN
    from attnkit.edit import EditResult, edit
    from attnkit.engine import (
        AttentionCall,
        Controller,
        LayerInfo,
        Layout,
        Selection,
        control,
        describe_layers,
        shared_latents,
    )
    from attnkit.flow_edit import FlowEditResult, flow_edit
    from attnkit.flow_inversion import FlowGeneration, FlowInversion, rf_edit, rf_invert, rf_reconstruct
    from attnkit.inversion import Inversion, invert
    from attnkit.models import ModelDefaults, defaults_for, load_pipeline
    from attnkit.notices import AttnkitError, AttnkitWarning
    from attnkit.sampling import Generation, generate
    from attnkit.segmentation import Segment, Segmentation, segment
    from attnkit.shared import SharedResult, consistent, mutual_edit, style_aligned
    from attnkit.stable_flow import (
        StableFlowInjection,
        StableFlowResult,
        VitalLayers,
        stable_flow_edit,
        vital_layers,
    )
    from attnkit.store import AttentionStore
    from attnkit.threads import set_threads
    from attnkit.transfer import TransferResult, transfer
    from attnkit.viz import image_grid, map_grid, overlay, read_png_metadata, save_png, word_strip
