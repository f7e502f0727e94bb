"""The extension's packaging: CMake lists, the legacy .s4ext, the catalog JSON, icons, compilable scripts.

Slicer extensions list their files (no globbing), so these tests keep the lists honest: every script and
resource a CMakeLists.txt names exists, and every .py file of FastSAM3DLib/ and FastSAM3D/ (and every file of
Resources/) is named. The metadata must agree across CMakeLists.txt, fastsam3d.s4ext and FastSAM3D.json.
When cmake and a C++ compiler are present, the extension is also configured, built and installed against a
stand-in of Slicer's CMake macros, and the installed layout is checked.
"""
import json
import os
import py_compile
import re
import shlex
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = "FastSAM3D"
JSON_SCHEMA_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                    "build_subdirectory", "enabled", "tier"}  # slicer-extension-catalog-entry-schema-v1.0.1
CATALOG_SCHEMA = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/" \
                 "slicer-extension-catalog-entry-schema-v1.0.1.json#"
IGNORED_PARTS = {"__pycache__", ".pytest_cache"}


# ------------------------------------------------------------------------------------------------------
# a small CMake reader: commands with their arguments, comments removed, ${VAR} expanded from set()


def cmake_commands(path):
    """[(command name lower-case, [arguments])] of a CMakeLists.txt, with ``set`` variables expanded."""
    text = Path(path).read_text()
    commands, variables = [], {}
    for match in re.finditer(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(", text, re.M):
        start, depth, i = match.end(), 1, match.end()
        while depth and i < len(text):
            ch = text[i]
            if ch == '"':
                i = text.index('"', i + 1)
            elif ch == "#":
                i = text.index("\n", i)
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            i += 1
        body = "\n".join(line.split("#", 1)[0] if '"' not in line else line for line in text[start:i - 1].splitlines())
        # unquoted ${LIST} becomes several arguments, quoted "${LIST}" stays one (as in CMake)
        body = re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [m.group(0)])), body)
        args = shlex.split(body, posix=True)
        name = match.group(1).lower()
        if name == "set" and args:
            variables[args[0]] = args[1:]
        commands.append((name, args))
    return commands, variables


def keyword_values(args, keyword, keywords):
    """Values following ``keyword`` in a CMake argument list, up to the next keyword."""
    if keyword not in args:
        return []
    values = []
    for arg in args[args.index(keyword) + 1:]:
        if arg in keywords:
            break
        values.append(arg)
    return values


def files_under(folder, suffix=None):
    folder = ROOT / folder
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not IGNORED_PARTS & set(p.parts) and not p.name.endswith(".pyc")
                  and (suffix is None or p.suffix == suffix))


def png_size(path):
    data = Path(path).read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    return struct.unpack(">II", data[16:24])


def s4ext():
    values = {}
    for line in (ROOT / "fastsam3d.s4ext").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            values[key] = value.strip()
    return values


def top_level():
    return cmake_commands(ROOT / "CMakeLists.txt")


def repo_of(url):
    match = re.match(r"https://(?:github\.com|raw\.githubusercontent\.com)/([^/]+)/([^/#]+?)(?:\.git)?(?:/|#|$)", url)
    assert match, f"not a GitHub URL: {url}"
    return match.group(1), match.group(2)


def raw_url_path(url):
    """Path inside the repository of a raw.githubusercontent.com/<org>/<repo>/<branch>/<path> URL."""
    match = re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)$", url)
    assert match, f"not a raw GitHub file URL: {url}"
    return match.group(1)


# ------------------------------------------------------------------------------------------------------
# metadata


