"""Generate `methods.json`: reference values of distillation losses from the official code.

Every value in the fixture is computed by the authors' own modules, imported from checkouts given
on the command line; nothing of theirs is copied here. This script only builds inputs, runs their
modules the way their training loop does, and writes the results.

Sources the committed fixture was made from:
  - SimKD (KD, FitNet, AT, SP, VID, CRD, SemCKD, SRRL, SimKD):
    https://github.com/DefangChen/SimKD at commit 2b389c31ed7779aea31e7aaf0bb0f2d8b6ac2f01
    (distiller_zoo/, models/util.py, crd/; combined as helper/loops.py `train_distill` does, with
    modules built as train_student.py builds them, weights from scripts/run_distill.sh).
  - mdistiller (DKD): https://github.com/megvii-research/mdistiller at commit
    a08d46f10d6102bd6e3f258ca5ac880b020ea259 (mdistiller/distillers/DKD.py, defaults from
    mdistiller/engine/cfg.py).
  - torch 2.14.1 (CPU), float64 throughout.

Command (from the repository root, with both repositories exported, e.g.
`git archive HEAD | tar -x -C DIR`):

    python tests/golden/make_golden.py /path/to/SimKD /path/to/mdistiller

Only import-time shims are applied to the official code, never to its arithmetic: `Tensor.cuda`
returns the tensor itself (their SemCKD loss and CRD sampler call `.cuda()`), and mdistiller's
DKD module is loaded without running its package `__init__` (which imports every distiller).

The fixture's format is described in README.md next to this file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

SIMKD_COMMIT = "2b389c31ed7779aea31e7aaf0bb0f2d8b6ac2f01"
MDISTILLER_COMMIT = "a08d46f10d6102bd6e3f258ca5ac880b020ea259"

# `-b` of each method in SimKD's scripts/run_distill.sh (CIFAR, resnet32x4 -> resnet8x4). Every
# method there also uses `-c 1 -d 1` (cross-entropy + KD term) except SimKD (`-c 0 -d 0 -b 1`);
# plain KD is `-b 0`, its term being the `-d` one.
PROTOCOL = {
    "kd": {"cls": 1.0, "div": 1.0, "beta": 0.0, "weight": 1.0},
    "fitnet": {"cls": 1.0, "div": 1.0, "beta": 100.0, "weight": 100.0},
    "at": {"cls": 1.0, "div": 1.0, "beta": 1000.0, "weight": 1000.0},
    "sp": {"cls": 1.0, "div": 1.0, "beta": 3000.0, "weight": 3000.0},
    "vid": {"cls": 1.0, "div": 1.0, "beta": 1.0, "weight": 1.0},
    "crd": {"cls": 1.0, "div": 1.0, "beta": 0.8, "weight": 0.8},
    "semckd": {"cls": 1.0, "div": 1.0, "beta": 400.0, "weight": 400.0},
    "srrl": {"cls": 1.0, "div": 1.0, "beta": 1.0, "weight": 1.0},
    "simkd": {"cls": 0.0, "div": 0.0, "beta": 1.0, "weight": 1.0},
    # mdistiller cfg: CE_WEIGHT 1.0; the DKD term carries alpha, beta and the warmup itself.
    "dkd": {"ce": 1.0, "weight": 1.0},
}

BATCH = 4


def encode(tensor: torch.Tensor) -> dict:
    """A tensor as {"shape", "dtype", "values"} with values flattened in row-major order."""
    tensor = tensor.detach()
    dtype = "int64" if not tensor.is_floating_point() else "float64"
    return {
        "shape": list(tensor.shape),
        "dtype": dtype,
        "values": tensor.reshape(-1).tolist(),
    }


def randomise_batchnorms(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics for every BatchNorm in `module`."""
    for sub in module.modules():
        if isinstance(sub, nn.BatchNorm2d):
            with torch.no_grad():
                n = sub.num_features
                sub.weight.copy_(1.0 + 0.3 * torch.randn(n, generator=gen))
                sub.bias.copy_(0.2 * torch.randn(n, generator=gen))
                sub.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                sub.running_var.copy_(1.0 + 0.5 * torch.rand(n, generator=gen))


def state(module: nn.Module | None, prefix: str = "") -> dict:
    if module is None:
        return {}
    return {prefix + k: encode(v) for k, v in module.state_dict().items()}


