"""The repository keeps its import layering (scripts/check_layering.py), and the checker catches
each kind of break it is there for."""
import importlib.util
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("check_layering", REPO / "scripts" / "check_layering.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_repository_keeps_its_layering(checker):
    assert checker.layering_problems(REPO) == []


def test_an_import_against_the_layers_is_reported(checker, tmp_path):
    root = _tree(tmp_path, {"spec_heads/heads.py": "import torch\nfrom rollout.engine import Engine\n",
                            "rollout/engine.py": "from spec_heads.heads import DraftHeads\n",
                            "learner/loop.py": "import experiments.config\n"})
    problems = checker.layering_problems(root)
    assert len(problems) == 2
    assert problems[0].startswith("spec_heads/heads.py:2: spec_heads imports rollout.engine")
    assert problems[1].startswith("learner/loop.py:1: learner imports experiments.config")


def test_ray_outside_an_actor_module_is_reported(checker, tmp_path):
    root = _tree(tmp_path, {"rollout/engine.py": "def f():\n    import ray\n",
                            "rollout/worker.py": "import ray\n",
                            "learner/coordinator.py": "import ray\n",
                            "experiments/train.py": "import ray\n"})
    assert checker.layering_problems(root) == [
        "rollout/engine.py:2: imports ray outside an actor/worker/coordinator module"]


def test_a_backend_imported_by_two_modules_is_reported(checker, tmp_path):
    root = _tree(tmp_path, {"learner/trl_backend.py": "from trl import GRPOTrainer\n",
                            "experiments/train.py": "import trl.trainer\n",
                            "rollout/vllm_engine.py": "import vllm\n"})
    problems = checker.layering_problems(root)
    assert problems == ["trl is imported by 2 modules (experiments/train.py, learner/trl_backend.py); "
                        "keep it behind one"]


def test_the_command_exits_nonzero_on_a_break(checker, tmp_path, capsys):
    assert checker.main(["check_layering.py", str(REPO)]) == 0
    assert capsys.readouterr().out.strip() == "layering: ok"
    root = _tree(tmp_path, {"spec_heads/a.py": "import learner\n"})
    assert checker.main(["check_layering.py", str(root)]) == 1
    assert "spec_heads imports learner" in capsys.readouterr().out
