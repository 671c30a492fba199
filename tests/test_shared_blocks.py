"""The blocks the four scripts share are textually identical, so a fix in one cannot silently miss the others
(`diff odt.py odt_td3.py` then shows only the algorithm)."""

from __future__ import annotations

import ast

import pytest

from conftest import REPO

SCRIPTS = ["odt.py", "odt_td3.py", "dt_grpo.py", "reinformer_ag.py"]
# Top-level definitions shared by every script by design: LAMB, the transformer's pieces, the one-step defaults,
# the evaluation seeds and the entry point. Run plumbing is not copied: it lives in common/run.py.
EVERYWHERE = ["lamb_param_groups", "Lamb", "returns_to_go", "one_step_defaults", "Dropout", "CausalSelfAttention",
              "eval_seeds", "__main__"]
# The decision transformer and the tanh-Gaussian policy shared by the DT scripts (Reinformer has its own).
DT_SCRIPTS = ["odt.py", "odt_td3.py", "dt_grpo.py"]
DT_SHARED = ["online_episode_seed", "Block", "attention_mask", "warmup_schedule"]
ODT_AND_GRPO = ["DecisionTransformer", "LOG_STD_MIN", "squash_log_std", "tanh_log_det", "gaussian_log_prob",
                "tanh_normal_log_prob", "tanh_normal_rsample", "odt_losses", "update", "DTAgent"]
# The common block of Args: the experiment fields up to the budgets, and the run fields from --resume to
# "# Algorithm specific arguments" (budgets and their docstrings are per algorithm).


def definitions(script: str) -> dict[str, str]:
    source = (REPO / script).read_text()
    out = {}
    for node in ast.parse(source).body:
        segment = ast.get_source_segment(source, node)
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = segment
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    out[target.id] = segment
                elif isinstance(target, ast.Tuple):
                    out.update({t.id: segment for t in target.elts if isinstance(t, ast.Name)})
        elif isinstance(node, ast.If) and "__main__" in ast.get_source_segment(source, node.test):
            out["__main__"] = segment
    args = out["Args"]
    out["Args (common block)"] = (args[:args.index("    pretrain_updates:")]
                                  + args[args.index("    resume:"):args.index("    # Algorithm specific arguments")])
    return out


@pytest.mark.parametrize("names,scripts", [
    (EVERYWHERE + ["Args (common block)"], SCRIPTS),
    (DT_SHARED, DT_SCRIPTS),
    (ODT_AND_GRPO, ["odt.py", "dt_grpo.py"]),
    (["set_up", "main"], ["odt.py", "odt_td3.py"]),  # the same phases: the teaching diff shows only the algorithm
])
def test_shared_blocks_are_identical(names, scripts):
    defs = {script: definitions(script) for script in scripts}
    reference = scripts[0]
    differing = [f"{name}: {script}" for name in names for script in scripts[1:]
                 if defs[script].get(name) != defs[reference].get(name)]
    missing = [f"{name}: {script}" for name in names for script in scripts if name not in defs[script]]
    assert not missing, f"shared definitions missing: {missing}"
    assert not differing, f"shared definitions differ from {reference}: {differing}"
