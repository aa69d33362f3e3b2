"""Generate docs/config.md from the config schema, so the reference cannot drift from the code."""
from __future__ import annotations

from tunesmith.config import Config, _describe_allowed


def config_reference() -> str:
    lines = ["# Config reference", "",
             "Generated from `src/tunesmith/config.py` by `tunesmith config docs > docs/config.md`.",
             "Set keys in a recipe YAML or override them on the command line: `tunesmith train my.yaml train.lr=1e-4`.", ""]
    for section, field in Config.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and hasattr(model, "model_fields")):
            continue
        lines += [f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, f in model.model_fields.items():
            default = f.default_factory() if f.default_factory else f.default
            default = "unset" if default is None else f"`{default}`" if default != {} else "`{}`"
            typ = _describe_allowed(f).replace("|", "\\|")
            meaning = (f.description or "").replace("|", "\\|")
            lines.append(f"| `{section}.{name}` | {typ} | {default} | {meaning} |")
        lines.append("")
    return "\n".join(lines)
