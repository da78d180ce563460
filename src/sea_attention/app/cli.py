"""The `sea` command: distil, evaluate, plot, and the end-to-end demo."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..core.config import BIN_SUMS_DTYPES, GATE_FORMS
from . import assets
from .corpora import DATA_FORMS, DatasetText, load_dataset_text
from .cli_tasks import TEXT_COLUMN_HELP, add_task_options, require_classifier, task_split
from .cli_args import (fraction, int_list, layer_list, name_list, non_negative_float, non_negative_int, output_dir,
                       output_file, positive_float, positive_int, row_range, unit_interval)


def load_sea_model(name_or_path: str, overrides: dict | None = None, runtime: dict | None = None,
                   baselines: bool = False):
    """A saved SEA model directory, or a base model (bundled name, local dir, hub id) patched fresh;
    with ``baselines``, also a trained-baseline save (``sea distill --method ...``).

    ``overrides`` shape a fresh patch (ignored for a saved model); ``runtime`` (grouping,
    query_block) changes no weight, so it applies to both.
    """
    from ..tools.baselines.saving import is_baseline_save, load_baseline
    from ..hf import from_pretrained, patch, set_runtime

    if is_baseline_save(name_or_path):
        if not baselines:
            raise ValueError(f"{name_or_path} holds a trained baseline (sea distill --method ...), not a SEA model: "
                             "run it with `sea compare` or `sea eval`")
        model, tokenizer = load_baseline(name_or_path)
        if overrides or runtime:
            print(f"note: {name_or_path} is a trained baseline; ignoring {sorted({**(overrides or {}), **runtime})}",
                  file=sys.stderr)
        return model, tokenizer, name_or_path
    if (Path(name_or_path) / "sea_config.json").exists():
        model, tokenizer = from_pretrained(name_or_path)
        if overrides:
            print(f"note: {name_or_path} is already a SEA model; ignoring {sorted(overrides)}", file=sys.stderr)
    else:
        model, tokenizer = assets.load_model(name_or_path)
        patch(model, **(overrides or {}))
    if runtime:
        set_runtime(model, **runtime)
    return model, tokenizer, name_or_path


def _sea_config_of(model) -> dict:
    """The SEA config a patched model's layers run with (for a result's JSON: what its SEA rows ran, every
    field resolved)."""
    from dataclasses import asdict

    from ..hf import sea_layers

    return asdict(sea_layers(model)[0][2].config)


def _runtime_options(args) -> dict:
    """The run-time fields (``hf.patch.RUNTIME_FIELDS``) this command's options set."""
    from ..hf.patch import RUNTIME_FIELDS

    return {name: getattr(args, name) for name in RUNTIME_FIELDS if getattr(args, name, None) is not None}


def _sea_overrides(args) -> dict:
    with_k = args.command not in ("eval", "compare", "diagnose")  # their --k is the budget(s) measured
    names = ("estimate_width", "feature_factor", "gate_form", "key_bounds") + (("k",) if with_k else ())
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _add_sea_options(parser: argparse.ArgumentParser, with_k: bool = True) -> None:
    group = parser.add_argument_group("SEA options (when patching a base model)")
    if with_k:  # `sea eval` uses --k for its list of budgets
        group.add_argument("--k", type=positive_int, help="keys per query per head (default 64)")
    group.add_argument("--estimate-width", type=positive_int, help="K, width of the compressed estimate (default 256 for causal layers, 128 bidirectional)")
    group.add_argument("--feature-factor", type=positive_int, help="nbf: m = d ln d / nbf random features (default 8)")
    group.add_argument("--gate-form", choices=GATE_FORMS,
                       help="output gates: the paper's sigmoid ones (the causal default) or identity (started at "
                            "exactly 1: an untrained layer returns the sparse context; the bidirectional default)")
    group.add_argument("--key-bounds", action="store_true", default=None,
                       help="add an upper bound of each bin's largest logit (max/min keys per block) to the "
                            "estimate's signals: finds lone outstanding keys (retrieval); off by default")
    runtime = parser.add_argument_group("selection (also for saved SEA models)")
    runtime.add_argument("--grouping", choices=("query", "query_head", "block"),
                         help="which cells share one top-k: per query (default), per query and head, or per "
                              "block of positions (fastest on long inputs)")
    runtime.add_argument("--query-block", type=positive_int, help="positions per block of --grouping block and of the long rows (default 64)")
    runtime.add_argument("--candidates", type=positive_int,
                         help="exact refinement: select cells for this many times the budget, keep each head's "
                              "exactly best share of their keys, per query row (default 1: off; with --grouping block a block's "
                              "rows share its candidates and each keeps its own best)")
    runtime.add_argument("--block-from", type=non_negative_int,
                         help="the long-rows policy: query rows at key positions from this one on (a multiple of "
                              "--query-block) run the block grouping with --block-candidates, earlier rows the "
                              "per-query grouping (default: 1024, rounded up to a multiple of --query-block, for a "
                              "causal per-query layer off the flex path, else 0; 0: off)")
    runtime.add_argument("--block-candidates", type=positive_int,
                         help="exact refinement of the rows --block-from hands to the block grouping (default: 16 "
                              "while --block-from is on, else 4)")
    runtime.add_argument("--bin-sums-dtype", choices=BIN_SUMS_DTYPES,
                         help="how the binned signals store their prefix sums: float64 (default; decoding selects "
                              "exactly what a full forward does) or float32 (faster prefill, half the decoding state's tables)")
    runtime.add_argument("--dense-until", type=non_negative_int,
                         help="the length policy: query rows with at most this many keys attend to all of them "
                              "(exact, as the dense model), longer rows run SEA (default 0: every row runs SEA). "
                              "Only SEA's rows follow it: oracle and competitor rows select as before")
    runtime.add_argument("--dense-layers", type=layer_list,
                         help="comma-separated layer indices that keep the dense model's attention on every row "
                              "(e.g. 0,1: the first two, as Quest does); their cost is dense attention's; 'none' "
                              "clears a saved model's list (default: as saved, none for a base model). Only SEA's "
                              "rows follow it: oracle and competitor rows select as before")
    runtime.add_argument("--forced-keys", action="store_true", default=None,
                         help="the sinks and the local window count key by key, not as whole bins: the estimate "
                              "chooses k - sinks - window keys at every length (better at 8k tokens, a little "
                              "worse at 1k-4k; off by default)")