def param_grads(module: nn.Module | None, prefix: str = "") -> tuple[dict, list]:
    """Gradients of named parameters, and the names of parameters that received none."""
    grads, without = {}, []
    if module is None:
        return grads, without
    for name, p in module.named_parameters():
        if p.grad is None:
            without.append(prefix + name)
        else:
            grads[prefix + name] = encode(p.grad)
    return grads, without


def case(
    method: str,
    name: str,
    setup: dict,
    inputs: dict[str, torch.Tensor],
    student_inputs: list[str],
    run: Callable[[], torch.Tensor],
    module: nn.Module | None = None,
    extra_modules: dict[str, nn.Module] | None = None,
    outputs: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> dict:
    """Run `run()` (the loss, from the official modules) and record everything around it.

    `module` is the trainable official module (its state_dict names are the params' names);
    `extra_modules` are further modules by prefix (e.g. the teacher's classifier `cls_t.`).
    """
    extra_modules = extra_modules or {}
    params = state(module)
    for prefix, m in extra_modules.items():
        params.update(state(m, prefix))
    for key in student_inputs:
        inputs[key].requires_grad_(True)
    loss = run()
    loss_value = float(loss.detach().reshape(-1)[0])
    loss.sum().backward()
    grads, without = param_grads(module)
    for prefix, m in extra_modules.items():
        g, w = param_grads(m, prefix)
        grads.update(g)
        without.extend(w)
    entry = {
        "method": method,
        "case": name,
        "setup": setup,
        "weight": PROTOCOL[method]["weight"],
        "protocol": PROTOCOL[method],
        "inputs": {k: encode(v) for k, v in inputs.items()},
        "student_inputs": student_inputs,
        "params": params,
        "loss": loss_value,
        "grads": {
            "inputs": {k: encode(inputs[k].grad) for k in student_inputs},
            "params": grads,
        },
        "params_without_grad": without,
    }
    # parameters are unchanged (no optimiser step); buffers (BN statistics, CRD memory) move
    after = {}
    for prefix, m in [("", module), *extra_modules.items()]:
        if m is not None:
            after.update({prefix + k: encode(v) for k, v in m.named_buffers()})
    if after:
        entry["buffers_after"] = after
    if outputs is not None:
        entry["outputs"] = {k: encode(v) for k, v in outputs().items()}
    return entry


# ----------------------------------------------------------------------------------------------
# import of the official code


def load_official(simkd: Path, mdistiller: Path) -> types.SimpleNamespace:
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # CPU run of their `.cuda()` calls
    sys.path.insert(0, str(simkd))
    from crd.criterion import CRDLoss
    from distiller_zoo import Attention, DistillKL, HintLoss, SemCKDLoss, Similarity, VIDLoss
    from models.util import SRRL, ConvReg, SelfA, SimKD

    for pkg, folder in [
        ("mdistiller", mdistiller / "mdistiller"),
        ("mdistiller.distillers", mdistiller / "mdistiller" / "distillers"),
    ]:
        module = types.ModuleType(pkg)
        module.__path__ = [str(folder)]
        sys.modules[pkg] = module
    for name in ("_base", "DKD"):
        full = f"mdistiller.distillers.{name}"
        path = mdistiller / "mdistiller" / "distillers" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(full, path)
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[full] = loaded
        spec.loader.exec_module(loaded)
    dkd_module = sys.modules["mdistiller.distillers.DKD"]
    return types.SimpleNamespace(
        CRDLoss=CRDLoss,
        Attention=Attention,
        DistillKL=DistillKL,
        HintLoss=HintLoss,
        SemCKDLoss=SemCKDLoss,
        Similarity=Similarity,
        VIDLoss=VIDLoss,
        SRRL=SRRL,
        ConvReg=ConvReg,
        SelfA=SelfA,
        SimKD=SimKD,
        DKD=dkd_module.DKD,
    )


# ----------------------------------------------------------------------------------------------
# cases


def kd_cases(o, gen):
    y_s = torch.randn(BATCH, 10, generator=gen) * 3
    y_t = torch.randn(BATCH, 10, generator=gen) * 3
    crit = o.DistillKL(4.0)
    inputs = {"logit_s": y_s, "logit_t": y_t}
    return [
        case(
            "kd",
            "kd_t4",
            {"T": 4.0, "num_classes": 10},
            inputs,
            ["logit_s"],
            lambda: crit(inputs["logit_s"], inputs["logit_t"]),
        )
    ]


def fitnet_cases(o, gen):
    out = []
    branches = [
        ("fitnet_student_double", 8, 4, "Conv2d 3x3 stride 2 pad 1"),
        ("fitnet_student_half", 4, 8, "ConvTranspose2d 4x4 stride 2 pad 1"),
        ("fitnet_student_larger", 6, 4, "Conv2d kernel (1+sH-tH, 1+sW-tW), no pad"),
        ("fitnet_equal", 4, 4, "Conv2d kernel 1x1 (the s_H >= t_H branch)"),
        ("fitnet_student_smaller", 4, 6, "Conv2d 3x3 pad 1; teacher avg-pooled to s_H"),
    ]
    s_c, t_c = 3, 4
    for name, s_h, t_h, branch in branches:
        f_s = torch.randn(BATCH, s_c, s_h, s_h, generator=gen)
        f_t = torch.randn(BATCH, t_c, t_h, t_h, generator=gen)
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        reg = o.ConvReg(f_s.shape, f_t.shape).double()
        randomise_batchnorms(reg, gen)
        reg.train()
        crit = o.HintLoss()
        inputs = {"feat_s": f_s, "feat_t": f_t}

        def run(reg=reg, crit=crit, inputs=inputs):
            a, b = reg(inputs["feat_s"], inputs["feat_t"])
            return crit(a, b)

        setup = {
            "hint_layer": 1,
            "s_shape": list(f_s.shape),
            "t_shape": list(f_t.shape),
            "branch": branch,
            "bn_mode": "train",
        }
        out.append(case("fitnet", name, setup, inputs, ["feat_s"], run, reg))
    return out


def at_cases(o, gen):
    crit = o.Attention(p=2)
    out = []
    # heights differ per pair: student larger (student pooled), smaller (teacher pooled), equal
    s_shapes = [(3, 4), (4, 2), (5, 2)]
    t_shapes = [(4, 2), (6, 4), (2, 2)]
    heights = {
        f"feat_s_{i}": torch.randn(BATCH, c, h, h, generator=gen)
        for i, (c, h) in enumerate(s_shapes)
    }
    heights.update(
        {
            f"feat_t_{i}": torch.randn(BATCH, c, h, h, generator=gen)
            for i, (c, h) in enumerate(t_shapes)
        }
    )
    # lists of different length: the loop passes feat[1:-1]; zip() keeps min(len) pairs
    trunc = {
        f"feat_s_{i}": torch.randn(BATCH, 2, h, h, generator=gen) for i, h in enumerate([4, 2, 2])
    }
    trunc.update(
        {
            f"feat_t_{i}": torch.randn(BATCH, 3, h, h, generator=gen)
            for i, h in enumerate([4, 2, 2, 1])
        }
    )
    for name, inputs, n_s, n_t in [
        ("at_heights_differ", heights, 3, 3),
        ("at_lists_differ_in_length", trunc, 3, 4),
    ]:

        def run(inputs=inputs, n_s=n_s, n_t=n_t):
            g_s = [inputs[f"feat_s_{i}"] for i in range(n_s)]
            g_t = [inputs[f"feat_t_{i}"] for i in range(n_t)]
            return sum(crit(g_s, g_t))

        setup = {
            "p": 2,
            "num_student_feats": n_s,
            "num_teacher_feats": n_t,
            "taps": "feat[1:-1] of each network, zipped",
        }
        students = [f"feat_s_{i}" for i in range(n_s)]
        out.append(case("at", name, setup, inputs, students, run))
    return out


def sp_cases(o, gen):
    crit = o.Similarity()
    out = []
    for name, s, t in [
        ("sp_last_map", (4, 4, 4), (6, 4, 4)),
        ("sp_heights_differ", (3, 2, 2), (8, 4, 4)),
    ]:
        inputs = {
            "feat_s": torch.randn(BATCH, *s, generator=gen),
            "feat_t": torch.randn(BATCH, *t, generator=gen),
        }

        def run(inputs=inputs):
            return sum(crit([inputs["feat_s"]], [inputs["feat_t"]]))

        setup = {
            "tap": "feat[-2] (last conv stage map)",
            "s_shape": [BATCH, *s],
            "t_shape": [BATCH, *t],
        }
        out.append(case("sp", name, setup, inputs, ["feat_s"], run))
    return out


def vid_cases(o, gen):
    out = []
    pairs = [
        ("vid_equal_heights", (3, 4), (4, 4)),
        ("vid_student_larger", (3, 8), (4, 4)),
        ("vid_student_smaller", (2, 2), (5, 4)),
    ]
    for name, (s_c, s_h), (t_c, t_h) in pairs:
        inputs = {
            "feat_s": torch.randn(BATCH, s_c, s_h, s_h, generator=gen),
            "feat_t": torch.randn(BATCH, t_c, t_h, t_h, generator=gen),
        }
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        crit = o.VIDLoss(s_c, t_c, t_c).double()

        def run(crit=crit, inputs=inputs):
            return crit(inputs["feat_s"], inputs["feat_t"])

        setup = {
            "num_input_channels": s_c,
            "num_mid_channel": t_c,
            "num_target_channels": t_c,
            "init_pred_var": 5.0,
            "eps": 1e-5,
            "s_shape": list(inputs["feat_s"].shape),
            "t_shape": list(inputs["feat_t"].shape),
        }
        out.append(case("vid", name, setup, inputs, ["feat_s"], run, crit))
    # the loop's sum over feat[1:-1] pairs, one VIDLoss per pair in an nn.ModuleList
    s_list = [(2, 4), (3, 4), (4, 2)]
    t_list = [(3, 4), (4, 2), (5, 2)]
    inputs = {}
    for i, ((s_c, s_h), (t_c, t_h)) in enumerate(zip(s_list, t_list)):
        inputs[f"feat_s_{i}"] = torch.randn(BATCH, s_c, s_h, s_h, generator=gen)
        inputs[f"feat_t_{i}"] = torch.randn(BATCH, t_c, t_h, t_h, generator=gen)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    crits = nn.ModuleList([o.VIDLoss(s[0], t[0], t[0]) for s, t in zip(s_list, t_list)]).double()

    def run_list():
        return sum(c(inputs[f"feat_s_{i}"], inputs[f"feat_t_{i}"]) for i, c in enumerate(crits))

    setup = {
        "s_channels": [s[0] for s in s_list],
        "t_channels": [t[0] for t in t_list],
        "init_pred_var": 5.0,
        "eps": 1e-5,
        "taps": "feat[1:-1], VIDLoss(s, t, t) per pair",
    }
    students = [f"feat_s_{i}" for i in range(3)]
    out.append(case("vid", "vid_three_stages_sum", setup, inputs, students, run_list, crits))
    return out


def crd_cases(o, gen):
    n_data, k, bsz = 24, 5, BATCH
    opt = types.SimpleNamespace(
        s_dim=6, t_dim=8, feat_dim=8, nce_k=k, nce_t=0.07, nce_m=0.5, n_data=n_data
    )
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    crit = o.CRDLoss(opt).double()
    # the memory banks are the official module's own initialisation (uniform, seeded above)
    labels = torch.arange(n_data) % 3  # a tiny "dataset" of 3 classes
    rng = np.random.default_rng(7)
    out = []
    for step, idx in enumerate([torch.tensor([0, 5, 10, 19]), torch.tensor([5, 7, 12, 22])]):
        negatives = []
        for i in idx.tolist():
            pool = np.nonzero(labels.numpy() != labels[i].item())[0]
            negatives.append(rng.choice(pool, k, replace=False))
        # mode 'exact': column 0 is the sample's own index, then K negatives of other classes
        contrast_idx = torch.cat([idx[:, None], torch.as_tensor(np.stack(negatives))], 1)
        inputs = {
            "feat_s": torch.randn(bsz, opt.s_dim, generator=gen),
            "feat_t": torch.randn(bsz, opt.t_dim, generator=gen),
            "idx": idx,
            "contrast_idx": contrast_idx,
        }

        def run(inputs=inputs):
            return crit(inputs["feat_s"], inputs["feat_t"], inputs["idx"], inputs["contrast_idx"])

        setup = {
            "s_dim": opt.s_dim,
            "t_dim": opt.t_dim,
            "feat_dim": opt.feat_dim,
            "n_data": n_data,
            "nce_k": k,
            "nce_t": opt.nce_t,
            "nce_m": opt.nce_m,
            "step": step + 1,
            "dataset_labels": labels.tolist(),
            "taps": "feat[-1] (pooled, flattened) of each network",
            "note": "params = state before this step; buffers_after = after it "
            "(memory_v1/memory_v2 updated, contrast.params[2:4] = Z_v1, Z_v2)",
        }
        name = "crd_first_batch_sets_z" if step == 0 else "crd_second_batch_fixed_z"
        entry = case("crd", name, setup, inputs, ["feat_s"], run, crit)
        z = crit.contrast.params
        entry["z"] = {"Z_v1": float(z[2]), "Z_v2": float(z[3])}
        crit.zero_grad()
        out.append(entry)
    return out


def srrl_cases(o, gen):
    s_n, t_n, n_cls = 6, 8, 5
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    conn = o.SRRL(s_n=s_n, t_n=t_n).double()
    randomise_batchnorms(conn, gen)
    cls_t = nn.Linear(t_n, n_cls).double()
    feat_t = torch.relu(torch.randn(BATCH, t_n, generator=gen))
    with torch.no_grad():
        logit_t = cls_t(feat_t)
    inputs = {
        "feat_s": torch.relu(torch.randn(BATCH, s_n, generator=gen)),
        "feat_t": feat_t,
        "logit_t": logit_t,
    }
    mse = nn.MSELoss()

    def run():
        trans, pred = conn(inputs["feat_s"], cls_t)
        return mse(trans, inputs["feat_t"]) + mse(pred, inputs["logit_t"])

    setup = {
        "s_n": s_n,
        "t_n": t_n,
        "num_classes": n_cls,
        "bn_mode": "train",
        "taps": "feat[-1] (pooled) of each network; logit_t = cls_t(feat_t)",
        "teacher_params": ["cls_t.weight", "cls_t.bias"],
    }
    return [case("srrl", "srrl_pooled", setup, inputs, ["feat_s"], run, conn, {"cls_t.": cls_t})]


def semckd_cases(o, gen):
    bsz = 8  # SelfA's MLPs are sized by the batch: feat_dim = batch_size, embedding = bsz // 4
    s_shapes = [(2, 4), (3, 4), (2, 2)]
    t_shapes = [(2, 4), (2, 2), (3, 2)]
    inputs = {}
    for i, (c, h) in enumerate(s_shapes):
        inputs[f"feat_s_{i}"] = torch.randn(bsz, c, h, h, generator=gen)
    for i, (c, h) in enumerate(t_shapes):
        inputs[f"feat_t_{i}"] = torch.relu(torch.randn(bsz, c, h, h, generator=gen))
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    s_n = [c for c, _ in s_shapes]
    t_n = [c for c, _ in t_shapes]
    attn = o.SelfA(bsz, s_n, t_n, 1.0).double()
    randomise_batchnorms(attn, gen)
    crit = o.SemCKDLoss()
    keep = {}

    def run():
        s_value, f_target, weight = attn(
            [inputs[f"feat_s_{i}"] for i in range(3)], [inputs[f"feat_t_{i}"] for i in range(3)]
        )
        keep["attention"] = weight
        return crit(s_value, f_target, weight)

    setup = {
        "batch_size": bsz,
        "s_n": s_n,
        "t_n": t_n,
        "soft": 1.0,
        "factor": 4,
        "bn_mode": "train",
        "taps": "feat[1:-1] of each network",
        "s_shapes": [[bsz, c, h, h] for c, h in s_shapes],
        "t_shapes": [[bsz, c, h, h] for c, h in t_shapes],
    }
    students = [f"feat_s_{i}" for i in range(3)]
    return [
        case(
            "semckd",
            "semckd_3x3_soft1",
            setup,
            inputs,
            students,
            run,
            attn,
            outputs=lambda: {"attention": keep["attention"]},
        )
    ]


def simkd_cases(o, gen):
    out = []
    s_n, t_n, n_cls, factor = 4, 8, 5, 2
    for name, s_h, t_h in [
        ("simkd_equal_heights", 2, 2),
        ("simkd_student_larger", 4, 2),
        ("simkd_student_smaller", 2, 4),
    ]:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        proj = o.SimKD(s_n=s_n, t_n=t_n, factor=factor).double()
        randomise_batchnorms(proj, gen)
        cls_t = nn.Linear(t_n, n_cls).double()
        inputs = {
            "feat_s": torch.randn(BATCH, s_n, s_h, s_h, generator=gen),
            "feat_t": torch.relu(torch.randn(BATCH, t_n, t_h, t_h, generator=gen)),
        }
        keep = {}
        mse = nn.MSELoss()

        def run(proj=proj, cls_t=cls_t, inputs=inputs, keep=keep, mse=mse):
            trans_s, trans_t, pred = proj(inputs["feat_s"], inputs["feat_t"], cls_t)
            keep["pred_feat_s"] = pred
            return mse(trans_s, trans_t)

        setup = {
            "s_n": s_n,
            "t_n": t_n,
            "factor": factor,
            "num_classes": n_cls,
            "bn_mode": "train",
            "taps": "feat[-2] of each network",
            "s_shape": list(inputs["feat_s"].shape),
            "t_shape": list(inputs["feat_t"].shape),
            "teacher_params": ["cls_t.weight", "cls_t.bias"],
        }
        out.append(
            case(
                "simkd",
                name,
                setup,
                inputs,
                ["feat_s"],
                run,
                proj,
                {"cls_t.": cls_t},
                outputs=lambda keep=keep: {"pred_feat_s": keep["pred_feat_s"]},
            )
        )
    return out


class _Student(nn.Module):
    """Stands in for the student in mdistiller's DKD: its "image" is its logits."""

    def forward(self, logits):
        return logits, {}


class _Teacher(nn.Module):
    """Stands in for the teacher in mdistiller's DKD: fixed logits, whatever the image."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, _image):
        return self.logits, {}


def dkd_cases(o, gen):
    cfg = types.SimpleNamespace(
        DKD=types.SimpleNamespace(CE_WEIGHT=1.0, ALPHA=1.0, BETA=8.0, T=4.0, WARMUP=20)
    )
    y_s = torch.randn(BATCH, 10, generator=gen) * 3
    y_t = torch.randn(BATCH, 10, generator=gen) * 3
    target = torch.tensor([0, 3, 3, 9])
    out = []
    for epoch in (1, 10, 20, 30):
        inputs = {"logit_s": y_s.clone(), "logit_t": y_t.clone(), "target": target}
        distiller = o.DKD(_Student(), _Teacher(inputs["logit_t"]), cfg)
        distiller.train()

        def run(distiller=distiller, inputs=inputs, epoch=epoch):
            _, losses = distiller.forward_train(inputs["logit_s"], inputs["target"], epoch=epoch)
            return losses["loss_kd"]

        setup = {
            "alpha": 1.0,
            "beta": 8.0,
            "T": 4.0,
            "warmup": 20,
            "epoch": epoch,
            "num_classes": 10,
            "warmup_factor": min(epoch / 20, 1.0),
            "note": "loss = min(epoch / warmup, 1) * dkd_loss, as DKD.forward_train",
        }
        out.append(case("dkd", f"dkd_epoch_{epoch}", setup, inputs, ["logit_s"], run))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("simkd", type=Path, help="a checkout of DefangChen/SimKD")
    parser.add_argument("mdistiller", type=Path, help="a checkout of megvii-research/mdistiller")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("methods.json"))
    args = parser.parse_args(argv)
    for path, marker in [(args.simkd, "distiller_zoo"), (args.mdistiller, "mdistiller")]:
        if not (path / marker).is_dir():
            print(f"error: {path} has no {marker}/ folder", file=sys.stderr)
            return 2
    torch.set_default_dtype(torch.float64)
    o = load_official(args.simkd, args.mdistiller)
    gen = torch.Generator().manual_seed(20261130)
    cases = []
    for make in (
        kd_cases,
        fitnet_cases,
        at_cases,
        sp_cases,
        vid_cases,
        crd_cases,
        srrl_cases,
        semckd_cases,
        simkd_cases,
        dkd_cases,
    ):
        cases.extend(make(o, gen))
    for entry in cases:
        if not math.isfinite(entry["loss"]):
            print(f"error: {entry['case']} has a non-finite loss", file=sys.stderr)
            return 1
    fixture = {
        "sources": {
            "SimKD": {"repo": "https://github.com/DefangChen/SimKD", "commit": SIMKD_COMMIT},
            "mdistiller": {
                "repo": "https://github.com/megvii-research/mdistiller",
                "commit": MDISTILLER_COMMIT,
            },
            "torch": torch.__version__.split("+")[0],
            "dtype": "float64",
        },
        "cases": cases,
    }
    args.out.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    print(f"{len(cases)} cases -> {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
