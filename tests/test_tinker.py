"""The studio's Tinker training API driven by the official `tinker` SDK (TINKER_BASE_URL / TINKER_API_KEY pointed at the
studio), on a tiny model built here: every primitive, the numbers against tunesmith's own training, and the house
rules (the key, idle sessions, a saved state served as a run)."""
import json
import math

import numpy as np
import pytest
import torch

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

from conftest import write_jsonl  # noqa: E402
from test_studio import Running  # noqa: E402


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model_dir):
    s = Running(tmp_path_factory.mktemp("tinker-studio"), models_dirs=(tiny_model_dir.parent,))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def service(studio):
    client = tinker.ServiceClient(base_url=studio.url, api_key=studio.key)
    yield client
    client.close("success").result()


def datum(tokens: list[int], weights: list[float] | None = None) -> types.Datum:
    """Next-token prediction on `tokens`: the input is all but the last, the targets all but the first."""
    inputs, targets = tokens[:-1], tokens[1:]
    return types.Datum(model_input=types.ModelInput.from_ints(inputs),
                       loss_fn_inputs={"target_tokens": targets,
                                       "weights": weights if weights is not None else [1.0] * len(targets)})


def state_folder(studio, path: str):
    """Where the studio keeps a saved state (tinker://RUN/KIND/NAME)."""
    run, kind, name = path.removeprefix("tinker://").split("/")
    return studio.app.state.runner.home / "tinker" / run.replace(":", "_") / kind / name


def test_capabilities_session_and_a_lora_client_with_its_tokenizer(studio, service, tiny_model_dir):
    caps = tinker.RestClient(base_url=studio.url, api_key=studio.key).get_server_capabilities().result()
    assert tiny_model_dir.name in [m.model_name for m in caps.supported_models]
    tc = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0).result()
    info = tc.get_info()
    assert info.lora_rank == 4 and info.model_data.model_name == str(tiny_model_dir)
    tok = tc.get_tokenizer()  # resolves offline: the model is named by its folder
    assert tok.encode("hello world") and tok.eos_token == "<|im_end|>"


def test_cross_entropy_forward_backward_optim_step_lowers_the_loss(service, tiny_model_dir, tiny_tokenizer):
    tc = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0).result()
    rows = [tiny_tokenizer.encode(t) for t in ("Return the sum of two numbers.", "hello world, how are you today?")]
    data = [datum(r) for r in rows]
    first = tc.forward(data, "cross_entropy").result()
    assert len(first.loss_fn_outputs) == 2
    lp = first.loss_fn_outputs[0]["logprobs"].to_numpy()
    assert lp.shape == (len(rows[0]) - 1,) and (lp < 0).all()
    assert first.metrics["loss:sum"] == pytest.approx(-sum(o["logprobs"].to_numpy().sum() for o in first.loss_fn_outputs),
                                                      rel=1e-5)
    losses = []
    for _ in range(8):
        fb = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=3e-2))
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    assert losses[0] == pytest.approx(first.metrics["loss:sum"], rel=1e-5)  # forward alone changed nothing
    assert losses[-1] < 0.7 * losses[0], losses


def test_one_forward_backward_and_optim_step_is_one_tunesmith_training_step(studio, service, tmp_path, tiny_model_dir,
                                                                            instruction_file):
    """The same rows, LoRA (rank 4, alpha 32, every linear layer of the blocks, seed 0), AdamW and clipping: the loss
    at step 0 and the adapter after one step agree with `tunesmith train`'s."""
    from safetensors.torch import load_file

    from test_train import tiny_cfg
    from tunesmith.assemble import assemble
    from tunesmith.train.loop import train

    n_train = 6
    rows = [json.loads(x) for x in instruction_file.read_text().splitlines()][:n_train + 8]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = tiny_cfg(tmp_path, tiny_model_dir, data, "method.name=lora", "method.r=4", "method.alpha=32",
                   "train.max_steps=1", f"train.micro_batch_size={n_train}", "train.warmup=0",
                   "train.schedule=constant", "train.lr=1e-2", "train.max_grad_norm=1.0", "train.weight_decay=0.0",
                   "model.dtype=float32", "train.mixed_precision=no", "train.seed=0", "eval.samples=0")
    res = train(cfg)
    step1 = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()][1]
    tuned = load_file(res.run_dir / "final" / "adapter_model.safetensors")

    split = assemble(cfg, torch.device("cpu"), with_model=False).data.train.tokens
    assert len(split) == n_train
    label_tokens = sum(int((t.labels[1:] != -100).sum()) for t in split)
    batch = []
    for t in split:
        ids = t.input_ids.tolist()
        trained = (t.labels[1:] != -100).astype(np.float32) / label_tokens
        batch.append(types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                 loss_fn_inputs={"target_tokens": ids[1:], "weights": trained.tolist()}))
    tc = service.create_lora_training_client(base_model=str(tiny_model_dir), rank=4, seed=0,
                                             train_unembed=False).result()
    fb = tc.forward_backward(batch, "cross_entropy")
    opt = tc.optim_step(types.AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                         grad_clip_norm=1.0))
    loss = fb.result().metrics["loss:sum"]
    opt.result()
    print(f"step-0 loss: tunesmith {step1['loss']:.8f}  tinker {loss:.8f}")
    assert loss == pytest.approx(step1["loss"], abs=1e-4)

    saved = tc.save_state("after-one-step").result()
    ours = load_file(state_folder(studio, saved.path) / "adapter_model.safetensors")
    assert set(ours) == set(tuned)
    worst_a = max(float((ours[k] - tuned[k]).abs().max()) for k in tuned if "lora_A" in k)
    worst_b = max(float((ours[k] - tuned[k]).abs().max()) for k in tuned if "lora_B" in k)
    moved = max(float(tuned[k].abs().max()) for k in tuned if "lora_B" in k)
    print(f"after one step: max |A diff| {worst_a:.2e}, max |B diff| {worst_b:.2e} (B moved by up to {moved:.2e})")
    assert worst_a == 0.0 or worst_a < 1e-7  # the same initialisation (A gets no gradient at step 1: B starts at 0)
    assert moved > 1e-3 and worst_b < 1e-5
