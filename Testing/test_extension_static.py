"""Static checks of the Slicer extension: module file, panels, .ui, CMake lists, .s4ext and the Lib's imports.

Speckle2Self.py and its panels (Speckle2SelfWidgets) need Slicer's Qt, so they are checked here
as source (Testing/test_gui_panels.py runs them under PySide6): they compile, every ``ui.X``
widget they use exists in the .ui, every .ui parameter name is a field of the parameter node,
torch is not imported at module level and the logic is the Lib's. The CMake lists must name
exactly the files on disk, and the Lib must never import Qt, ctk or slicer.app.
"""

from __future__ import annotations

import ast
import py_compile
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "Speckle2Self"
MODULE_FILE = MODULE_DIR / "Speckle2Self.py"
WIDGETS_DIR = MODULE_DIR / "Speckle2SelfWidgets"
SELFTEST_FILE = WIDGETS_DIR / "selftest.py"
INSTALLER_FILE = WIDGETS_DIR / "installer.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "Speckle2Self.ui"
LIB_DIR = MODULE_DIR / "Speckle2SelfLib"
LOGIC_FILE = LIB_DIR / "scene" / "logic.py"
MODELS_DIR = REPO / "Resources" / "Models"     # top level: shared by the Slicer build and pip
QT_WIDGETS = {"QWidget", "QLabel", "QCheckBox", "QComboBox", "QSpinBox", "QPushButton", "QProgressBar",
              "QTableView", "QLineEdit", "QGroupBox"}
MRML_WIDGETS = {"qMRMLNodeComboBox", "qSlicerMarkupsPlaceWidget", "qMRMLTableView"}


@pytest.fixture(scope="module")
def module_source() -> str:
    return MODULE_FILE.read_text()


def gui_sources() -> list:
    """The module file and its panels: the code that runs in Slicer's Qt."""
    return [MODULE_FILE, *sorted(p for p in WIDGETS_DIR.glob("*.py"))]


@pytest.fixture(scope="module")
def gui_source() -> str:
    return "\n".join(p.read_text() for p in gui_sources())


def class_methods(path: Path, class_name: str) -> dict:
    """Method name -> source of a class defined in ``path``."""
    classes = {c.name: c for c in ast.parse(path.read_text()).body if isinstance(c, ast.ClassDef)}
    return {f.name: ast.unparse(f) for f in classes[class_name].body if isinstance(f, ast.FunctionDef)}


@pytest.fixture(scope="module")
def ui_tree() -> ET.ElementTree:
    return ET.parse(UI_FILE)


def ui_widgets(tree) -> dict:
    """objectName -> (class, SlicerParameterName or None) for every widget in the .ui."""
    widgets = {}
    for widget in tree.iter("widget"):
        param = next((p.find("string").text for p in widget.findall("property")
                      if p.get("name") == "SlicerParameterName"), None)
        widgets[widget.get("name")] = (widget.get("class"), param)
    return widgets