# ---------------------------------------------------------------------------------------- texts
DATASET_OPTIONS = ("data_config", "data_split", "text_column")


def _load_text(args, split: str) -> str:
    """``--data``'s text: a bundled corpus or a text file (split by sea's rule), else a ``datasets`` corpus
    (``--data-split``, default the same split name; ``--data-config``, ``--text-column``)."""
    given = [f"--{name.replace('_', '-')}" for name in DATASET_OPTIONS if getattr(args, name, None) is not None]
    if args.data is None:  # sea distill leaves it unset so that --task can refuse it
        args.data = "wiki"
    if args.data in assets.BUNDLED_TEXTS or _names_a_file(args.data):
        if given:
            raise ValueError(f"{', '.join(given)} apply to `datasets` corpora, not to --data {args.data}")
        return assets.load_text(args.data, split)
    split = getattr(args, "data_split", None) or split
    if split == "all":
        raise ValueError(f"split 'all' is for the bundled corpora and text files: name a split of {args.data} "
                         "with --data-split")
    return load_dataset_text(DatasetText(args.data, split, getattr(args, "data_config", None),
                                         getattr(args, "text_column", None) or "text"))


def _names_a_file(data: str) -> bool:
    """An existing file, or a missing one written as a path (./x, /x, ~/x, x.txt); a folder is a dataset."""
    path = Path(data).expanduser()
    return path.is_file() or (not path.exists() and (data.startswith((".", "/", "~")) or data.endswith(".txt")))


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-config", help="configuration of a `datasets` corpus (wikitext-2: wikitext-2-raw-v1)")
    parser.add_argument("--data-split", help="split of a `datasets` corpus, e.g. validation (default: --split's "
                                             "name; `sea distill`: train)")
    parser.add_argument("--text-column", help=TEXT_COLUMN_HELP)


# ---------------------------------------------------------------------------------------- distill
# option of `sea distill` -> (the trained baseline it shapes, the field of that baseline's config)
BASELINE_OPTIONS = {"indexer_heads": ("indexer", "heads"), "indexer_dim": ("indexer", "head_dim"),
                    "performer_feature_factor": ("performer", "feature_factor")}


def _baseline_config(args):
    """The config of ``--method`` from its options; options of other methods are an error."""
    from ..tools.baselines.trained import trained_method

    given = {}
    for option, (owner, field) in BASELINE_OPTIONS.items():
        value = getattr(args, option, None)
        if value is not None and owner != args.method:
            raise ValueError(f"--{option.replace('_', '-')} applies to --method {owner}, not {args.method}")
        if value is not None:
            given[field] = value
    if args.method == "sea":
        return None
    if args.method == "cosformer":
        given["horizon"] = args.seq_len  # its cos weights span the distillation windows
    return trained_method(args.method).config(**given)


def _distill_stage(args) -> str:
    """--stage, or the method's own: estimator for SEA and the indexer, full for the linear attentions."""
    from ..tools.baselines.trained import trained_method

    if args.method == "sea":
        return args.stage or "estimator"
    method = trained_method(args.method)
    if args.stage not in (None, method.stage):
        raise ValueError(f"--method {args.method} is distilled with --stage {method.stage}, not {args.stage}")
    return method.stage


def _baseline_student(args, config):
    """A base model, patched (the patch routes each layer to the baseline), carrying a fresh ``--method``."""
    from ..tools.baselines.saving import is_baseline_save
    from ..tools.baselines.trained import attach_baseline
    from ..hf import patch

    options = {**_sea_overrides(args), **_runtime_options(args)}
    if options:
        raise ValueError(f"{sorted(options)} shape SEA; --method {args.method} does not use them")
    if (Path(args.model) / "sea_config.json").exists() or is_baseline_save(args.model):
        raise ValueError(f"--method {args.method} is distilled from a base model, and {args.model} is a distilled save")
    model, tokenizer = assets.load_model(args.model)
    patch(model)
    return model, tokenizer, attach_baseline(model, args.method, config)


def _refuse_dense_layers(args) -> None:
    """Distillation trains every SEA layer: a layer kept dense would get no gradient for its gates."""
    if getattr(args, "dense_layers", None):
        raise ValueError(f"sea distill trains every SEA layer and refuses --dense-layers {args.dense_layers}: "
                         "keep layers dense at run time (sea eval/compare/bench --dense-layers, or "
                         "sea.set_runtime(model, dense_layers=...))")


def _distill_config(args, stage: str):
    from ..tools.distill import DistillConfig

    return DistillConfig(stage=stage, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, lr=args.lr, base_lr=args.base_lr,
                         warmup_steps=args.warmup_steps, schedule=args.schedule, bf16=args.bf16, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, hidden_loss=args.hidden_loss,
                         query_rows=args.query_rows, updates_per_pass=args.updates_per_pass)


