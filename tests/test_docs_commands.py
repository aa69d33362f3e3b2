"""Every `tunesmith ...` command the README and docs/*.md print (docs/history/ is a record, not a manual) parses: its
subcommand and flags exist (tunesmith's own argparse parser), its recipe is a built-in one or a file the reader
supplies, its `key=value` overrides are config keys with valid values (the config loader, as `train` runs it), and
its data paths name a known data set. The quick ones (`recipes`, `config show`, `data sources`) are run. Nothing
trains here."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tunesmith.cli.main import build_parser, main
from tunesmith.config import list_recipes, load_config
from tunesmith.data import sources

ROOT = Path(__file__).resolve().parents[1]
MANUAL = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
WITH_CONFIG = {"train", "plan", "compare", "show", "inspect"}   # subcommands taking RECIPE|FILE key=value...
BUILTIN_DATA = ("builtin:docstrings", "builtin:arithmetic", "builtin:arithmetic-test", "builtin:countdown",
                "builtin:countdown-test")


def _commands(path: Path) -> list[tuple[str, str, bool]]:
    """(where, command, whole) for each `tunesmith ...` in a fenced block (continuation lines joined: a whole command)
    or an inline span (maybe a subcommand and a flag only, e.g. `tunesmith train --resume`)."""
    text = path.read_text(encoding="utf-8")
    found = []
    for block in re.finditer(r"^```[a-z]*\n(.*?)^```", text, re.S | re.M):
        line_no = text.count("\n", 0, block.start()) + 2
        joined = re.sub(r"\\\n\s*", " ", block.group(1))
        for k, line in enumerate(joined.splitlines()):
            hit = re.search(r"(?:^|\s)(tunesmith\s.*|tunesmith$)", line.strip())
            if hit and not line.strip().startswith("#"):
                found.append((f"{path.name}:{line_no + k}", hit.group(1), True))
    for span in re.finditer(r"(?<!`)`(tunesmith(?:\s[^`]*)?)`(?!`)", text):
        found.append((f"{path.name}:{text.count(chr(10), 0, span.start()) + 1}", span.group(1), False))
    return found


ALL = [c for p in MANUAL for c in _commands(p)]
# Spans that elide part of a command (`tunesmith eval ... --runs`) say which flag matters, not a whole command.
CHECKED = [(w, c, whole) for w, c, whole in ALL if "..." not in c]
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")   # NAME, N, RUN_DIR: the reader fills it in


def test_the_manual_prints_commands():
    assert len([c for c in CHECKED if c[2]]) > 60, len(CHECKED)
    assert len(ALL) - len(CHECKED) < 15


def _argv(command: str) -> list[str]:
    """The arguments after `tunesmith`, up to a shell redirection or pipe; usage brackets dropped."""
    words = shlex.split(re.sub(r"\[(-[^\]]*)\]", r"\1", command), comments=True)[1:]   # [--port 8765]
    cut = next((i for i, w in enumerate(words) if w in (">", "|", "&", "&&", ";", "2>&1")), len(words))
    return words[:cut]


def _subparser(parser, names: list[str]):
    """The parser of `tunesmith a b` and how many words named it."""
    used = 0
    while used < len(names):
        actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not actions or names[used] not in actions[0].choices:
            break
        parser, used = actions[0].choices[names[used]], used + 1
    return parser, used


def _names_exist(where: str, argv: list[str]) -> None:
    """For a span that names a subcommand and flags without a whole command line."""
    parser, used = _subparser(build_parser(), argv)
    assert used, f"{where}: no subcommand {argv[:1]}"
    options = {o for a in parser._actions for o in a.option_strings}
    unknown = [w for w in argv[used:] if w.startswith("-") and w.split("=")[0] not in options]
    assert not unknown, f"{where}: `tunesmith {' '.join(argv[:used])}` has no option {unknown}"


def _known_recipe_or_file(config: str | None, sub: str) -> None:
    if config is None or config in list_recipes() or "=" in config:
        return
    if sub == "inspect" and (config.startswith(("builtin:", sources.PREFIX)) or Path(config).suffix):
        return   # a data file
    assert Path(config).suffix in (".yaml", ".yml"), f"{config!r} is no built-in recipe ({', '.join(list_recipes())})"


def _check_data(spec: str) -> None:
    if spec.startswith("builtin:"):
        assert spec in BUILTIN_DATA, spec
    elif spec.startswith(sources.PREFIX):
        name, _, file = spec[len(sources.PREFIX):].partition("/")
        assert name in sources.SOURCES and file in sources.SOURCES[name].outputs, f"{spec}: no such data set file"


@pytest.mark.parametrize("where,command,whole", CHECKED, ids=[w for w, _, _ in CHECKED])
def test_a_printed_command_parses_and_names_what_exists(where, command, whole, capsys):
    argv = _argv(command)
    if not argv:
        return   # `tunesmith` itself
    if not whole or any(PLACEHOLDER.match(w) for w in argv):
        _names_exist(where, argv)
        if any(PLACEHOLDER.match(w) for w in argv) or argv[:1] in (["eval"], ["serve"], ["export"], ["chat"]):
            return   # needs what the reader has (a run, a value); the names are checked
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit:
        if not whole:
            return   # a subcommand and flags in prose: their names are checked above
        pytest.fail(f"{where}: `{command}` does not parse: {capsys.readouterr().err.strip()}")
    assert all("=" in x and not x.startswith("-") for x in extra), f"{where}: unknown arguments {extra}"
    if not argv:
        return
    sub = argv[0] if argv[0] not in ("config", "data") or len(argv) == 1 else argv[1]
    if sub in WITH_CONFIG:
        config, overrides = args.config, list(args.overrides) + extra
        if config and "=" in config:
            config, overrides = None, [config] + overrides
        _known_recipe_or_file(config, sub)
        if sub == "inspect" and config and config not in list_recipes() and not config.endswith((".yaml", ".yml")):
            config, overrides = None, [f"data.path={config}"] + overrides
        if config and config not in list_recipes():
            config = None   # a YAML file the reader writes: its keys are checked on the default recipe
        cfg = load_config(config, overrides)   # unknown keys and bad values fail here, as for `tunesmith train`
        for spec in [cfg.data.path] if isinstance(cfg.data.path, str) else cfg.data.path:
            _check_data(spec)
    if sub == "eval" and args.data:
        _check_data(args.data)
    if sub == "get":
        assert set(args.names) <= {*sources.SOURCES, "all"}, f"{where}: unknown data set in {args.names}"
    if sub == "recipes":
        assert not argv[1:], where


QUICK = sorted({" ".join(_argv(c)) for _, c, _ in CHECKED
                if _argv(c)[:1] == ["recipes"] or _argv(c)[:2] in (["data", "sources"], ["config", "methods"])
                or (_argv(c)[:2] == ["config", "show"] and not any(a.endswith((".yaml", ".yml")) for a in _argv(c)))})


@pytest.mark.parametrize("command", QUICK)
def test_the_quick_commands_run(command, capsys):
    assert main(command.split()) == 0
    assert capsys.readouterr().out.strip()


def test_the_quick_commands_are_there():
    assert "recipes" in QUICK and any(c.startswith("config show") for c in QUICK), QUICK


def test_no_manual_page_points_into_this_projects_own_folders():
    for path in MANUAL:
        assert "../shared" not in path.read_text(encoding="utf-8"), path.name
    for recipe in list_recipes().values():
        assert "../shared" not in recipe.read_text(encoding="utf-8"), recipe.name
