"""The tree shows the pipeline: one sub-package per stage, imports that run one way, a README that names the
paths that exist."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"
# the stages in the order deploy runs them: a stage may import an earlier one, never a later one
STAGES = ("zoo", "compress", "onnx", "ort", "tflm", "device", "report", "bench")
SHARED = ("errors", "util", "output", "compute", "metrics", "cluster", "cycles", "memory_plan")  # every stage may use these; they import no stage
ORCHESTRATION = ("deploy", "measure_int8", "cli")  # the only modules that know every stage


def imported(path: Path) -> set[str]:
    """Every `pipeline.*` module a file imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {name for name in found if name.startswith("pipeline.")}


def room(path: Path) -> str:
    return path.relative_to(PIPELINE).parts[0].removesuffix(".py")


def test_every_module_lives_in_a_known_room():
    rooms = {room(p) for p in PIPELINE.rglob("*.py")} - {"__init__"}
    assert rooms == set(STAGES) | set(SHARED) | set(ORCHESTRATION)
    assert len([p for p in PIPELINE.glob("*.py")]) <= 12


def test_no_stage_imports_a_later_stage_and_shared_modules_import_no_stage():
    wrong = []
    for path in PIPELINE.rglob("*.py"):
        here = room(path)
        for name in imported(path):
            there = name.split(".")[1]
            if there not in STAGES or here in ORCHESTRATION:
                continue
            if here in SHARED or STAGES.index(there) > STAGES.index(here):
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, wrong


def test_data_and_profiles_import_no_stage_at_module_level():
    for package in ("calib", "targets"):
        for path in (ROOT / package).glob("*.py"):
            tree = ast.parse(path.read_text())
            top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
            names = {n.module for n in top if isinstance(n, ast.ImportFrom) and n.module}
            assert names & {f"pipeline.{s}" for s in STAGES} == set(), path


def test_the_readme_and_docs_name_paths_that_exist():
    texts = [(ROOT / "README.md").read_text(), *(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))]
    paths = {p for text in texts for p in re.findall(r"`((?:pipeline|targets|calib)/[\w/.-]+)`", text)}
    assert len(paths) > 15
    missing = [p for p in paths if not (ROOT / p).exists() and p != "calib/cache/"]  # made on first download
    assert not missing, missing
    links = {link for text in texts for link in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", text)}
    assert {"docs/COMPRESSION.md", "docs/DESIGN.md", "docs/BENCHMARKS.md", "docs/CLUSTER.md"} <= links
    assert all((ROOT / link).is_file() or (ROOT / "docs" / link).is_file() for link in links), links


def test_the_readme_stays_a_short_guide():
    assert len((ROOT / "README.md").read_text().splitlines()) < 300