def _distill_student(args):
    """The model to distil, its tokenizer, the trained baseline (None: SEA) and the base to record;
    the output folder is checked first, before any training."""
    from ..tools.baselines.saving import check_baseline_target
    from ..hf.io import check_save_target

    if args.task is not None and args.data is not None:
        raise ValueError("--data (a text to model) and --task (a classification task) exclude each other")
    baseline = _baseline_config(args)
    if baseline is None:
        check_save_target(args.out)
        torch.manual_seed(args.seed)
        model, tokenizer, base = load_sea_model(args.model, _sea_overrides(args), _runtime_options(args))
        return model, tokenizer, None, base
    check_baseline_target(args.out)
    torch.manual_seed(args.seed)
    model, tokenizer, method = _baseline_student(args, baseline)
    return model, tokenizer, method, args.model


def _distill_batches(args, model, tokenizer):
    """What the distillation reads: a task's texts (a classifier, `sea finetune`) or token windows."""
    from ..tools.distill import TokenWindows, tokenize

    if args.task is None:
        return TokenWindows(tokenize(tokenizer, _load_text(args, "train")), args.seq_len, args.seed)
    from ..tools.tasks import TaskBatches
    from ..tools.tasks.metrics import check_max_len

    require_classifier(model, args.model)
    return TaskBatches(task_split(args, "train"), tokenizer, check_max_len(model, args.seq_len), args.seed)


