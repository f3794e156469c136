"""K-FAC for Keras 3: Kronecker-factored natural-gradient optimization.

Typical use::

    model.compile(optimizer=kfac_keras.KFAC(learning_rate=0.1, damping=1e-2),
                  loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=256, callbacks=[kfac_keras.KFACCallback()])
"""

__version__ = "0.1.0"

from kfac_keras.callback import KFACCallback, register_optimizer_names
from kfac_keras.losses import DistributionLoss, declare_loss
from kfac_keras.optimizer import KFAC
from kfac_keras.options import AdaptiveOptions
from kfac_keras.registration import Registration, register
from kfac_keras.training import KFACTrainStep, make_train_step

register_optimizer_names()  # compile(optimizer="kfac")

__all__ = [
    "AdaptiveOptions",
    "DistributionLoss",
    "KFAC",
    "KFACCallback",
    "KFACTrainStep",
    "declare_loss",
    "Registration",
    "make_train_step",
    "register",
    "__version__",
]