def test_top_level_cmake_has_complete_metadata():
    commands, variables = top_level()
    assert ("project", [NAME]) in commands
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert variables.get(f"EXTENSION_{key}"), f"EXTENSION_{key} is missing or empty"
    assert variables["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert variables["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert variables["EXTENSION_CONTRIBUTORS"] == ["FastSAM3D for Slicer team"]
    homepage = variables["EXTENSION_HOMEPAGE"][0]
    assert homepage.startswith("https://github.com/") and repo_of(homepage)[1] == "Slicer" + NAME
    description = variables["EXTENSION_DESCRIPTION"][0]
    for required in ("FastSAM3D", "SAM-Med3D", "weights", "Apache-2.0"):
        assert required in description, f"the description must state the weight licences ({required!r})"
    names = [name for name, _ in commands]
    for required in ("find_package", "include"):
        assert required in names
    includes = [args[0] for name, args in commands if name == "include"]
    assert includes == ["${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"]
    subdirectories = [args[0] for name, args in commands if name == "add_subdirectory"]
    assert set(subdirectories) == {"FastSAM3D", "FastSAM3DLib", "Resources"}
    for folder in subdirectories:
        assert (ROOT / folder / "CMakeLists.txt").is_file()


def test_icon_and_screenshot_urls_point_into_this_repository():
    _, variables = top_level()
    homepage_repo = repo_of(variables["EXTENSION_HOMEPAGE"][0])
    icon_url = variables["EXTENSION_ICONURL"][0]
    assert repo_of(icon_url) == homepage_repo
    icon = ROOT / raw_url_path(icon_url)
    assert icon.is_file(), f"{icon_url} names {icon}, which is not in the tree"
    assert png_size(icon) == (128, 128)
    for url in variables["EXTENSION_SCREENSHOTURLS"]:
        assert repo_of(url) == homepage_repo
        assert raw_url_path(url).startswith("Resources/Screenshots/")


def test_screenshots_exist():
    _, variables = top_level()
    for url in variables["EXTENSION_SCREENSHOTURLS"]:
        assert (ROOT / raw_url_path(url)).is_file(), url


def test_s4ext_and_catalog_entry_agree_with_cmake():
    _, variables = top_level()
    legacy = s4ext()
    catalog = json.loads((ROOT / f"{NAME}.json").read_text())

    assert (ROOT / "fastsam3d.s4ext").stem.lower() == NAME.lower()
    assert set(catalog) <= JSON_SCHEMA_KEYS, f"keys the schema does not allow: {set(catalog) - JSON_SCHEMA_KEYS}"
    assert catalog["$schema"] == CATALOG_SCHEMA
    assert {"$schema", "category", "scm_url"} <= set(catalog)
    assert isinstance(catalog["tier"], int) and 1 <= catalog["tier"] <= 5

    category = variables["EXTENSION_CATEGORY"][0]
    assert legacy["category"] == catalog["category"] == category
    depends = variables["EXTENSION_DEPENDS"]
    assert legacy["depends"].split() == catalog["build_dependencies"] == depends
    homepage = variables["EXTENSION_HOMEPAGE"][0]
    assert legacy["homepage"] == homepage
    assert legacy["scmurl"] == catalog["scm_url"]
    assert repo_of(catalog["scm_url"]) == repo_of(homepage)
    assert legacy["scm"] == catalog.get("scm_type", "git") == "git"
    assert legacy["scmrevision"] == catalog["scm_revision"]
    assert legacy["build_subdirectory"] == catalog["build_subdirectory"] == "."
    assert legacy["contributors"] == variables["EXTENSION_CONTRIBUTORS"][0]
    assert legacy["iconurl"] == variables["EXTENSION_ICONURL"][0]
    assert legacy["description"] == variables["EXTENSION_DESCRIPTION"][0]
    assert legacy["screenshoturls"].split() == variables["EXTENSION_SCREENSHOTURLS"]
    assert legacy["status"] == variables["EXTENSION_STATUS"][0]
    assert legacy["enabled"] == "1" and catalog.get("enabled", True) is True


# ------------------------------------------------------------------------------------------------------
# file lists


def _missing_lines(listed, present, where):
    missing = sorted(set(present) - set(listed))
    return f"not listed in {where} (add these lines):\n" + "\n".join(f"  {p}" for p in missing)


def test_module_cmake_lists_the_module_and_effect_and_registers_the_self_test():
    commands, _ = cmake_commands(ROOT / NAME / "CMakeLists.txt")
    calls = [args for name, args in commands if name == "slicermacrobuildscriptedmodule"]
    assert len(calls) == 1
    keywords = {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"}
    args = calls[0]
    assert keyword_values(args, "NAME", keywords) == [NAME]
    scripts = keyword_values(args, "SCRIPTS", keywords)
    resources = keyword_values(args, "RESOURCES", keywords)
    for listed in scripts + resources:
        assert (ROOT / NAME / listed).is_file(), f"{NAME}/CMakeLists.txt lists {listed}, which does not exist"
    python_files = files_under(NAME, ".py")
    assert set(python_files) <= set(scripts), _missing_lines(scripts, python_files, f"{NAME}/CMakeLists.txt")
    other = [p for p in files_under(NAME) if not p.endswith(".py") and p != "CMakeLists.txt"]
    assert set(other) <= set(resources), _missing_lines(resources, other, f"{NAME}/CMakeLists.txt RESOURCES")
    tests = [args for name, args in commands if name == "slicer_add_python_unittest"]
    assert tests and keyword_values(tests[0], "SCRIPT", {"SCRIPT", "SLICER_ARGS", "TESTNAME_PREFIX"}) == [f"{NAME}.py"]
    source = (ROOT / NAME / f"{NAME}.py").read_text()
    assert f"class {NAME}Test(ScriptedLoadableModuleTest)" in source
    effect_path = re.search(r'os\.path\.join\(MODULE_DIR, "([^"]+)", "([^"]+)"\)', source)
    assert effect_path and f"{effect_path.group(1)}/{effect_path.group(2)}" in scripts, \
        "the effect file registered at start-up must be installed"


def test_library_cmake_lists_every_library_file():
    commands, _ = cmake_commands(ROOT / "FastSAM3DLib" / "CMakeLists.txt")
    calls = [args for name, args in commands if name == "ctkmacrocompilepythonscript"]
    assert len(calls) == 1
    keywords = {"TARGET_NAME", "SCRIPTS", "RESOURCES", "SOURCE_DIR", "DESTINATION_DIR", "INSTALL_DIR",
                "NO_INSTALL_SUBDIR", "GLOBAL_TARGET"}
    args = calls[0]
    scripts = " ".join(keyword_values(args, "SCRIPTS", keywords)).split()
    resources = " ".join(keyword_values(args, "RESOURCES", keywords)).split()
    assert keyword_values(args, "DESTINATION_DIR", keywords) == [
        "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/FastSAM3DLib"]
    assert keyword_values(args, "INSTALL_DIR", keywords) == ["${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/FastSAM3DLib"]
    assert "NO_INSTALL_SUBDIR" in args
    for listed in scripts + resources:
        assert (ROOT / "FastSAM3DLib" / listed).is_file(), f"FastSAM3DLib/CMakeLists.txt lists missing {listed}"
    python_files = files_under("FastSAM3DLib", ".py")
    assert set(python_files) <= set(scripts), _missing_lines(scripts, python_files, "FastSAM3DLib/CMakeLists.txt")
    data_files = [p for p in files_under("FastSAM3DLib") if not p.endswith(".py") and p != "CMakeLists.txt"]
    assert set(data_files) <= set(resources), _missing_lines(resources, data_files,
                                                             "FastSAM3DLib/CMakeLists.txt RESOURCES")


def test_resources_cmake_lists_every_resource():
    _, variables = cmake_commands(ROOT / "Resources" / "CMakeLists.txt")
    listed = variables["FastSAM3D_RESOURCES"]
    for resource in listed:
        assert (ROOT / "Resources" / resource).is_file(), f"Resources/CMakeLists.txt lists {resource}, which is missing"
    present = [p for p in files_under("Resources") if p != "CMakeLists.txt" and not p.startswith("Screenshots/")]
    assert set(present) <= set(listed), _missing_lines(listed, present, "Resources/CMakeLists.txt")


def test_icons():
    assert png_size(ROOT / "Resources" / "Icons" / f"{NAME}.png") == (128, 128)
    width, height = png_size(ROOT / "Resources" / "Icons" / f"SegmentEditor{NAME}.png")
    assert width == height and 16 <= width <= 32  # Segment Editor effect buttons are about 21 pixels


def test_module_effect_and_library_compile(tmp_path):
    scripts = [ROOT / NAME / p for p in files_under(NAME, ".py")] + \
        [ROOT / "FastSAM3DLib" / p for p in files_under("FastSAM3DLib", ".py")]
    assert any(p.name == "SegmentEditorEffect.py" for p in scripts)
    for script in scripts:
        py_compile.compile(str(script), cfile=str(tmp_path / "out.pyc"), doraise=True)


# ------------------------------------------------------------------------------------------------------
# configure, build and install against stand-ins of Slicer's CMake macros

STUB_SLICER_CONFIG = """
set(Slicer_FOUND TRUE)
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/Empty.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/Empty.cmake")
"""

# Stand-ins with the semantics of Slicer's and CTK's macros: copy each listed file (keeping its sub-folder)
# into the build tree's module folder and install that folder; record the registered tests.
STUB_USE_SLICER = """
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.10/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
set(Slicer_USE_PYTHONQT TRUE)
set(BUILD_TESTING ON)
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(_PY "NO_INSTALL_SUBDIR" "TARGET_NAME;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
  set(_outputs)
  foreach(_file ${_PY_SCRIPTS} ${_PY_RESOURCES})
    if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${_file}")
      message(FATAL_ERROR "listed file does not exist: ${_file}")
    endif()
    add_custom_command(OUTPUT "${_PY_DESTINATION_DIR}/${_file}"
      COMMAND "${CMAKE_COMMAND}" -E copy "${CMAKE_CURRENT_SOURCE_DIR}/${_file}" "${_PY_DESTINATION_DIR}/${_file}"
      DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/${_file}")
    list(APPEND _outputs "${_PY_DESTINATION_DIR}/${_file}")
  endforeach()
  add_custom_target(Copy${_PY_TARGET_NAME} ALL DEPENDS ${_outputs})
  install(DIRECTORY "${_PY_DESTINATION_DIR}/" DESTINATION "${_PY_INSTALL_DIR}" USE_SOURCE_PERMISSIONS)
endmacro()
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(_MOD "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(_MOD_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "unknown arguments: ${_MOD_UNPARSED_ARGUMENTS}")
  endif()
  ctkMacroCompilePythonScript(TARGET_NAME ${_MOD_NAME} SCRIPTS ${_MOD_SCRIPTS} RESOURCES ${_MOD_RESOURCES}
    DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
    INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR} NO_INSTALL_SUBDIR)
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(_T "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  file(APPEND "${CMAKE_BINARY_DIR}/registered_tests.txt" "${CMAKE_CURRENT_SOURCE_DIR}/${_T_SCRIPT}\\n")
endmacro()
"""


def _compiler():
    return any(shutil.which(name) for name in ("c++", "g++", "clang++", "cl"))


@pytest.mark.skipif(not shutil.which("cmake") or not _compiler(), reason="needs cmake and a C++ compiler")
def test_configure_build_install_layout(tmp_path):
    stub = tmp_path / "slicer"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(STUB_SLICER_CONFIG)
    (stub / "UseSlicer.cmake").write_text(STUB_USE_SLICER)
    (stub / "Empty.cmake").write_text("")
    build, prefix = tmp_path / "build", tmp_path / "install"

    def run(*args):
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}"

    run("cmake", "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={stub}", "-DCMAKE_BUILD_TYPE=Release")
    run("cmake", "--build", str(build))
    run("cmake", "--install", str(build), "--prefix", str(prefix))

    modules = prefix / "lib" / "Slicer-5.10" / "qt-scripted-modules"
    assert (modules / f"{NAME}.py").is_file()
    assert (modules / "SegmentEditorFastSAM3DLib" / "SegmentEditorEffect.py").is_file()
    for script in files_under("FastSAM3DLib", ".py"):
        assert (modules / "FastSAM3DLib" / script).is_file(), script
    assert (modules / "Resources" / "Icons" / f"{NAME}.png").is_file()  # where ScriptedLoadableModule looks
    assert (modules / "Resources" / "models.json").is_file()
    tests = (build / "registered_tests.txt").read_text().split()
    assert tests == [str(ROOT / NAME / f"{NAME}.py")]
    # the installed library finds the installed Resources folder
    probe = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(modules)!r})
        import FastSAM3DLib, FastSAM3DLib.resources as r
        assert FastSAM3DLib.__file__.startswith({str(modules)!r}), FastSAM3DLib.__file__
        print(r.resources_dir())
    """)
    env = {k: v for k, v in os.environ.items() if k != "FASTSAM3D_RESOURCES"}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == modules / "Resources"
