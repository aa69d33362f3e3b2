"""The built-in task: summarise a Python standard-library docstring in one sentence.

Records: instruction "Summarize what `X` does.", input = the docstring body,
output = its first sentence, group = the top-level module (train/test are split
by module, so no module leaks). Built from the running interpreter, so no download
is needed; deterministic for a given Python version. Importing the whole standard
library has side effects, so the records are built in a child process
(`python -m tunesmith.data.docstrings OUT`) and cached as JSONL.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import warnings
from pathlib import Path

SKIP = {"this", "antigravity", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "pydoc_data",
        "lib2to3", "ensurepip", "venv", "test", "idle", "xxsubtype", "msvcrt", "winreg", "winsound",
        "encodings", "_winapi", "nt", "_msi", "msilib", "readline", "webbrowser"}
BUILDER_VERSION = 1


def cached_path() -> Path:
    """Build once per Python version into the tunesmith cache; return the JSONL path."""
    from tunesmith.paths import cache_root, child_env

    v = sys.version_info
    out = cache_root() / "data" / f"docstrings-py{v.major}.{v.minor}.{v.micro}-v{BUILDER_VERSION}.jsonl"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        subprocess.run([sys.executable, "-m", "tunesmith.data.docstrings", str(tmp)], check=True, env=child_env(),
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
        os.replace(tmp, out)
    return out


def split_docstring(doc: str) -> tuple[str, str]:
    """(first sentence, the rest) of a docstring."""
    doc = inspect.cleandoc(doc)
    first_para, _, rest = doc.partition("\n\n")
    para = " ".join(line.strip() for line in first_para.splitlines())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    if m and len(m.group(1)) < len(para):
        summary, tail = m.group(1), para[len(m.group(1)):].strip()
        body = (tail + "\n\n" + rest).strip() if rest else tail
    else:
        summary, body = para, rest.strip()
    return summary.strip(), body


def _records_for(module, seen: set) -> list[dict]:
    out = []
    top = module.__name__.split(".")[0]

    def add(qual: str, obj) -> None:
        doc = getattr(obj, "__doc__", None)
        if not isinstance(doc, str) or qual in seen:
            return
        summary, body = split_docstring(doc)
        if (summary, body) in seen:
            return
        if not (15 <= len(summary) <= 250) or not (100 <= len(body) <= 1500):
            return
        if re.match(r"^[\w.]+\(.*\)\s*(->.*)?$", summary):  # a C signature line, not a summary
            return
        seen.update((qual, (summary, body)))
        out.append({"instruction": f"Summarize what `{qual}` does.", "input": body, "output": summary, "group": top})

    name = module.__name__
    add(name, module)
    for key, value in sorted(vars(module).items()):
        if key.startswith("_") or getattr(value, "__module__", None) not in (name, "_" + name.split(".")[-1]):
            continue
        if inspect.isclass(value):
            add(f"{name}.{key}", value)
            for mk, mv in sorted(vars(value).items()):
                if not mk.startswith("_") and (inspect.isfunction(mv) or inspect.ismethoddescriptor(mv)
                                               or isinstance(mv, (property, classmethod, staticmethod))):
                    add(f"{name}.{key}.{mk}", getattr(mv, "__func__", mv))
        elif inspect.isfunction(value) or inspect.isbuiltin(value):
            add(f"{name}.{key}", value)
    return out


def _import_quietly(name: str):
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module(name)
    except BaseException:
        return None


def build() -> list[dict]:
    warnings.simplefilter("ignore")
    names = sorted(n for n in sys.stdlib_module_names if n not in SKIP and not n.startswith(("_", "test")))
    modules = []
    for n in names:
        m = _import_quietly(n)
        if m is None:
            continue
        modules.append(m)
        if hasattr(m, "__path__"):
            for info in pkgutil.walk_packages(m.__path__, n + ".", onerror=lambda _: None):
                if any(s in info.name for s in (".test", "tests", "__main__", "idle")):
                    continue
                sub = _import_quietly(info.name)
                if sub is not None:
                    modules.append(sub)
    seen: set = set()
    records = []
    for m in modules:
        records.extend(_records_for(m, seen))
    return records


if __name__ == "__main__":
    rows = build()
    with open(sys.argv[1], "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
