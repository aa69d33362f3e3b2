"""A toy objective and its task, declared in this one module (tests/test_task_declarations.py registers it with one
line): supervised fine-tuning judged by its held-out token error rate, lower is better, on a model with a
classifier's head as far as `tunesmith plan` is concerned. Everything the product shows of a toy run is declared here."""
from tunesmith.catalog import LEARNING_RATE, SPEED, TRAIN_LOSS, Chart, Curve, Detail, TaskShows, TaskSpec, Verdict
from tunesmith.objectives.sft import SFT


class Toy(SFT):
    task = "toy"

    def measure(self, model, examples):
        m = super().measure(model, examples)
        return {"eval_toy_error": round(1 - m["eval_token_accuracy"], 5), **m}


OBJECTIVE = Toy

SHOWS = TaskShows(
    headline="eval_toy_error", higher_is_better=False, label="held-out toy error", percent=True,
    verdict=Verdict("eval_toy_error", "held-out toy error", ".1%", good="falls", details=(Detail("eval_loss", "loss"),),
                    note="a toy"),
    charts=(Chart("toy error", "error", (Curve("eval_toy_error", "held-out toy error", held_out=True),)),
            Chart("loss", "loss", (TRAIN_LOSS,)), LEARNING_RATE, SPEED),
    evaluates="generation", compare_headline=True, compare_kind="held-out toy error (%), lower is better")
TASK = TaskSpec("toy", "toy_objective", "instruction records", ("instruction",), ("eval_toy_error", "eval_loss"),
                lower_is_better=("eval_toy_error", "eval_loss"), head="classes", shows=SHOWS)
