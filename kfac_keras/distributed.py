"""K-FAC under `tf.distribute` strategies with more than one replica.

`kfac_keras.training.KFACTrainStep` uses these helpers when it runs inside a
replica context of a strategy with more than one replica (`model.fit` inside
`strategy.scope()`, or `strategy.run(step, ...)` in a custom loop).

Design. Under `MirroredStrategy` on CPU (and `MultiWorkerMirroredStrategy`)
every cross-replica reduction, and every update of a mirrored variable from
replica context, is a `merge_call`, which TensorFlow does not allow inside a
`tf.cond` branch; K-FAC's periodic work and its non-finite guards are
`tf.cond`s. So a step is split in two:

1. *Replica context*, no `merge_call`: each replica runs the forward pass on
   its slice of the global batch under a persistent tape, and the gradient
   of its loss (Keras divides the loss by the number of replicas, so the sum
   of the replicas' gradients is the gradient of the global-batch mean).
   Fisher targets are drawn with the replica's first *global* example index
   (`replica_id * per_replica_batch`), so the replicas together draw what
   one device draws for the whole batch (`kfac_keras.sampling`).
2. *One `merge_call`* into cross-replica context, outside any `tf.cond`,
   where the rest of the step runs once: the gradients (and loss) are summed
   over replicas in one packed all-reduce; the non-finite guard sees the
   summed values, so a NaN/Inf in any replica's batch skips the step on
   every replica; every `cov_update_every` steps, inside the guard's
   `tf.cond`, `strategy.extended.call_for_each_replica` runs each replica's
   sampled backward pass on its own tape, the blocks *record* their new
   estimates (`kfac_keras.blocks.base.EstimateRecorder`) instead of folding
   them, and one packed all-reduce forms the global-batch mean (weighted by
   each replica's number of examples) before the moving average. EKFAC's
   corrected diagonals take the same path every `scale_update_every` steps
   (each replica's estimate from its own captures, in the eigenbasis every
   replica shares; after the decomposition when the step has one, so that
   the estimate is made in the new basis). Then the
   decompositions (`tf.cond`) and the update (`KFAC.apply_step`, with Keras's
   per-variable update through `strategy.extended.update`). Assignments to
   mirrored variables in cross-replica context write every copy with the
   same value, so the replicas stay identical.

The `adaptive` options (the default: Levenberg-Marquardt damping; also
`quadratic_model_step`) need two quantities of the global batch: the
quadratic model's Fisher products (`u^T F v`, forward-mode passes) and the
loss after the update. Each replica builds a
`kfac_keras.quadratic_model.BatchQuadraticModel` of its slice, handed to the
cross-replica part by the `merge_call`; `ReplicaBatches` runs its passes
with `call_for_each_replica` (inside the update's `tf.cond`s) and combines
them with one all-reduce each: the Gram matrix as the example-weighted mean
of the replicas' (the mean over the global batch), the loss as the sum of
the replicas' shares (Keras divides each by the number of replicas). The
gradient inner products, `rho`, `alpha`, `mu` and the damping rule then run
once on these values, as on one device. With `mixed_float16`, each replica
scales its loss and unscales its gradients; the dynamic loss scale is
updated once, from the summed gradients.

Communication (float32, `P` = number of trainable parameters, `S` = number
of factor entries `sum_blocks (d_in^2 + d_out^2)` plus diagonal-block
entries): every step one all-reduce of `P + 1` floats (gradients and loss);
every `cov_update_every` steps one more of `S + 1` floats; with
`inverse_method="ekfac"`, every `scale_update_every` steps one of the
corrected diagonals' `sum_blocks d_in d_out + 1` floats; with `adaptive`
options, every `damping_update_every` steps (every step with
`quadratic_model_step`) two more of at most 5 floats (the Gram matrix and
the loss after the update). With the default
replicated decompositions nothing else is exchanged; with
`KFAC(distributed_inverses=True)` each `inv_update_every` steps adds one of
the blocks' whole state (factors and decompositions) and one flag per block
(see `KFAC`). `python -m benchmarks.distributed_cost` measures
these volumes for the MNIST autoencoder, and the step time with one and two
replicas (one CPU split into logical devices shows the overhead of the
multi-replica step, not a speed-up); the README reports its output.
(A ring all-reduce moves about twice these volumes per worker.)

Equivalence with one device on the same global batches (tested in
`tests/test_distributed_mirrored.py` and `tests/test_distributed_multiworker.py`):
exact up to float32 summation order when the global batch splits evenly over
the replicas and `statistics_fraction=1`. That holds for every block whose
estimate is a mean of per-example (or per-location) terms, because the
replicas' estimates are averaged weighted by their example counts; the tests
cover Dense, Conv2D and Embedding Kronecker blocks, EKFAC's corrected
diagonals (Dense), the tridiagonal blocks,
the adaptive options (`tests/test_distributed_mirrored_options.py`) and
dynamic loss scaling (float32 exactly; `mixed_float16` up to float16
rounding, `tests/test_distributed_mixed_precision.py`). `DiagonalBlock`'s
estimate is the square of the summed sampled gradient; its replicas' squares
are averaged, which has the same expectation but is not the single-device
value. Per-replica model state such as BatchNormalization's moving
statistics follows Keras's own rules under the strategy: each replica
normalizes its slice with that slice's statistics and keeps its own moving
statistics, so a model with BatchNormalization is not the single-device
function of the weights (its trainable weights and K-FAC state stay
identical across replicas; `tests/test_distributed_layers.py`).

Not supported with more than one replica (NotImplementedError when the step
is built, before any K-FAC state is created; see `check_supported`):
losses with `reduction="sum"`,
`BatchNormalization(synchronized=True)` (its all-reduce would run inside
K-FAC's capture of the forward pass, which the replicas enter one at a
time), and `jit_compile=True` of the custom-loop step (the sampled backward
pass needs each replica's tape outside XLA).

TPU readiness: the step has no `py_function`, host callbacks or Python
control flow on tensor values, and shapes are static; it was run on CPU only
(`MirroredStrategy` over logical CPU devices, `MultiWorkerMirroredStrategy`
over loopback), never on a TPU. `distributed_inverses=True` needs the
replica id as a trace-time constant (true for the two strategies above; a
strategy without it gets a NotImplementedError at the first decomposition).
"""