def parameter_fields(source: str) -> dict:
    """Field name -> annotation source of the @parameterNodeWrapper class."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in Speckle2Self.py")


# ----------------------------------------------------------------------------- module file and .ui

def test_module_file_and_panels_compile(tmp_path):
    sources = gui_sources()
    assert len(sources) >= 8, "the module file, the panels, the poller, the installer and the self-test"
    for path in sources:
        py_compile.compile(str(path), cfile=str(tmp_path / (path.stem + ".pyc")), doraise=True)


def test_module_file_is_thin():
    assert len(MODULE_FILE.read_text().splitlines()) <= 300, "panels, jobs and installer belong in their own files"


def test_every_widget_the_module_uses_exists_in_the_ui(gui_source, ui_tree):
    used = set(re.findall(r"\bui\.([A-Za-z_]\w*)", gui_source))
    assert len(used) >= 40, "the panels use the .ui's widgets"
    missing = sorted(used - set(ui_widgets(ui_tree)))
    assert not missing, f"the module's code uses widgets missing from {UI_FILE.name}: {missing}"


def test_ui_parameter_names_are_parameter_node_fields_with_fitting_types(module_source, ui_tree):
    fields = parameter_fields(module_source)
    connected = {name: (cls, param) for name, (cls, param) in ui_widgets(ui_tree).items() if param}
    assert len(connected) >= 10
    for name, (cls, param) in connected.items():
        assert param in fields, f"{name} is bound to '{param}', which is not a parameter node field"
        annotation = fields[param]
        if cls == "QComboBox":
            assert "Choice(" in annotation, f"{param}: a combo box needs a Choice annotation"
        if cls == "ctkSliderWidget":
            assert "WithinRange(" in annotation, f"{param}: a slider needs a WithinRange annotation"
        if cls == "QCheckBox":
            assert annotation == "bool", f"{param}: a check box needs a bool field"
        if cls == "qMRMLNodeComboBox":
            assert annotation.startswith("vtkMRML"), f"{param}: a node selector needs a node-typed field"


def test_ui_declares_custom_widgets_and_gives_mrml_widgets_the_scene(ui_tree):
    classes = {cls for cls, _ in ui_widgets(ui_tree).values()}
    declared = {c.find("class").text for c in ui_tree.iter("customwidget")}
    assert not sorted(classes - QT_WIDGETS - declared), "undeclared custom widget classes"
    receivers = {c.find("receiver").text for c in ui_tree.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {name for name, (cls, _) in ui_widgets(ui_tree).items() if cls in MRML_WIDGETS}
    assert mrml and mrml <= receivers, f"MRML widgets without the scene: {sorted(mrml - receivers)}"


def lib_sources() -> list:
    return sorted(p for p in LIB_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def test_module_has_title_category_help_and_a_slicer_self_test(module_source, gui_source):
    tree = ast.parse(module_source)
    classes = {c.name: c for c in tree.body if isinstance(c, ast.ClassDef)}
    assert {"Speckle2Self", "Speckle2SelfWidget"} <= set(classes)
    # the logic is the Lib's (qt-free, tested headless), not a wrapper in the module file or a panel
    assert "Speckle2SelfLogic" not in classes and "ScriptedLoadableModuleLogic" not in gui_source
    imports = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "Speckle2SelfLib.scene.logic"]
    assert imports and "Speckle2SelfLogic" in {a.name for n in imports for a in n.names}
    # Slicer's "Reload and Test" and CTest look for <Module>Test in the module file's namespace
    tests = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "Speckle2SelfWidgets.selftest"]
    assert tests and "Speckle2SelfTest" in {a.name for n in tests for a in n.names}
    test_classes = {c.name: c for c in ast.parse(SELFTEST_FILE.read_text()).body if isinstance(c, ast.ClassDef)}
    assert [ast.unparse(b) for b in test_classes["Speckle2SelfTest"].bases] == ["ScriptedLoadableModuleTest"]
    assert "runTest" in {f.name for f in test_classes["Speckle2SelfTest"].body if isinstance(f, ast.FunctionDef)}
    assert 'self.parent.title = _("Speckle2Self")' in module_source
    assert 'self.parent.categories = ["Ultrasound"]' in module_source
    assert "<a href=" in module_source and "acknowledgementText" in module_source


def test_module_and_its_lib_load_without_torch():
    for path in gui_sources():
        top_level = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top_level for a in n.names} | \
            {n.module for n in top_level if isinstance(n, ast.ImportFrom)}
        assert "torch" not in names, f"{path.name} must import torch lazily"
    # What the GUI imports at setup must work with torch missing (None in sys.modules blocks it).
    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1])\n"
            "import Speckle2SelfLib.scene.logic, Speckle2SelfLib.scene.lumen, Speckle2SelfLib.scene.live, "
            "Speckle2SelfLib.engine.models, Speckle2SelfLib.engine.inference\n"
            "Speckle2SelfLib.engine.models.bundled_models()\n"
            "try:\n    import torch\nexcept ImportError:\n    print('blocked')\n")
    run = subprocess.run([sys.executable, "-c", code, str(MODULE_DIR)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "blocked" in run.stdout, run.stderr


# ----------------------------------------------------------------------------- CMake and .s4ext

def cmake_set(text: str, variable: str) -> list:
    match = re.search(rf"set\({variable}\b(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return match.group(1).split()


def test_module_cmake_lists_every_lib_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "file(GLOB" not in text, "list files explicitly"
    name = cmake_set(text, "MODULE_NAME")[0]
    expand = lambda items: {i.replace("${MODULE_NAME}", name) for i in items}  # noqa: E731
    scripts = expand(cmake_set(text, "MODULE_PYTHON_SCRIPTS"))
    on_disk = {p.relative_to(MODULE_DIR).as_posix() for p in gui_sources() + lib_sources()}
    assert scripts == on_disk, (f"scripts not listed: {sorted(on_disk - scripts)}; "
                                f"listed but absent: {sorted(scripts - on_disk)}")
    resources = expand(cmake_set(text, "MODULE_PYTHON_RESOURCES"))
    expected = {"Resources/Icons/Speckle2Self.png", "Resources/UI/Speckle2Self.ui"}
    assert resources == expected, (f"resources not listed: {sorted(expected - resources)}; "
                                   f"listed but absent: {sorted(resources - expected)}")
    listed_models = set(cmake_set(text, "MODULE_MODEL_RESOURCES"))
    models = {p.relative_to(MODELS_DIR).as_posix() for p in MODELS_DIR.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts}
    assert listed_models == models, (f"models not listed: {sorted(models - listed_models)}; "
                                     f"listed but absent: {sorted(listed_models - models)}")
    assert "../Resources/Models" in text and "install(FILES" in text
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS", text, re.S)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def top_cmake_values() -> dict:
    text = (REPO / "CMakeLists.txt").read_text()
    return {key: value for key, value in re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', text)}


def read_s4ext() -> dict:
    fields = {}
    for line in (REPO / "Speckle2Self.s4ext").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            fields[key] = value.strip()
    return fields


def test_top_level_cmake_describes_the_extension():
    text = (REPO / "CMakeLists.txt").read_text()
    values = top_cmake_values()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert values.get(f"EXTENSION_{key}"), f"EXTENSION_{key} missing or empty"
    assert values["EXTENSION_CATEGORY"] == "Ultrasound" and values["EXTENSION_DEPENDS"] == "PyTorch"
    for snippet in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(Speckle2Self)",
                    "SlicerMacroExtractRepositoryInfo(VAR_PREFIX", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                    "include(${Slicer_EXTENSION_CPACK})"):
        assert snippet in text, f"top-level CMakeLists.txt lacks {snippet}"


def test_s4ext_has_required_fields_matching_the_cmake():
    fields = read_s4ext()
    required = ("scm", "scmurl", "depends", "homepage", "contributors", "category", "iconurl", "status",
                "description", "screenshoturls", "enabled")
    assert not [k for k in required if not fields.get(k)], "empty or missing .s4ext fields"
    assert fields["scm"] == "git" and fields["scmurl"].startswith("https://") and fields["enabled"] == "1"
    values = top_cmake_values()
    pairs = {"homepage": "HOMEPAGE", "category": "CATEGORY", "iconurl": "ICONURL", "depends": "DEPENDS",
             "contributors": "CONTRIBUTORS", "description": "DESCRIPTION", "screenshoturls": "SCREENSHOTURLS"}
    for s4ext_key, cmake_key in pairs.items():
        assert fields[s4ext_key] == values[f"EXTENSION_{cmake_key}"], f"{s4ext_key} differs from the CMake"
    assert fields["iconurl"].endswith("Speckle2Self/Resources/Icons/Speckle2Self.png")


def test_icon_is_a_128_pixel_png():
    from PIL import Image

    with Image.open(MODULE_DIR / "Resources" / "Icons" / "Speckle2Self.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


# ----------------------------------------------------------------------------- the Lib stays GUI-free

FORBIDDEN_MODULES = ("qt", "ctk", "PythonQt", "slicer.app", "slicer.modules", "slicer.ScriptedLoadableModule",
                     "slicer.parameterNodeWrapper")


def gui_uses(path: Path) -> list:
    """Imports of Qt/ctk/slicer GUI modules and uses of slicer.app / slicer.modules in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        modules = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
            modules = [f"slicer.{node.attr}"]
        found += [f"{path.relative_to(MODULE_DIR).as_posix()}:{node.lineno} {m}" for m in modules
                  if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_MODULES)]
    return found


