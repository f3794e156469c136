"""The K-FAC optimizer a keras program trains with: `kfac_keras.KFAC(**options)`,
or, given a step rule, tools/step_efficiency's `StepRuleKFAC` (issue 12's
candidate step rules, e.g. `{"step_rule": "ortho", "ns_steps": 3,
"momentum_after": true, "learning_rate": 0.01}` or `{"step_rule": "kl_velocity"}`).
"""

import json
import os
import sys

import kfac_keras

STEP_EFFICIENCY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                               "step_efficiency")


def make_kfac(options, step_rule=None):
    """`KFAC(**options)`, or `StepRuleKFAC(**options, **step_rule)` when `step_rule` is given.

    Args:
        options: dict of `kfac_keras.KFAC` keyword arguments.
        step_rule: dict of `StepRuleKFAC` arguments, a JSON string of one, or
            None (the library's rule); an `"lr_schedule"` entry (`{"kind":
            "cosine", "steps": N, "final_fraction": f}`) decays `learning_rate`
            (`step_rules.learning_rate_schedule`). Defaults to None.
    """
    if isinstance(step_rule, str):
        step_rule = json.loads(step_rule) if step_rule else None
    if not step_rule:
        return kfac_keras.KFAC(**options)
    if STEP_EFFICIENCY not in sys.path:
        sys.path.insert(0, STEP_EFFICIENCY)
    from step_rules import StepRuleKFAC, learning_rate_schedule

    step_rule = dict(step_rule)
    schedule = step_rule.pop("lr_schedule", None)  # as in tools/step_efficiency/run.py
    if schedule:
        step_rule["learning_rate"] = learning_rate_schedule(
            step_rule.get("learning_rate", 1.0), **schedule)
    overlap = sorted(set(options) & set(step_rule))
    if overlap:
        raise ValueError(f"{overlap} given both as K-FAC options and in the step rule; "
                         "give each argument once.")
    return StepRuleKFAC(**options, **step_rule)