import contextlib

import keras
import tensorflow as tf

from kfac_keras import guards
from kfac_keras import keras_internals


def multi_replica_strategy(model=None):
    """The strategy with more than one replica this step would run under, or
    None: the current strategy, else the one `model` was built under."""
    strategies = [tf.distribute.get_strategy()]
    model_strategy = getattr(model, "distribute_strategy", None)
    if model_strategy is not None:
        strategies.append(model_strategy)
    for strategy in strategies:
        if strategy.num_replicas_in_sync > 1:
            return strategy
    return None


def variable_scope(strategy):
    """`strategy.scope()` unless it is already entered (or `strategy` is
    None): K-FAC creates its state when the step is built, possibly outside
    the scope the model was built in."""
    if strategy is None or tf.distribute.get_strategy() is strategy:
        return contextlib.nullcontext()
    return strategy.scope()


def in_multi_replica_context():
    """True inside `strategy.run` of a strategy with more than one replica."""
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        return False
    return tf.distribute.get_replica_context().num_replicas_in_sync > 1


def check_supported(strategy, model, distribution, jit_compile):
    """Raises NotImplementedError for an option K-FAC cannot run with under
    `strategy` (more than one replica).

    Args:
        strategy: the `tf.distribute.Strategy`.
        model: the Keras model.
        distribution: the loss's `kfac_keras.losses.PredictiveDistribution`.
        jit_compile: the step's `jit_compile`.
    """
    unsupported = []
    synchronized = [layer.name for layer in keras_internals.child_layers(model)
                    if getattr(layer, "synchronized", False) is True]
    if synchronized:
        unsupported.append(
            f"BatchNormalization(synchronized=True) (layers {synchronized}): its "
            "all-reduce runs inside the forward pass K-FAC captures, one replica "
            "at a time; use synchronized=False (each replica normalizes its "
            "slice with its own batch statistics)")
    if distribution.reduction == "sum":
        unsupported.append(
            "losses with reduction='sum' (the per-example Fisher scale would "
            "use the per-replica batch size); use the default reduction")
    if jit_compile:
        unsupported.append(
            "jit_compile=True: the sampled backward pass runs on each "
            "replica's tape outside XLA; build the step with jit_compile=False")
    if unsupported:
        raise NotImplementedError(
            f"K-FAC under {type(strategy).__name__} with "
            f"{strategy.num_replicas_in_sync} replicas does not support "
            + "; ".join(unsupported) + ".")


