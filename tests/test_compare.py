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
