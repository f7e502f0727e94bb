"""The extension's packaging: CMake lists, the legacy .s4ext, the catalog JSON, icons, compilable scripts.

Slicer extensions list their files (no globbing), so these tests keep the lists honest: every script and
resource a CMakeLists.txt names exists, and every .py file of FastSAM3DLib/ and FastSAM3D/ (and every file of
Resources/) is named. The metadata must agree across CMakeLists.txt, fastsam3d.s4ext and FastSAM3D.json.
When cmake and a C++ compiler are present, the extension is also configured, built and installed against a
stand-in of Slicer's CMake macros, and the installed layout is checked.

The "Extensions Index" section repeats, offline, what github.com/Slicer/ExtensionsIndex checks on a submission
(scripts/check_description_files.py, .pre-commit-config.yaml with .prettierrc.js, the schema files, and the
questions of scripts/extension_ai_analysis.py), as read at ExtensionsIndex commit 07f1d1b (branches main,
5.12 and 5.10). What needs GitHub itself (topic, image URLs answering, the pull requests) is listed in the
README section "Publishing to the Extensions Index".
"""
import ast
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
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = "FastSAM3D"
# slicer-extension-catalog-entry-schema-v1.0.1 (draft-07, additionalProperties false): property -> JSON type.
# v1.0.2 (2026-01) only adds "dicom_support_rule"; the same entry goes to the index's main, 5.12 and 5.10
# branches, and 5.10 holds (and its pre-commit validates against) v1.0.1 only, so the entry stays on v1.0.1.
CATALOG_SCHEMA_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                             "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int}
CATALOG_SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}
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

    assert (ROOT / "fastsam3d.s4ext").stem.lower() == NAME.lower()  # the schema: test_catalog_entry_validates_...

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


# ------------------------------------------------------------------------------------------------------
# Extensions Index: what the index checks on a submission, repeated offline

INDEX_SIZE_LIMIT_MB = 100  # check_repository_size: every file of the clone, .git included, in MiB
INDEX_LICENSE_NAMES = ["LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt"]
INDEX_REPOSITORY_PREFIXES = ("Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_")
# check_cmakelists_content's regular expressions, as the index writes them (stricter than CMake: the screenshot
# URLs must be one quoted string, closed by ")" right after the quote)
INDEX_PROJECT_PATTERN = r"project\s*\(\s*([^\s\)\n\r]+)"
INDEX_ICONURL_PATTERN = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
INDEX_SCREENSHOTURLS_PATTERN = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'
SLICER_5_10_CMAKE_MINIMUM = ["VERSION", "3.20.6...3.22.6", "FATAL_ERROR"]  # Utilities/Templates/Extensions/Default


def test_catalog_entry_validates_against_the_index_schema():
    catalog = json.loads((ROOT / f"{NAME}.json").read_text(encoding="utf-8"))
    assert isinstance(catalog, dict)
    assert CATALOG_SCHEMA_REQUIRED <= set(catalog), f"required: {sorted(CATALOG_SCHEMA_REQUIRED - set(catalog))}"
    assert set(catalog) <= set(CATALOG_SCHEMA_PROPERTIES), \
        f"additionalProperties is false; not in the schema: {sorted(set(catalog) - set(CATALOG_SCHEMA_PROPERTIES))}"
    for key, value in catalog.items():
        expected = CATALOG_SCHEMA_PROPERTIES[key]
        # JSON booleans are not integers for the schema (Python's bool is an int subclass)
        assert isinstance(value, expected) and (expected is bool or not isinstance(value, bool)), \
            f"{key}: {value!r} is not a JSON {expected.__name__}"
    assert catalog["$schema"] == CATALOG_SCHEMA
    assert all(isinstance(item, str) for item in catalog.get("build_dependencies", []))
    assert catalog.get("scm_type", "git") in ("git", "local")
    assert 1 <= catalog.get("tier", 1) <= 5
    # check_scm_url_syntax, check_extension_name and check_git_repository_name
    assert urlsplit(catalog["scm_url"]).scheme in ("git", "https")
    assert not NAME.lower().startswith("slicer"), "the extension name must not start with 'Slicer'"
    repo_name = catalog["scm_url"].strip().strip("/").rsplit("/", 1)[-1]
    repo_name = repo_name[:-4] if repo_name.endswith(".git") else repo_name
    assert repo_name.startswith(INDEX_REPOSITORY_PREFIXES), f"the repository name {repo_name!r} must start with Slicer"