def first_global_example(local_batch_size):
    """Index in the global batch of this replica's first example, assuming
    the global batch is split into equal consecutive slices (what
    `tf.distribute` does with a batch that divides evenly)."""
    replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
    return tf.cast(replica_id, tf.int32) * tf.cast(local_batch_size, tf.int32)


def pack(tensors):
    """Flattens float tensors into one float32 vector (IndexedSlices are
    made dense)."""
    return tf.concat([tf.reshape(tf.cast(tf.convert_to_tensor(t), tf.float32), [-1])
                      for t in tensors], axis=0)


def unpack(vector, shapes):
    """Inverse of `pack`: splits `vector` into float32 tensors of `shapes`."""
    sizes = [int(tf.TensorShape(shape).num_elements()) for shape in shapes]
    parts = tf.split(vector, sizes) if len(sizes) > 1 else [vector]
    return [tf.reshape(part, shape) for part, shape in zip(parts, shapes)]


def sum_over_replicas(strategy, per_replica_vector):
    """All-reduces (sums) a per-replica vector in cross-replica context; the
    result is a plain tensor, the same on every worker."""
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_vector, axis=None)


def assign_per_replica(strategy, variables, per_replica_values):
    """Assigns each replica's own value to its copy of each variable
    (cross-replica context), e.g. to put back what its forward pass changed.
    Returns a True scalar tensor (for `tf.cond`)."""
    for variable, values in zip(variables, per_replica_values):
        target = variable.value if isinstance(variable, keras.Variable) else variable
        strategy.extended.update(
            target, lambda copy, value: copy.assign(value), args=(values,), group=False)
    return tf.constant(True)


def _num_examples(inputs):
    """Batch size of a (possibly nested) model input, as float32."""
    first_input = next(i for i in tf.nest.flatten(inputs) if i is not None)
    return tf.cast(tf.shape(first_input)[0], tf.float32)


class ReplicaBatches:
    """The quadratic model's passes over the global batch, run per replica on
    its slice (`kfac_keras.quadratic_model.BatchQuadraticModel`, built in each
    replica context) and combined in cross-replica context.

    Same interface as `BatchQuadraticModel` (what `KFAC.apply_step` uses):
    `fisher_gram` is the example-count-weighted mean of the replicas' Gram
    matrices, i.e. the mean over the global batch; `loss` is the sum of the
    replicas' losses, each of which Keras divides by the number of replicas
    (as the step's own loss), i.e. the global-batch mean loss when the batch
    splits evenly. Both can run inside `tf.cond` branches (one
    `call_for_each_replica` and one all-reduce each, no `merge_call`).

    Args:
        strategy: the multi-replica `tf.distribute.Strategy`.
        per_replica_batches: the replicas' `BatchQuadraticModel`s (a
            `PerReplica` value, as `merge_call` passes them on).
    """

    def __init__(self, strategy, per_replica_batches):
        self._strategy = strategy
        self._batches = per_replica_batches

    def fisher_gram(self, directions, variables):
        """`[u_i^T F u_j]` of the global batch (see `BatchQuadraticModel`)."""
        size = len(directions)

        def replica_gram(batch):
            count = _num_examples(batch.x)
            return pack([batch.fisher_gram(directions, variables) * count, count])

        total = sum_over_replicas(self._strategy, self._strategy.extended.call_for_each_replica(
            replica_gram, args=(self._batches,)))
        return tf.reshape(total[:-1] / total[-1], [size, size])

    def loss(self):
        """The step's loss of the global batch at the current weights."""
        per_replica = self._strategy.extended.call_for_each_replica(
            lambda batch: tf.reshape(batch.loss(), [1]), args=(self._batches,))
        return sum_over_replicas(self._strategy, per_replica)[0]


