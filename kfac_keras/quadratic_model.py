"""The local quadratic model: exact Fisher products, step size and momentum.

Martens & Grosse 2015, sections 6.4-7. Around the current parameters the
objective `h` is modelled by

    M(delta) = h(theta) + grad^T delta + 1/2 delta^T C delta,   C = F + (lambda + eta) I,

with `F` the *exact* Fisher of the current mini-batch, which for the losses
K-FAC supports equals the generalised Gauss-Newton matrix:

    u^T F v = mean_n c_n (J_n u)^T H_n (J_n v).

`J_n v` is the directional derivative of example `n`'s output along the
parameter direction `v`, computed in forward mode
(`tf.autodiff.ForwardAccumulator`, one extra forward pass per direction, no
per-example Jacobians); `H_n` is the Fisher of the predictive distribution
w.r.t. the model output (`kfac_keras.losses`, `output_fisher_gram`): softmax cross-entropy on
logits `diag(p) - p p^T`, sigmoid cross-entropy on logits `diag(p (1-p))`,
squared error `2 I` (with the `1/d` averaging in `c_n`); on probability
outputs the same Fisher in probability coordinates, `diag(1/p) - 1 1^T` and
`1 / (p (1-p))`. `c_n` is the per-example scale of the Keras loss (reduction,
averaging over outputs and positions, sample weights), as in
`kfac_keras.losses`.

**Step size and momentum** (section 7, `AdaptiveOptions(quadratic_model_step=True)`).
With the preconditioned direction `Delta = -Fhat^{-1} grad` and the previous
update `delta0`, the update `delta = alpha Delta + mu delta0` minimises `M`
when

    [[Delta^T C Delta,  Delta^T C delta0],    [alpha]      [grad^T Delta ]
     [delta0^T C Delta, delta0^T C delta0]] @ [mu   ] = - [grad^T delta0].

On the first step (`delta0 = 0`), or when the system is singular, only
`alpha = -grad^T Delta / Delta^T C Delta` is used and `mu = 0`. The `F`
products need two forward-mode passes per step; the rules that use them are
in `kfac_keras.step_rules`, the options in `kfac_keras.options.AdaptiveOptions`.

**Cost**: every step with `quadratic_model_step`, two forward-mode passes
(each about 1.5-3x a forward pass); every `T1` steps with `adapt_damping`,
one plain forward pass for `h(theta + delta)`, plus one forward-mode pass
when the step comes from a fixed learning rate.

**Stochastic layers.** The extra passes run the model in training mode, like
the step's own forward pass. Non-trainable state they would change (e.g.
BatchNormalization moving statistics, random-seed state) is put back after
each pass, so the extra passes leave no trace. Dropout draws a fresh mask in
each pass, so with dropout the products and `rho` are noisier estimates.
"""

import tensorflow as tf

from kfac_keras import fisher_products



# ------------------------------------------------------- model passes
def _read(variables):
    return [tf.identity(tf.convert_to_tensor(v)) for v in variables]


class BatchQuadraticModel:
    """Exact-Fisher products and loss re-evaluation on one mini-batch.

    Built by the training step for each batch; every method runs the model
    in training mode and then puts back the model's non-trainable variables
    (so a BatchNormalization layer's moving statistics are updated once per
    step, by the step's own forward pass).

    Args:
        model: the Keras model (one output, or several with one loss each).
        distribution: its `kfac_keras.losses.PredictiveDistribution`.
        x: the batch inputs.
        y: the batch targets.
        sample_weight: optional per-example weights.
        loss_fn: callable `(x, y, y_pred, sample_weight) -> scalar loss`, the
            loss of the training step (unscaled).
    """

    def __init__(self, model, distribution, x, y, sample_weight, loss_fn):
        self.model = model
        self.distribution = distribution
        self.x = x
        self.y = y
        self.sample_weight = sample_weight
        self.loss_fn = loss_fn

    def _stateless(self, fn):
        state = list(self.model.non_trainable_variables)
        before = _read(state)
        result = fn()
        with tf.control_dependencies(tf.nest.flatten(result)):
            for variable, value in zip(state, before):
                variable.assign(value)
            return tf.nest.map_structure(tf.identity, result)

    def jacobian_vector_product(self, tangents, variables):
        """`(y_pred, J v)` for the direction `tangents` (aligned with `variables`;
        other parameters stay fixed)."""
        # Forward mode cannot cross a recurrent layer's While loop in graph
        # mode; such models use the double-backward product (fisher_products).
        method = fisher_products.jvp_method(self.model)

        def forward():
            y_pred, jvp = fisher_products.jacobian_vector_product(
                lambda: self.model(self.x, training=True), variables, tangents, method)
            # The outputs' Keras masks weigh the output Fisher (`fisher_gram`).
            self._output_masks = [getattr(t, "_keras_mask", None) for t in tf.nest.flatten(y_pred)]
            return tf.nest.map_structure(lambda t: tf.cast(t, tf.float32), (y_pred, jvp))

        return self._stateless(forward)

    def fisher_gram(self, directions, variables):
        """The matrix `[u_i^T F u_j]` for a list of parameter directions.

        Args:
            directions: list of K directions, each a list of tensors aligned
                with `variables`.
            variables: the model variables the directions move (the others
                are held fixed).

        Returns:
            A `(K, K)` float32 tensor.
        """
        outputs = [self.jacobian_vector_product(d, variables) for d in directions]
        for output, mask in zip(tf.nest.flatten(outputs[0][0]), self._output_masks):
            if mask is not None:
                output._keras_mask = mask
        gram = self.distribution.output_fisher_gram(  # losses.py: per-loss, per-output maths
            outputs[0][0], [jv for _, jv in outputs], self.sample_weight)
        return 0.5 * (gram + tf.transpose(gram))

    def loss(self):
        """The step's loss at the model's current weights, on this batch."""
        def forward():
            y_pred = self.model(self.x, training=True)
            return tf.cast(self.loss_fn(self.x, self.y, y_pred, self.sample_weight),
                           tf.float32)

        return self._stateless(forward)