def prettier_json(data):
    """The text prettier writes for a catalog entry with the index's .prettierrc.js.

    prettier's JSON printer with prettier-plugin-multiline-arrays and ``multilineArraysWrapThreshold: 0``: two
    spaces, ``"key": value``, every non-empty array one element per line (``[]`` stays), a final newline; an
    object whose first key is on the line of its "{" in the source may stay on one line, which a flat catalog
    entry does not have. Checked: equal to prettier 3.5.3's output for all 255 entries of the index's main
    branch and for this file.
    """
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def test_catalog_entry_is_formatted_as_the_index_prettier_writes_it():
    """The index's pre-commit (prettier with multilineArraysWrapThreshold 0) would rewrite any other form."""
    raw = (ROOT / f"{NAME}.json").read_bytes()
    assert b"\r" not in raw, "LF line endings only (check_json_file_format, mixed-line-ending)"
    text = raw.decode("utf-8")
    assert "\t" not in text, "no tabs (forbid-tabs)"
    assert all(line == line.rstrip() for line in text.splitlines()), "no trailing whitespace (trailing-whitespace)"
    expected = prettier_json(json.loads(text))
    assert text == expected, f"format {NAME}.json as prettier does with the index's settings:\n{expected}"


def test_prettier_rule_wraps_arrays():
    """The rule above is the index's, not json.dumps' defaults: inline arrays and missing newlines are refused."""
    data = {"$schema": CATALOG_SCHEMA, "build_dependencies": ["PyTorch"], "category": "Segmentation"}
    inline = '{\n  "$schema": "%s",\n  "build_dependencies": ["PyTorch"],\n  "category": "Segmentation"\n}\n' \
        % CATALOG_SCHEMA
    assert prettier_json(data) != inline
    assert '  "build_dependencies": [\n    "PyTorch"\n  ],\n' in prettier_json(data)
    assert '"build_dependencies": [],' in prettier_json({"build_dependencies": [], "tier": 1})
    assert prettier_json(data).endswith("}\n") and not prettier_json(data).endswith("\n\n")


def test_cmake_minimum_version_is_that_of_slicer_5_10_extension_template():
    commands, _ = top_level()
    assert commands[0][0] == "cmake_minimum_required", "cmake_minimum_required must come first"
    assert commands[0][1] == SLICER_5_10_CMAKE_MINIMUM


def test_top_level_cmake_passes_the_index_checks():
    """check_cmakelists_content: project() is the catalog file's name; icon and screenshot URLs as it parses them."""
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    catalog_file = ROOT / f"{NAME}.json"
    projects = re.findall(INDEX_PROJECT_PATTERN, text, re.IGNORECASE | re.MULTILINE)
    assert projects and projects[0].strip().strip('"').strip("'") == catalog_file.stem
    icons = re.findall(INDEX_ICONURL_PATTERN, text, re.IGNORECASE | re.MULTILINE)
    assert icons, "the index finds no EXTENSION_ICONURL"
    screenshots = re.findall(INDEX_SCREENSHOTURLS_PATTERN, text, re.IGNORECASE | re.MULTILINE)
    assert screenshots, 'the index finds no EXTENSION_SCREENSHOTURLS (one quoted string, then ")")'
    _, variables = top_level()
    assert icons[0].strip() == variables["EXTENSION_ICONURL"][0]
    assert screenshots[0].split() == variables["EXTENSION_SCREENSHOTURLS"]
    # validate_image_url wants an image Content-Type or an image file name; raw.githubusercontent.com serves
    # PNG files as image/png. The files exist (test_icon_and_screenshot_urls_point_into_this_repository).
    for url in [icons[0].strip()] + screenshots[0].split():
        assert url.startswith("http") and url.lower().endswith((".png", ".jpg", ".jpeg", ".gif")), url