def decomposition_cost(block):
    """Cost proxy of decomposing `block`: `n^3` summed over its square
    matrix state variables (`n x n`)."""
    cost = 0
    for variable in block.state_variables():
        shape = tuple(variable.shape)
        if len(shape) == 2 and shape[0] == shape[1]:
            cost += int(shape[0]) ** 3
    return cost


def assign_owners(costs, num_replicas):
    """Greedy balance: blocks in decreasing cost, each to the replica with the
    least total so far (ties: lowest replica id; equal costs keep their
    order). Returns the owner replica id of each block."""
    loads = [0] * num_replicas
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
        owner = min(range(num_replicas), key=lambda r: (loads[r], r))
        owners[index] = owner
        loads[owner] += costs[index]
    return owners


def decompose_distributed(strategy, blocks, damping_variable, damping):
    """`guards.guarded_update_inverses` with the blocks shared out over the
    replicas (`KFAC(distributed_inverses=True)`), in cross-replica context.

    Each replica decomposes the blocks `assign_owners` gives it (writing only
    its own copies of their state), then one all-reduce of the blocks' whole
    state, zero where a replica does not own a block, plus one success flag
    per block, gives every replica every block's new state, which is then
    written to all copies. A failed block keeps its previous decomposition
    and raises the damping, as in the replicated mode.

    Args:
        strategy: the `tf.distribute.Strategy` (more than one replica).
        blocks: the registered blocks.
        damping_variable: the optimizer's damping variable, raised when a
            block fails.
        damping: the total damping the decompositions use.

    Returns:
        A scalar bool tensor, True if every block was decomposed.
    """
    owners = assign_owners([decomposition_cost(b) for b in blocks],
                           strategy.num_replicas_in_sync)
    states = [list(block.state_variables()) for block in blocks]

    def decompose_own_blocks(damping):
        replica_id = tf.get_static_value(
            tf.distribute.get_replica_context().replica_id_in_sync_group)
        if replica_id is None:
            raise NotImplementedError(
                "KFAC(distributed_inverses=True) needs the replica id at trace "
                f"time, which {type(strategy).__name__} does not provide; use "
                "distributed_inverses=False.")
        parts, flags = [], []
        for block, owner, state in zip(blocks, owners, states):
            if owner == replica_id:
                flags.append(tf.cast(guards.decompose_blocks([block], damping)[0], tf.float32))
                parts.extend(tf.convert_to_tensor(v) for v in state)
            else:
                flags.append(tf.constant(0.0))
                parts.extend(tf.zeros(v.shape, v.dtype) for v in state)
        return pack(parts + [tf.stack(flags)])

    per_replica = strategy.extended.call_for_each_replica(decompose_own_blocks, args=(damping,))
    variables = [v for state in states for v in state]
    shapes = [v.shape for v in variables] + [(len(blocks),)]
    *values, flags = unpack(sum_over_replicas(strategy, per_replica), shapes)
    for variable, value in zip(variables, values):
        variable.assign(tf.cast(value, variable.dtype))
    succeeded = tf.reduce_all(flags > 0.5)
    guards.raise_damping_unless(damping_variable, succeeded)
    return succeeded
