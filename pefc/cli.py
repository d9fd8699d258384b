"""The ``pefc`` command line.

Exit codes: 0 success, 2 bad input (spec, targets, checkpoint, plugin), 1 failed work
(e.g. verification). Errors print as one paragraph; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pefc.errors import PefcError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _COMMANDS[name] = fn
        return fn
    return register


def _at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low`` (a bad value exits 2 with a usage message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pefc", description="Compile PEFT specs into trainable PyTorch modules.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="parse and validate a spec; print where and why it is wrong")
    p.add_argument("spec")
    sub.add_parser("schema", help="print the JSON Schema of the spec (built-ins and installed plugins)")
    p = sub.add_parser("plugins", help="list installed methods and where they come from")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inspect", help="sites matched, trainable params per adapter, %% of base, mergeable")
    p.add_argument("spec")
    p.add_argument("--meta", action="store_true", help="plan on the meta device: no weights allocated; captures two layers of each stack of "
                   "identical layers and replicates their sites (pefc.plan)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("compile", help="compile a spec; write DIR/adapters.safetensors + DIR/spec.json")
    p.add_argument("spec")
    p.add_argument("-o", "--output", required=True, metavar="DIR")

    p = sub.add_parser("export", help="fold mergeable adapters and write ONNX")
    p.add_argument("spec")
    p.add_argument("--adapters", metavar="DIR", help="adapter checkpoint to load (default: fresh adapters)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.onnx")
    p.add_argument("--no-merge", action="store_true", help="keep every adapter as graph nodes")
    p.add_argument("--lora-inputs", action="store_true",
                   help="LoRA A/B as graph inputs with empty defaults (ONNX Runtime multi-LoRA)")
    p.add_argument("--verify", action="store_true", help="check the file in onnxruntime on fresh shapes")
    p.add_argument("--kv-cache", action="store_true",
                   help="a decoder with past_key_values.{i}.key/.value inputs and present.* outputs; --verify "
                        "compares a greedy loop in onnxruntime with generate")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast the model before export")
    p.add_argument("--atol", type=float, help="verification tolerance (default by dtype)")
    p.add_argument("--external-data", action="store_true", help="weights in MODEL.onnx.data (automatic > 1.5 GB)")
    p.add_argument("--quantize", action="store_true",
                   help="quantized base: quantize the merged model's quantized sites with onnxruntime's tooling "
                        "(nf4: MatMulBnb4, int8: MatMulNBits) and report the error")
    p.add_argument("--max-error", type=float, default=0.05, metavar="ABS",
                   help="with --quantize: warn when max |delta logits| exceeds this (default 0.05)")

    p = sub.add_parser("export-hf", help="fold every adapter; write a transformers save_pretrained directory")
    p.add_argument("spec")
    p.add_argument("--adapters", metavar="DIR", help="adapter checkpoint to load (default: fresh adapters)")
    p.add_argument("-o", "--output", required=True, metavar="HF_DIR")

    p = sub.add_parser("export-adapter", help="write LoRA adapters as an ONNX Runtime .onnx_adapter file")
    p.add_argument("spec")
    p.add_argument("--adapters", required=True, metavar="DIR")
    p.add_argument("-o", "--output", required=True, metavar="NAME.onnx_adapter")

    p = sub.add_parser("bench", help="latency, train step and peak memory: base vs adapted vs merged, vs HF PEFT")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the spec's)")
    p.add_argument("--repeats", type=_at_least(1), help="timed runs (20; with --generate: 1 per runner, "
                   "round robin, median)")
    p.add_argument("--warmup", type=_at_least(0), default=3)
    p.add_argument("--dims", metavar="NAME=SIZE", nargs="*", default=[], help="sizes of named dims, e.g. seq=128")
    p.add_argument("--no-peft", action="store_true", help="skip the HF PEFT comparison")
    p.add_argument("--compiled", action="store_true", help="also time both train steps under torch.compile")
    p.add_argument("--threads", type=_at_least(1), help="threads PyTorch (and onnxruntime) run on (default: PyTorch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time wall clock (default) or the process's CPU time (CPU only; with --threads 1 "
                   "not inflated by other jobs)")
    p.add_argument("--quantized", choices=["nf4", "int8"], metavar="METHOD",
                   help="instead: train step and weight memory of the spec's base vs that base quantized (nf4, int8)")
    p.add_argument("--generate", action="store_true",
                   help="generation tokens/s instead: pefc (unmerged, merged), HF PEFT, base HF; batch 1 and 8")
    p.add_argument("--prompt", type=_at_least(1), default=128, help="with --generate: prompt tokens (128)")
    p.add_argument("--new-tokens", type=_at_least(1), default=256, help="with --generate: new tokens (256)")
    p.add_argument("--batches", type=_at_least(1), nargs="+", default=[1, 8], help="with --generate: (1 8)")
    p.add_argument("--no-onnx", action="store_true", help="with --generate: skip the onnxruntime decoder")

    p = sub.add_parser("import-peft", help="HF PEFT checkpoint -> DIR/spec.yaml + DIR/adapters.safetensors")
    p.add_argument("peft_dir", metavar="PEFT_DIR")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--base", metavar="DIR", help="local transformers checkpoint of the base model "
                      "(default: base_model_name_or_path of adapter_config.json, if it is a local directory)")
    base.add_argument("--model-spec", metavar="FILE",
                      help="a spec (YAML/JSON) whose `model` (and `inputs`) build the base, or just a model section")
    p.add_argument("--name", help="name of the pefc adapter (default: the method)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="dtype of the base model")

    p = sub.add_parser("export-peft", help="write an adapter checkpoint as an HF PEFT checkpoint directory")
    p.add_argument("spec")
    p.add_argument("--adapters", required=True, metavar="DIR")
    p.add_argument("-o", "--output", required=True, metavar="PEFT_DIR")
    p.add_argument("--adapter", metavar="NAME", help="the adapter to write when the spec has several")
    p.add_argument("--base-name", metavar="NAME_OR_PATH",
                   help="base_model_name_or_path to record (default: the spec's model.hf.pretrained)")

    p = sub.add_parser("demo", help="the main job end to end on a small built-in model")
    p.add_argument("--steps", type=_at_least(1), default=300)
    p.add_argument("-o", "--output", metavar="DIR",
                   help="keep the adapters, spec.json and a merged model.onnx here")
    p.add_argument("--plot", metavar="FILE", help="also draw the loss curve as a PNG image")
    _add_common_flags(sub)
    return parser


#: verbs that build the spec's model: a `model.python` spec runs its code only with --trust-code
MODEL_VERBS = ("inspect", "compile", "export", "export-adapter", "export-hf", "export-peft", "bench", "import-peft")


def _add_common_flags(sub: Any) -> None:
    """``--trust-code`` on every verb that builds a model; ``--debug`` after any verb too."""
    for name in MODEL_VERBS:
        sub.choices[name].add_argument("--trust-code", action="store_true",
                                       help="consent to import and call the spec's model.python factory "
                                            "(also: PEFC_TRUST_CODE=1); without it such a spec is refused")
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show Python tracebacks on errors")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while starting up (imports, parsing): one line, no traceback
        print("pefc: interrupted", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when a verb imports transformers
        logging.getLogger("torchao").setLevel(logging.ERROR)  # CPU builds log each CUDA kernel library they miss
    try:
        return _COMMANDS[args.command](args)
    except PefcError as exc:
        return _fail(args, str(exc), exc.exit_code)
    except BrokenPipeError:  # e.g. `pefc inspect ... | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # a path given on the command line: missing, not writable, disk full ...
        return _fail(args, _os_error(exc), 2)
    except KeyboardInterrupt:
        print(f"pefc {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in pefc or a plugin: one line, the traceback only with --debug
        return _fail(args, _internal_error(exc), 1)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """Print ``message`` as the command's error (with the traceback under --debug); return ``code``."""
    if args.debug:
        traceback.print_exc()
    print(f"pefc {args.command}: error: {message}", file=sys.stderr)
    return code