def test_license_file_in_repository_root():
    found = [name for name in INDEX_LICENSE_NAMES if (ROOT / name).is_file()]
    assert found, f"check_license_file looks for one of {INDEX_LICENSE_NAMES} in the repository root"
    text = (ROOT / found[0]).read_text(encoding="utf-8", errors="ignore")
    assert "Apache License" in text and "Version 2.0" in text  # the licence the description names
    _, variables = top_level()
    assert "Apache-2.0" in variables["EXTENSION_DESCRIPTION"][0]


def _git(*args):
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


@pytest.mark.skipif(not shutil.which("git") or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_repository_clone_fits_the_index_size_limit():
    """check_repository_size clones the whole history (scm_revision is set) and counts every file, .git too."""
    tracked = [ROOT / p for p in _git("ls-files", "-z").decode().split("\0") if p]
    working_tree = sum(p.lstat().st_size for p in tracked if os.path.lexists(p))
    counts = dict(line.split(": ", 1) for line in _git("count-objects", "-v").decode().splitlines() if ": " in line)
    history = (int(counts.get("size-pack", 0)) + int(counts.get("size", 0))) * 1024  # an upper bound of the clone's
    total_mb = (working_tree + history) / (1024 * 1024)
    assert total_mb <= INDEX_SIZE_LIMIT_MB, \
        f"a clone is about {total_mb:.1f} MiB (files {working_tree / 2**20:.1f} MiB, history " \
        f"{history / 2**20:.1f} MiB); the index refuses more than {INDEX_SIZE_LIMIT_MB} MiB"


MAX_LINE = 120


def test_python_lines_fit_the_projects_width():
    """The project's line width is 120 characters (code, docstrings and tests alike), so every file reads in one
    editor width and side-by-side diffs stay readable."""
    long = []
    for name in _git("ls-files", "-z", "*.py").decode().split("\0"):
        if name:
            for number, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1):
                if len(line) > MAX_LINE:
                    long.append(f"{name}:{number} ({len(line)} characters)")
    assert not long, "lines wider than 120 characters: " + ", ".join(long)


# --- module-level imports of the files Slicer loads at start-up ---

# What scripts/extension_ai_analysis.py accepts at file scope: "the Python Standard Library ... Slicer, vtk,
# SimpleITK, numpy, and scipy" (all shipped in Slicer's Python); the extension's own modules are followed.
SLICER_MODULES = {"slicer", "vtk", "qt", "ctk", "SegmentEditorEffects", "sitkUtils", "vtkITK", "vtkAddon"}
SLICER_WRAPPER_PATTERN = re.compile(r"^(qSlicer\w*PythonQt|qMRML\w*PythonQt|vtkSlicer\w*Python|vtkMRML\w*Python)$")
BUNDLED_PACKAGES = {"numpy", "SimpleITK", "scipy"}


def own_modules(root=ROOT):
    """Top-level names of the extension's own code -> the file or folder that defines them."""
    return {"FastSAM3DLib": root / "FastSAM3DLib",
            "SegmentEditorFastSAM3DLib": root / NAME / "SegmentEditorFastSAM3DLib",
            NAME: root / NAME / f"{NAME}.py"}


def startup_files(root=ROOT):
    """The Python files Slicer runs at start-up: the module file and the effect's folder (read at run time)."""
    return [root / NAME / f"{NAME}.py"] + sorted((root / NAME / "SegmentEditorFastSAM3DLib").glob("*.py"))


def is_accepted_at_file_scope(top):
    return (top in sys.stdlib_module_names or top in SLICER_MODULES or top in BUNDLED_PACKAGES
            or bool(SLICER_WRAPPER_PATTERN.match(top)))


