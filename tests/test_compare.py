"""`tunesmith compare`: one training run per method, each in its own process, tabulated side by side."""
import csv
import io

from tunesmith.cli.main import main


def test_compare_trains_each_method_and_tabulates_them(tmp_path, tiny_model_dir, instruction_file, capsys):
    out = tmp_path / "cmp"
    args = ["compare", f"model.name={tiny_model_dir}", f"data.path={instruction_file}", "data.val_size=8",
            "train.max_steps=3", "train.micro_batch_size=4", "eval.max_examples=8", "eval.samples=2",
            "eval.max_new_tokens=4", "model.dtype=float32", "--out", str(out), "--methods"]
    assert main([*args, "lora,no-such-method"]) == 2 and not out.exists()
    assert "unknown method 'no-such-method'; available: full, lora," in capsys.readouterr().err
    assert main([*args, "lora,bitfit,ia3"]) == 1  # a Llama has no biases: bitfit fails, the others still run
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "table.csv").read_text()))}
    assert "has none; use ia3" in rows["bitfit"]["error"]
    for method in ("lora", "ia3"):
        assert rows[method]["weights"] == "float32"
        assert 0 < float(rows[method]["held-out loss"]) < float(rows[method]["base loss"]) + 1
        assert int(rows[method]["trainable params"]) > 0 and float(rows[method]["tok/s"]) > 0
    assert int(rows["lora"]["trainable params"]) > int(rows["ia3"]["trainable params"])
    table = (out / "table.md").read_text()
    assert table.startswith("| method | weights | task metric |") and "| untrained base | - |" in table
    assert (out / "chart.png").stat().st_size > 0
    assert main([*args, "lora"]) == 2  # never into a folder that holds a comparison already
    assert "already exists" in capsys.readouterr().err


def test_the_table_says_which_metric_a_reward_or_rl_comparison_carries(tmp_path):
    import json

    from tunesmith.evaluate.compare import _row, to_markdown
    from tunesmith.run import RunDir

    def run(name, task, before, after):
        folder = RunDir(tmp_path / name)
        folder.path.mkdir()
        folder.summary.write_text(json.dumps({"task": task, "before": before, "after": after, "dtype": "float32",
                                              "params": {"trainable": 10}, "tok_s": 1.0}))
        return _row(name, folder.path, 1.0, 2 ** 30)

    reward = run("rm", "reward", {"eval_accuracy": 0.5, "eval_loss": 0.69}, {"eval_accuracy": 0.7, "eval_loss": 0.6})
    assert (reward["task metric"], reward["base metric"]) == (70.0, 50.0)
    assert "pairwise accuracy" in to_markdown([reward])
    rl = run("grpo", "rl", {"eval_reward": 0.25}, {"eval_reward": 0.5})
    assert (rl["task metric"], rl["base metric"]) == (0.5, 0.25)
    assert "mean total reward" in to_markdown([rl]) and "ROUGE" not in to_markdown([rl])
