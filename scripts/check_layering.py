#!/usr/bin/env python3
"""Print the imports that break specroll's one-way layering, exit 1 if there are any.

    python scripts/check_layering.py [REPO_ROOT]

The rules (docs/design.md, "Layers"):
- imports point one way: spec_heads <- rollout <- learner <- experiments (a package may import
  the ones to its left, never one to its right);
- `ray` only in modules whose file name contains actor, worker, coordinator or ray, and in
  experiments;
- each optional backend (vllm, trl) is imported by exactly one module, so everything else runs
  without it.
Relative imports stay inside their package, so only absolute ones are checked.
"""
from __future__ import annotations

import ast
import pathlib
import sys

ORDER = ("spec_heads", "rollout", "learner", "experiments")
RAY_MODULE_WORDS = ("actor", "worker", "coordinator", "ray")
SINGLE_MODULE_BACKENDS = ("vllm", "trl")


def _imported_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module]
    return []


def layering_problems(root: str | pathlib.Path) -> list[str]:
    """One line per import that breaks a rule, for the packages under `root`."""
    root = pathlib.Path(root)
    problems: list[str] = []
    users: dict[str, set[str]] = {lib: set() for lib in SINGLE_MODULE_BACKENDS}
    for pkg in ORDER:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root)
            try:
                tree = ast.parse(path.read_text(), str(path))
            except SyntaxError as e:
                problems.append(f"{rel}: does not parse ({e.msg})")
                continue
            for node in ast.walk(tree):
                for name in _imported_names(node):
                    top = name.split(".")[0]
                    if top in ORDER and ORDER.index(top) > ORDER.index(pkg):
                        problems.append(f"{rel}:{node.lineno}: {pkg} imports {name} (imports point "
                                        "spec_heads <- rollout <- learner <- experiments)")
                    if top == "ray" and pkg != "experiments" \
                            and not any(w in path.stem for w in RAY_MODULE_WORDS):
                        problems.append(f"{rel}:{node.lineno}: imports ray outside an "
                                        "actor/worker/coordinator module")
                    if top in users:
                        users[top].add(str(rel))
    for lib, files in users.items():
        if len(files) > 1:
            problems.append(f"{lib} is imported by {len(files)} modules ({', '.join(sorted(files))}); "
                            "keep it behind one")
    return problems


def main(argv: list[str]) -> int:
    problems = layering_problems(argv[1] if len(argv) > 1 else pathlib.Path(__file__).parent.parent)
    print("\n".join(problems) if problems else "layering: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