def test_lib_never_imports_qt_ctk_or_slicer_app():
    sources = lib_sources()
    assert len(sources) >= 10
    offending = [use for path in sources for use in gui_uses(path)]
    assert not offending, f"Speckle2SelfLib must run headless: {offending}"
    assert gui_uses(MODULE_FILE), "the check finds GUI use where there is some (the module file)"


def test_json_description_for_slicer_5_8_matches_the_s4ext():
    """Slicer 5.8+ reads a JSON catalog entry; the .s4ext stays for 5.6 and both must agree."""
    import json

    entry = json.loads((REPO / "Speckle2Self.json").read_text())
    fields = read_s4ext()
    assert entry["scm_url"] == fields["scmurl"] and entry["scm_revision"] == fields["scmrevision"]
    assert entry["category"] == fields["category"] == "Ultrasound"
    assert entry["build_dependencies"] == fields["depends"].split() == ["PyTorch"]
    assert entry["build_subdirectory"] == "." and entry["tier"] in (1, 3, 5)


def test_modules_slicer_loads_need_no_scikit_image_or_opencv():
    """Slicer's Python has neither: the Lib modules the GUI imports must load without them."""
    gui_modules = ["scene.logic", "scene.despeckle", "scene.lumen", "scene.live", "scene.nodes", "scene.jobs",
                   "engine.models", "engine.inference", "engine.adapt", "engine.user_models", "engine.backends",
                   "engine.grain", "engine.latest_frame", "segmentation", "simulation", "igtl", "metrics"]
    probe = ("import sys\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('skimage', 'cv2'):\n"
             "            raise ImportError('blocked: ' + name)\n"
             "sys.meta_path.insert(0, Block())\n"
             f"sys.path.insert(0, {str(MODULE_DIR)!r})\n"
             f"for m in {gui_modules!r}:\n"
             "    __import__('Speckle2SelfLib.' + m)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]


# ----------------------------------------------------------------------------- issue #11 (module review)

def module_function(path: Path, name: str, namespace: dict):
    """Define one top-level function of a GUI source file (it cannot be imported without Qt)."""
    tree = ast.parse(path.read_text())
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert found, f"{path.name} has no top-level function {name}"
    exec(compile(ast.Module(body=found, type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def test_every_slicer_test_method_skips_cleanly_without_torch(monkeypatch):
    import functools
    import importlib.util
    import unittest

    classes = {c.name: c for c in ast.parse(SELFTEST_FILE.read_text()).body if isinstance(c, ast.ClassDef)}
    methods = [f for f in classes["Speckle2SelfTest"].body
               if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")]
    assert len(methods) >= 4
    for method in methods:   # CTest calls each test_* method directly, not runTest
        assert [ast.unparse(d) for d in method.decorator_list] == ["requiresTorch"], method.name
        assert "pip_install" not in ast.unparse(method) and "ensurePythonDependencies" not in ast.unparse(method)
    requires_torch = module_function(SELFTEST_FILE, "requiresTorch", {"importlib": importlib, "functools": functools})
    ran = []

    class Probe(unittest.TestCase):
        @requires_torch
        def test_it(self):
            ran.append(True)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    result = unittest.TestResult()
    Probe("test_it").run(result)
    assert len(result.skipped) == 1 and not ran and not result.errors and not result.failures
    monkeypatch.undo()
    result = unittest.TestResult()
    Probe("test_it").run(result)
    assert ran == [True] and result.wasSuccessful() and not result.skipped


def test_torch_prompt_does_not_promise_a_small_cpu_build_on_linux(gui_source, monkeypatch):
    assert "several hundred MB" not in gui_source
    note = module_function(INSTALLER_FILE, "torchDownloadNote", {"_": lambda text: text, "sys": sys})
    monkeypatch.setattr(sys, "platform", "linux")
    assert "CUDA" in note() and "hundred MB" not in note()
    monkeypatch.setattr(sys, "platform", "win32")
    assert "CPU" in note()


def test_torch_install_runs_inside_error_handling():
    installer = ast.parse(INSTALLER_FILE.read_text())
    guarded = set()
    for node in ast.walk(installer):
        if isinstance(node, ast.Try) and node.handlers:
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    calls = [n for n in ast.walk(installer) if isinstance(n, ast.Call)
             and getattr(n.func, "id", getattr(n.func, "attr", None)) == "ensurePythonDependencies"]
    assert calls, "torchReady never asks for torch?"
    assert all(id(c) in guarded for c in calls), "ensurePythonDependencies outside try/except in torchReady"
    # the panels ask through torchReady only (a failed install is shown, never raised into Qt)
    for path in gui_sources():
        if path != INSTALLER_FILE:
            assert "ensurePythonDependencies(" not in path.read_text(), f"{path.name} installs torch unguarded"
    assert sum("torchReady()" in p.read_text() for p in gui_sources()) >= 3   # Apply, Live, Adapt


def test_parameter_node_defaults_agree_with_the_ui(module_source, ui_tree):
    tree = ast.parse(module_source)
    wrapper = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "Speckle2SelfParameterNode")
    defaults = {s.target.id: ast.literal_eval(s.value) for s in wrapper.body
                if isinstance(s, ast.AnnAssign) and s.value is not None and isinstance(s.value, ast.Constant)}
    checked = 0
    for widget in ui_tree.iter("widget"):
        props = {p.get("name"): p for p in widget.findall("property")}
        param = props.get("SlicerParameterName")
        name = param.find("string").text if param is not None else None
        if name not in defaults:
            continue
        value_prop = props.get("value") or props.get("checked")
        if value_prop is None or not isinstance(defaults[name], (int, float)):
            continue
        raw = value_prop[0].text
        ui_value = raw == "true" if value_prop[0].tag == "bool" else float(raw)
        assert ui_value == defaults[name], f"{name}: parameter node default {defaults[name]} but .ui {raw}"
        checked += 1
    assert checked >= 3 and "tolerance" in defaults


def test_segmenting_shows_the_diameter_chart_and_seeds_from_the_last_point(gui_source):
    assert "ShowChartInLayout(result.plot_chart_node)" in gui_source
    assert "GetNthControlPointPositionWorld(0" not in gui_source, "re-placed seeds must not read point 0"
    assert "frame = browser.GetSelectedItemNumber()" not in gui_source


def test_one_job_poller_polls_every_job_with_a_qtimer():
    poller = class_methods(WIDGETS_DIR / "jobpoller.py", "JobPoller")
    assert "QTimer()" in poller["__init__"] and "self.tick" in poller["__init__"]
    assert "job.poll()" in poller["tick"] and "job.cancel()" in poller["tick"] and "processEvents" not in poller["tick"]
    assert "self.job.cancel()" in poller["cancel"] and "self.cancel()" in poller["stop"]
    for path in gui_sources():      # no other loop polls a job
        if path.name != "jobpoller.py":
            assert ".poll()" not in path.read_text(), f"{path.name} polls a job itself"
    widget = class_methods(MODULE_FILE, "Speckle2SelfWidget")
    assert "panel.stop()" in widget["cleanup"] and "panel.stop()" in widget["onSceneStartClose"]


def test_apply_despeckles_in_a_background_job_polled_by_a_qtimer():
    methods = class_methods(WIDGETS_DIR / "despeckle.py", "DespecklePanel")
    apply = methods["onApplyButton"]
    assert "self.logic.process(" not in apply, "Apply must not despeckle on the main thread"
    assert "start_process(" in apply and "JobPoller(job" in apply and "self.poller.cancel()" in apply
    assert "processEvents" not in methods["onProgress"]
    assert "self.poller.stop()" in methods["stop"]
    lib_classes = {c.name: c for c in ast.parse(LOGIC_FILE.read_text()).body if isinstance(c, ast.ClassDef)}
    logic = {f.name: ast.unparse(f) for f in lib_classes["Speckle2SelfLogic"].body if isinstance(f, ast.FunctionDef)}
    assert "prepare_job(" in logic["start_process"] and "job.start()" in logic["start_process"]


def test_segment_runs_in_a_background_job_polled_by_a_qtimer():
    """Defect 7: Segment (a whole sequence) must not block the GUI, and must be cancellable."""
    methods = class_methods(WIDGETS_DIR / "lumen.py", "LumenPanel")
    segment = methods["onSegmentButton"]
    assert "segment_lumen(" not in segment and "segmentLumen(" not in segment, "Segment must not run on the main thread"
    assert "start_segmentation(" in segment and "JobPoller(job" in segment
    assert ".cancel()" in segment, "the Segment button cancels a running job"
    assert "processEvents" not in methods["onProgress"]
    assert "self.poller.stop()" in methods["stop"]
    lib_classes = {c.name: c for c in ast.parse(LOGIC_FILE.read_text()).body if isinstance(c, ast.ClassDef)}
    logic = {f.name: ast.unparse(f) for f in lib_classes["Speckle2SelfLogic"].body if isinstance(f, ast.FunctionDef)}
    assert "prepare_segmentation(" in logic["start_segmentation"] and "job.start()" in logic["start_segmentation"]


def test_icon_and_screenshot_urls_point_at_files_in_this_repository():
    values = top_cmake_values()
    for url in [values["EXTENSION_ICONURL"], *values["EXTENSION_SCREENSHOTURLS"].split()]:
        relative = url.split("/main/", 1)[1]
        assert (REPO / relative).is_file(), f"{url} names {relative}, which is not in the repository"
