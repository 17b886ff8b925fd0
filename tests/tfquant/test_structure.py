"""The library's layering: tfquant never imports the application (nets, learners)."""
import ast
import os
import re

import tfquant

PACKAGE_DIR = os.path.dirname(os.path.abspath(tfquant.__file__))
APPLICATION = ("nets", "learners")
# A module path of the application as a plain string, the argument of a dynamic import.
_MODULE_STRING = re.compile(r"^(nets|learners)(\.\w+)+$")


def _imported_modules(path):
    """Every module name an import statement of the file names (absolute imports; relative ones stay in tfquant)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.append(str(node.args[0].value))  # importlib.import_module("nets....") is an import too
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.match(node.value):
            names.append(node.value)  # a registry of module names imported later
    return names


def test_library_never_imports_the_application():
    sources = [os.path.join(root, name) for root, _, names in os.walk(PACKAGE_DIR) for name in names
               if name.endswith(".py")]
    assert len(sources) > 10  # the walk found the package
    offending = [(os.path.relpath(path, PACKAGE_DIR), module) for path in sources for module in _imported_modules(path)
                 if module.split(".")[0] in APPLICATION or module.startswith(tuple(a + "." for a in APPLICATION))]
    assert offending == []


def test_import_finder_sees_each_kind_of_import(tmp_path):
    """The checker itself: each way of importing nets is found (so the test above can fail)."""
    path = tmp_path / "sample.py"
    path.write_text("import nets.resnet\nfrom learners import runner\nimport importlib\n"
                    "importlib.import_module('nets.convnet_at_fmnist')\nfrom . import ops\n"
                    "MODELS = {'a': 'learners.uniform_quant'}\n")
    found = _imported_modules(str(path))
    assert sorted(set(found)) == ["importlib", "learners", "learners.uniform_quant", "nets.convnet_at_fmnist",
                                  "nets.resnet"]


def test_the_public_face_resolves_and_the_lock_module_needs_no_tensorflow():
    import subprocess
    import sys
    code = ("import sys; import tfquant.files, tfquant.errors; assert 'tensorflow' not in sys.modules, 'early'; "
            "import tfquant; names = list(tfquant.__all__); "
            "objs = [getattr(tfquant, n) for n in names]; assert 'tensorflow' in sys.modules; "
            "assert all(getattr(o, '__name__', n) == n for o, n in zip(objs, names)), names; "
            "assert set(names) <= set(dir(tfquant)); import tfquant.ops as ops; assert tfquant.ops is ops; "
            "print(len(names))")
    root = os.path.dirname(PACKAGE_DIR)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env=dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) == 11
    try:
        tfquant.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("tfquant.no_such_name resolved")
