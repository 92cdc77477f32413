"""Count the auditable surface: code lines of every eexit module the three daemons import.

    python tools/surface.py [--json]

A code line is non-blank, not a comment and not part of a docstring. The modules are found by
following `from . import x` / `from .x import` / `from eexit.x import` / `import eexit.x`
from eexit/brain.py, eexit/watchdog.py and eexit/eew.py (venue modules are counted apart:
the budget is <= 2,400 lines plus <= 250 per venue module). Exit 0 always: this measures.
"""

import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "eexit"
DAEMONS = ("brain", "watchdog", "eew")


def code_lines(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(1 for number, line in enumerate(source.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and number not in docstrings)


def module_path(name):
    """eexit.x or eexit.x.y -> its file, or None."""
    parts = name.split(".")[1:]
    if not parts:
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imports_of(path, package):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("eexit"):
                prefix = node.module
            else:
                continue
            if module_path(prefix):
                found.add(prefix)
            for alias in node.names:
                if module_path(f"{prefix}.{alias.name}"):
                    found.add(f"{prefix}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("eexit.") and module_path(a.name))
    return found


def surface():
    seen, todo = set(), [f"eexit.{name}" for name in DAEMONS]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_path(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo.extend(imports_of(path, package) - seen)
    return {name: code_lines(module_path(name)) for name in sorted(seen)}


def main():
    counts = surface()
    # A venue module is one of eexit/venues/<id>.py; the package and its shared base are core.
    venues = {n: c for n, c in counts.items()
              if n.startswith("eexit.venues.") and n.rpartition(".")[2] not in ("__init__", "base")}
    core = sum(c for n, c in counts.items() if n not in venues)
    # The risk kernel (issue 25) is a daemon beside the core, not in it: its own file is
    # counted apart (budget 600); what it imports is core and counted above.
    risk = code_lines(module_path("eexit.risk"))
    if "--json" in sys.argv:
        print(json.dumps({"modules": counts, "core": core, "venues": venues, "risk": risk}, indent=2))
        return 0
    for name, count in counts.items():
        print(f"{count:6d}  {name}{'  (venue)' if name in venues else ''}")
    print(f"{core:6d}  core (budget 2400)")
    for name, count in venues.items():
        print(f"{count:6d}  {name} (budget 250)")
    print(f"{risk:6d}  eexit.risk, own code (budget 600)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