def cmd_distill(args) -> int:
    from ..tools.baselines.saving import save_baseline
    from ..tools.distill import Distiller
    from ..hf import save_pretrained

    stage = _distill_stage(args)
    _refuse_dense_layers(args)
    config = _distill_config(args, stage)  # its checks before any loading
    model, tokenizer, method, base = _distill_student(args)
    batches = _distill_batches(args, model, tokenizer)
    checkpoints = Path(args.checkpoint_dir or f"{Path(args.out)}-checkpoints")  # beside OUT: OUT is replaced whole
    group = args.group
    distiller = Distiller(model.to(group.device), batches, config, checkpoints, method, group)
    say = print if group.is_main else (lambda *_: None)
    if group.backend is not None:
        say(f"{group.world_size} processes ({group.backend}), global batch {args.batch_size * group.world_size} "
            f"windows (--batch-size {args.batch_size} per process) x --grad-accum {args.grad_accum}")
    if args.resume:
        say(f"resumed at step {distiller.step}" if distiller.resume() else "no checkpoint found: starting fresh")
    started = time.perf_counter()
    history = distiller.run(progress=not args.quiet)
    # fine-tuned base weights (stage full, now or earlier) must travel with the SEA weights
    tuned = stage == "full" or bool(getattr(model.config, "sea_base_weights_included", False))
    model = distiller.trained_model()  # under FSDP2: gathered on rank 0, which alone writes
    if not group.is_main:
        return 0
    if method is None:
        save_pretrained(model, args.out, base_model=getattr(model.config, "sea_base_model", None) or base,
                        tokenizer=tokenizer, include_base_weights=tuned)
    else:
        save_baseline(model, args.out, base_model=base, tokenizer=tokenizer, include_base_weights=tuned)
    print(f"{args.method}, stage {stage}: {len(history)} steps, loss {history[0].loss:.4f} -> "
          f"{history[-1].loss:.4f}, {time.perf_counter() - started:.0f} s; model saved to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from ..tools.baselines.trained import baseline_layers
    from ..tools.distill import tokenize
    from ..tools.evaluate import BudgetSweep, evaluate_budgets, format_table, write_json

    group = args.group
    if args.task is not None:
        if group.backend is not None:
            raise ValueError("sea eval --task runs in one process: launch it without torchrun")
        return _eval_task(args)
    torch.manual_seed(0)  # a base model's fresh (untrained) SEA modules: the same in every process
    model, tokenizer, _ = load_sea_model(args.model, _sea_overrides(args), _runtime_options(args), baselines=True)
    args.seq_len = args.seq_len or 1024
    args.k_list = args.k_list or [32, 64, 128]
    tokens = tokenize(tokenizer, _load_text(args, args.split))
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
    stride = args.seq_len if args.stride is None else args.stride
    trained = baseline_layers(model)
    if trained is not None:
        if group.backend is not None:
            raise ValueError(f"{args.model} holds a trained baseline ({trained.name}): `sea eval` runs it in one "
                             "process; launch it without torchrun")
        return _eval_baseline(args, model, tokens, trained.name, stride)
    sweep = BudgetSweep(args.seq_len, stride, args.k_list, oracle=args.oracle, progress=not args.quiet)
    rows = evaluate_budgets(model.to(group.device), tokens, sweep, group)
    if not group.is_main:
        return 0
    print(format_table(rows))
    if args.json:
        from ..tools.bench import machine_info  # perplexity differs in its last digits between CPU kinds

        write_json(rows, args.json, **_eval_about(args, stride), machine=machine_info(),
                   sea_config=_sea_config_of(model))
    return 0


def _eval_about(args, stride: int) -> dict:
    """What a `sea eval` JSON records of its run."""
    return {"model": args.model, "data": args.data, "split": args.split, "seq_len": args.seq_len, "stride": stride}


def _eval_task(args) -> int:
    """`sea eval --task`: accuracy, macro-F1 and confusion of dense, oracle and SEA on the task's split."""
    from ..tools.tasks.metrics import TaskEvalSetup, check_max_len, evaluate_task, format_task_table, write_task_json

    if args.split == "all":
        raise ValueError("--task is evaluated on one split: train, validation or test")
    model, tokenizer, _ = load_sea_model(args.model, _sea_overrides(args), _runtime_options(args))
    require_classifier(model, args.model)
    max_len = check_max_len(model, args.seq_len or model.config.max_position_embeddings)
    setup = TaskEvalSetup(tuple(args.k_list or (8, 16, 32, 64)), max_len, args.batch_size, args.oracle)
    data = task_split(args, args.split)
    rows = evaluate_task(model, tokenizer, data, setup, progress=not args.quiet)
    print(format_task_table(rows))
    if args.json:
        from ..tools.bench import machine_info

        about = dict(model=args.model, machine=machine_info(), sea_config=_sea_config_of(model))
        print(f"wrote {write_task_json(rows, args.json, data, setup, **about)}")
    return 0


def _eval_baseline(args, model, tokens, method: str, stride: int) -> int:
    """`sea eval` of a trained baseline: its rows of `sea compare` (and the oracle's), dense first."""
    from ..tools.baselines import CompareConfig, compare_perplexity, format_compare_table
    from ..tools.bench import write_bench_json

    methods = (method, "oracle") if args.oracle else (method,)
    config = CompareConfig(methods, tuple(args.k_list), args.seq_len, stride)
    rows = compare_perplexity(model, tokens, config, progress=not args.quiet)
    print(format_compare_table(rows))
    if args.json:
        write_bench_json(rows, args.json, **_eval_about(args, stride))
    return 0


# ---------------------------------------------------------------------------------------- compare
def cmd_compare(args) -> int:
    from dataclasses import asdict

    from ..tools.baselines import DEFAULT_METHODS
    from ..tools.baselines.compare import check_budgets, check_model_runs
    from ..tools.baselines.trained import baseline_layers
    from ..tools.bench import write_bench_json

    model, tokenizer, _ = load_sea_model(args.model, _sea_overrides(args), _runtime_options(args), baselines=True)
    trained = baseline_layers(model)
    if args.methods is None:  # a trained baseline's model: dense and the baseline
        args.methods = ("dense", trained.name) if trained is not None else DEFAULT_METHODS
    for method in args.methods:  # before any text is read
        check_model_runs(model, method)
    check_budgets(args.methods, tuple(args.k_list))  # every (method, k) before the first forward
    about = {"model": args.model, "task": args.task, "methods": list(args.methods), "budgets": args.k_list,
             "sea_config": _sea_config_of(model)}
    if args.task != "perplexity":
        rows = _compare_retrieval(args, model, tokenizer, about)
    else:
        from ..tools.baselines import CompareConfig, compare_perplexity, format_compare_table
        from ..tools.baselines.plot import plot_compare
        from ..tools.distill import tokenize

        tokens = tokenize(tokenizer, _load_text(args, args.split))[: args.max_tokens]
        config = CompareConfig(args.methods, tuple(args.k_list), args.seq_len, args.stride, args.coverage_skip)
        about.update(data=args.data, split=args.split, tokens=int(tokens.numel()), setup=asdict(config))
        partial = (lambda done: write_bench_json(done, args.json, **about, complete=False)) if args.json else None
        rows = compare_perplexity(model, tokens, config, progress=not args.quiet, on_row=partial)
        print(format_compare_table(rows))
        if args.plot:
            title = f"{args.model}, {args.data}/{args.split}: {tokens.numel()} tokens, windows of {args.seq_len}"
            print(f"wrote {plot_compare(rows, args.plot, title)}")
    if args.json:
        print(f"wrote {write_bench_json(rows, args.json, **about, complete=True)}")
    return 0


def _compare_retrieval(args, model, tokenizer, about: dict) -> list:
    """`sea compare --task` of the retrieval and copy suite: its rows, table and plot."""
    from dataclasses import asdict

    from ..tools.baselines.retrieval import RetrievalConfig, format_retrieval_table, plot_retrieval, retrieval_rows
    from ..tools.baselines.tasks import TASKS
    from ..tools.bench import write_bench_json

    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer to build {args.task} prompts with")
    tasks = tuple(TASKS) if args.task == "retrieval" else (args.task,)
    config = RetrievalConfig(tasks, tuple(args.lengths), args.prompts, args.seed, args.max_new_tokens,
                             tuple(args.haystack))
    about["setup"] = asdict(config)
    partial = (lambda done: write_bench_json(done, args.json, **about, complete=False)) if args.json else None
    rows = retrieval_rows(model, tokenizer, args.methods, tuple(args.k_list), config, progress=not args.quiet,
                          on_row=partial)
    print(format_retrieval_table(rows))
    if args.plot:
        title = f"{args.model}: {args.prompts} prompts per task and length, greedy"
        print(f"wrote {plot_retrieval(rows, args.plot, title)}")
    return rows


def _add_compare_parser(commands) -> None:
    from ..tools.baselines import DEFAULT_METHODS, METHODS, check_methods
    from ..tools.baselines.tasks import TASKS

    compare = commands.add_parser("compare", help="every method (oracle, window+sinks, Quest, SEA) at equal budget")
    compare.add_argument("--model", required=True, help="bundled name, local dir, SEA dir or hub id")
    compare.add_argument("--task", default="perplexity", choices=("perplexity", *TASKS, "retrieval"),
                         help="perplexity on sliding windows, or a retrieval/copy task (retrieval: all of them)")
    compare.add_argument("--methods", type=name_list(check_methods),
                         help=f"some of {','.join(METHODS)} (dense always runs: the reference); default "
                              f"{','.join(DEFAULT_METHODS)}, or dense and the baseline for a model distilled with "
                              "`sea distill --method`")
    compare.add_argument("--k", dest="k_list", type=int_list, default=[32, 64, 128],
                         help="keys per query per head, e.g. 32,64,128")
    perplexity = compare.add_argument_group("--task perplexity")
    perplexity.add_argument("--data", default="wiki", help=DATA_FORMS)
    perplexity.add_argument("--split", default="test", choices=("train", "validation", "test", "all"))
    perplexity.add_argument("--seq-len", type=positive_int, default=1024)
    perplexity.add_argument("--stride", type=positive_int, help="default: --seq-len (non-overlapping windows)")
    perplexity.add_argument("--max-tokens", type=positive_int, help="evaluate only the first N tokens")
    perplexity.add_argument("--coverage-skip", type=fraction, default=0.0,
                            help="coverage over rows past this fraction of each window (e.g. 0.25)")
    compare.add_argument("--plot", type=output_file, help="write a PNG: perplexity against keys per query, or accuracy against length")
    suite = compare.add_argument_group("retrieval and copy tasks (--task passkey, needle, multi_needle, copy, or "
                                       "retrieval: all four)")
    suite.add_argument("--lengths", type=int_list, default=[1024, 2048, 4096, 8192], help="prompt lengths in tokens")
    suite.add_argument("--prompts", type=positive_int, default=10, help="prompts per task and length (evenly "
                                                                        "spaced depths)")
    suite.add_argument("--max-new-tokens", type=positive_int, help="greedy steps (default: each task's own)")
    suite.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    suite.add_argument("--haystack", type=name_list(lambda names: tuple(names)), default=["wiki", "bbc"],
                       help="prose the needles hide in, alternating by prompt: bundled corpora (their test "
                            "split) or text files")
    compare.add_argument("--json", type=output_file, help="write the setup, machine and rows to this JSON file")
    compare.add_argument("--quiet", action="store_true")
    _add_sea_options(compare, with_k=False)
    compare.set_defaults(func=cmd_compare)


# ---------------------------------------------------------------------------------------- diagnose
def cmd_diagnose(args) -> int:
    from dataclasses import asdict

    from ..tools.diagnose import DiagnoseConfig, diagnose, format_diagnosis_table, plot_diagnosis, write_diagnosis_json
    from ..tools.distill import tokenize

    if args.task is not None:
        return _diagnose_retrieval(args)
    config = DiagnoseConfig(args.k, args.seq_len, args.coverage_skip)  # bad values fail before the model loads
    model, tokenizer, _ = load_sea_model(args.model, _sea_overrides(args), _runtime_options(args))
    tokens = tokenize(tokenizer, _load_text(args, args.split))[: args.max_tokens]
    diagnosis = diagnose(model, tokens, config, progress=not args.quiet)
    print(format_diagnosis_table(diagnosis))
    if args.json:
        about = dict(model=args.model, data=args.data, split=args.split, setup=asdict(config),
                     sea_config=_sea_config_of(model))
        print(f"wrote {write_diagnosis_json(diagnosis, args.json, **about)}")
    if args.plot:
        rows = f"rows past {args.coverage_skip:g} of each" if args.coverage_skip else "all rows"
        title = (f"{args.model}, {args.data}/{args.split}\n"
                 f"k={args.k}, {diagnosis.windows} windows of {args.seq_len} tokens, {rows}")
        print(f"wrote {plot_diagnosis(diagnosis, args.plot, title)}")
    return 0


def _diagnose_retrieval(args) -> int:
    """`sea diagnose --task`: SEA's selection along the dense answer to one prompt of the suite."""
    from dataclasses import asdict

    from ..tools.baselines.retrieval import RetrievalConfig, suite_prompts
    from ..tools.retrieval_diagnose import (RetrievalDiagnoseConfig, diagnose_prompt, format_prompt_diagnosis,
                                            plot_prompt_diagnosis, write_prompt_diagnosis)

    suite = RetrievalConfig((args.task,), (args.length,), args.prompts, args.seed, haystacks=tuple(args.haystack))
    if args.prompt >= args.prompts:
        raise ValueError(f"--prompt must be below --prompts ({args.prompts}), got {args.prompt}")
    config = RetrievalDiagnoseConfig(args.k, args.top, suite.new_tokens(args.task))
    model, tokenizer, _ = load_sea_model(args.model, _sea_overrides(args), _runtime_options(args))
    suite.check_fits(getattr(model.config, "max_position_embeddings", None))
    prompt = suite_prompts(tokenizer, suite)[(args.task, args.length)][args.prompt]
    report = diagnose_prompt(model, tokenizer, prompt, config)
    print(format_prompt_diagnosis(report))
    if args.json:
        about = dict(model=args.model, prompt=args.prompt, suite=asdict(suite), setup=asdict(config),
                     sea_config=_sea_config_of(model))
        print(f"wrote {write_prompt_diagnosis(report, args.json, **about)}")
    if args.plot:
        print(f"wrote {plot_prompt_diagnosis(report, args.plot)}")
    return 0


def _add_diagnose_parser(commands) -> None:
    diagnose = commands.add_parser("diagnose", help="per layer and head: the teacher mass SEA's keys cover, beside "
                                                    "the oracle's and a window's, and the estimate's KL")
    diagnose.add_argument("--model", required=True, help="SEA dir, or a base model to patch (untrained estimator)")
    diagnose.add_argument("--data", default="wiki", help="'wiki', 'bbc' or a text file")
    diagnose.add_argument("--split", default="test", choices=("train", "validation", "test", "all"))
    diagnose.add_argument("--seq-len", type=positive_int, default=1024, help="tokens per window (non-overlapping)")
    diagnose.add_argument("--max-tokens", type=positive_int, help="use only the first N tokens")
    diagnose.add_argument("--k", type=positive_int, default=64, help="keys per query per head, for every method")
    diagnose.add_argument("--coverage-skip", type=fraction, default=0.0,
                          help="measure only rows past this fraction of each window (e.g. 0.25)")
    diagnose.add_argument("--json", type=output_file, help="write the setup, machine, per-layer and per-head numbers to this JSON file")
    diagnose.add_argument("--plot", type=output_file, help="write a PNG: coverage bars per layer, the estimate's KL below")
    diagnose.add_argument("--quiet", action="store_true")
    from ..tools.baselines.tasks import TASKS

    task = diagnose.add_argument_group("one prompt of the retrieval suite (--task): SEA's selection at each answer "
                                       "step, layer and head against the dense top keys")
    task.add_argument("--task", choices=tuple(TASKS), help="diagnose this task's prompt instead of perplexity windows")
    task.add_argument("--length", type=positive_int, default=1024, help="prompt tokens")
    task.add_argument("--prompts", type=positive_int, default=10, help="prompts of the set (as in sea compare)")
    task.add_argument("--prompt", type=non_negative_int, default=0, help="which of them (0-based)")
    task.add_argument("--top", type=positive_int, default=4, help="dense top keys checked per step, layer and head")
    task.add_argument("--seed", type=int, default=0)
    task.add_argument("--haystack", type=name_list(lambda names: tuple(names)), default=["wiki", "bbc"],
                      help="prose of the needles: bundled corpora (test split) or text files")
    _add_sea_options(diagnose, with_k=False)
    diagnose.set_defaults(func=cmd_diagnose)


# ---------------------------------------------------------------------------------------- plot
def cmd_plot(args) -> int:
    from ..tools.distill import tokenize
    from ..tools.viz import capture_attention, plot_attention

    model, tokenizer, _ = load_sea_model(args.model, _sea_overrides(args), _runtime_options(args))
    if args.task is not None:  # the first test text of a task, as the classifier reads it (special tokens too)
        text = task_split(args, "test").texts[0]
        tokens = torch.tensor(tokenizer(text, truncation=True, max_length=args.seq_len)["input_ids"])
    else:
        tokens = tokenize(tokenizer, _load_text(args, "test"))[: args.seq_len]
    snapshot = capture_attention(model, tokens.unsqueeze(0), args.layer, args.head)
    count = snapshot.teacher.shape[0]
    if args.last is not None:
        snapshot = snapshot.rows(count - args.last, count)
    elif args.rows is not None:
        start, stop = args.rows
        snapshot = snapshot.rows(start or 0, count if stop is None else stop)
    print(f"wrote {plot_attention(snapshot, args.out, f'{args.model}: layer {args.layer}, head {args.head}')}")
    return 0


# ---------------------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    from transformers import TextStreamer

    from ..hf import GrowingCache, cache_kwargs

    model, tokenizer, _ = load_sea_model(args.model, _sea_overrides(args), _runtime_options(args))
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer to turn the prompt into tokens")
    if args.dense:
        from ..hf import dense_attention as attention_mode
    else:
        from contextlib import nullcontext

        attention_mode = lambda m: nullcontext(m)  # noqa: E731
    device = next(model.parameters()).device
    encoded = tokenizer(args.prompt, return_tensors="pt")
    inputs = {name: encoded[name].to(device) for name in ("input_ids", "attention_mask") if name in encoded}
    torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 else \
        dict(do_sample=False)
    with attention_mode(model):  # the cache appends in place (both modes): no copy of the past per token
        model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer,
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **cache_kwargs(GrowingCache()),
                       **sampling)
    return 0