def import_time_imports(tree):
    """(line, module, names, level) of every import that runs when the module is imported.

    Everything outside function bodies runs: the module body, if/try/with/loop blocks, class bodies, decorators
    and default values. ``importlib.import_module("x")`` and ``__import__("x")`` there count as imports too.
    """
    found = []

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d]:
                visit(child)
            return
        if isinstance(node, ast.Lambda):
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, [], 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module or "", [alias.name for alias in node.names], node.level))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value, [], 0))
        for child in ast.iter_child_nodes(node):
            visit(child)

    for statement in tree.body:
        visit(statement)
    return found


def _module_files(base, parts):
    """Files that run for ``import <base>.<parts...>``: each package's __init__.py, then the module."""
    files, path = [], base
    if path.is_file():
        return [path]
    for part in [None] + list(parts):
        if part is not None:
            if (path / part).is_dir():
                path = path / part
            elif (path / f"{part}.py").is_file():
                files.append(path / f"{part}.py")
                break
            else:
                break  # a name defined in the package, not a submodule
        if (path / "__init__.py").is_file():
            files.append(path / "__init__.py")
    return files


def startup_import_violations(files, own, root=ROOT):
    """Imports the index's review refuses at file scope, following the extension's own modules."""
    violations, seen = [], set()
    queue = [(Path(f), []) for f in files]
    while queue:
        path, chain = queue.pop(0)
        if path in seen:
            continue
        seen.add(path)
        where = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        for line, module, names, level in import_time_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if level:  # relative: always the extension's own code
                package = path.parent
                for _ in range(level - 1):
                    package = package.parent
                parts = module.split(".") if module else []
                targets = _module_files(package, parts)
                targets += [f for name in names for f in _module_files(package, parts + [name])]
            else:
                top, *parts = module.split(".")
                if top not in own:
                    if not is_accepted_at_file_scope(top):
                        via = "".join(f"{c} -> " for c in chain)
                        violations.append(f"{via}{where}:{line}: {module}")
                    continue
                targets = _module_files(own[top], parts)
                targets += [f for name in names for f in _module_files(own[top], parts + [name])]
            queue.extend((target, chain + [f"{where}:{line}"]) for target in targets)
    return violations


@pytest.mark.skipif(not hasattr(sys, "stdlib_module_names"), reason="needs Python 3.10+ (sys.stdlib_module_names)")
def test_startup_files_import_only_what_the_index_review_accepts():
    """torch and every other package outside stdlib/Slicer/vtk/qt/ctk/numpy/SimpleITK/scipy: inside functions."""
    files = startup_files()
    assert files[0].is_file() and len(files) > 1, files
    violations = startup_import_violations(files, own_modules())
    assert not violations, "imported when Slicer starts (move each into the function that needs it):\n" + \
        "\n".join(violations)


