"""The direction of the package dependency: onpolicy_sft uses decoding, never the reverse."""

import ast
from pathlib import Path

DECODING = Path(__file__).resolve().parents[1] / "decoding"


def imported_modules(source: str) -> list[str]:
    """The absolute names of the modules that `source` imports, anywhere in it (function bodies included)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_imported_modules_sees_every_form_of_import():
    source = "import onpolicy_sft.data\nfrom onpolicy_sft import grading\ndef f():\n    import onpolicy_sft.models\n"
    assert set(imported_modules(source)) == {"onpolicy_sft.data", "onpolicy_sft", "onpolicy_sft.grading",
                                             "onpolicy_sft.models"}
    assert imported_modules("from .rules import eos_ids") == []


def test_no_module_of_decoding_imports_onpolicy_sft():
    files = sorted(DECODING.rglob("*.py"))
    assert files
    offending = {}
    for path in files:
        name = path.relative_to(DECODING).as_posix()
        found = sorted({m for m in imported_modules(path.read_text(encoding="utf-8")) if m.split(".")[0] == "onpolicy_sft"})
        if found:
            offending[name] = found
    assert not offending, f"decoding/ must not import onpolicy_sft (take what it needs as arguments): {offending}"



def test_no_module_over_500_lines_and_no_function_over_60():
    root = DECODING.parent
    too_long = []
    for path in sorted([*DECODING.rglob("*.py"), *(root / "onpolicy_sft").rglob("*.py")]):
        source = path.read_text(encoding="utf-8")
        where = path.relative_to(root).as_posix()
        if source.count("\n") > 500:
            too_long.append(f"{where}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                too_long.append(f"{where}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "split these by idea:\n" + "\n".join(too_long)
