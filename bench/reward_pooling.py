"""Where a reward model should read its score (`reward.pooling`): a linear probe on frozen SmolLM2 states, layer by
layer, read at the last token (transformers' rule) or averaged over the answer's tokens, on the HH-RLHF harmless pairs.

    .venv/bin/python bench/reward_pooling.py [--layers 0,4,8,12,16,20,24,28,30]      # ~25 min on 2 cores

Every pair of the training and test files is tokenized as the `hh-reward` recipe tokenizes it (pairs over its 512
tokens are left out here) and run once through the frozen base. Per layer and pooling, a logistic regression without
intercept learns from the difference chosen - rejected (features scaled to unit variance, each pair's sign flipped at
random so both classes occur); its L2 strength is picked by 5-fold cross-validation on the training pairs, and the
test accuracy is that choice's. No reward model is trained: the probe shows how much of the preference each reading
of the base already holds in a linear form. The numbers are in docs/results.md ("Reward models and online RL").
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from tunesmith.assemble import assemble
from tunesmith.config import load_config
from tunesmith.data.render import IGNORE
from tunesmith.methods.load import load_model

DATA = "datasets:preference_hh_harmless"   # the data folder (TUNESMITH_DATA_DIR); `tunesmith data get preference_hh_harmless`
STRENGTHS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def states(path: str, layers: list[int]) -> dict[str, np.ndarray]:
    """(pairs, 2, layers, hidden) states of the chosen and rejected rows, at the last token and averaged over the answer."""
    run = assemble(load_config("hh-reward", [f"data.path={path}", "data.val_size=0"]), torch.device("cpu"), with_model=False)
    pairs = run.data.train.tokens
    model = load_model(run.model_dir, torch.float32, torch.device("cpu"), "causal").eval()
    hidden = model.config.hidden_size
    out = {k: np.zeros((len(pairs), 2, len(layers), hidden), dtype=np.float32) for k in ("last", "mean")}
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            for side, row in enumerate((pair, pair.rejected)):
                ids = torch.from_numpy(row.input_ids.astype(np.int64))[None]
                every = model.model(input_ids=ids, output_hidden_states=True).hidden_states
                answer = torch.from_numpy(row.labels != IGNORE)
                for j, layer in enumerate(layers):
                    out["last"][i, side, j] = every[layer][0, -1].numpy()
                    out["mean"][i, side, j] = every[layer][0, answer].mean(0).numpy()
            if i % 200 == 0:
                print(f"  {path}: {i}/{len(pairs)} pairs, {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def probe(train: np.ndarray, test: np.ndarray) -> tuple[float, float, float]:
    """(strength chosen, its cross-validated accuracy, test accuracy) of a linear probe on chosen - rejected."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    def signed(f: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        sign = np.random.default_rng(seed).integers(0, 2, len(f)) * 2 - 1
        return (f[:, 0] - f[:, 1]) * sign[:, None], (sign > 0).astype(int)

    x, y = signed(train, 0)
    x_test, y_test = signed(test, 1)
    scale = x.std(0) + 1e-6
    cv = {c: cross_val_score(LogisticRegression(C=c, fit_intercept=False, max_iter=3000), x / scale, y, cv=5).mean()
          for c in STRENGTHS}
    best = max(cv, key=cv.get)
    fitted = LogisticRegression(C=best, fit_intercept=False, max_iter=3000).fit(x / scale, y)
    return best, cv[best], fitted.score(x_test / scale, y_test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,4,8,12,16,20,24,28,30", help="hidden-state indices (0: embeddings)")
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = [int(x) for x in args.layers.split(",")]
    train, test = states(f"{DATA}/train.jsonl", layers), states(f"{DATA}/test.jsonl", layers)
    print(f"\n{len(train['last'])} training pairs, {len(test['last'])} test pairs; accuracy of a linear probe on frozen states")
    print("| layer | last token: 5-fold CV | last token: test | answer mean: 5-fold CV | answer mean: test |")
    print("|---|---|---|---|---|")
    for j, layer in enumerate(layers):
        cells = []
        for kind in ("last", "mean"):
            _, cv, acc = probe(train[kind][:, :, j], test[kind][:, :, j])
            cells += [f"{cv:.3f}", f"{acc:.3f}"]
        print(f"| {layer} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
