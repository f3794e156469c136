"""keras-io's `text_classification_with_transformer`, on synthetic data.

The model is the keras-io program's (token + position Embedding, one
transformer block with 2-head MultiHeadAttention, feed-forward 32,
LayerNormalization, Dropout 0.1, GlobalAveragePooling1D, Dropout, Dense 20
relu, Dense 2 softmax, `sparse_categorical_crossentropy` on probabilities);
only the optimizer line and the callback change between runs. There is no
internet here, so the IMDB reviews are replaced by synthetic ones of the same
shapes (vocabulary 20,000, length 200, ids padded with 0 in front like
`pad_sequences`): Zipf-distributed filler tokens, and a few "sentiment" tokens
per review, drawn from the label's set with probability `--signal` and from
the other set otherwise (so the label is learnable but noisy).

Usage (one JSON line per epoch on stdout):

    python tools/keras_programs/transformer_classifier.py --optimizer adam
    python tools/keras_programs/transformer_classifier.py --optimizer kfac \
        --kfac '{"damping": 0.01}' --position batched
"""

import argparse
import json
import time

import keras
import numpy as np
from keras import layers, ops

VOCAB_SIZE = 20000
MAXLEN = 200
EMBED_DIM = 32
NUM_HEADS = 2
FF_DIM = 32
SENTIMENT_TOKENS = 20  # per class


def synthetic_reviews(num_examples, seed, signal=0.8, mean_sentiment=12.0):
    """Token ids `(num_examples, MAXLEN)` and labels in {0, 1}.

    Args:
        num_examples: number of reviews.
        seed: NumPy seed.
        signal: probability that a sentiment token comes from the label's set.
        mean_sentiment: Poisson mean of the number of sentiment tokens.
    """
    rng = np.random.default_rng(seed)
    # Sentiment ids sit among moderately frequent tokens (ranks 100..139).
    positive = np.arange(100, 100 + SENTIMENT_TOKENS)
    negative = np.arange(100 + SENTIMENT_TOKENS, 100 + 2 * SENTIMENT_TOKENS)
    labels = rng.integers(0, 2, num_examples)
    x = np.zeros((num_examples, MAXLEN), np.int64)
    for n in range(num_examples):
        length = int(np.clip(rng.lognormal(np.log(180), 0.5), 20, 600))
        tokens = rng.zipf(1.3, size=length) + 1  # ids >= 2, Zipf like words
        tokens = np.where(tokens < VOCAB_SIZE, tokens, rng.integers(2, VOCAB_SIZE, length))
        count = min(rng.poisson(mean_sentiment) + 1, length)
        where = rng.choice(length, size=count, replace=False)
        own = positive if labels[n] == 1 else negative
        other = negative if labels[n] == 1 else positive
        from_own = rng.random(count) < signal
        tokens[where] = np.where(from_own, rng.choice(own, count), rng.choice(other, count))
        tokens = tokens[:MAXLEN]  # pad_sequences truncates 'pre' by default: keep the tail
        tokens = tokens[-MAXLEN:]
        x[n, MAXLEN - len(tokens):] = tokens
    return x, labels


class TransformerBlock(layers.Layer):
    """keras-io's transformer block (post-norm)."""

    def __init__(self, embed_dim, num_heads, ff_dim, rate=0.1, **kwargs):
        super().__init__(**kwargs)
        self.att = layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential(
            [layers.Dense(ff_dim, activation="relu"), layers.Dense(embed_dim)])
        self.layernorm1 = layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = layers.LayerNormalization(epsilon=1e-6)
        self.dropout1 = layers.Dropout(rate)
        self.dropout2 = layers.Dropout(rate)

    def call(self, inputs, training=None):
        attn_output = self.att(inputs, inputs)
        attn_output = self.dropout1(attn_output, training=training)
        out1 = self.layernorm1(inputs + attn_output)
        ffn_output = self.ffn(out1)
        ffn_output = self.dropout2(ffn_output, training=training)
        return self.layernorm2(out1 + ffn_output)


class TokenAndPositionEmbedding(layers.Layer):
    """keras-io's embedding; `position="keras_io"` looks positions up with
    an un-batched `arange` (as keras-io does), `"batched"` with ids tiled to
    the batch (same function, batch-first ids)."""

    def __init__(self, maxlen, vocab_size, embed_dim, position="keras_io", **kwargs):
        super().__init__(**kwargs)
        self.token_emb = layers.Embedding(input_dim=vocab_size, output_dim=embed_dim)
        self.pos_emb = layers.Embedding(input_dim=maxlen, output_dim=embed_dim)
        self.position = position

    def call(self, x):
        maxlen = ops.shape(x)[-1]
        positions = ops.arange(start=0, stop=maxlen, step=1)
        if self.position == "batched":
            positions = ops.broadcast_to(positions[None, :], ops.shape(x))
        positions = self.pos_emb(positions)
        x = self.token_emb(x)
        return x + positions


