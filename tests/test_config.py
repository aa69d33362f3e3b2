from pathlib import Path

import pytest

from tunesmith.config import Config, load_config, list_recipes
from tunesmith.cli.docs import config_reference, methods_matrix, with_current_matrix
from tunesmith.errors import TunesmithError


def test_default_recipe_loads_and_overrides_apply():
    cfg = load_config(None, ["train.max_steps=20", "method.name=full", "data.columns={instruction: q}"])
    assert cfg.train.max_steps == 20 and cfg.method.name == "full"
    assert cfg.data.columns == {"instruction": "q"}
    assert cfg.recipe == "docstrings"


@pytest.mark.parametrize("override, expected", [
    ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'lr'?)"),
    ("modle.name=x", "unknown config key 'modle' (did you mean 'model'?)"),
    ("train.lr=abc", "config key 'train.lr' has value 'abc'"),
    ("method.name=lorra", "config key 'method.name' has value 'lorra'"),
    ("train.micro_batch_size=0", "greater than or equal to 1"),
    ("notakeyvalue", "is not key=value"),
])
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(TunesmithError) as e:
        load_config(None, [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_recipe_suggests(tmp_path):
    with pytest.raises(TunesmithError, match="did you mean 'docstrings'"):
        load_config("docstring")


def test_yaml_file_and_bad_yaml(tmp_path):
    good = tmp_path / "my.yaml"
    good.write_text("train:\n  max_steps: 3\n")
    assert load_config(str(good)).train.max_steps == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [\n")
    with pytest.raises(TunesmithError, match="not valid YAML"):
        load_config(str(bad))


def test_every_recipe_validates_and_opens_with_its_command():
    for name, path in list_recipes().items():
        assert isinstance(load_config(name), Config)
        assert path.read_text().startswith("# tunesmith train"), f"{name} must open with the command that runs it"


def test_config_docs_are_current():
    docs = Path(__file__).parents[1] / "docs" / "config.md"
    assert docs.read_text() == config_reference(), "run: tunesmith config docs > docs/config.md"


def test_the_method_support_matrix_in_the_docs_is_generated_from_the_catalog():
    docs = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    assert methods_matrix() in docs and with_current_matrix(docs) == docs, "run: make docs"


def test_deepspeed_config_passes_through_but_not_the_keys_tunesmith_sets(tmp_path):
    import json

    from tunesmith.config import check_combinations
    from tunesmith.train.zero import engine_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000, "overlap_comm": True}}))
    cfg = load_config(None, ["train.distributed=deepspeed", f"train.deepspeed_config={user}", "train.micro_batch_size=4",
                             "train.grad_accum=2", "train.zero_stage=1"])
    ds = engine_config(cfg.train, world=3)
    assert ds["zero_optimization"] == {"reduce_bucket_size": 1000, "overlap_comm": True, "stage": 1}
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 1.0
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(TunesmithError, match="remove optimizer"):
        engine_config(cfg.train, world=3)
    with pytest.raises(TunesmithError, match="zero_stage"):
        load_config(None, ["train.distributed=deepspeed", "train.zero_stage=3"])
    with pytest.raises(TunesmithError, match="qlora"):
        check_combinations(load_config(None, ["train.distributed=deepspeed", "method.name=qlora"]))


def test_recipes_and_config_show_from_the_cli(capsys):
    import yaml

    from tunesmith.cli.main import main

    assert main(["recipes"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert sorted(listed) == sorted(list_recipes())
    assert main(["config", "show", "tldr", "train.lr=5e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == 5e-4 and shown["method"]["freeze_layers"] == 10  # the recipe's, then the override
    assert main(["config", "show", "tldr", "train.lrr=5e-4"]) == 2
    assert "unknown config key 'train.lrr' (did you mean 'lr'?)" in capsys.readouterr().err


def test_a_listing_piped_into_a_reader_that_leaves_early_ends_quietly():
    """`tunesmith recipes | head -1`: no BrokenPipeError traceback on stderr."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import sys; from tunesmith.cli.main import main; sys.exit(main(['recipes']))"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.close()  # the reader leaves before the listing is written
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_bare_no_is_the_value_no_not_false(tmp_path):
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML 1.1 reads no as false
    (tmp_path / "r.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(str(tmp_path / "r.yaml"), []).train.mixed_precision == "no"


def test_a_missing_start_run_names_the_recipe_that_makes_it_or_the_newest_finished_one(tmp_path):
    """arithmetic-grpo starts from runs/arithmetic-sft: without it the error was a failed hub lookup."""
    from tunesmith.config import check_start_run

    runs = tmp_path / "runs"
    cfg = load_config("arithmetic-grpo", [f"model.name={runs}/arithmetic-sft", f"output.dir={runs}"])
    with pytest.raises(TunesmithError, match="train it first: `tunesmith train arithmetic-sft`"):
        check_start_run(cfg)
    (runs / "arithmetic-sft-20261207-101010" / "final").mkdir(parents=True)
    with pytest.raises(TunesmithError, match="newest finished run of that recipe is .*arithmetic-sft-20261207-101010"):
        check_start_run(cfg)
    (runs / "arithmetic-sft").mkdir()
    check_start_run(cfg)  # present: nothing to say
    check_start_run(load_config("arithmetic-grpo", ["model.name=smollm2-135m-instruct"]))  # not a run: not this check's
