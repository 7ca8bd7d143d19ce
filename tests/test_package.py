"""The package's lazy exports stay what they are when a submodule of the same name is imported."""

from __future__ import annotations

import importlib


def test_an_exported_function_is_not_replaced_by_its_namesake_submodule():
    import mtlvision as mv

    importlib.import_module("mtlvision.export")
    importlib.import_module("mtlvision.registry")
    from mtlvision import api

    assert mv.export is api.export and mv.registry is api.registry
    from mtlvision.export import export_onnx  # the submodule itself is still importable by name

    assert callable(export_onnx)
    assert mv.balancers.__name__ == "mtlvision.balancers"  # exported modules are modules