def build_model(position="keras_io", dropout=0.1):
    inputs = layers.Input(shape=(MAXLEN,))
    x = TokenAndPositionEmbedding(MAXLEN, VOCAB_SIZE, EMBED_DIM, position)(inputs)
    x = TransformerBlock(EMBED_DIM, NUM_HEADS, FF_DIM, rate=dropout)(x)
    x = layers.GlobalAveragePooling1D()(x)
    x = layers.Dropout(dropout)(x)
    x = layers.Dense(20, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    return keras.Model(inputs=inputs, outputs=outputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=["adam", "sgd", "kfac"], default="kfac")
    parser.add_argument("--learning-rate", type=float, default=0.1, help="for --optimizer sgd")
    parser.add_argument("--kfac", default="{}", help="JSON keyword arguments of KFAC(...); a dict "
                        "`adaptive` becomes kfac_keras.AdaptiveOptions(**adaptive)")
    parser.add_argument("--adam-cosine-steps", type=int, default=0,
                        help="for --optimizer adam: Adam(CosineDecay(1e-3, N, alpha=0.1)) (0: plain 'adam')")
    parser.add_argument("--step-rule", default="", help="JSON StepRuleKFAC arguments (tools/step_efficiency/step_rules.py): train with that step rule instead of KFAC's (kfac_choice.py)")
    parser.add_argument("--position", choices=["keras_io", "batched"], default="keras_io")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--val", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal", type=float, default=0.8,
                        help="probability that a sentiment token matches the label")
    parser.add_argument("--sentiment", type=float, default=12.0,
                        help="mean number of sentiment tokens per review")
    parser.add_argument("--log-every", type=int, default=0,
                        help="print the K-FAC diagnostics every N batches (0: never)")
    parser.add_argument("--report", action="store_true", help="print the registration report")
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    x_train, y_train = synthetic_reviews(args.train, 1, args.signal, args.sentiment)
    x_val, y_val = synthetic_reviews(args.val, 2, args.signal, args.sentiment)
    model = build_model(args.position, args.dropout)
    callbacks = []
    if args.optimizer == "adam":
        optimizer = "adam" if not args.adam_cosine_steps else keras.optimizers.Adam(
            keras.optimizers.schedules.CosineDecay(1e-3, args.adam_cosine_steps, alpha=0.1))
    elif args.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(args.learning_rate, momentum=0.9)
    else:
        import kfac_keras
        from kfac_choice import make_kfac

        options = json.loads(args.kfac)
        if isinstance(options.get("adaptive"), dict):
            options["adaptive"] = kfac_keras.AdaptiveOptions(**options["adaptive"])
        optimizer = make_kfac(options, args.step_rule)
        callbacks.append(kfac_keras.KFACCallback(verbose=int(args.report)))
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])

    class EpochLine(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.time()

        def on_epoch_end(self, epoch, logs=None):
            print(json.dumps({"optimizer": args.optimizer, "kfac": args.kfac,
                              "step_rule": args.step_rule, "seed": args.seed,
                              **({"adam_cosine_steps": args.adam_cosine_steps}
                                 if args.adam_cosine_steps else {}),
                              "position": args.position, "dropout": args.dropout,
                              "epoch": epoch + 1,
                              "steps": (epoch + 1) * -(-args.train // args.batch_size),
                              "loss": round(float(logs["loss"]), 4),
                              "val_accuracy": round(float(logs["val_accuracy"]), 4),
                              "val_loss": round(float(logs["val_loss"]), 4),
                              "seconds": round(time.time() - self.start, 1),
                              **kfac_logs(logs)}), flush=True)

        def on_train_batch_end(self, batch, logs=None):
            if args.log_every and batch % args.log_every == 0:
                print(json.dumps({"batch": batch, "loss": round(float(logs["loss"]), 4),
                                  **kfac_logs(logs)}), flush=True)

    def kfac_logs(logs):
        keys = ("damping", "update_norm", "rho", "kfac_skipped_steps")
        return {k: float(f"{float(logs[k]):.4g}") for k in keys if k in logs}

    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs,
              validation_data=(x_val, y_val), verbose=0,
              callbacks=callbacks + [EpochLine()])


if __name__ == "__main__":
    main()
