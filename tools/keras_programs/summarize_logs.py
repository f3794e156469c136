"""Markdown tables of the keras-program logs written by lanes.sh / lanes2.sh.

    python tools/keras_programs/summarize_logs.py tools/keras_programs/logs

One row per run (in log order): the candidate (Adam, `KFAC()` defaults,
`--kfac` options or `--step-rule`), the seed, and the validation metric per
epoch (transformer: val accuracy; denoising: val binary CE; VAE: training
epoch-mean total loss and the final model's total loss; BiLSTM: val accuracy).
"""

import json
import os
import re
import sys


LABELS = {
    '{"step_rule": "ortho", "ns_steps": 3, "momentum_after": true, "learning_rate": 0.01}':
        "(b) ortho ns3, momentum after, lr 1e-2",
    '{"step_rule": "kl_velocity"}': "(c) KL clip on the velocity, c 1e-4",
    '{"step_rule": "kl_velocity", "kl_bound": 0.01}': "(c') KL clip on the velocity, c 1e-2",
    'KFAC({"momentum": 0.0})': "(d) `KFAC(momentum=0.0)`",
}


def candidate(optimizer, kfac, step_rule):
    name = _candidate(optimizer, kfac, step_rule)
    for key, label in LABELS.items():
        if name in (key, f"step rule {key}"):
            return label
    return "(a) `KFAC()` defaults" if name == "`KFAC()` defaults" else name


def _candidate(optimizer, kfac, step_rule):
    if optimizer == "adam":
        return "Adam"
    if isinstance(step_rule, str) and '"lr_schedule"' in step_rule:
        return "(b) ortho + cosine decay to 10% over the run"
    parts = []
    if kfac and kfac not in ("{}", {}):
        parts.append(f"KFAC({json.dumps(kfac) if isinstance(kfac, dict) else kfac})")
    if step_rule:
        parts.append(f"step rule {json.dumps(step_rule) if isinstance(step_rule, dict) else step_rule}")
    return " + ".join(parts) or "`KFAC()` defaults"


def epoch_table(path, metric):
    runs = {}
    for line in open(path):
        if not line.startswith('{"optimizer"'):
            continue
        row = json.loads(line)
        name = candidate(row["optimizer"], row.get("kfac"), row.get("step_rule"))
        if row.get("adam_cosine_steps"):
            name += f" + cosine decay to 10% over {row['adam_cosine_steps']} steps"
        key = (name, row.get("seed", 0))
        runs.setdefault(key, []).append((row["epoch"], row[metric], row.get("seconds")))
    print(f"\n{os.path.basename(path)} ({metric} per epoch; seconds at the end)\n")
    print("| candidate | seed | " + metric + " per epoch | seconds |\n|---|---|---|---|")
    for (name, seed), rows in runs.items():
        rows.sort()
        print(f"| {name} | {seed} | {' / '.join(str(r[1]) for r in rows)} | {rows[-1][2]} |")


def vae_table(path):
    print(f"\n{os.path.basename(path)} (training epoch-mean total loss per epoch; final model's total loss)\n")
    print("| candidate | per epoch | final total loss | seconds |\n|---|---|---|---|")
    for line in open(path):
        if line.startswith('{"optimizer"'):
            row = json.loads(line)
            name = candidate(row["optimizer"], row.get("options"), row.get("step_rule"))
            print(f"| {name} | {' / '.join(str(v) for v in row['epoch_total_loss'])} | "
                  f"{row['final_total_loss']} | {row['seconds']} |")


def recurrent_table(path):
    print(f"\n{os.path.basename(path)} (BiLSTM val accuracy per epoch; training loss first -> last epoch)\n")
    print("| candidate | val accuracy per epoch | loss | ms/step |\n|---|---|---|---|")
    command = ""
    pattern = re.compile(r"^bilstm\s+(\S+)\s+val_accuracy \S+ \(per epoch ([^)]*)\)\s+loss (\S+ -> \S+)\s+(\S+) ms/step")
    for line in open(path):
        if line.startswith("["):
            command = line
            continue
        match = pattern.match(line)
        if match:
            kind = match.group(1)
            kfac = re.search(r"--kfac (\{.*?\})(?: --|$)", command)
            rule = re.search(r"--step-rule (\{.*?\})(?: --|$)", command.strip())
            name = candidate(kind, kfac.group(1) if kfac else None, rule.group(1) if rule else None)
            print(f"| {name} | {match.group(2).replace(', ', ' / ')} | {match.group(3)} | {match.group(4)} |")


def main(directory):
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith("transformer"):
            epoch_table(path, "val_accuracy")
        elif name.startswith("denoising"):
            epoch_table(path, "val_loss")
        elif name.startswith("vae"):
            vae_table(path)
        elif name.startswith("recurrent"):
            recurrent_table(path)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "logs"))
