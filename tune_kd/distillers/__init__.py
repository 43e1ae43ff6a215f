"""Training methods, one module each, behind one small interface (`base.Distiller`): a distiller
computes its training loss, predicts at evaluation, and owns the modules it trains. The training
loop does not care which one it runs. `create(config, student, teachers)` builds the one
`config.method` names; `names()` lists them.
"""

from tune_kd.distillers import (  # noqa: F401  (registers the methods)
    aekd,
    at,
    aveg,
    crd,
    dkd,
    fitnet,
    kd,
    reuse,
    semckd,
    sequential,
    simkd,
    sp,
    srrl,
    student,
    vid,
)
from tune_kd.distillers.base import (
    DISTILLATION_KEYS,
    Batch,
    Distiller,
    Key,
    StepOutput,
    Teacher,
    TeacherOutput,
    stage_shapes,
)
from tune_kd.distillers.registry import (
    create,
    get,
    method_keys,
    names,
    register,
    structure,
    unused_keys,
)

__all__ = [
    "DISTILLATION_KEYS",
    "Batch",
    "Distiller",
    "Key",
    "StepOutput",
    "Teacher",
    "TeacherOutput",
    "create",
    "get",
    "method_keys",
    "names",
    "register",
    "stage_shapes",
    "structure",
    "unused_keys",
]