def _internal_error(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"internal error: {type(exc).__name__}{': ' + first if first else ''} (run with --debug for the traceback)"


def _os_error(exc: OSError) -> str:
    """``path: reason`` for a file-system error, e.g. ``out/adapters.safetensors: Permission denied``."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else f"{type(exc).__name__}: {reason}"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False, default=str))


@command("validate")
def _validate(args: argparse.Namespace) -> int:
    from pefc.spec import load_spec
    from pefc.trust import OPT_IN, code_note

    spec = load_spec(args.spec)
    methods = ", ".join(f"{a.name}:{a.method}" for a in spec.adapters) or "no adapters"
    print(f"{args.spec}: valid ({methods})")
    note = code_note(spec.model)
    if note:
        print(f"note: model.python: {note}; pefc runs it only with {OPT_IN}")
    return 0


@command("schema")
def _schema(args: argparse.Namespace) -> int:
    from pefc.spec import spec_schema

    _print_json(spec_schema())
    return 0


@command("plugins")
def _plugins(args: argparse.Namespace) -> int:
    from pefc.registry import default_registry

    registry = default_registry()
    rows = []
    for info in registry.plugins:
        for name in info.methods or ("-",):
            method = registry.methods.get(name)
            rows.append({"method": name, "plugin": info.name, "module": info.module,
                         "distribution": info.distribution, "version": info.version,
                         "mergeable": method.mergeable if method else None,
                         "description": method.description if method else "", "error": info.error})
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'method':<10} {'mergeable':<9} {'distribution':<22} {'module':<28} description")
    for row in rows:
        dist = f"{row['distribution']} {row['version']}" if row["distribution"] else "(not installed)"
        if row["error"]:
            print(f"{'-':<10} {'':<9} {dist:<22} {row['module']:<28} FAILED: {row['error']}")
            continue
        print(f"{row['method']:<10} {'yes' if row['mergeable'] else 'no':<9} {dist:<22} {row['module']:<28} "
              f"{row['description']}")
    return 0


@command("inspect")
def _inspect(args: argparse.Namespace) -> int:
    import pefc

    spec = pefc.load_spec(args.spec, trust_code=args.trust_code)
    if args.meta:
        plan = pefc.plan(spec)
        if args.json:
            _print_json(plan.to_dict())
        else:
            print(plan.report.table())
            print(f"\nplanned on the meta device in {plan.seconds:.1f}s: " + _plan_summary(plan))
        return 0
    report = pefc.compile(spec).parameter_report()
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.table())
    return 0


def _plan_summary(plan: Any) -> str:
    if plan.strategy == "replicated":
        stacks = ", ".join(f"{path} ({n} layers)" for path, n in plan.stacks.items())
        return f"captured the first layers of {stacks} and replicated their sites"
    return f"full capture ({plan.reason})"


@command("compile")
def _compile(args: argparse.Namespace) -> int:
    import pefc

    spec = pefc.load_spec(args.spec, trust_code=args.trust_code)
    model = pefc.compile(spec)
    out = model.save_adapters(Path(args.output))
    report = model.parameter_report()
    print(f"compiled {args.spec}: {report.trainable_params:,} trainable params "
          f"({report.percent_of_base:.4f}% of {report.base_params:,}); wrote {out}/adapters.safetensors "
          f"and {out}/spec.json")
    return 0


def _compiled_with_adapters(spec_path: str, adapters: str | None, trust_code: bool = False) -> Any:
    import pefc

    model = pefc.compile(pefc.load_spec(spec_path, trust_code=trust_code))
    if adapters:
        model.load_adapters(adapters)
    return model


@command("export")
def _export(args: argparse.Namespace) -> int:
    from pefc.export import export_onnx, refuse_unverifiable
    from pefc.source import torch_dtype
    from pefc.spec import load_spec

    spec = load_spec(args.spec)  # refuse before compiling what could not be verified
    refuse_unverifiable({torch_dtype(args.dtype or (spec.model.dtype if spec.model else "float32"))}, args.verify)
    model = _compiled_with_adapters(args.spec, args.adapters, args.trust_code)
    result = export_onnx(model, args.output, merge=not args.no_merge, verify=args.verify,
                         lora_inputs=args.lora_inputs, dtype=args.dtype, atol=args.atol,
                         external_data=True if args.external_data else None, quantize=args.quantize,
                         kv_cache=args.kv_cache)
    print(f"wrote {result.path} ({result.nodes} nodes{', external data' if result.external_data else ''}) "
          f"in {result.seconds:.1f}s; inputs {', '.join(result.inputs[:4])}"
          f"{' ...' if len(result.inputs) > 4 else ''}; outputs {', '.join(result.outputs)}")
    for shape, diff in result.verify_max_abs_diff.items():
        requantized = result.verify_requantized.get(shape)
        if requantized is not None:
            print(f"verify: onnxruntime (re-quantized) at dims {shape}: vs unmerged PyTorch max |diff| = "
                  f"{requantized['max_vs_unmerged']:.3g}, mean = {requantized['mean_vs_unmerged']:.3g}; "
                  f"vs merged float max |diff| = {requantized['max_vs_float']:.3g}, "
                  f"mean = {requantized['mean_vs_float']:.3g}")
            continue
        if args.kv_cache:
            print(f"verify: onnxruntime greedy loop = generate, token for token (batch x prompt + new {shape}); "
                  f"prefill logits max |diff| = {diff:.3g}")
            continue
        print(f"verify: onnxruntime vs PyTorch at dims {shape}: max |diff| = {diff:.3g}")
    if result.quantization_error is not None:
        from pefc.quant_merge import describe_error

        print(describe_error(result.quantization_error, args.max_error,
                             observed=max(result.verify_max_abs_diff.values(), default=0.0)))
    return 0


@command("export-hf")
def _export_hf(args: argparse.Namespace) -> int:
    model = _compiled_with_adapters(args.spec, args.adapters, args.trust_code)
    out = model.save_merged(args.output)
    print(f"wrote {out}/config.json, {out}/model.safetensors and {out}/generation_config.json "
          "(load with transformers AutoModelForCausalLM.from_pretrained(DIR))")
    return 0


@command("export-adapter")
def _export_adapter(args: argparse.Namespace) -> int:
    from pefc.export import export_lora_adapter

    model = _compiled_with_adapters(args.spec, args.adapters, args.trust_code)
    names = export_lora_adapter(model, args.output)
    print(f"wrote {args.output}: {len(names)} LoRA tensors")
    return 0


@command("bench")
def _bench(args: argparse.Namespace) -> int:
    import torch

    import pefc
    from pefc.bench import run_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.generate:
        from pefc.genbench import run_generate_bench, table

        result = run_generate_bench(pefc.load_spec(args.spec, trust_code=args.trust_code), device=args.device,
                                    compare_peft=not args.no_peft, prompt=args.prompt,
                                    new_tokens=args.new_tokens, batches=tuple(args.batches), onnx=not args.no_onnx,
                                    repeats=args.repeats or 1, clock=args.clock)
        _print_json(result) if args.json else print(table(result))
        return 0
    repeats = args.repeats or 20
    dims = {}
    for item in args.dims:
        name, _, size = item.partition("=")
        if not size.isdigit() or int(size) < 1:
            raise pefc.SpecError(f"--dims expects NAME=SIZE with a positive size, got {item!r}")
        dims[name] = int(size)
    spec = pefc.load_spec(args.spec, trust_code=args.trust_code)
    if args.quantized:
        from pefc.bench import run_quant_bench

        report = run_quant_bench(spec, args.quantized, device=args.device, repeats=repeats, warmup=args.warmup,
                                 dims=dims, clock=args.clock)
    elif spec.select is not None:  # many adapters in one batch: docs/selection.md
        from pefc.selbench import run_selection_bench

        report = run_selection_bench(spec, device=args.device, repeats=repeats, warmup=args.warmup, dims=dims,
                                     compare_peft=not args.no_peft, clock=args.clock)
    else:
        report = run_bench(spec, device=args.device, repeats=repeats, warmup=args.warmup, dims=dims,
                           compare_peft=not args.no_peft, compiled_step=args.compiled, clock=args.clock)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.table())
    return 0


@command("import-peft")
def _import_peft(args: argparse.Namespace) -> int:
    from pefc.atomic import write_text
    from pefc.interop import peft as interop

    model_spec, inputs = _base_model_spec(args)
    model = interop.load(args.peft_dir, model_spec=model_spec, inputs=inputs, name=args.name)
    out = model.save_adapters(Path(args.output))
    data = json.loads(model.pefc.spec.to_json())
    write_text(out / "spec.yaml", f"# imported from the HF PEFT checkpoint {args.peft_dir} by `pefc import-peft`\n"
               + _yaml(data))
    adapter = model.pefc.spec.adapters[0]
    report = model.parameter_report().adapters[0]
    print(f"imported {args.peft_dir}: adapter {adapter.name!r} ({adapter.method}, {len(report.sites)} sites, "
          f"{report.params:,} params); wrote {out}/spec.yaml and {out}/adapters.safetensors")
    return 0


def _base_model_spec(args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None]:
    """The import's ``model`` section and optional ``inputs``, from --base, --model-spec or the checkpoint."""
    from pydantic import ValidationError

    from pefc.errors import SpecError
    from pefc.interop.peft import local_base_model
    from pefc.spec import ModelSpec, read_spec_data
    from pefc.trust import grant

    inputs = None
    if args.base:
        data: Any = {"hf": {"pretrained": str(Path(args.base).resolve())}}
    elif args.model_spec:
        data, _ = read_spec_data(args.model_spec)
        if isinstance(data, dict) and "model" in data:
            data, inputs = data["model"], data.get("inputs")
    else:
        data = local_base_model(args.peft_dir).model_dump(mode="json", by_alias=True, exclude_none=True)
    if args.dtype:
        data = {**data, "dtype": args.dtype} if isinstance(data, dict) else data
    try:
        model_spec = ModelSpec.model_validate(data)
    except ValidationError as exc:
        issues = [f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise SpecError("not a valid model section", source=args.model_spec or args.base, issues=issues) from None
    grant(model_spec, args.trust_code)
    if args.model_spec:
        model_spec._origin.folder = str(Path(args.model_spec).resolve().parent)
    return model_spec, inputs


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


@command("export-peft")
def _export_peft(args: argparse.Namespace) -> int:
    from pefc.interop import peft as interop

    model = _compiled_with_adapters(args.spec, args.adapters, args.trust_code)
    out = interop.save(model, args.output, adapter=args.adapter, base_model_name_or_path=args.base_name)
    print(f"wrote {out}/adapter_config.json and {out}/adapter_model.safetensors "
          "(load with peft.PeftModel.from_pretrained(base, DIR))")
    return 0


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from pefc.demo import run_demo

    run_demo(steps=args.steps, out_dir=args.output, plot=args.plot)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