# ---------------------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from dataclasses import asdict

    from ..tools import bench

    if args.bench_command == "model":
        setup = bench.ModelBenchSetup(args.model, args.lengths, args.decode_tokens, args.data,
                                      args.dense_implementation, args.threads, args.cache)
        if args.model == "tiny":  # a random narrow Llama, no tokenizer: random prompt ids
            from ..hf import patch

            model, tokenizer = patch(bench.tiny_model(max(args.lengths) + args.decode_tokens),
                                     **_sea_overrides(args), **_runtime_options(args)), None
        else:
            model, tokenizer, _ = load_sea_model(args.model, _sea_overrides(args), _runtime_options(args))
        print(f"{args.model}: prefill T tokens, then {args.decode_tokens} greedy decode steps; dense = "
              f"{args.dense_implementation}; the {args.cache} KV cache for both")
        points = bench.bench_model(model, tokenizer, setup)
        print(f"\n{bench.format_model_table(args.model, points)}")
        sections = {"setup": asdict(setup), "sea_options": {**_sea_overrides(args), **_runtime_options(args)}}
        if args.plot:
            print(f"wrote {bench.plot_model_bench(points, args.plot, f'{args.model}: dense vs SEA, same weights')}")
    elif args.bench_command == "decode":
        setup = bench.AttentionBenchSetup(args.heads, args.head_dim, args.k, args.estimate_width, True, 1, args.threads)
        print(f"one attention layer decoding, B=1, H={setup.heads}, d={setup.head_dim}, fp32: ms per token after a "
              f"prompt of T tokens ({args.steps} steps, median of the last three quarters); one fresh process per point")
        points = bench.bench_decode(args.lengths, args.methods, setup, args.steps, args.timeout)
        print(f"\n{bench.format_decode_table(points)}")
        sections = {"setup": asdict(setup), "steps": args.steps}
    else:
        setup = bench.AttentionBenchSetup(args.heads, args.head_dim, args.k, args.estimate_width,
                                          not args.bidirectional, args.repeats, args.threads)
        print(f"attention forward, B=1, H={setup.heads}, d={setup.head_dim}, fp32, "
              f"{'causal' if setup.causal else 'bidirectional'}; one fresh process per point")
        points = bench.bench_attention(args.lengths, args.methods, setup, args.memory_limit_gb, args.timeout)
        print(f"\n{bench.format_attention_table(points)}")
        sections = {"setup": asdict(setup), "memory_limit_gb": args.memory_limit_gb}
        if args.breakdown:
            groupings = tuple(g for m, g in (("sea", "long_rows"), ("sea_per_query_chunked", "query"), ("sea_block", "block"))
                              if m in args.methods) or ("long_rows",)
            rate, breakdowns = bench.bench_breakdown(args.lengths, setup, args.timeout, groupings=groupings)
            for breakdown in breakdowns:
                print(f"\n{bench.format_breakdown(breakdown, rate)}")
            sections["breakdown"] = {"matmul_gflops": rate, "lengths": [asdict(b) for b in breakdowns]}
        if args.plot:
            print(f"wrote {bench.plot_attention_bench(points, args.plot)}")
    if args.json:
        print(f"wrote {bench.write_bench_json(points, args.json, threads=args.threads, **sections)}")
    return 0


