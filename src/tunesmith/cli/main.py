"""The `tunesmith` command: a thin layer over the library. Errors print as one line and exit 2."""
from __future__ import annotations

import os

from tunesmith.native_env import set_native_defaults  # noqa: E402

# Before torch (and its OpenMP runtime) loads: threads spin only briefly when waiting, so a busy neighbour core does
# not stall every parallel region; oneDNN keeps enough bfloat16 kernels for training's many shapes (native_env.py).
# Never reach for the hub for bundled or local models.
set_native_defaults()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from tunesmith.errors import TunesmithError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    # bitsandbytes warns on import that an optional CPU kernel package is missing; it works without it
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`data inspect FILE -n 2 data.template=qa`)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if getattr(args, "data_dir", None):  # for this process and the ones it starts (torchrun workers, compare's runs)
        os.environ["TUNESMITH_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
    try:
        return args.func(args) or 0
    except TunesmithError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tunesmith recipes | head`: the reader left; say nothing more (Python's documented way)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


# `tunesmith compare`'s default: every method that trains SmolLM2 (BitFit needs biases) and is not slow on a CPU
# (LoRA-int8's int8 matmuls)
COMPARED_METHODS = ("full", "lora", "qlora", "ia3", "prompt-tuning", "prefix-tuning", "adapters")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune pretrained language models end to end.")
    sub = p.add_subparsers(metavar="COMMAND")

    t = sub.add_parser("train", help="train a recipe (default: the built-in docstring task)")
    t.add_argument("config", nargs="?", help="recipe name (see `tunesmith recipes`) or YAML file")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory of the same name")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its newest good checkpoint "
                   "(its config.yaml is used; overrides still apply)")
    t.add_argument("--force-resume", action="store_true", help="resume even if the data or base model changed")
    t.add_argument("--force", action="store_true", help="train even if the memory estimate says it will not fit")
    t.add_argument("--nproc", type=int, help="data-parallel processes on this node (re-launches itself under torchrun)")
    t.add_argument("--nnodes", type=int, default=1, help="nodes taking part (multi-node: run the same command on each)")
    t.add_argument("--node-rank", type=int, default=0)
    t.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (multi-node)")
    t.add_argument("--master-port", type=int, default=29500)
    _data_dir_flag(t)
    t.set_defaults(func=cmd_train)

    pl = sub.add_parser("plan", help="estimate peak memory and training time before running")
    pl.add_argument("config", nargs="?", help="recipe name or YAML file (default: the default recipe)")
    pl.add_argument("overrides", nargs="*", metavar="key=value")
    pl.add_argument("--json", action="store_true", help="print the estimate as JSON")
    _data_dir_flag(pl)
    pl.set_defaults(func=cmd_plan)

    ev = sub.add_parser("eval", help="score a finished run (and the base) against references; writes report.html")
    ev.add_argument("run", help="a run directory (runs/NAME)")
    ev.add_argument("--data", help="evaluation data file (default: the run's validation split)")
    ev.add_argument("-n", type=int, default=50, help="examples to evaluate (default 50, spread over the data)")
    ev.add_argument("--no-base", action="store_true", help="skip the base model")
    ev.add_argument("--base", action="store_true", help="include the base model (the default)")
    ev.add_argument("--runs", nargs="*", default=[], help="other run directories to put side by side")
    ev.add_argument("--show", type=int, default=8, help="examples in the side-by-side table")
    ev.add_argument("--max-new-tokens", type=int, help="generation cap (default: the run's eval.max_new_tokens)")
    ev.add_argument("--num-beams", type=int, help="beam search width (default: the run's eval.num_beams; 1 = greedy)")
    ev.add_argument("--samples", type=int, metavar="K", help="headroom for RL: pass@1 (greedy) against pass@K of K samples "
                    "(K >= 2), best-of-K for other rewards; checks: an RL run's rewards, or --check")
    ev.add_argument("--check", action="append", default=[], metavar="KIND[:ARG]", help="with --samples: what a right "
                    "answer is, e.g. numeric:answer, exact:answer, 'regex:#### -?[0-9]+', function:FILE.py:NAME, model:RUN")
    ev.add_argument("--temperature", type=float, help="with --samples: sampling temperature (default: the run's rl.temperature)")
    ev.add_argument("--judge", nargs="+", metavar="JUDGE", help="compare the run with one --runs run (or the base) "
                    "pairwise: a reward-model run (runs/NAME) or an OpenAI-compatible endpoint (http://host:port/v1); "
                    "several judges judge the same answers")
    ev.add_argument("--judge-model", metavar="NAME", help="with an endpoint --judge: the model the endpoint serves")
    _data_dir_flag(ev)
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="merge and save as a Hugging Face model, a verified GGUF (+ Ollama Modelfile), or the adapter")
    ex.add_argument("run", help="a run directory (runs/NAME)")
    ex.add_argument("--format", choices=["hf", "gguf", "adapter"], default="hf")
    ex.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="weights of the export (default f32)")
    ex.add_argument("--quant", choices=["q8_0"], help="GGUF quantization (instead of --dtype)")
    ex.add_argument("--out", help="output folder (default: RUN_DIR/export/FORMAT)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export")
    ex.set_defaults(func=cmd_export)

    cm = sub.add_parser("compare", help="train the same recipe once per method and tabulate the results")
    cm.add_argument("config", nargs="?", help="recipe name or YAML file (default: the default recipe)")
    cm.add_argument("overrides", nargs="*", metavar="key=value")
    cm.add_argument("--methods", default=",".join(COMPARED_METHODS),
                    help="comma-separated method names (default: %(default)s)")
    cm.add_argument("--out", help="output folder (default: runs/compare-<recipe>-<time>)")
    _data_dir_flag(cm)
    cm.set_defaults(func=cmd_compare)

    r = sub.add_parser("recipes", help="list the built-in recipes")
    r.set_defaults(func=cmd_recipes)

    c = sub.add_parser("config", help="config utilities")
    csub = c.add_subparsers(metavar="ACTION")
    cs = csub.add_parser("show", help="print the fully resolved config")
    cs.add_argument("config", nargs="?")
    cs.add_argument("overrides", nargs="*", metavar="key=value")
    cs.set_defaults(func=cmd_config_show)
    cd = csub.add_parser("docs", help="print the config reference (docs/config.md)")
    cd.set_defaults(func=cmd_config_docs)
    cmx = csub.add_parser("methods", help="print the method support matrix (generated into docs/methods.md)")
    cmx.set_defaults(func=cmd_config_methods)

    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(metavar="ACTION")
    di = dsub.add_parser("inspect", help="show what training will see: format, counts, lengths, masked examples")
    di.add_argument("config", nargs="?", help="a data file, or a recipe name / YAML file (default: the default recipe)")
    di.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.columns={instruction: question}")
    di.add_argument("-n", type=int, default=3, help="rendered examples to show (default 3)")
    _data_dir_flag(di)
    di.set_defaults(func=cmd_data_inspect)
    dg = dsub.add_parser("get", help="download a built-in recipe's public data set, convert it, check its checksums")
    dg.add_argument("names", nargs="+", metavar="NAME", help="data set names (`tunesmith data sources` lists them), or all")
    _data_dir_flag(dg)
    dg.set_defaults(func=cmd_data_get)
    dl = dsub.add_parser("sources", help="list the public data sets behind the built-in recipes, and which are present")
    _data_dir_flag(dl)
    dl.set_defaults(func=cmd_data_sources)

    g = sub.add_parser("generate", help="generate text from a tuned run or a model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run directory (runs/NAME)")
    src.add_argument("--model", help="a model name or path (as in model.name)")
    g.add_argument("prompt", nargs="+")
    _sampling_flags(g)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--raw", action="store_true", help="the prompt as it is: no chat or text template (a run is prompted as "
                   "it was trained by default: its template and system prompt)")
    g.add_argument("--system", help="system message (chat-template models; replaces a run's data.system_prompt)")
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="interactive chat with a run or a model (streaming; /reset, /system, /quit)")
    ch.add_argument("source", help="a run directory or a model name/path")
    _sampling_flags(ch)
    ch.set_defaults(func=cmd_chat)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP API for runs or a model")
    sv.add_argument("sources", nargs="+", help="run directories (adapters on one base) or one model name/path")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--merge", action="store_true", help="merge a single adapter into the base (faster generation)")
    sv.add_argument("--api-key", help="require `Authorization: Bearer KEY` (needed to bind a non-loopback address)")
    sv.add_argument("--insecure", action="store_true", help="bind a non-loopback address without an API key (anyone who "
                    "can reach it can use it)")
    sv.add_argument("--max-waiting", type=int, default=256, help="queued requests at most; beyond, 429 (default 256)")
    sv.add_argument("--max-tokens-cap", type=int, default=1024, help="max_tokens is capped at this (default 1024)")
    sv.add_argument("--rows", type=int, default=32, help="requests generated together at most (default 32)")
    sv.set_defaults(func=cmd_serve)

    st = sub.add_parser("studio", help="a local fine-tuning server speaking OpenAI's fine-tuning API (docs/studio.md)")
    st.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback: this machine only)")
    st.add_argument("--port", type=int, default=8765)
    st.add_argument("--home", default="studio", help="where files, jobs, runs and studio.db live (default ./studio)")
    st.add_argument("--api-key", help="the key clients send (Authorization: Bearer KEY or X-API-Key: KEY; default: a "
                    "key made at the first start and kept in HOME/.token; needed to bind a non-loopback address)")
    st.add_argument("--no-auth", action="store_true", help="no key at all (loopback only): every local process and user "
                    "can then use the studio, i.e. run jobs and read its files")
    st.add_argument("--models", action="append", default=[], metavar="DIR", help="a folder of models requests may name "
                    "(by their path inside DIR); repeatable. Default: bundled models and the studio's own jobs only")
    st.add_argument("--data-root", action="append", default=[], metavar="DIR", help="a folder whose files data.path / "
                    "data.val_path may name over HTTP; repeatable. Default: uploaded files only")
    st.add_argument("--allow-code", action="store_true", help="let requests run code and reach anything: function "
                    "rewards, teachers and data by path, hub downloads, any config key")
    st.add_argument("--workers", type=int, help="jobs trained at once; the rest wait in the queue (default 1; with "
                    "--executor ray: all, Ray queues what the cluster has no room for)")
    st.add_argument("--executor", choices=("local", "ray"), default="local", help="where jobs run: local subprocesses "
                    "(default), or a Ray cluster (--ray-address; the home on storage every node sees: docs/scaling.md)")
    st.add_argument("--ray-address", metavar="URL", help="the Ray cluster's job server, e.g. http://HEAD:8265")
    st.add_argument("--ray-cpus", type=float, default=1, help="CPUs a Ray job asks for unless its request's "
                    "tunesmith.resources says (default 1)")
    st.add_argument("--ray-gpus", type=float, default=0, help="GPUs a Ray job asks for by default (default 0)")
    st.add_argument("--ray-memory-gb", type=float, help="memory a Ray job asks for by default (default: none asked)")
    st.add_argument("--max-file-mb", type=int, default=512, help="largest upload accepted (default 512 MB)")
    st.add_argument("--runs", action="append", default=[], help="a runs folder the web page lists too (default: ./runs "
                    "when it exists; repeatable)")
    st.set_defaults(func=cmd_studio)
    return p


def _data_dir_flag(p) -> None:
    p.add_argument("--data-dir", metavar="DIR", help="the folder `datasets:NAME/FILE` paths are read from (default: "
                   "$TUNESMITH_DATA_DIR, else ~/.cache/tunesmith/data)")


def _sampling_flags(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)


def cmd_chat(args) -> int:
    from tunesmith.export.chat import chat_loop
    from tunesmith.methods.load import load_model, prompt_format
    from tunesmith.models import inference_dtype, load_tokenizer, pick_device, resolve_model_dir
    from tunesmith.models.generate import Sampling

    model_dir = resolve_model_dir(args.source)
    model = load_model(model_dir, inference_dtype(pick_device())).eval()
    chat_loop(model, load_tokenizer(model_dir), Sampling(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
              prompt_format(model_dir))
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from tunesmith.export.serve import build_app, is_loopback, load_served

    loopback = is_loopback(args.host)
    if not loopback and not args.api_key and not args.insecure:
        raise TunesmithError(f"--host {args.host} is reachable from other machines: pass --api-key KEY (clients send "
                             f"Authorization: Bearer KEY), or --insecure to serve it open")
    served = load_served(args.sources, args.merge, max_rows=args.rows, max_waiting=args.max_waiting,
                         max_tokens_cap=args.max_tokens_cap, api_key=args.api_key, loopback_only_hosts=loopback)
    print(f"serving {', '.join(served.names)} on http://{args.host}:{args.port}/v1 (OpenAI-compatible)"
          + ("" if args.api_key else "; no API key"), flush=True)
    uvicorn.run(build_app(served), host=args.host, port=args.port, log_level="warning",
                limit_concurrency=args.max_waiting + 64)
    return 0


def cmd_studio(args) -> int:
    from tunesmith.export.serve import is_loopback
    from tunesmith.studio.app import Studio, build_studio, run_studio

    loopback = is_loopback(args.host)
    if not loopback and not args.api_key:
        raise TunesmithError(f"--host {args.host} is reachable from other machines: pass --api-key KEY (clients send "
                             f"Authorization: Bearer KEY), and put TLS in front of it (docs/studio.md, Security)")
    if args.no_auth and (not loopback or args.api_key):
        raise TunesmithError("--no-auth is for a loopback address only, and without --api-key")
    if args.workers is not None and args.workers < 1:
        raise TunesmithError("--workers must be at least 1")
    for flag, folders in (("--models", args.models), ("--data-root", args.data_root)):
        missing = [f for f in folders if not Path(f).is_dir()]
        if missing:
            raise TunesmithError(f"{flag} {missing[0]}: no such folder")
    home = Path(args.home).resolve()
    executor = None
    if args.executor == "ray":
        if not args.ray_address:
            raise TunesmithError("--executor ray needs --ray-address (the cluster's job server, e.g. http://HEAD:8265)")
        from tunesmith.studio.ray_executor import RayExecutor

        executor = RayExecutor(args.ray_address, cpus=args.ray_cpus, gpus=args.ray_gpus, memory_gb=args.ray_memory_gb)
        args.workers = args.workers or 1000  # as many jobs at once as the cluster has room for: Ray queues the rest
    studio = Studio(home, api_key=args.api_key, loopback_only_hosts=loopback, workers=args.workers or 1, executor=executor,
                    max_file_bytes=args.max_file_mb << 20, no_auth=args.no_auth, allow_code=args.allow_code,
                    models_dirs=tuple(Path(d).resolve() for d in args.models),
                    data_roots=tuple(Path(d).resolve() for d in args.data_root),
                    runs_dirs=tuple(Path(r).resolve() for r in args.runs or (["runs"] if Path("runs").is_dir() else [])))
    app = build_studio(studio, port=args.port)
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::', '') else args.host}:{args.port}/"
    if studio.api_key:
        print(f"tunesmith studio, home {home}\n  web page:   {url}?token={studio.api_key}\n  OpenAI API: "
              f"base_url={url}v1 api_key={studio.api_key}" + ("" if args.api_key else f" (kept in {home / '.token'})")
              + f"\n  Tinker API: TINKER_BASE_URL={url.rstrip('/')} TINKER_API_KEY={studio.api_key}", flush=True)
    else:
        print(f"tunesmith studio on {url} (OpenAI API at {url}v1), home {home}; --no-auth: any local process or user "
              f"can use it", flush=True)
    if args.allow_code:
        print("  --allow-code: requests may run code and read files as this user", flush=True)
    run_studio(app, args.host, args.port)
    return 0


def _split_overrides(args) -> tuple[str | None, list[str]]:
    """`tunesmith train key=value` (no config) puts the first override in `config`."""
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:
        config, overrides = None, [config] + overrides
    return config, overrides


def cmd_train(args) -> int:
    from tunesmith.config import load_config

    if args.nproc and os.environ.get("WORLD_SIZE") is None:
        return _launch_torchrun(args)

    config, overrides = _split_overrides(args)
    resume = Path(args.resume) if args.resume else None
    if resume:
        if config:
            raise TunesmithError("--resume takes its config from the run directory; pass only key=value overrides")
        if not (resume / "config.yaml").exists():
            raise TunesmithError(f"--resume {resume}: not a tunesmith run directory (no config.yaml)")
        config = str(resume / "config.yaml")
    cfg = load_config(config, overrides)  # validates before anything heavy loads
    _check_data(cfg)
    from tunesmith.train.interrupt import TrainingInterrupted
    from tunesmith.train.loop import train

    try:
        train(cfg, resume=resume, force_resume=args.force_resume, force=args.force, overwrite=args.overwrite)
    except TrainingInterrupted as e:
        print(f"{e}\n{e.next_step}: {e.resume_command}", file=sys.stderr)
        return 130
    return 0


def _check_data(cfg) -> None:
    """A recipe's public data set missing from the data folder stops here, in one line naming the command that gets it."""
    from tunesmith.data.sources import check_present

    check_present(cfg.data.path, cfg.data.val_path)


def _launch_torchrun(args) -> int:
    """Re-run this very command under torchrun (gloo on CPU, NCCL on GPU is chosen inside)."""
    from tunesmith.config import load_config

    config, overrides = _split_overrides(args)
    _check_data(load_config(str(Path(args.resume) / "config.yaml") if args.resume else config, overrides))  # fail here, not N times
    rest = ([config] if config else []) + overrides
    for flag in ("overwrite", "force", "force_resume"):
        if getattr(args, flag):
            rest.append("--" + flag.replace("_", "-"))
    if args.resume:
        rest += ["--resume", args.resume]
    where = ["--standalone"] if args.nnodes == 1 else ["--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank),
                                                      "--master_addr", args.master_addr, "--master_port", str(args.master_port)]
    from tunesmith.train.launch import run_under_torchrun

    return run_under_torchrun(rest, args.nproc, where, log=lambda m: print(m, file=sys.stderr, flush=True))


def cmd_plan(args) -> int:
    import json

    from tunesmith.config import load_config
    from tunesmith.train.plan import plan_config

    config, overrides = _split_overrides(args)
    cfg = load_config(config, overrides)
    _check_data(cfg)
    plan = plan_config(cfg)
    if args.json:
        print(json.dumps({"parts": plan.parts, "total": plan.total, "available": plan.available, "fits": plan.fits,
                          "tokens": plan.tokens, "seconds": plan.seconds, "matmul_gflops": plan.matmul_gflops,
                          "matmul_dtype": str(plan.dtype).removeprefix("torch.")}, indent=1))
    else:
        print(plan.describe())
    return 0 if plan.fits else 1


def cmd_eval(args) -> int:
    from tunesmith.evaluate.evaluation import evaluate_run

    run = Path(args.run)
    if args.samples is not None and args.judge:
        raise TunesmithError("--samples K (headroom) and --judge (a pairwise comparison) are two evaluations: run one at a time")
    if args.samples is not None:
        from tunesmith.evaluate.headroom import evaluate_headroom

        evaluate_headroom(run, args.samples, args.data, args.n, tuple(args.check), not args.no_base,
                          tuple(Path(r) for r in args.runs), args.temperature, args.max_new_tokens)
        return 0
    if args.check or args.temperature is not None:
        raise TunesmithError("--check and --temperature go with --samples K")
    if args.judge:
        from tunesmith.evaluate.judge import judge_runs

        judge_runs(run, tuple(args.judge), args.judge_model, tuple(Path(r) for r in args.runs), args.data, args.n,
                   args.max_new_tokens)
        return 0
    evaluate_run(run, args.data, args.n, not args.no_base, tuple(Path(r) for r in args.runs), args.show, args.max_new_tokens,
                 num_beams=args.num_beams)
    print(f"report: {run / 'report.html'}")
    return 0


def cmd_export(args) -> int:
    from tunesmith.export.run import export_run

    if args.quant and args.format != "gguf":
        raise TunesmithError("--quant applies to --format gguf only")
    export_run(Path(args.run), args.format, args.dtype, args.quant, Path(args.out) if args.out else None, args.overwrite)
    return 0


def cmd_compare(args) -> int:
    from datetime import datetime

    from tunesmith.catalog import METHOD_NAMES
    from tunesmith.config import load_config
    from tunesmith.evaluate.compare import compare

    config, overrides = _split_overrides(args)
    cfg = load_config(config, overrides)  # fail fast on a bad recipe
    _check_data(cfg)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise TunesmithError(f"--methods: unknown method {unknown[0]!r}; available: {', '.join(METHOD_NAMES)}")
    out = Path(args.out or Path(cfg.output.dir) / f"compare-{cfg.recipe}-{datetime.now():%Y%m%d-%H%M%S}")
    rows = compare(config, overrides, methods, out)
    print((out / "table.md").read_text())
    print(f"written: {out / 'table.md'}, {out / 'table.csv'}, {out / 'chart.png'}")
    return 0 if all("error" not in r for r in rows) else 1


def cmd_recipes(args) -> int:
    from tunesmith.config import DEFAULT_RECIPE, list_recipes

    for name, path in list_recipes().items():
        lines = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
        about = next((ln for ln in lines[1:] if ln), "")
        print(f"{name:<16} {about}{'  (default)' if name == DEFAULT_RECIPE else ''}")
    return 0


def cmd_config_show(args) -> int:
    from tunesmith.config import dump_yaml, load_config

    config, overrides = _split_overrides(args)
    print(dump_yaml(load_config(config, overrides)), end="")
    return 0


def cmd_config_docs(args) -> int:
    from tunesmith.cli.docs import config_reference

    print(config_reference(), end="")
    return 0


def cmd_config_methods(args) -> int:
    from tunesmith.cli.docs import methods_matrix

    print(methods_matrix())
    return 0


def cmd_data_inspect(args) -> int:
    from tunesmith.run.log import printable
    from tunesmith.config import list_recipes, load_config
    from tunesmith.data.inspect import inspect_data
    from tunesmith.models import load_tokenizer, resolve_model_dir

    config, overrides = _split_overrides(args)
    if config and config not in list_recipes() and (config.startswith("builtin:") or Path(config).suffix not in (".yaml", ".yml")):
        config, overrides = None, [f"data.path={config}", "data.val_path=null"] + overrides  # a data file
    cfg = load_config(config, overrides)
    _check_data(cfg)
    tokenizer = load_tokenizer(resolve_model_dir(cfg.model.name))
    print(printable(inspect_data(cfg, tokenizer, args.n, color=sys.stdout.isatty()), keep_colors=sys.stdout.isatty()))
    return 0


def cmd_data_get(args) -> int:
    from tunesmith.data.sources import SOURCES, get

    names = list(SOURCES) if args.names == ["all"] else args.names
    for name in names:
        get(name)
    return 0


def cmd_data_sources(args) -> int:
    from tunesmith.data.sources import SOURCES, data_dir

    root = data_dir()
    print(f"data folder: {root}")
    for s in SOURCES.values():
        present = all((root / s.name / f).is_file() for f in s.outputs)
        print(f"{s.name:<24} {'present' if present else 'missing'}  recipes: {', '.join(s.recipes)}\n  {s.origin}")
    return 0


def cmd_generate(args) -> int:
    from dataclasses import replace

    from tunesmith.data.render import PromptFormat
    from tunesmith.methods.load import load_model, prompt_format
    from tunesmith.models import inference_dtype, load_tokenizer, pick_device, resolve_model_dir
    from tunesmith.models.generate import Sampling, generate
    from tunesmith.run.log import printable

    model_dir = resolve_model_dir(args.run or args.model)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, inference_dtype(pick_device()))
    text = " ".join(args.prompt)
    # prompted as the run was trained (its template, its system prompt), unless --raw or --system say otherwise
    fmt = PromptFormat("text", add_special_tokens=True) if args.raw else prompt_format(model_dir)
    if args.system and fmt.template == "chat":
        fmt = replace(fmt, system_prompt=args.system)
    prompt = fmt.render([{"role": "user", "content": text}], tokenizer)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, no_repeat_ngram_size=args.no_repeat_ngram_size, seed=args.seed)
    out = generate(model, tokenizer, [prompt], sampling, add_special_tokens=fmt.add_special_tokens)[0]
    print(printable(out.text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
