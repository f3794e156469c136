"""The optimizers a benchmark races: K-FAC, its variants and first-order baselines.

``adam`` is ``keras.optimizers.Adam``. ``sgd`` is ``SGD(momentum=0.9)``.
``nesterov`` is ``SGD(momentum=0.9, nesterov=True)``. ``muon`` is
``keras.optimizers.Muon``. Keras' Muon applies its Newton-Schulz
orthogonalised update only to 2-D variables whose path doesn't match
``exclude_layers``. Every other variable (biases, i.e. any non-2-D variable)
automatically gets Muon's built-in AdamW step, at ``learning_rate *
adam_lr_ratio``. The harness passes the model's output layer name in
``exclude_layers``, as Muon's docstring recommends, and sets both weight
decays to 0 so that all optimizers minimise the same objective. ``kfac`` is
``kfac_keras.KFAC`` (its defaults) plus ``kfac_keras.KFACCallback``. Optional
K-FAC variants, all with ``step_rule="kl_clip"``: ``kfac_paper`` (the paper's
quadratic-model step size and momentum with Levenberg-Marquardt damping),
``kfac_tridiagonal`` (the same with the block-tridiagonal inverse) and
``kfac_fixed`` (learning rate 0.01, fixed damping, no norm constraint).
Optional Muon variant: ``muon_bf16``, ``muon`` with the matrix products of
its Newton-Schulz iterations in bfloat16 (``MuonBfloat16``), the counterpart of
``KFAC(orthogonal_dtype="bfloat16")``, so that Muon gets the same saving when
K-FAC uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import keras

from kfac_keras import KFAC, KFACCallback

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "MuonBfloat16",
    "OPTIMIZER_NAMES",
    "OptimizerSpec",
    "PAPER_ADAPTIVE",
    "get_optimizer_specs",
]

OPTIMIZER_NAMES = ("kfac", "adam", "sgd", "nesterov", "muon", "kfac_paper",
                   "kfac_tridiagonal", "kfac_fixed", "muon_bf16")
#: What ``--optimizers`` runs unless told otherwise.
DEFAULT_OPTIMIZERS = ("kfac", "adam", "sgd", "nesterov", "muon")


class MuonBfloat16(getattr(keras.optimizers, "Muon", keras.optimizers.Optimizer)):
    """``keras.optimizers.Muon`` with the Newton-Schulz products in bfloat16.

    Only ``zeropower_via_newtonschulz5`` changes, in the way
    ``kfac_keras.step_rules.newton_schulz(dtype="bfloat16")`` does: the
    normalisation (Muon's own, ``x / (||x||_F + 1e-7)``), the iterate and the
    coefficients stay float32; each matrix product takes bfloat16 inputs and
    gives a bfloat16 result. Every argument is ``keras.optimizers.Muon``'s.
    """

    def zeropower_via_newtonschulz5(self, x, steps: int):
        ops = keras.ops
        if len(ops.shape(x)) < 2:
            raise ValueError("MuonBfloat16 orthogonalises matrices; received a variable "
                             f"of shape {ops.shape(x)}.")
        a, b, c = self.muon_a, self.muon_b, self.muon_c
        dtype = x.dtype
        x = ops.cast(x, "float32")
        tall = x.shape[-2] > x.shape[-1]
        if tall:
            x = ops.swapaxes(x, -2, -1)
        x = x / (ops.norm(x, axis=(-2, -1), keepdims=True) + 1e-7)
        for _ in range(steps):
            low = ops.cast(x, "bfloat16")
            gram = ops.matmul(low, ops.swapaxes(low, -2, -1))
            polynomial = (b * ops.cast(gram, "float32")
                          + c * ops.cast(ops.matmul(gram, gram), "float32"))
            x = a * x + ops.cast(ops.matmul(ops.cast(polynomial, "bfloat16"), low), "float32")
        if tall:
            x = ops.swapaxes(x, -2, -1)
        return ops.cast(x, dtype)


@dataclasses.dataclass
class OptimizerSpec:
    """How to build one optimizer for the benchmark.

    ``build(lr)`` returns a fresh optimizer (``lr=None``: its default).
    ``grid``/``quick_grid`` are learning-rate grids. Empty means "no search,
    use ``default_lr``". ``callbacks()`` returns fresh extra callbacks.
    """

    name: str
    label: str
    build: Callable
    default_lr: float | None
    grid: tuple = ()
    quick_grid: tuple = ()
    callbacks: Callable = list


#: The variants below are K-FAC's own step (the quadratic-model step is not
#: combinable with the default ``step_rule="orthogonal"``; ``kfac_fixed`` is
#: the plain update).
KL_CLIP = {"step_rule": "kl_clip"}
#: ``AdaptiveOptions`` arguments of the ``kfac_paper`` variants.
PAPER_ADAPTIVE = {"quadratic_model_step": True, "adapt_damping": True,
                  "min_damping": 1e-3}


def _kfac_build(lr, **kwargs):
    if lr is not None:
        kwargs["learning_rate"] = lr
    return KFAC(**kwargs)


def _make_kfac_callbacks_factory():
    """Fresh KFACCallback per run; only the first prints its registration
    report (every run builds the same model)."""
    state = {"first": True}

    def factory():
        verbose = 1 if state["first"] else 0
        state["first"] = False
        return [KFACCallback(verbose=verbose)]

    return factory


def get_optimizer_specs(names=DEFAULT_OPTIMIZERS, *, output_layer_name=None,
                        kfac_kwargs=None, kfac_grid=None, grids=None, verbose=True):
    """OptimizerSpecs for ``names`` (from ``OPTIMIZER_NAMES``).

    ``output_layer_name`` is given to Muon's ``exclude_layers``.
    ``kfac_grid``: learning rates to search for K-FAC (default: none, so
    K-FAC runs with its own default learning rate).
    ``grids``: ``{name: (grid, quick_grid)}`` to replace the default grids
    for a problem whose good learning rates lie elsewhere.
    """
    kfac_kwargs = dict(kfac_kwargs or {})
    opt = keras.optimizers
    sgd_grid = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    table = {
        "adam": OptimizerSpec(
            "adam", "Adam", lambda lr: opt.Adam(learning_rate=1e-3 if lr is None else lr),
            1e-3, (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), (1e-3, 3e-3)),
        "sgd": OptimizerSpec(
            "sgd", "SGD+momentum(0.9)",
            lambda lr: opt.SGD(learning_rate=1e-2 if lr is None else lr, momentum=0.9),
            1e-2, sgd_grid, (1e-2, 3e-2)),
        "nesterov": OptimizerSpec(
            "nesterov", "SGD+Nesterov(0.9)",
            lambda lr: opt.SGD(learning_rate=1e-2 if lr is None else lr, momentum=0.9,
                               nesterov=True),
            1e-2, sgd_grid, (1e-2, 3e-2)),
        "muon": OptimizerSpec(
            "muon", "Muon",
            lambda lr: opt.Muon(
                learning_rate=1e-2 if lr is None else lr,
                exclude_layers=[output_layer_name] if output_layer_name else None,
                weight_decay=0.0, adam_weight_decay=0.0),
            1e-2, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), (1e-2, 3e-2)),
        "muon_bf16": OptimizerSpec(
            "muon_bf16", "Muon (bfloat16 Newton-Schulz)",
            lambda lr: MuonBfloat16(
                learning_rate=1e-2 if lr is None else lr,
                exclude_layers=[output_layer_name] if output_layer_name else None,
                weight_decay=0.0, adam_weight_decay=0.0),
            1e-2, (1e-3, 3e-3, 1e-2, 3e-2, 1e-1), (1e-2, 3e-2)),
        "kfac": OptimizerSpec(
            "kfac", "K-FAC",
            lambda lr: _kfac_build(lr, **kfac_kwargs),
            None, tuple(kfac_grid or ()), tuple(kfac_grid or ()),
            _make_kfac_callbacks_factory()),
        # The paper's adaptive algorithm (sections 6.5 and 7): step size and
        # momentum from the quadratic model, Levenberg-Marquardt damping.
        "kfac_paper": OptimizerSpec(
            "kfac_paper", "K-FAC paper (quadratic-model step, LM damping)",
            lambda lr: _kfac_build(None, adaptive=PAPER_ADAPTIVE,
                                   **{**KL_CLIP, **kfac_kwargs}),
            None, (), (), _make_kfac_callbacks_factory()),
        "kfac_tridiagonal": OptimizerSpec(
            "kfac_tridiagonal", "K-FAC paper, block-tridiagonal",
            lambda lr: _kfac_build(None, adaptive=PAPER_ADAPTIVE,
                                   approximation="tridiagonal", **{**KL_CLIP, **kfac_kwargs}),
            None, (), (), _make_kfac_callbacks_factory()),
        # The plain update: fixed damping, no norm constraint.
        "kfac_fixed": OptimizerSpec(
            "kfac_fixed", "K-FAC fixed damping, no clipping",
            lambda lr: _kfac_build(0.01 if lr is None else lr, adaptive=None,
                                   norm_constraint=None, **{**KL_CLIP, **kfac_kwargs}),
            0.01, tuple(kfac_grid or ()), tuple(kfac_grid or ()),
            _make_kfac_callbacks_factory()),
    }
    specs = []
    for n in names:
        if n not in table:
            raise ValueError(f"unknown optimizer {n!r}; choose from {OPTIMIZER_NAMES}")
        if n in ("muon", "muon_bf16") and not hasattr(opt, "Muon"):
            if verbose:
                print("skipping muon: this Keras has no keras.optimizers.Muon", flush=True)
            continue
        spec = table[n]
        if grids and n in grids:
            full, quick = grids[n]
            spec = dataclasses.replace(spec, grid=tuple(full), quick_grid=tuple(quick))
        specs.append(spec)
    return specs