def _add_layer_shape(parser) -> None:
    """The benchmarked attention layer's shape and SEA's budget (bench attention / decode)."""
    parser.add_argument("--heads", type=positive_int, default=12)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--k", type=positive_int, default=64, help="SEA keys per query per head")
    parser.add_argument("--estimate-width", type=positive_int, help="SEA's K (default: SEAConfig's)")


def _add_bench_parser(commands) -> None:
    from ..tools.bench import (
        CACHES, DECODE_METHODS, DEFAULT_DECODE_METHODS, DEFAULT_METHODS, METHODS, check_decode_methods, check_methods,
    )

    bench = commands.add_parser("bench", help="speed and memory: the attention alone, or a whole model")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    attention = kinds.add_parser("attention", help="time and peak memory of one attention forward vs T")
    attention.add_argument("--lengths", type=int_list, default=[1024, 4096, 16384, 32768], help="e.g. 1024,4096")
    attention.add_argument("--methods", type=name_list(check_methods), default=DEFAULT_METHODS,
                           help=f"some of {','.join(METHODS)} (default: {','.join(DEFAULT_METHODS)}; the rest are opt-in settings)")
    _add_layer_shape(attention)
    attention.add_argument("--repeats", type=positive_int, default=3, help="timed calls per point (median)")
    attention.add_argument("--bidirectional", action="store_true", help="no causal mask")
    attention.add_argument("--memory-limit-gb", type=positive_float, default=16.0,
                           help="skip dense methods (eager, sea_reference) estimated to need more")
    attention.add_argument("--timeout", type=positive_float, default=1800, help="seconds per point")
    attention.add_argument("--breakdown", action="store_true", help="also time each stage of SEA against its FLOP floor")
    attention.add_argument("--plot", type=output_file, help="write a log-log PNG of time and memory vs T")
    decode = kinds.add_parser("decode", help="ms per decoded token of one attention layer vs the prompt length")
    decode.add_argument("--lengths", type=int_list, default=[1024, 8192, 32768], help="prompt lengths, e.g. 1024,8192")
    decode.add_argument("--methods", type=name_list(check_decode_methods), default=DEFAULT_DECODE_METHODS,
                        help=f"some of {','.join(DECODE_METHODS)} (default: {','.join(DEFAULT_DECODE_METHODS)})")
    _add_layer_shape(decode)
    decode.add_argument("--steps", type=positive_int, default=32, help="decoded tokens per point (at least 4)")
    decode.add_argument("--timeout", type=positive_float, default=1800, help="seconds per point")
    model = kinds.add_parser("model", help="prefill and decode tokens/s, dense vs SEA")
    model.add_argument("--model", required=True, help="bundled name, local dir, SEA dir, hub id, or 'tiny' (random)")
    model.add_argument("--lengths", type=int_list, default=[512, 1024, 2048], help="prompt lengths")
    model.add_argument("--decode-tokens", type=positive_int, default=32)
    model.add_argument("--data", default="wiki", help="text of the prompts: 'wiki', 'bbc' or a text file")
    model.add_argument("--dense-implementation", default="sdpa", choices=("sdpa", "eager"))
    model.add_argument("--cache", default="growing", choices=CACHES,
                       help="KV cache of both modes: growing (appends in place) or dynamic (transformers' "
                            "DynamicCache, which copies the whole cache every step)")
    model.add_argument("--plot", type=output_file, help="write a PNG: prefill and decode tokens/s and prefill memory vs T")
    _add_sea_options(model)
    for parser in (attention, decode, model):
        parser.add_argument("--threads", type=positive_int, help="torch threads (default: torch's)")
        parser.add_argument("--json", type=output_file, help="write the setup, machine and results to this JSON file")
        parser.set_defaults(func=cmd_bench)


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sea", description="SEA: linear-time sparse attention for pretrained transformers")
    commands = parser.add_subparsers(dest="command", required=True)

    from .demo import add_demo_parser

    add_demo_parser(commands)

    from .cli_tasks import add_finetune_parser

    add_finetune_parser(commands)

    from ..tools.baselines.trained import TRAINED
    from ..tools.distill.losses import HIDDEN_LOSSES

    distill = commands.add_parser("distill", help="distil SEA (or a trained baseline) from a model's dense attention")
    distill.add_argument("--model", default="smollm2-135m", help="bundled name, local dir, SEA dir or hub id")
    distill.add_argument("--data", help=f"{DATA_FORMS} (language modelling; default wiki; not with --task)")
    _add_data_options(distill)
    add_task_options(distill, text_column=False)
    distill.add_argument("--method", default="sea", choices=("sea", *TRAINED),
                         help="what to distil: SEA, or a trained baseline of `sea compare` (default sea)")
    distill.add_argument("--stage", choices=("estimator", "full"),
                         help="estimator: only the method's modules, base frozen; full: the whole model against a "
                              "frozen dense copy (default: estimator for sea and indexer, full for performer and "
                              "cosformer, the only stage they have)")
    distill.add_argument("--steps", type=positive_int, default=100)
    distill.add_argument("--seq-len", type=positive_int, default=512,
                         help="tokens per window; with --task, per text (longer texts are truncated)")
    distill.add_argument("--batch-size", type=positive_int, default=1)
    distill.add_argument("--grad-accum", type=positive_int, default=1)
    distill.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate of the SEA modules")
    distill.add_argument("--base-lr", type=positive_float, default=1e-5, help="learning rate of the base model (stage full)")
    distill.add_argument("--warmup-steps", type=non_negative_int, default=10)
    distill.add_argument("--query-rows", type=non_negative_int, default=0,
                         help="stage estimator: query rows per window trained in each layer, drawn afresh every "
                              "step (default 0: every row)")
    distill.add_argument("--updates-per-pass", type=positive_int, default=1,
                         help="stage estimator: optimizer steps per teacher forward, each on fresh rows (default 1)")
    distill.add_argument("--hidden-loss", choices=HIDDEN_LOSSES,
                         help="stage full only: hidden-state MSE relative to each state's scale (default), or the "
                              "paper's plain MSE")
    distill.add_argument("--schedule", default="cosine", choices=("cosine", "linear", "constant"))
    distill.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--out", required=True, type=output_dir, help="directory for the distilled model")
    distill.add_argument("--checkpoint-dir", type=output_dir, help="default: OUT-checkpoints")
    distill.add_argument("--checkpoint-every", type=non_negative_int, default=50)
    distill.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    distill.add_argument("--quiet", action="store_true")
    _add_sea_options(distill)
    baselines = distill.add_argument_group("trained baselines (--method)")
    baselines.add_argument("--indexer-heads", type=positive_int, help="indexer heads (default 4)")
    baselines.add_argument("--indexer-dim", type=positive_int, help="width of an indexer head (default 32)")
    baselines.add_argument("--performer-feature-factor", type=positive_int,
                           help="nbf of the performer: m = d ln d / nbf random features (default 1)")
    distill.set_defaults(func=cmd_distill)

    evaluate = commands.add_parser("eval", help="perplexity (or, with --task, accuracy): dense vs SEA at several k "
                                                "(and the oracle)")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", default="wiki", help=DATA_FORMS)
    _add_data_options(evaluate)
    evaluate.add_argument("--split", default="test", choices=("train", "validation", "test", "all"))
    evaluate.add_argument("--seq-len", type=positive_int,
                          help="tokens per window (default 1024); with --task, per text (default: the model's positions)")
    evaluate.add_argument("--stride", type=positive_int, help="default: --seq-len (non-overlapping windows)")
    evaluate.add_argument("--k", dest="k_list", type=int_list,
                          help="budgets, e.g. 32,64,128 (default 32,64,128; with --task 8,16,32,64)")
    evaluate.add_argument("--batch-size", type=positive_int, default=16, help="--task: texts per forward")
    add_task_options(evaluate, text_column=False)
    evaluate.add_argument("--oracle", action=argparse.BooleanOptionalAction, default=True,
                          help="also evaluate exact top-(H*k) selection on the dense attention")
    evaluate.add_argument("--max-tokens", type=positive_int, help="evaluate only the first N tokens")
    evaluate.add_argument("--json", type=output_file, help="write the numbers to this JSON file")
    evaluate.add_argument("--quiet", action="store_true")
    _add_sea_options(evaluate, with_k=False)
    evaluate.set_defaults(func=cmd_eval)

    generate = commands.add_parser("generate", help="generate text with a SEA model, streamed to the terminal")
    generate.add_argument("--model", required=True, help="SEA dir, or a base model to patch (untrained estimator)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=positive_int, default=64)
    generate.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: greedy")
    generate.add_argument("--top-p", type=unit_interval, default=0.95, help="nucleus sampling mass, in (0, 1]")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--dense", action="store_true", help="use the model's dense attention instead, to compare")
    _add_sea_options(generate)
    generate.set_defaults(func=cmd_generate)

    plot = commands.add_parser("plot", help="PNG of teacher attention, SEA estimate and SEA sparse attention")
    plot.add_argument("--model", required=True)
    plot.add_argument("--data", default="wiki")
    plot.add_argument("--seq-len", type=positive_int, default=256)
    plot.add_argument("--layer", type=non_negative_int, default=0)
    plot.add_argument("--head", type=non_negative_int, default=0)
    rows = plot.add_mutually_exclusive_group()
    rows.add_argument("--rows", type=row_range, help="plot only query rows START:STOP (keys up to STOP), e.g. 768:1024")
    rows.add_argument("--last", type=positive_int, help="plot only the last N query rows (all the keys they see)")
    plot.add_argument("--out", type=output_file, default="attention.png")
    add_task_options(plot)
    _add_sea_options(plot)
    plot.set_defaults(func=cmd_plot)

    _add_compare_parser(commands)
    _add_diagnose_parser(commands)
    _add_bench_parser(commands)
    return parser


DISTRIBUTED_COMMANDS = ("distill", "eval")  # the commands torchrun can run on many processes


def main(argv: list[str] | None = None) -> int:
    from ..tools.distributed import process_group

    args = build_parser().parse_args(argv)
    try:
        with process_group() as group:
            if group.backend is not None and args.command not in DISTRIBUTED_COMMANDS:
                raise ValueError(f"sea {args.command} runs in one process: launch it without torchrun (torchrun "
                                 f"runs {' and '.join(f'sea {c}' for c in DISTRIBUTED_COMMANDS)})")
            args.group = group
            return args.func(args)
    except (ValueError, OSError) as error:
        print(f"sea {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