@pytest.mark.skipif(not hasattr(sys, "stdlib_module_names"), reason="needs Python 3.10+ (sys.stdlib_module_names)")
def test_startup_import_check_refuses_heavy_imports(tmp_path):
    """The check above finds heavy imports in try blocks, class bodies, if blocks and through the own library."""
    (tmp_path / NAME / "SegmentEditorFastSAM3DLib").mkdir(parents=True)
    lib = tmp_path / "FastSAM3DLib"
    (lib / "weights").mkdir(parents=True)
    (lib / "__init__.py").write_text('"""lazy"""\n')
    (lib / "light.py").write_text("import os\nimport numpy as np\n\ndef f():\n    import torch\n")
    (lib / "heavy.py").write_text("import torch\n")
    (lib / "weights" / "__init__.py").write_text("")
    (lib / "weights" / "loading.py").write_text("from ..heavy import x\n")
    module = tmp_path / NAME / f"{NAME}.py"
    effect = tmp_path / NAME / "SegmentEditorFastSAM3DLib" / "SegmentEditorEffect.py"
    own = own_modules(tmp_path)

    def check(module_source, effect_source="import qt\n"):
        module.write_text(textwrap.dedent(module_source))
        effect.write_text(textwrap.dedent(effect_source))
        return startup_import_violations(startup_files(tmp_path), own, tmp_path)

    clean = """
        import logging, os
        import qt, ctk, vtk, slicer
        import numpy as np
        import SimpleITK as sitk
        import qSlicerSegmentationsEditorEffectsPythonQt
        from slicer.ScriptedLoadableModule import ScriptedLoadableModule
        from FastSAM3DLib import light
        import FastSAM3DLib.weights

        def run():
            import torch
            from FastSAM3DLib import heavy

        class Widget:
            def setup(self):
                import huggingface_hub
        """
    assert check(clean, "from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect\n") == []
    assert check("import torch\n") == [f"{NAME}/{NAME}.py:1: torch"]
    assert check("try:\n    import torch\nexcept ImportError:\n    torch = None\n") == [f"{NAME}/{NAME}.py:2: torch"]
    assert check("import os\nif os.name:\n    from monai import x\n") == [f"{NAME}/{NAME}.py:3: monai"]
    assert check("class A:\n    import requests\n") == [f"{NAME}/{NAME}.py:2: requests"]
    assert check("import importlib\nimportlib.import_module('torch')\n") == [f"{NAME}/{NAME}.py:2: torch"]
    assert check("import os\n", "import qt\nimport torch.nn as nn\n") == \
        [f"{NAME}/SegmentEditorFastSAM3DLib/SegmentEditorEffect.py:2: torch.nn"]
    assert check("from FastSAM3DLib import heavy\n") == \
        [f"{NAME}/{NAME}.py:1 -> FastSAM3DLib/heavy.py:1: torch"]
    assert check("from FastSAM3DLib.weights import loading\n") == \
        [f"{NAME}/{NAME}.py:1 -> FastSAM3DLib/weights/loading.py:1 -> FastSAM3DLib/heavy.py:1: torch"]


# --- the module's help text ---


def _string_fragments(node, constants):
    """Every string a help-text expression is built from (literals, module-level string constants, f-strings)."""
    fragments = []
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            fragments.append(child.value)
        elif isinstance(child, ast.Name) and child.id in constants:
            fragments.append(constants[child.id])
        elif isinstance(child, ast.JoinedStr):
            fragments.append("".join(
                part.value if isinstance(part, ast.Constant) else
                constants.get(getattr(part.value, "id", None), "{}") for part in child.values))
    return fragments


def test_module_help_links_to_the_homepage():
    """getDefaultModuleDocumentationLink() links docs.slicer.org/.../user_guide/modules/fastsam3d.html, which does
    not exist for an extension: the help must link the README (EXTENSION_HOMEPAGE) instead."""
    _, variables = top_level()
    homepage = variables["EXTENSION_HOMEPAGE"][0]
    tree = ast.parse((ROOT / NAME / f"{NAME}.py").read_text(encoding="utf-8"))
    constants = {target.id: statement.value.value for statement in tree.body if isinstance(statement, ast.Assign)
                 and isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, str)
                 for target in statement.targets if isinstance(target, ast.Name)}
    uses_default_link = [node.lineno for node in ast.walk(tree)
                         if isinstance(node, ast.Attribute) and node.attr == "getDefaultModuleDocumentationLink"]
    assert not uses_default_link, f"{NAME}.py:{uses_default_link[0]}: the default documentation link is broken"
    module_class = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == NAME)
    init = next(node for node in module_class.body if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    help_values = [node.value for node in ast.walk(init) if isinstance(node, (ast.Assign, ast.AugAssign))
                   for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                   if isinstance(target, ast.Attribute) and target.attr == "helpText"]
    assert help_values, "the module sets no help text"
    link = re.compile(r'href="' + re.escape(homepage) + r'(?:["#/])')
    fragments = [f for value in help_values for f in _string_fragments(value, constants)]
    assert any(link.search(f) for f in fragments), f'the module help must contain <a href="{homepage}...">'
